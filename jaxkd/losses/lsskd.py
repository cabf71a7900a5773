"""LSSKD: self-distillation between a network's final classifier and auxiliary classifiers on its stages."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxkd.checks import check_labels, check_nonnegative, check_temperature
from jaxkd.losses.classification import cross_entropy
from jaxkd.losses.core import Array, kl_from_log_probs, log_softmax, masked_logsumexp, per_example_loss

__all__ = ["lsskd", "lsskd_terms"]


def _check(final_logits, aux_logits, final_targets, aux_targets, labels, temperature):
    check_temperature("temperature", temperature)
    if np.shape(final_targets) != np.shape(final_logits) or np.shape(aux_targets) != np.shape(aux_logits):
        raise ValueError(
            f"the targets must have the logits' shapes: final {np.shape(final_logits)} vs {np.shape(final_targets)}, "
            f"auxiliary {np.shape(aux_logits)} vs {np.shape(aux_targets)}"
        )
    if np.ndim(aux_logits) < 2 or np.shape(aux_logits)[:-2] != np.shape(final_logits)[:-1] or (
        np.shape(aux_logits)[-1] != np.shape(final_logits)[-1]
    ):
        raise ValueError(
            "aux_logits must stack the auxiliary classifiers before the class axis, [..., L, C] for final "
            f"logits [..., C]; got aux_logits {np.shape(aux_logits)} and final_logits {np.shape(final_logits)}"
        )
    check_labels(labels, final_logits)


@per_example_loss
def lsskd_terms(
    final_logits: Array, aux_logits: Array, final_targets: Array, aux_targets: Array, labels: Array, *,
    temperature: float = 3.0,
):
    """LSSKD's three terms per example, ``(ce_aux, kd_aux, kd_final)`` (see :func:`lsskd`)."""
    _check(final_logits, aux_logits, final_targets, aux_targets, labels, temperature)
    num_aux = np.shape(aux_logits)[-2]
    t2 = temperature**2
    ce_aux = sum(cross_entropy(aux_logits[..., l, :], labels, reduction="none") for l in range(num_aux))
    log_q = log_softmax(aux_logits, temperature)  # [..., L, C]
    log_p = log_softmax(final_logits, temperature)  # [..., C]
    target_final = log_softmax(final_targets, temperature)
    kd_aux = t2 * jnp.sum(kl_from_log_probs(target_final[..., None, :], log_q), axis=-1)
    # The auxiliary classifiers' mean prediction, as the final classifier's target.
    log_mean_q = masked_logsumexp(log_softmax(aux_targets, temperature), axis=-2) - jnp.log(num_aux)
    kd_final = t2 * kl_from_log_probs(log_mean_q, log_p)
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
) -> Array:
    """Layered self-distillation through auxiliary classifiers (LSSKD: Dahri, Memon, Yu, Idris, Khan, Ahmad,
    Shoman, Aziz & Qureshi, "A Layered Self-Supervised Knowledge Distillation Framework for Efficient
    Multimodal Learning on the Edge", arXiv:2506.07055, 2025), per example.

    A network with final logits ``z`` and auxiliary classifiers ``a_1..a_L`` on its intermediate feature
    maps (no teacher network); ``p = softmax(z/T)``, ``q_l = softmax(a_l/T)``, ``sg`` = stop-gradient:

    ``L = α Σ_l CE(a_l, y) + β T² Σ_l KL(sg(p) ‖ q_l) + γ T² KL(sg(q̄) ‖ p)``,  ``q̄ = (1/L) Σ_l q_l``

    where the stop-gradient targets are the caller's: ``final_targets`` and ``aux_targets`` are the same
    logits, ``jax.lax.stop_gradient``-ed in training (as :func:`jaxkd.losses.dml` takes them), so that
    each classifier is pulled towards the others and never the target towards its learner.

    every auxiliary classifier learns the labels and the final classifier's distribution (the transfer
    from the deepest stage down to each stage), and the final classifier learns the auxiliary classifiers'
    mean distribution (back up). The cross-entropy of the final classifier itself is not included
    (``"ce + lsskd"``).

    Assumptions (no official code is public; the abstract gives the mechanism, not the formula): the
    paper's auxiliary classifiers predict a *self-supervised augmented* distribution over (class,
    input transformation) pairs, following HSAKD (Yang et al., IJCAI 2021); here they predict the classes
    of the untransformed input only (the one-transformation case), and the stage-to-stage transfer is the
    two-way KL above. ``T = 3`` is HSAKD's temperature.

    Args:
      final_logits: ``[..., C]``, the network's own classifier.
      aux_logits: ``[..., L, C]``, the auxiliary classifiers stacked before the class axis.
      final_targets, aux_targets: the same logits as targets (``stop_gradient`` of them in training).
      labels: integer labels ``[...]``.
      temperature: ``T``.
      aux_ce_weight, aux_kd_weight, final_kd_weight: ``α``, ``β``, ``γ`` (each ``>= 0``).
    """
    for name, value in (("aux_ce_weight", aux_ce_weight), ("aux_kd_weight", aux_kd_weight),
                        ("final_kd_weight", final_kd_weight)):
        check_nonnegative(name, value)
    ce_aux, kd_aux, kd_final = lsskd_terms(
        final_logits, aux_logits, final_targets, aux_targets, labels, temperature=temperature, reduction="none"
    )
    return aux_ce_weight * ce_aux + aux_kd_weight * kd_aux + final_kd_weight * kd_final
