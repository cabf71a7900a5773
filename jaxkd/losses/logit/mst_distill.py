"""MST-Distill's routed distillation: KD from the ``k`` specialized teachers a router picks per example.

Li, Yang, Chen, Dong, Chen & Wang, "MST-Distill: Mixture of Specialized Teachers for Cross-Modal Knowledge
Distillation", ACM MM 2025; official code ``Gray-OREO/MST-Distill`` (``KD_methods/MST.py``:
``k_ways_MTGdistillation_detached``, ``distillation_loss``, ``load_balancing_loss``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxkd.checks import check_choice, check_int, check_same_logits, check_temperature
from jaxkd.losses.core import Array, kl_from_log_probs, log_softmax, per_example_loss, to_float

__all__ = ["mst_distill"]


@per_example_loss
def mst_distill(
    student_logits: Array,
    teacher_logits: Array,
    router_probs: Array,
    *,
    k: int = 1,
    temperature: float = 4.0,
) -> Array:
    """The top-``k`` routed KD of MST-Distill's third stage, per example.

    ``teacher_logits`` ``[..., N, C]`` stacks the ``N`` specialized teachers, ``router_probs`` ``[..., N]`` the
    router's softmax; with ``S`` the ``k`` teachers of largest router probability (``torch.topk``; ties go to
    the lower index) and ``p = softmax(z / T)``::

        L = (1 / k) · Σ_{i ∈ S} T² · KL(p_{t_i} ‖ p_s)

    The router probabilities only *select* teachers: the selection is piecewise constant, so no gradient
    reaches them through this term (in the official code the router learns from the load-balancing term
    only). A NaN in any teacher's logits makes the example's value NaN, picked or not. Official ``T = 4``, ``k = 1``.

    Args:
      student_logits: ``[..., C]``.
      teacher_logits: ``[..., N, C]``, gradient-stopped by the caller (the official code detaches them).
      router_probs: ``[..., N]``.
      k: how many teachers each example learns from, ``1 <= k <= N``.
      temperature: ``T``.
    """
    check_temperature("temperature", temperature)
    if np.ndim(teacher_logits) != np.ndim(student_logits) + 1:
        raise ValueError(
            f"teacher_logits must stack the teachers as [..., N, C] next to student logits [..., C], got shapes "
            f"{np.shape(teacher_logits)} and {np.shape(student_logits)}"
        )
    check_same_logits(student_logits, teacher_logits[..., 0, :])
    num_teachers = np.shape(teacher_logits)[-2]
    if np.shape(router_probs) != np.shape(teacher_logits)[:-1]:
        raise ValueError(
            f"router_probs must be [..., N] = {np.shape(teacher_logits)[:-1]}, got {np.shape(router_probs)}"
        )
    k = check_int("k", k, low=1)
    if k > num_teachers:
        raise ValueError(f"k={k} exceeds the number of teachers {num_teachers}")
    log_s = log_softmax(student_logits, temperature)
    log_t = log_softmax(teacher_logits, temperature)
    per_teacher = kl_from_log_probs(log_t, log_s[..., None, :])  # [..., N]
    _, chosen = jax.lax.top_k(jax.lax.stop_gradient(to_float(router_probs)), k)  # [..., k]
    selected = jnp.take_along_axis(per_teacher, chosen, axis=-1)
    value = temperature**2 * jnp.mean(selected, axis=-1)
    # A NaN (or +inf) teacher the router did not pick still makes the example NaN: corrupted inputs must show,
    # whatever the routing of the step.
    return jnp.where(jnp.any(jnp.isnan(per_teacher), axis=-1), jnp.nan, value)


def load_balancing(router_probs: Array, *, mode: str = "kl", mask: Array | None = None) -> Array:
    """The router's load-balancing term (official ``load_balancing_loss``), a batch-level scalar.

    With ``ḡ = mean_b router_probs[b]`` (over the real examples) and ``N`` teachers:

    * ``mode="kl"`` (official default): ``nn.KLDivLoss(reduction="batchmean")(log ḡ, u)`` with ``u = 1/N``;
      on a 1-D input ``batchmean`` divides by its length, so the value is ``(1/N) · KL(u ‖ ḡ)``;
    * ``mode="cv"``: the coefficient of variation of the summed probabilities, ``std(Σ_b g_b) / mean(Σ_b g_b)``,
      with PyTorch's unbiased ``std``.

    Not a public loss: router probabilities are not class logits (an excluded teacher has no meaning).
    """
    check_choice("mode", mode, ("kl", "cv"))
    g = to_float(router_probs)
    n = g.shape[-1]
    weights = jnp.ones(g.shape[0], g.dtype) if mask is None else jnp.asarray(mask, g.dtype)
    importance = jnp.sum(g * weights[:, None], axis=0)  # padding examples route nothing
    if mode == "kl":
        mean = importance / jnp.maximum(jnp.sum(weights), 1.0)
        u = 1.0 / n
        return jnp.sum(u * (jnp.log(u) - jnp.log(mean))) / n
    return jnp.std(importance, ddof=1) / jnp.mean(importance)
