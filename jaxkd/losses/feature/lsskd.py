"""LSSKD: self-distillation between a network's final classifier and auxiliary classifiers on its stages."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxkd.checks import check_int, check_labels, check_nonnegative, check_temperature
from jaxkd.losses.logit.classification import cross_entropy
from jaxkd.losses.core import Array, kl_from_log_probs, log_softmax, masked_logsumexp, per_example_loss, to_float

__all__ = ["lsskd", "lsskd_terms"]


def _check(final_logits, aux_logits, final_targets, aux_targets, labels, temperature, transformations):
    check_temperature("temperature", temperature)
    m = check_int("transformations", transformations, low=1)
    if np.shape(final_targets) != np.shape(final_logits) or np.shape(aux_targets) != np.shape(aux_logits):
        raise ValueError(
            f"the targets must have the logits' shapes: final {np.shape(final_logits)} vs {np.shape(final_targets)}, "
            f"auxiliary {np.shape(aux_logits)} vs {np.shape(aux_targets)}"
        )
    f_shape, a_shape = np.shape(final_logits), np.shape(aux_logits)
    if m == 1:
        ok = len(a_shape) >= 2 and a_shape[:-2] == f_shape[:-1] and a_shape[-1:] == f_shape[-1:]
        expected = "[..., L, C]"
    else:
        ok = (len(a_shape) >= 3 and a_shape[:-3] == f_shape[:-1] and a_shape[-2] == m
              and len(f_shape) >= 1 and a_shape[-1] == f_shape[-1] * m)
        expected = f"[..., L, M, C·M] with M = transformations = {m}"
    if not ok:
        raise ValueError(
            f"aux_logits must stack the auxiliary classifiers before the class axis, {expected} for final "
            f"logits [..., C]; got aux_logits {a_shape} and final_logits {f_shape}"
        )
    check_labels(labels, final_logits)
    return m


def _joint(aux_logits: Array, m: int) -> Array:
    """``[..., L, C]`` (one transformation) or ``[..., L, M, C·M]`` as ``[..., L, M, C·M]``."""
    return aux_logits[..., None, :] if m == 1 else aux_logits


def _aggregate(joint: Array, m: int) -> Array:
    """SLA's aggregated class logits ``z̄_c = (1/M) Σ_j z(t_j x)_{c·M + j}``: ``[..., L, M, C·M] -> [..., L, C]``."""
    x = to_float(joint)
    x = x.reshape(*x.shape[:-1], x.shape[-1] // m, m)  # [..., L, M(j), C, M(j')]
    return jnp.mean(jnp.diagonal(x, axis1=-3, axis2=-1), axis=-1)  # the entries j' = j: [..., L, C]


@per_example_loss
def lsskd_terms(
    final_logits: Array, aux_logits: Array, final_targets: Array, aux_targets: Array, labels: Array, *,
    temperature: float = 3.0, transformations: int = 1,
):
    """LSSKD's three terms per example, ``(ce_aux, kd_aux, kd_final)`` (see :func:`lsskd`)."""
    m = _check(final_logits, aux_logits, final_targets, aux_targets, labels, temperature, transformations)
    joint = _joint(aux_logits, m)  # [..., L, M, C·M]
    t2 = temperature**2
    # The joint (class, transformation) label of copy j is y·M + j (HSAKD's layout; y itself when M = 1).
    labels = jnp.asarray(labels)
    joint_labels = labels[..., None] * m + jnp.arange(m, dtype=labels.dtype)  # [..., M]
    joint_labels = jnp.broadcast_to(joint_labels[..., None, :], joint.shape[:-1])  # [..., L, M]
    ce = cross_entropy(joint, joint_labels, reduction="none")  # [..., L, M]
    ce_aux = jnp.sum(jnp.mean(ce, axis=-1), axis=-1)
    log_q = log_softmax(_aggregate(joint, m), temperature)  # [..., L, C]
    log_p = log_softmax(final_logits, temperature)  # [..., C]
    target_final = log_softmax(final_targets, temperature)
    kd_aux = t2 * jnp.sum(kl_from_log_probs(target_final[..., None, :], log_q), axis=-1)
    # The auxiliary classifiers' mean (aggregated) prediction, as the final classifier's target.
    num_aux = joint.shape[-3]
    log_mean_q = masked_logsumexp(log_softmax(_aggregate(_joint(aux_targets, m), m), temperature), axis=-2)
    kd_final = t2 * kl_from_log_probs(log_mean_q - jnp.log(num_aux), log_p)
    return ce_aux, kd_aux, kd_final


@per_example_loss
def lsskd(
    final_logits: Array,
    aux_logits: Array,
    final_targets: Array,
    aux_targets: Array,
    labels: Array,
    *,
    temperature: float = 3.0,
    aux_ce_weight: float = 1.0,
    aux_kd_weight: float = 1.0,
    final_kd_weight: float = 1.0,
    transformations: int = 1,
) -> Array:
    """Layered self-supervised self-distillation through auxiliary classifiers (LSSKD: Dahri, Memon, Yu,
    Idris, Khan, Ahmad, Shoman, Aziz & Qureshi, "A Layered Self-Supervised Knowledge Distillation Framework
    for Efficient Multimodal Learning on the Edge", arXiv:2506.07055, 2025), per example.

    A network with final logits ``z`` (on the untransformed input ``x``) and auxiliary classifiers
    ``a_1..a_L`` on its intermediate feature maps (no teacher network). As in the paper, following
    HSAKD (Yang, An, Cai & Xu, IJCAI 2021) and SLA (Lee, Hwang & Shin, "Self-supervised Label Augmentation
    via Input Transformations", ICML 2020), each auxiliary classifier predicts the *self-supervised
    augmented* label: the joint ``(class, transformation)`` pair over ``M`` input transformations
    ``t_1..t_M`` (``C·M`` outputs, joint index ``c·M + j`` as in HSAKD's code), on every transformed copy
    ``t_j(x)``. Its class prediction is SLA's aggregate ``ā_{l,c} = (1/M) Σ_j a_l(t_j x)_{c·M + j}``. With
    ``p = softmax(z/T)``, ``q_l = softmax(ā_l/T)``, ``sg`` = stop-gradient:

    ``L = α Σ_l (1/M) Σ_j CE(a_l(t_j x), y·M + j) + β T² Σ_l KL(sg(p) ‖ q_l) + γ T² KL(sg(q̄) ‖ p)``,
    ``q̄ = (1/L) Σ_l q_l``

    where the stop-gradient targets are the caller's: ``final_targets`` and ``aux_targets`` are the same
    logits, ``jax.lax.stop_gradient``-ed in training (as :func:`jaxkd.losses.dml` takes them), so that
    each classifier is pulled towards the others and never the target towards its learner: every auxiliary
    classifier learns the joint labels and the final classifier's distribution (the transfer from the
    deepest stage down to each stage), and the final classifier learns the auxiliary classifiers' mean
    aggregated distribution (back up). The cross-entropy of the final classifier itself is not included
    (``"ce + lsskd"``). With ``transformations = 1`` the auxiliary classifiers predict the classes of the
    input itself (``ā_l = a_l(x)``, ``CE(a_l, y)``).

    Assumptions (no official code is public; the abstract and third-party summaries give the mechanism,
    not the formula): the one-to-one transfer between stages is the two-way KL above on the aggregated
    class distributions; the paper's epoch-wise (progressive, PS-KD-like) targets are not modelled (the
    targets are the current step's predictions). ``T = 3`` is HSAKD's temperature; the
    :func:`jaxkd.methods.lsskd` method uses ``M = 4`` rotations (0°, 90°, 180°, 270°), HSAKD's and SLA's
    transformations.

    Args:
      final_logits: ``[..., C]``, the network's own classifier on the untransformed input.
      aux_logits: ``[..., L, C]`` (``transformations = 1``) or ``[..., L, M, C·M]``: the auxiliary
        classifiers' joint logits on each of the ``M`` transformed copies, classifiers before copies.
      final_targets, aux_targets: the same logits as targets (``stop_gradient`` of them in training).
      labels: integer class labels ``[...]``.
      temperature: ``T``.
      aux_ce_weight, aux_kd_weight, final_kd_weight: ``α``, ``β``, ``γ`` (each ``>= 0``).
      transformations: ``M >= 1``.
    """
    for name, value in (("aux_ce_weight", aux_ce_weight), ("aux_kd_weight", aux_kd_weight),
                        ("final_kd_weight", final_kd_weight)):
        check_nonnegative(name, value)
    ce_aux, kd_aux, kd_final = lsskd_terms(
        final_logits, aux_logits, final_targets, aux_targets, labels, temperature=temperature,
        transformations=transformations, reduction="none",
    )
    return aux_ce_weight * ce_aux + aux_kd_weight * kd_aux + final_kd_weight * kd_final
