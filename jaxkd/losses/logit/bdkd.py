"""BD-KD (Amara, Sepahvand, Meyer, Gross & Clark, "BD-KD: Balancing the Divergences for Online Knowledge
Distillation", 2022): entropy-balanced forward and reverse KL."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxkd.checks import check_same_logits, check_temperature
from jaxkd.losses.core import Array, log_softmax, per_example_loss, probs, zero_where_masked
from jaxkd.losses.logit.divergences import forward_kl, reverse_kl

__all__ = ["bdkd", "bdkd_terms", "bdkd_weights"]


def _entropy(logits: Array, temperature: float) -> Array:
    log_p = log_softmax(logits, temperature)
    return -jnp.sum(probs(log_p) * zero_where_masked(log_p), axis=-1)


def bdkd_weights(student_logits: Array, teacher_logits: Array, *, temperature: float = 4.0) -> tuple[Array, Array]:
    """BD-KD's per-example ``(w_forward, w_reverse)`` (ASSUMPTION — see :func:`bdkd`), gradient-stopped.

    ``w_forward = H_t / (H_s + H_t)`` and ``w_reverse = H_s / (H_s + H_t)`` with ``H`` the entropies of
    ``softmax(z/T)``; both 0.5 when ``H_s + H_t = 0``.
    """
    check_temperature("temperature", temperature)
    check_same_logits(student_logits, teacher_logits)
    h_s = jax.lax.stop_gradient(_entropy(student_logits, temperature))
    h_t = jax.lax.stop_gradient(_entropy(teacher_logits, temperature))
    total = h_s + h_t
    w_forward = jnp.where(total > 0, h_t / jnp.where(total > 0, total, 1.0), 0.5)
    w_reverse = jnp.where(total > 0, h_s / jnp.where(total > 0, total, 1.0), 0.5)
    return w_forward, w_reverse


@per_example_loss
def bdkd_terms(student_logits: Array, teacher_logits: Array, *, temperature: float = 4.0) -> tuple[Array, Array]:
    """BD-KD's weighted ``(T²·w_f·KL(p_t‖p_s), T²·w_r·KL(p_s‖p_t))`` per example; :func:`bdkd` is their sum."""
    w_f, w_r = bdkd_weights(student_logits, teacher_logits, temperature=temperature)
    scale = temperature**2
    forward = forward_kl(student_logits, teacher_logits, temperature=temperature, reduction="none")
    reverse = reverse_kl(student_logits, teacher_logits, temperature=temperature, reduction="none")
    return scale * w_f * forward, scale * w_r * reverse


@per_example_loss
def bdkd(student_logits: Array, teacher_logits: Array, *, temperature: float = 4.0) -> Array:
    """Balanced-divergence KD, the student's loss (Amara, Sepahvand, Meyer, Gross & Clark, "BD-KD:
    Balancing the Divergences for Online Knowledge Distillation", 2022, arXiv 2212.12965).

    ``L = T² · [w_f · KL(p_t ‖ p_s) + w_r · KL(p_s ‖ p_t)]`` per example, ``p = softmax(z/T)``, with
    per-example weights from :func:`bdkd_weights`:
    ``w_f = H_t/(H_s + H_t)``, ``w_r = H_s/(H_s + H_t)`` (gradient-stopped).

    From the paper's abstract: BD-KD adaptively balances forward and reverse KL with **sample-wise
    weights** at the level of the student's distillation loss, to improve the student's accuracy and
    calibration; a third-party summary of the paper (sciencestack.ai, 2212.12965) adds that the weighting
    is "guided by the entropy gap between teacher and student predictions" and that the teacher's
    objective (online setting) uses reverse KL as a regularizer. The paper's method section, any code and
    the defaults could not be read, and no official repository is known.

    **The exact weighting is an assumption:** relative entropies. When the student is more confident than
    the teacher (``H_s < H_t``) the mass-covering forward KL gets more weight (it raises the student's
    entropy); when the student is less confident, the mode-seeking reverse KL does. Equal entropies give
    the symmetric ``(KL_f + KL_r)/2``. The ``T²`` factor and the default ``T = 4`` are also assumptions
    (Hinton's convention). This is the offline half (a fixed teacher); in online KD the teacher's own
    loss (CE + reverse-KL regularizer) is a separate method on the teacher.
    """
    forward, reverse = bdkd_terms(student_logits, teacher_logits, temperature=temperature, reduction="none")
    return forward + reverse
