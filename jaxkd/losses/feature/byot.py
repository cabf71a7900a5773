"""Be Your Own Teacher (BYOT): self-distillation from a network's deepest classifier into shallow classifiers on
its stages (Zhang, Song, Gao, Chen, Bao & Ma, "Be Your Own Teacher: Improve the Performance of Convolutional
Neural Networks via Self Distillation", ICCV 2019).

Checked against the authors' code (``ArchipLab-LinfengZhang/pytorch-self-distillation-final``, ``train.py``);
where it differs from the paper is said in :func:`byot`.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxkd.checks import check_in_range, check_labels, check_nonnegative, check_temperature
from jaxkd.losses.core import Array, kl_from_log_probs, log_softmax, per_example_loss, to_float
from jaxkd.losses.logit.classification import cross_entropy

__all__ = ["byot", "byot_terms"]


def _check(aux_logits, aux_features, final_logits, final_features, labels, temperature):
    check_temperature("temperature", temperature)
    a, f = np.shape(aux_logits), np.shape(final_logits)
    h, g = np.shape(aux_features), np.shape(final_features)
    if len(a) < 2 or a[:-2] != f[:-1] or a[-1] != f[-1]:
        raise ValueError(f"aux_logits must be [..., L, C] for final logits [..., C]; got {a} and {f}")
    if len(h) < 2 or h[:-2] != g[:-1] or h[-2] != a[-2] or h[-1] != g[-1]:
        raise ValueError(
            f"aux_features must be [..., L, D] (one row per auxiliary classifier, L = {a[-2]}) for final features "
            f"[..., D] with the logits' leading axes; got {h} and {g}"
        )
    check_labels(labels, final_logits)


@per_example_loss
def byot_terms(
    aux_logits: Array, aux_features: Array, final_logits: Array, final_features: Array, labels: Array, *,
    temperature: float = 3.0,
):
    """BYOT's three terms per example, each summed over the ``L`` shallow classifiers: ``(ce, kd, hint)`` =
    ``(Σ_i CE(z_i, y), Σ_i KL(softmax(z_C/T) ‖ softmax(z_i/T)), Σ_i ‖h_i − f_C‖²)`` (see :func:`byot`)."""
    _check(aux_logits, aux_features, final_logits, final_features, labels, temperature)
    labels = jnp.asarray(labels)
    ce = jnp.sum(cross_entropy(aux_logits, jnp.broadcast_to(labels[..., None], np.shape(aux_logits)[:-1]),
                               reduction="none"), axis=-1)
    target = log_softmax(final_logits, temperature)[..., None, :]
    kd = jnp.sum(kl_from_log_probs(target, log_softmax(aux_logits, temperature)), axis=-1)
    diff = to_float(aux_features) - to_float(final_features)[..., None, :]
    hint = jnp.sum(diff * diff, axis=(-2, -1))
    return ce, kd, hint


@per_example_loss
def byot(
    aux_logits: Array,
    aux_features: Array,
    final_logits: Array,
    final_features: Array,
    labels: Array,
    *,
    temperature: float = 3.0,
    alpha: float = 0.3,
    feature_weight: float = 0.03,
) -> Array:
    """BYOT's loss of the shallow classifiers, per example (Zhang et al., "Be Your Own Teacher: Improve the
    Performance of Convolutional Neural Networks via Self Distillation", ICCV 2019).

    A network's stages each feed a shallow classifier ``i = 1..L`` (a bottleneck to the deepest feature's
    width, pooling, a linear layer: logits ``z_i`` and the bottleneck's embedding ``h_i``); the network's
    own (deepest) classifier has logits ``z_C`` and embedding ``f_C``. With ``sg`` = stop-gradient (the
    caller's: ``final_logits`` and ``final_features`` are targets, gradient-stopped in training)::

        L = Σ_i [ (1 − α)·CE(z_i, y) + α·KL(softmax(sg(z_C)/T) ‖ softmax(z_i/T)) + λ·‖h_i − sg(f_C)‖² ]

    — the paper's Eq. (1)-(3) for the shallow classifiers (loss sources 1-3); the deepest classifier's own
    cross-entropy is the separate ``ce`` term (``"ce + byot"``).

    Where the authors' final code differs (``train.py``), jaxkd follows the paper except for the KD scale:

    * KD: the code's ``CrossEntropy(outputs, targets)`` is ``−Σ softmax(z_C/T) log softmax(z_i/T)`` with no
      ``T²`` factor; jaxkd takes the KL, which differs by the target's entropy (a constant: the same
      gradients), also without ``T²``;
    * hint: the code uses ``torch.dist`` (the batch's Frobenius norm, not squared) between a linear
      adaptation of the shallow embedding and the deepest one, skipped for the shallowest classifier; the
      paper's (and the conference code's) squared L2 per example is used here, for every classifier.

    Defaults ``T = 3``, ``α = 0.3`` (``--loss_coefficient``), ``λ = 0.03`` (``--feature_loss_coefficient``)
    are the code's.

    Args:
      aux_logits: ``[..., L, C]``, the shallow classifiers' logits.
      aux_features: ``[..., L, D]``, their bottleneck embeddings (the deepest embedding's width).
      final_logits: ``[..., C]``, the deepest classifier's logits (a target).
      final_features: ``[..., D]``, the deepest embedding (a target).
      labels: integer labels ``[...]``.
      temperature: ``T``; alpha: ``α`` in ``[0, 1]``; feature_weight: ``λ >= 0``.
    """
    check_in_range("alpha", alpha, 0.0, 1.0)
    check_nonnegative("feature_weight", feature_weight)
    ce, kd, hint = byot_terms(aux_logits, aux_features, final_logits, final_features, labels,
                              temperature=temperature, reduction="none")
    return (1.0 - alpha) * ce + alpha * kd + feature_weight * hint
