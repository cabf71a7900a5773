"""LELP (Learning Embedding Linear Projections): pseudo-subclass targets from linear projections of the
teacher's embeddings, for binary and few-class distillation.

Loo, Iliopoulos, Hu & Vee, "Linear Projections of Teacher Embeddings for Few-Class Distillation", 2024
(arXiv:2409.20449). No official code was found. The paper's description (abstract, and public summaries of
its method section): for each class, find informative linear subspaces of the teacher's final-layer
embeddings with PCA, after projecting the class's embeddings onto the null space of the teacher's
classification weights (removing what the teacher's logits already carry); split them into
pseudo-subclasses; train the student to replicate these pseudo-subclasses. The exact form of the
pseudo-subclass distribution below (each class's teacher probability split over its subclasses by a
softmax of standardized projections) is this implementation's reading and is stated where it is made.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxkd.checks import check_int, check_temperature
from jaxkd.losses.core import Array, kl_from_log_probs, log_softmax, per_example_loss, to_float

__all__ = ["lelp", "lelp_projections", "lelp_projections_from_moments", "lelp_targets"]


def lelp_projections(
    embeddings,
    labels,
    *,
    num_classes: int,
    subclasses: int = 4,
    classifier_kernel=None,
) -> np.ndarray:
    """LELP's per-class linear projections, ``[K, S, D + 1]`` (NumPy, computed once offline).

    For each class ``c`` with embeddings ``E_c`` (rows of ``embeddings`` whose label is ``c``) and mean
    ``μ_c``: the centred rows ``X = E_c − μ_c`` are projected onto the null space of the teacher's
    classifier (``X ← X (I − W W⁺)`` for ``classifier_kernel`` ``W`` ``[D, K]``, when given), and the top
    ``S`` principal directions ``v_{c,1..S}`` of ``X`` (right singular vectors, largest first) are kept.
    Projection ``s`` of an embedding ``f`` is the standardized coordinate
    ``u_{c,s}(f) = (f − μ_c)·v_{c,s} / σ_{c,s}``, with ``σ_{c,s}`` the standard deviation of the class's
    coordinates along ``v_{c,s}``; it is stored in homogeneous form: ``out[c, s] = [v/σ, −μ_c·v/σ]``, so
    ``u = out[c, s, :D]·f + out[c, s, D]``. The sign of each direction is fixed so that its largest
    coordinate is positive (PCA leaves it arbitrary). A direction without variance (fewer examples than
    directions, or a class without examples) is all zeros: its pseudo-subclasses share the class equally.

    Args:
      embeddings: ``[N, D]`` teacher embeddings of the training set.
      labels: ``[N]`` integer labels in ``[0, num_classes)``.
      num_classes: ``K``.
      subclasses: ``S``, the pseudo-subclasses per class (at most ``D``). The count is a hyper-parameter
        of LELP; 4 is this implementation's default.
      classifier_kernel: the teacher's classifier kernel ``[D, K]`` (Flax layout) whose column span is
        removed first, or ``None`` to skip that step.
    """
    num_classes = check_int("num_classes", num_classes, low=1)
    subclasses = check_int("subclasses", subclasses, low=1)
    e = np.asarray(embeddings, np.float64)
    y = np.asarray(labels)
    if e.ndim != 2:
        raise ValueError(f"embeddings must be [N, D], got shape {e.shape}")
    if y.shape != (e.shape[0],):
        raise ValueError(f"labels must be [N] for embeddings {e.shape}, got shape {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels must be integers, got {y.dtype}")
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got values in [{y.min()}, {y.max()}]")
    if not np.all(np.isfinite(e)):
        raise ValueError("embeddings must be finite")
    d = e.shape[1]
    if subclasses > d:
        raise ValueError(f"subclasses={subclasses} exceeds the embedding width {d}")
    null = np.eye(d)
    if classifier_kernel is not None:
        w = np.asarray(classifier_kernel, np.float64)
        if w.ndim != 2 or w.shape[0] != d:
            raise ValueError(f"classifier_kernel must be [D={d}, K], got shape {w.shape}")
        null = null - w @ np.linalg.pinv(w)
    out = np.zeros((num_classes, subclasses, d + 1), np.float64)
    for c in range(num_classes):
        rows = e[y == c]
        if rows.shape[0] == 0:
            continue
        mean = rows.mean(axis=0)
        x = (rows - mean) @ null
        _, sing, vt = np.linalg.svd(x, full_matrices=False)
        scale = np.max(np.abs(sing)) if sing.size else 0.0
        for s in range(min(subclasses, vt.shape[0])):
            std = sing[s] / np.sqrt(rows.shape[0])
            if sing[s] <= 1e-10 * max(scale, 1e-300):
                continue
            v = vt[s] * np.sign(vt[s][np.argmax(np.abs(vt[s]))])
            out[c, s, :d] = v / std
            out[c, s, d] = -mean @ v / std
    return out if np.asarray(embeddings).dtype == np.float64 else out.astype(np.float32)


def lelp_projections_from_moments(
    sums: Array, outer: Array, counts: Array, *, subclasses: int, classifier_kernel: Array | None = None
) -> Array:
    """:func:`lelp_projections` from per-class moments, jittable: what LELP computes in the train step when
    no projections are given (the moments accumulate in method state over the batches seen).

    ``sums [K, D]``, ``outer [K, D, D]`` and ``counts [K]`` are ``Σ f``, ``Σ f fᵀ`` and the number of each
    class's embeddings. The class covariance ``Σ_c = outer/n − μμᵀ`` (population, as the singular values
    over ``√n`` of :func:`lelp_projections`) is projected onto the classifier's null space
    (``P Σ_c P``, ``P = I − W W⁺``), and its top ``S`` eigenvectors (``jnp.linalg.eigh``; the same
    directions as the right singular vectors of the centred rows) give ``[v/σ, −μ·v/σ]`` with
    ``σ = √λ``, the same sign rule (largest coordinate positive) and zeros for directions without variance.
    Equal to :func:`lelp_projections` on the same embeddings up to rounding (tested), for distinct
    eigenvalues (tied ones leave the basis of their eigenspace arbitrary, in both).
    """
    subclasses = check_int("subclasses", subclasses, low=1)
    sums, outer, counts = to_float(sums), to_float(outer), to_float(counts)
    k, d = sums.shape
    if outer.shape != (k, d, d) or counts.shape != (k,):
        raise ValueError(f"moments must be sums [K, D], outer [K, D, D], counts [K]; got {sums.shape}, {outer.shape}, {counts.shape}")
    if subclasses > d:
        raise ValueError(f"subclasses={subclasses} exceeds the embedding width {d}")
    n = jnp.maximum(counts, 1.0)[:, None]
    mean = sums / n
    cov = outer / n[..., None] - mean[:, :, None] * mean[:, None, :]
    if classifier_kernel is not None:
        w = to_float(classifier_kernel)
        if w.ndim != 2 or w.shape[0] != d:
            raise ValueError(f"classifier_kernel must be [D={d}, K], got shape {w.shape}")
        null = jnp.eye(d, dtype=cov.dtype) - w @ jnp.linalg.pinv(w)
        cov = null @ cov @ null
    cov = 0.5 * (cov + jnp.swapaxes(cov, -1, -2))
    eigvals, eigvecs = jnp.linalg.eigh(cov)  # ascending
    lam = eigvals[:, ::-1][:, :subclasses]  # [K, S]
    v = jnp.swapaxes(eigvecs[:, :, ::-1][:, :, :subclasses], -1, -2)  # [K, S, D]
    biggest = jnp.take_along_axis(v, jnp.argmax(jnp.abs(v), axis=-1)[..., None], axis=-1)
    v = v * jnp.where(biggest < 0, -1.0, 1.0)
    scale = jnp.max(jnp.abs(eigvals), axis=-1, keepdims=True)
    # σ_s = √λ_s; the SVD helper drops singular values below 1e-10 of the largest, i.e. λ below 1e-20 of it.
    keep = (lam > 1e-12 * scale) & (lam > 0) & (counts[:, None] > 0)
    std = jnp.sqrt(jnp.where(keep, lam, 1.0))
    direction = jnp.where(keep[..., None], v / std[..., None], 0.0)
    offset = -jnp.einsum("ksd,kd->ks", direction, mean)
    return jnp.concatenate([direction, offset[..., None]], axis=-1)


def _check_projections(teacher_logits, teacher_embedding, projections) -> tuple[int, int]:
    zt, f, p = np.shape(teacher_logits), np.shape(teacher_embedding), np.shape(projections)
    if len(zt) != 2 or len(f) != 2 or zt[0] != f[0]:
        raise ValueError(f"teacher_logits [B, K] and teacher_embedding [B, D] expected, got {zt} and {f}")
    if len(p) != 3 or p[0] != zt[1] or p[2] != f[1] + 1:
        raise ValueError(
            f"projections must be [K={zt[1]}, S, D+1={f[1] + 1}] for teacher logits {zt} and embedding {f}, got {p}"
        )
    return p[0], p[1]


def lelp_targets(
    teacher_logits: Array,
    teacher_embedding: Array,
    projections: Array,
    *,
    temperature: float = 1.0,
    subclass_temperature: float = 1.0,
) -> Array:
    """LELP's pseudo-subclass targets as log-probabilities ``[B, K, S]``:

    ``log p(c, s) = log softmax(z_t / T)_c + log softmax_s(u_{c,·}(f_t) / τ)_s``

    where ``u_{c,s}(f_t) = P[c, s, :D]·f_t + P[c, s, D]`` are the teacher embedding's standardized
    projections (:func:`lelp_projections`), ``T = temperature`` and ``τ = subclass_temperature``. Each
    class keeps the teacher's probability (the marginal over its subclasses is ``softmax(z_t/T)``), split
    over the class's pseudo-subclasses by where the embedding lies along the class's principal
    directions. (This factorized form is this implementation's reading of "splitting [the informative
    subspaces] into pseudo-subclasses"; no official code was found.)
    """
    check_temperature("temperature", temperature)
    check_temperature("subclass_temperature", subclass_temperature)
    _check_projections(teacher_logits, teacher_embedding, projections)
    f = to_float(teacher_embedding)
    p = to_float(projections)
    f, p = jnp.asarray(f, jnp.promote_types(f.dtype, p.dtype)), jnp.asarray(p, jnp.promote_types(f.dtype, p.dtype))
    u = jnp.einsum("bd,ksd->bks", f, p[..., :-1]) + p[..., -1]
    class_part = log_softmax(teacher_logits, temperature)[..., None]
    return class_part + jax.nn.log_softmax(u / subclass_temperature, axis=-1)


@per_example_loss
def lelp(
    student_logits: Array,
    teacher_logits: Array,
    teacher_embedding: Array,
    projections: Array,
    *,
    temperature: float = 1.0,
    subclass_temperature: float = 1.0,
) -> Array:
    """LELP's distillation loss (Loo, Iliopoulos, Hu & Vee, "Linear Projections of Teacher Embeddings for
    Few-Class Distillation", 2024), per example:

    ``T² · KL(p ‖ softmax(z_s / T))`` over the ``K·S`` pseudo-subclasses, ``p`` = :func:`lelp_targets`.

    Args:
      student_logits: ``[B, K·S]``, the student's expanded head, class-major (index ``c·S + s``).
      teacher_logits: ``[B, K]``; teacher_embedding: ``[B, D]`` (targets: pass them gradient-stopped).
      projections: ``[K, S, D + 1]`` from :func:`lelp_projections`.
      temperature: ``T`` of the class part and of the student; subclass_temperature: ``τ``.
    """
    k, s = _check_projections(teacher_logits, teacher_embedding, projections)
    zs = np.shape(student_logits)
    if len(zs) != 2 or zs[0] != np.shape(teacher_logits)[0] or zs[1] != k * s:
        raise ValueError(
            f"student_logits must be [B, K·S] = [{np.shape(teacher_logits)[0]}, {k * s}] for projections "
            f"{np.shape(projections)}, got {zs}"
        )
    target = lelp_targets(teacher_logits, teacher_embedding, projections, temperature=temperature,
                          subclass_temperature=subclass_temperature)
    target = target.reshape(target.shape[0], k * s)
    return temperature**2 * kl_from_log_probs(target, log_softmax(student_logits, temperature))
