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

from jaxkd.checks import check_temperature
from jaxkd.losses.core import Array, kl_from_log_probs, log_softmax, per_example_loss, to_float

__all__ = ["lelp", "lelp_targets"]


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
