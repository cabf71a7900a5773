"""Forward KL against the teacher's top-k classes (online, or stored offline) as a method."""

from __future__ import annotations

import jax

from jaxkd import losses
from jaxkd.checks import check_choice, check_int, check_temperature
from jaxkd.methods.base import LossInputs, Method, Weight, check_roles, require, stateless_method
from jaxkd.methods.registry import LOGIT_ROLES, register

__all__ = ["sparse_forward_kl"]


@register(
    "sparse_forward_kl", example="k=2",
    paper="top-k / sparse teacher (offline top-k logits, with a tail bucket or renormalized)",
    losses=("topk_teacher", "sparse_forward_kl"),
    contract=LOGIT_ROLES,
)
def sparse_forward_kl(
    *,
    k: int | None = None,
    tail: str = "drop",
    temperature: float = 1.0,
    student: str = "student",
    teacher: str = "teacher",
    weight: Weight = 1.0,
    name: str = "sparse_forward_kl",
    indices_key: str | None = None,
    log_probs_key: str | None = None,
) -> Method:
    """Forward KL against the teacher's top-``k`` distribution, no ``T²`` (:func:`jaxkd.losses.sparse_forward_kl`).

    Online (default): the top-``k`` classes of the teacher's logits at temperature ``T``
    (:func:`jaxkd.losses.topk_teacher`). Offline: with ``indices_key`` and ``log_probs_key``, the stored
    ``batch[indices_key]`` / ``batch[log_probs_key]`` (``[..., k_stored]``, full-vocabulary teacher
    log-probabilities computed at the same ``T``, sorted by decreasing probability as
    :func:`~jaxkd.losses.topk_teacher` returns them); then no teacher is needed, and ``k`` (if given) keeps
    the first ``k`` stored entries. ``tail`` is ``"drop"`` (renormalize both over the top-k set) or
    ``"bucket"`` (one extra tail category), as in DistillKit's sparse KL. Registry name ``"sparse_forward_kl"``.
    ``student``/``teacher`` name the participants in the two roles, as in :func:`~jaxkd.methods.kd` (the
    teacher's logits are a gradient-stopped target; offline, no teacher is read).
    """
    check_temperature("temperature", temperature)
    check_choice("tail", tail, ("drop", "bucket"))
    check_roles(name, student, teacher)
    if (indices_key is None) != (log_probs_key is None):
        raise ValueError("sparse_forward_kl needs both indices_key and log_probs_key (offline top-k) or neither (online)")
    offline = indices_key is not None
    if k is not None:
        k = check_int("k", k, low=1)
    if not offline and k is None:
        raise ValueError("sparse_forward_kl needs k (the number of teacher classes to keep) unless it reads stored top-k")

    def compute(inputs: LossInputs, rng: jax.Array) -> jax.Array:
        if offline:
            indices = require(inputs.batch, indices_key, method=name)
            log_probs = require(inputs.batch, log_probs_key, method=name)
            if k is not None:
                stored = indices.shape[-1]
                if k > stored:
                    raise ValueError(
                        f"k={k} is larger than the {stored} stored top-k entries in batch[{indices_key!r}]"
                    )
                indices, log_probs = indices[..., :k], log_probs[..., :k]
        else:
            indices, log_probs = losses.topk_teacher(inputs.target(teacher, method=name).logits, k,
                                                     temperature=temperature)
        return losses.sparse_forward_kl(
            inputs.output(student, method=name).logits, indices, log_probs, temperature=temperature, tail=tail, mask=inputs.example_mask
        )

    return stateless_method(
        name, compute, weight=weight, participants=(student,) if offline else (student, teacher),
        trained=(student,), batch_keys=(indices_key, log_probs_key) if offline else (),
    )
