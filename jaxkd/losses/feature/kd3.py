"""KD³ (Knowledge Distillation between Different Distributions): instance selection by the combined
teacher-student prediction, selection-weighted logit and feature alignment, and classifier alignment.

Tang, Chen, Niu, Sugiyama & Gong, "Distribution Shift Matters for Knowledge Distillation with Webly
Collected Images", ICCV 2023 (arXiv:2307.11469). No official code was found; the formulas below are
reconstructed from the paper's abstract ("we first dynamically select useful training instances from the
webly collected data according to the combined predictions of teacher network and student network.
Subsequently, we align both the weighted features and classifier parameters of the two networks"), and
every choice the abstract leaves open is stated where it is made. The paper's third component, the
MixDistribution contrastive block ("generate perturbed data with a new distribution for instance
alignment, so that the student network can further learn a distribution-invariant representation"),
is :func:`kd3_instance_alignment` (the contrastive instance alignment) together with
:func:`jaxkd.methods.feature.kd3.mix_distribution` (the perturbation, applied by the ``kd3`` method); the paper's
full text was not reachable, so both are this implementation's reading of the abstract (MixStyle-like
statistics mixing, InfoNCE alignment), as stated there.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxkd.checks import check_in_range, check_nonnegative, check_same_logits, check_temperature
from jaxkd.losses.core import (
    Array, flatten_features, kl_from_log_probs, l2_normalize, log_softmax, per_example_loss, relational_loss, to_float,
)

__all__ = ["kd3", "kd3_classifier_alignment", "kd3_instance_alignment", "kd3_selection", "kd3_terms"]


def kd3_selection(student_logits: Array, teacher_logits: Array, *, threshold: float = 0.5,
                  teacher_weight: float = 0.5) -> Array:
    """KD³'s teacher-student instance selection: float ``[...]`` weights, 1 for a selected example, else 0.

    ``p = λ·softmax(z_t) + (1 − λ)·softmax(z_s)`` is the combined prediction (``λ = teacher_weight``) and
    an example is selected when its confidence ``max_k p_k >= threshold``. Both predictions are
    gradient-stopped (the selection is a weight, not a term to optimize). Because the student changes
    during training, the selection changes with it ("dynamically select ... according to the combined
    predictions of teacher network and student network", KD³ abstract). The combination rule (a convex
    mixture) and the confidence threshold are this implementation's reading of the abstract.
    """
    check_same_logits(student_logits, teacher_logits)
    check_in_range("threshold", threshold, 0.0, 1.0)
    check_in_range("teacher_weight", teacher_weight, 0.0, 1.0)
    p_t = jax.nn.softmax(jax.lax.stop_gradient(to_float(teacher_logits)), axis=-1)
    p_s = jax.nn.softmax(jax.lax.stop_gradient(to_float(student_logits)), axis=-1)
    combined = teacher_weight * p_t + (1.0 - teacher_weight) * p_s
    confidence = jnp.max(combined, axis=-1)
    return jnp.where(jnp.isnan(confidence), jnp.nan, (confidence >= threshold).astype(confidence.dtype))


def _check_embeddings(student_embedding, teacher_embedding, logits=None) -> None:
    s, t = np.shape(student_embedding), np.shape(teacher_embedding)
    if len(s) != 2 or len(t) != 2 or s != t:
        raise ValueError(
            f"KD³ aligns [B, D] embeddings of the same shape (map the student's through a connector first), "
            f"got student {s} and teacher {t}"
        )
    if logits is not None and s[0] != np.shape(logits)[0]:
        raise ValueError(f"the embeddings {s} and the logits {np.shape(logits)} disagree on the batch size")


@per_example_loss
def kd3_terms(student_logits: Array, teacher_logits: Array, student_embedding: Array, teacher_embedding: Array,
              *, temperature: float = 4.0) -> tuple[Array, Array]:
    """KD³'s per-example terms ``(kd, feature)`` (Tang et al., ICCV 2023), to be weighted by
    :func:`kd3_selection` (``weights=``):

    * ``kd = T² · KL(softmax(z_t/T) ‖ softmax(z_s/T))`` — the logit distillation on the selected webly
      collected instances (Hinton's KD; the abstract does not give the paper's exact logit term, and ``T``
      is a hyper-parameter here, 4 by default as in RepDistiller's CIFAR recipes);
    * ``feature = (1/D) · ‖f_s − f_t‖²`` — the alignment of the (selection-)weighted features: the
      student's embedding ``f_s`` (already mapped to the teacher's width by a connector) against the
      teacher's ``f_t`` ("we align both the weighted features ... of the two networks"; the squared error
      is this implementation's choice).

    Args:
      student_logits, teacher_logits: ``[B, C]``.
      student_embedding, teacher_embedding: ``[B, D]`` (``teacher_embedding`` is gradient-stopped by the
        caller; the ``teacher_logits`` are only a target: pass them gradient-stopped).
      temperature: ``T``.
    """
    check_temperature("temperature", temperature)
    check_same_logits(student_logits, teacher_logits)
    _check_embeddings(student_embedding, teacher_embedding, student_logits)
    kd = temperature**2 * kl_from_log_probs(log_softmax(teacher_logits, temperature), log_softmax(student_logits, temperature))
    s, t = flatten_features(student_embedding), flatten_features(teacher_embedding)
    feature = jnp.mean(jnp.square(s - t), axis=-1)
    return kd, feature


@per_example_loss
def kd3(student_logits: Array, teacher_logits: Array, student_embedding: Array, teacher_embedding: Array,
        *, temperature: float = 4.0, feature_weight: float = 1.0) -> Array:
    """KD³'s per-example instance term ``kd + β · feature`` (see :func:`kd3_terms`; ``β = feature_weight``).

    Tang, Chen, Niu, Sugiyama & Gong, "Distribution Shift Matters for Knowledge Distillation with Webly
    Collected Images", ICCV 2023. Pass the selection of :func:`kd3_selection` as ``weights=`` (the mean is
    then over the selected examples); the classifier alignment is :func:`kd3_classifier_alignment`.
    """
    check_nonnegative("feature_weight", feature_weight)
    kd, feature = kd3_terms(student_logits, teacher_logits, student_embedding, teacher_embedding,
                            temperature=temperature, reduction="none")
    return kd + feature_weight * feature


@relational_loss
def kd3_instance_alignment(student_embedding: Array, teacher_embedding: Array, *, temperature: float = 0.07,
                           example_weights: Array) -> Array:
    """KD³'s MixDistribution instance alignment (Tang et al., ICCV 2023): InfoNCE over the batch between the
    student's embedding of the *perturbed* input and the teacher's embedding of the *clean* input,

    ``L = −(1/N) Σ_i log [ exp(cos(s_i, t_i)/τ) / Σ_j exp(cos(s_i, t_j)/τ) ]``

    over the ``N`` valid examples (``i`` and ``j`` both run over them; the positive of the student's
    ``s_i`` is the teacher's ``t_i`` of the same instance, the other instances of the batch are the
    negatives). The perturbed input — the original instance with a new distribution — is made by
    :func:`jaxkd.methods.feature.kd3.mix_distribution` inside the ``kd3`` method; aligning its student embedding with
    the teacher's clean one is what makes the student's representation distribution-invariant.

    The abstract names a "contrastive learning block called MixDistribution" for "instance alignment" but
    gives no formula and no official code was found: the InfoNCE form (cosine similarity of
    ``l2``-normalized embeddings, one direction: student anchors, teacher candidates, in-batch negatives,
    no memory bank) and ``τ = 0.07`` (RepDistiller's CRD ``nce_t``) are this implementation's choices.

    Args:
      student_embedding: ``[B, D]``, the student's embedding of the perturbed input, already mapped to the
        teacher's width by the connector.
      teacher_embedding: ``[B, D]``, the teacher's embedding of the clean input (gradient-stopped by the
        caller).
      temperature: ``τ``.
    """
    check_temperature("temperature", temperature)
    _check_embeddings(student_embedding, teacher_embedding)
    s = l2_normalize(flatten_features(student_embedding))
    t = l2_normalize(flatten_features(teacher_embedding))
    valid = example_weights > 0
    logits = jnp.where(valid[None, :], (s @ t.T) / temperature, -jnp.inf)
    positives = jnp.diagonal(log_softmax(logits))
    count = jnp.sum(valid.astype(s.dtype))
    total = -jnp.sum(jnp.where(valid, positives, 0.0))
    return total / jnp.maximum(count, 1.0)


def kd3_classifier_alignment(student_kernel: Array, student_bias: Array | None, teacher_kernel: Array,
                             teacher_bias: Array | None, connector_kernel: Array | None = None,
                             connector_bias: Array | None = None) -> Array:
    """KD³'s classifier-parameter alignment (a penalty on parameters, not a per-example loss):
    ``mean((W_s − W̃)²) + mean((b_s − b̃)²)``.

    The paper aligns "the classifier parameters of the two networks". When the student's embedding is
    mapped to the teacher's width by a linear connector ``f ↦ A f + a`` (``connector_kernel`` ``A`` as a
    Flax ``[D_s, D_t]`` kernel, ``connector_bias`` ``a``), the teacher's classifier ``(W_t, b_t)`` acting on
    the connected embedding is the classifier ``W̃ = A W_t``, ``b̃ = a W_t + b_t`` on the student's own
    embedding, and that is what the student's ``(W_s, b_s)`` is aligned to (without a connector:
    ``W̃ = W_t``, ``b̃ = b_t``). This pull-back through the connector is this implementation's way to
    compare classifiers of different widths; the teacher's parameters are gradient-stopped, the
    student's and the connector's are trained. A missing bias (``None``) counts as zero.

    Args:
      student_kernel: ``[D_s, C]``; student_bias: ``[C]`` or ``None``.
      teacher_kernel: ``[D_t, C]``; teacher_bias: ``[C]`` or ``None``.
      connector_kernel: ``[D_s, D_t]`` or ``None`` (then ``D_s`` must equal ``D_t``); connector_bias: ``[D_t]``.
    """
    ws, wt = to_float(student_kernel), jax.lax.stop_gradient(to_float(teacher_kernel))
    if ws.ndim != 2 or wt.ndim != 2 or ws.shape[-1] != wt.shape[-1]:
        raise ValueError(
            f"classifier kernels must be [D, C] over the same classes, got student {ws.shape} and teacher {wt.shape}"
        )
    classes = ws.shape[-1]
    bs = jnp.zeros((classes,), ws.dtype) if student_bias is None else to_float(student_bias)
    bt = jnp.zeros((classes,), wt.dtype) if teacher_bias is None else jax.lax.stop_gradient(to_float(teacher_bias))
    if bs.shape != (classes,) or bt.shape != (classes,):
        raise ValueError(f"classifier biases must be [{classes}], got student {bs.shape} and teacher {bt.shape}")
    if connector_kernel is None:
        if ws.shape != wt.shape:
            raise ValueError(
                f"the student's classifier {ws.shape} and the teacher's {wt.shape} differ in width: pass the "
                "connector that maps the student's embedding to the teacher's"
            )
        target_w, target_b = wt, bt
    else:
        a = to_float(connector_kernel)
        if a.shape != (ws.shape[0], wt.shape[0]):
            raise ValueError(
                f"connector_kernel must be [{ws.shape[0]}, {wt.shape[0]}] (student width, teacher width), got {a.shape}"
            )
        c = jnp.zeros((wt.shape[0],), a.dtype) if connector_bias is None else to_float(connector_bias)
        if c.shape != (wt.shape[0],):
            raise ValueError(f"connector_bias must be [{wt.shape[0]}], got {c.shape}")
        target_w, target_b = a @ wt, c @ wt + bt
    return jnp.mean(jnp.square(ws - target_w)) + jnp.mean(jnp.square(bs - target_b))
