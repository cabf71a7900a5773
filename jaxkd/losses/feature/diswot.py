"""DisWOT's similarity-matrix distillers (sample relations and class semantics) and its training-free score."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxkd.checks import check_label_values
from jaxkd.losses.core import Array, flatten_features, l2_normalize, log_softmax, probs, relational_loss, to_float

__all__ = ["diswot_relation", "diswot_score", "diswot_semantic", "fc_gradient"]


def _valid_count(example_weights: Array, dtype) -> Array:
    return jnp.sum(jnp.asarray(example_weights, dtype))


def _relation_distance(f_s: Array, f_t: Array, w: Array) -> Array:
    n = _valid_count(w, f_s.dtype)
    pair = w[:, None] * w[None, :]

    def normalized_gram(f):
        g = (f @ f.T) * pair  # relations with a masked example are 0 and drop out of the row norms
        return l2_normalize(g, axis=1)

    diff = normalized_gram(f_t) - normalized_gram(f_s)
    total = jnp.sum(jnp.where(pair > 0, diff * diff, 0.0))
    return jnp.where(n > 0, total / jnp.where(n > 0, n * n, 1.0), 0.0)


@relational_loss
def diswot_relation(student_features: Array, teacher_features: Array, *, example_weights: Array) -> Array:
    """DisWOT's sample-relation distiller (Dong, Li & Wei, "DisWOT: Student Architecture Search for
    Distillation WithOut Training", CVPR 2023): the batch Gram matrices of the (flattened) features,
    row-normalized, compared in squared Frobenius norm:

    ``G = normalize_rows(F Fᵀ)``,  ``L = ‖G_t − G_s‖²_F / B²``

    for ``F [B, D]`` (any widths: ``G`` is ``[B, B]``). This is the official ``batch_similarity``
    (the "relation similarity metric" of github.com/lilujunai/DisWOT-CVPR2023, ``index.md``; the same
    computation as SP's official loss), used as a distiller on the activations before global pooling
    (RepDistiller's ``feat[-2]``: ``stage3`` on the CIFAR ResNets).

    Args:
      student_features, teacher_features: ``[B, ...]``, flattened per example.
    """
    f_s, f_t = flatten_features(student_features), flatten_features(teacher_features)
    if f_s.shape[0] != f_t.shape[0]:
        raise ValueError(f"student and teacher features must have one batch size, got {f_s.shape} and {f_t.shape}")
    w = jnp.asarray(example_weights, f_s.dtype)
    return _relation_distance(f_s, f_t, w)


def fc_gradient(logits: Array, embedding: Array, labels: Array, example_weights: Array | None = None) -> Array:
    """The gradient of the mean cross-entropy with respect to a final linear layer's weight, ``[K, D]``:

    ``∂CE/∂W = (1/B) Σ_b (softmax(z_b) − 𝟙_{y_b}) e_bᵀ``

    for logits ``z = W e + b`` computed from the embedding ``e`` (the CIFAR ResNets' ``pooled``). DisWOT's
    "Grad-CAM of the fc layer": the official code reads ``fc.weight.grad`` after ``CE.backward()``; this
    is the same value in closed form (it holds whenever the logits are linear in ``embedding``).
    ``example_weights`` (``[B]``, 1/0) leave out masked examples; ``[K, D]`` rows of ``-inf``-excluded
    classes are 0 where the labels avoid them. Differentiable in ``logits`` and ``embedding``.
    """
    z = to_float(logits)
    e = flatten_features(embedding)
    if z.ndim != 2 or z.shape[0] != e.shape[0]:
        raise ValueError(f"logits must be [B, K] and embedding [B, ...] of one batch, got {z.shape} and {jnp.shape(embedding)}")
    if np.shape(labels) != z.shape[:1]:
        raise ValueError(f"labels must have shape {z.shape[:1]}, got {np.shape(labels)}")
    num_classes = z.shape[-1]
    w = jnp.ones(z.shape[:1], z.dtype) if example_weights is None else jnp.asarray(example_weights, z.dtype)
    check_label_values(labels, num_classes, where=None if example_weights is None else example_weights > 0)
    labels = jnp.asarray(labels)
    valid = (labels >= 0) & (labels < num_classes)
    residual = probs(log_softmax(z)) - jax.nn.one_hot(labels, num_classes, dtype=z.dtype)
    residual = jnp.where(valid[:, None], residual, jnp.nan) * w[:, None]
    residual = jnp.where(w[:, None] > 0, residual, 0.0)
    n = jnp.sum(w)
    return residual.T @ e.astype(z.dtype) / jnp.where(n > 0, n, 1.0)


def _semantic_distance(a_s: Array, a_t: Array) -> Array:
    def normalized_class_gram(a):
        return l2_normalize(a @ a.T, axis=1)

    diff = normalized_class_gram(a_t) - normalized_class_gram(a_s)
    return jnp.sum(diff * diff) / (a_s.shape[0] ** 2)


@relational_loss
def diswot_semantic(
    student_logits: Array,
    student_embedding: Array,
    teacher_logits: Array,
    teacher_embedding: Array,
    labels: Array,
    *,
    example_weights: Array,
) -> Array:
    """DisWOT's semantic (class-activation) similarity distiller (Dong, Li & Wei, "DisWOT: Student
    Architecture Search for Distillation WithOut Training", CVPR 2023).

    Each network's class-activation weights ``A = ∂CE/∂W_fc`` (``[K, D]``, :func:`fc_gradient`: the
    official "Grad-CAM of the fc layer") give a class-by-class similarity matrix, row-normalized:

    ``S = normalize_rows(A Aᵀ)`` (``[K, K]``),  ``L = ‖S_t − S_s‖²_F / K²``

    Deviation from the official snippet (``channel_similarity`` in ``index.md`` of
    github.com/lilujunai/DisWOT-CVPR2023): it treats ``fc.weight.grad`` ``[K, D]`` as ``K`` maps of ``D``
    channels and compares per-class ``D × D`` matrices, which only exists when teacher and student have
    the same width ``D``. The paper's semantic similarity compares the two networks' class activation
    maps through their similarity matrices; the ``K × K`` class-similarity form used here exists for any
    widths (what a student search across architectures needs) and is invariant to the scale of ``A``.

    Args:
      student_logits, teacher_logits: ``[B, K]``.
      student_embedding, teacher_embedding: ``[B, ...]``, what each network's final linear layer reads.
      labels: integer labels ``[B]``.
    """
    if np.shape(student_logits)[-1:] != np.shape(teacher_logits)[-1:]:
        raise ValueError(
            f"student and teacher must have the same classes, got logits {np.shape(student_logits)} and "
            f"{np.shape(teacher_logits)}"
        )
    a_s = fc_gradient(student_logits, student_embedding, labels, example_weights)
    a_t = fc_gradient(teacher_logits, teacher_embedding, labels, example_weights)
    return _semantic_distance(a_s, a_t)


def diswot_score(
    student_features: Array,
    teacher_features: Array,
    *,
    student_logits: Array | None = None,
    student_embedding: Array | None = None,
    teacher_logits: Array | None = None,
    teacher_embedding: Array | None = None,
    labels: Array | None = None,
) -> Array:
    """DisWOT's training-free score of a candidate student for a teacher (higher is better):

    ``score = −(‖G_t − G_s‖²_F / B² + ‖S_t − S_s‖²_F / K²)``

    the negated relation distance (:func:`diswot_relation`, features before pooling) plus, when the logits,
    embeddings and labels are given, the negated semantic distance (:func:`diswot_semantic`), of randomly
    initialized networks on one batch (the official ``compute_diswot_procedure``: ``score_sp + score_ickd``).
    ``0`` is the maximum, reached by a student whose similarity matrices equal the teacher's. To rank
    candidate models, see :func:`jaxkd.methods.diswot_rank`.
    """
    score = -diswot_relation(student_features, teacher_features)
    semantic = (student_logits, student_embedding, teacher_logits, teacher_embedding, labels)
    if any(x is not None for x in semantic):
        if any(x is None for x in semantic):
            raise ValueError(
                "the semantic term needs student_logits, student_embedding, teacher_logits, teacher_embedding "
                "and labels together"
            )
        score = score - diswot_semantic(*semantic)
    return score
