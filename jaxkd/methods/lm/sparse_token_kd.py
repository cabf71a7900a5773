"""Token-level KD against the teacher's top-k as a method: live or from an offline cache, with a tail bucket."""

from __future__ import annotations

from jaxkd import losses
from jaxkd.checks import check_choice, check_int, check_temperature
from jaxkd.losses.lm.tokens import shift_logits
from jaxkd.methods.base import LossInputs, Method, Weight, check_roles, stateless_method
from jaxkd.methods.registry import LOGIT_ROLES, register
from jaxkd.methods.lm.tokens import LM_KEYS, lm_targets

__all__ = ["sparse_token_kd"]


@register(
    "sparse_token_kd", inputs="tokens",
    paper="token-level KD against the teacher's top-k log-probabilities plus a tail bucket (offline teacher signals)",
    losses=("topk_teacher", "sparse_forward_kl"),
    contract=LOGIT_ROLES,
)
def sparse_token_kd(
    *,
    k: int = 8,
    tail: str = "bucket",
    temperature: float = 1.0,
    cached: bool = False,
    indices_key: str = "topk_indices",
    log_probs_key: str = "topk_log_probs",
    student: str = "student",
    teacher: str = "teacher",
    weight: Weight = 1.0,
    name: str = "sparse_token_kd",
) -> Method:
    """Token-level forward KL against a sparse teacher: its top-``k`` next-token log-probabilities (under
    the full softmax at ``T``) and the remaining mass as one tail category (``tail="bucket"``), or both
    renormalized over the top-k (``tail="drop"``) — :func:`jaxkd.losses.sparse_forward_kl` per token.

    Live (default): the top-k of the teacher's logits in the step. ``cached=True``: read
    ``batch[indices_key]`` / ``batch[log_probs_key]`` (``[B, T, k_stored]``, per *input* position, as
    :func:`jaxkd.data.text.teacher_cache.cache_teacher_topk` writes them), so no teacher runs at all; with the
    same ``k`` the two give the same loss and gradients (tested). ``k`` may be smaller than the stored
    number (the first ``k``, in decreasing probability).

    ``student``/``teacher`` name the participants in the two roles, as in :func:`token_kd` (live, the
    teacher's top-k is computed from its gradient-stopped logits; cached, no teacher is read).
    """
    check_int("k", k, low=1)
    check_roles(name, student, teacher)
    check_temperature("temperature", temperature)
    check_choice("tail", tail, ("drop", "bucket"))

    def compute(inputs: LossInputs, rng):
        _, target_mask, normalizer = lm_targets(inputs.batch)
        if cached:
            indices, log_probs = inputs.batch[indices_key], inputs.batch[log_probs_key]
            if k > indices.shape[-1]:
                raise ValueError(f"{name!r}: k={k} is larger than the {indices.shape[-1]} cached entries per token")
            indices, log_probs = indices[..., :k], log_probs[..., :k]
        else:
            indices, log_probs = losses.topk_teacher(inputs.target(teacher, method=name).logits, k,
                                                     temperature=temperature)
        zs = shift_logits(inputs.output(student, method=name).logits)
        return losses.sparse_forward_kl(zs, indices[:, :-1], log_probs[:, :-1], temperature=temperature, tail=tail,
                                        mask=target_mask, normalizer=normalizer)

    return stateless_method(name, compute, weight=weight, participants=(student,) if cached else (student, teacher), trained=(student,),
                            batch_keys=LM_KEYS + ((indices_key, log_probs_key) if cached else ()))
