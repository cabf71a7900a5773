"""KD-SVD: distill the relations between consecutive layers' leading singular vectors."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxkd.checks import check_int
from jaxkd.losses.core import Array, l2_normalize, per_example_loss, to_float

__all__ = ["kdsvd", "top_right_singular_vectors"]


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _top_right_singular(x: Array, n: int) -> tuple[Array, Array]:
    """``(V[:, :n], s[:n])`` of one matrix ``x [N, C]`` (singular values in decreasing order)."""
    v, lam = _full_right_basis(x)
    return v[:, :n], jnp.sqrt(jnp.maximum(lam[:n], 0.0))


def _full_right_basis(x: Array) -> tuple[Array, Array]:
    """All ``C`` right singular vectors of ``x [N, C]`` (a basis of R^C) and ``λ = s²`` padded with zeros."""
    n_rows, c = x.shape
    _, s, vt = jnp.linalg.svd(x, full_matrices=n_rows < c)
    lam = jnp.zeros((c,), x.dtype).at[: s.shape[0]].set(s * s)
    return vt.T, lam


@_top_right_singular.defjvp
def _top_right_singular_jvp(n, primals, tangents):
    # The leading right singular vectors of x are the leading eigenvectors of A = xᵀx (λ = s²):
    # dv_j = Σ_{i≠j} v_i (v_iᵀ dA v_j) / (λ_j − λ_i),  dλ_j = v_jᵀ dA v_j,  dA = dxᵀx + xᵀdx.
    # Only pairs with a *leading* j appear, so repeated trailing singular values (a rank-deficient map,
    # e.g. all-zero ReLU positions) do not make the gradient NaN, as the full SVD's derivative would.
    (x,), (dx,) = primals, tangents
    v, lam = _full_right_basis(x)
    s = jnp.sqrt(jnp.maximum(lam[:n], 0.0))
    da = dx.T @ x + x.T @ dx
    w = v.T @ (da @ v[:, :n])  # [C, n]: v_iᵀ dA v_j
    gap = lam[None, :n] - lam[:, None]  # λ_j − λ_i
    off = (jnp.arange(lam.shape[0])[:, None] != jnp.arange(n)[None, :]) & (gap != 0)
    f = jnp.where(off, 1.0 / jnp.where(off, gap, 1.0), 0.0)
    dv = v @ (f * w)
    dlam = jnp.diagonal(w[:n])
    ds = jnp.where(s > 0, dlam / (2.0 * jnp.where(s > 0, s, 1.0)), 0.0)
    return (v[:, :n], s), (dv, ds)


def top_right_singular_vectors(feature: Array, n: int) -> tuple[Array, Array]:
    """The ``n`` leading right singular vectors ``[B, C, n]`` and singular values ``[B, n]`` of each
    example's map ``[B, H, W, C]`` seen as an ``[H·W, C]`` matrix (``n`` is capped at ``min(H·W, C)``).

    Their derivative involves only the leading values (see the JVP above): it is finite whenever those
    are distinct from each other and from the rest, however degenerate the trailing ones are.
    """
    f = to_float(feature)
    x = f.reshape(f.shape[0], -1, f.shape[-1])
    n = min(n, x.shape[1], x.shape[2])
    return jax.vmap(lambda m: _top_right_singular(m, n))(x)


def _align(v_s: Array, v_t: Array) -> Array:
    """For each teacher vector, the student vector most parallel to it (largest ``|cos|``), sign-flipped
    to point its way: RepDistiller's ``align_rsv``. ``v_s [B, C, m]``, ``v_t [B, C, n] -> [B, C, n]``."""
    cosine = jnp.einsum("bcm,bcn->bmn", v_s, v_t)
    best = jnp.max(jnp.abs(cosine), axis=1, keepdims=True)
    select = jax.lax.stop_gradient(jnp.where(jnp.abs(cosine) == best, jnp.sign(cosine), 0.0))
    return jnp.einsum("bcm,bmn->bcn", v_s, select)


def _layer(student: Array, teacher: Array, k: int) -> tuple[Array, Array]:
    v_t, s_t = top_right_singular_vectors(teacher, k)
    v_s, _ = top_right_singular_vectors(student, k + 3)
    v_s = _align(v_s, v_t)
    scale = l2_normalize(s_t, axis=-1)[:, None, :]
    return v_s * scale, v_t * scale


def _rbf(upper: Array, lower: Array) -> Array:
    """``exp(−(u_c − l_c')² / 8)`` for every channel pair and vector, ``[B, C_upper, C_lower, k]``."""
    d = upper[:, :, None, :] - lower[:, None, :, :]
    return jnp.exp(-(d * d) / 8.0)


@per_example_loss
def kdsvd(
    student_lower: Array, student_upper: Array, teacher_lower: Array, teacher_upper: Array, *, k: int = 1
) -> Array:
    """KD-SVD per example, between two consecutive layers: ``Σ (rbf(V_s^up, V_s^low) − rbf(V_t^up, V_t^low))²``.

    Lee, Kim & Song, "Self-supervised Knowledge Distillation Using Singular Value Decomposition",
    ECCV 2018. Each map ``[H, W, C]`` of an example is an ``[H·W, C]`` matrix; its ``k`` leading right
    singular vectors (the teacher's) and ``k + 3`` (the student's) are kept. For each teacher vector, the
    student vector with the largest ``|cosine|`` is taken, its sign flipped to agree; both are scaled by
    the teacher's L2-normalized leading singular values. Between the two
    layers, ``rbf[c, c', j] = exp(−(v^up_{c j} − v^low_{c' j})² / 8)``, and the loss is the sum of the
    squared student-teacher differences over ``c, c', j`` (the batch mean of these values is the
    official sum divided by the batch size).

    Signs: a singular vector is defined up to its sign. The alignment removes the *student's* ambiguity
    (each student vector takes the sign of the teacher vector it matches), but not the *teacher's*: each
    teacher vector keeps the sign the SVD routine returns (LAPACK's convention under JAX, another under
    ``torch.svd`` or TensorFlow), independently per example, layer and vector, and the student's aligned
    vector follows it. Since ``rbf`` compares vectors of two different layers, flipping one layer's
    teacher vector turns ``exp(−(u − l)²/8)`` into ``exp(−(u + l)²/8)`` on both sides: the target, the
    loss and its gradient change. The loss inherits the teacher's sign ambiguity, as RepDistiller's port
    and the authors' TensorFlow code do (their ``align_rsv``/``Align_rsv`` flips the student's vectors
    only): it is deterministic for one SVD implementation, not across implementations.

    Follows RepDistiller's ``KDSVD`` (``distiller_zoo/KDSVD.py``, a port of the authors' TensorFlow code
    ``sseung0703/SSKD_SVD``) with ``k = 1``. Differences: NaN and infinite values propagate (that code
    zeroes them after the SVD and in the loss); the gradient of the singular vectors is written for the
    leading ones only (see :func:`top_right_singular_vectors`), finite for rank-deficient maps where the
    full SVD's derivative is NaN. The teacher inputs are gradient-stopped, as that code detaches them.
    The student's and the teacher's maps of one layer must have the same channels (the alignment
    compares their singular vectors).

    Args:
      student_lower, student_upper: the student's maps of two consecutive layers, NHWC.
      teacher_lower, teacher_upper: the teacher's, with the same channels layer by layer.
      k: the teacher's singular vectors kept (>= 1).
    """
    k = check_int("k", k, low=1)
    for who, (s, t) in (("lower", (student_lower, teacher_lower)), ("upper", (student_upper, teacher_upper))):
        if np.ndim(s) != 4 or np.ndim(t) != 4 or np.shape(s)[-1] != np.shape(t)[-1] or np.shape(s)[0] != np.shape(t)[0]:
            raise ValueError(
                f"kdsvd needs NHWC maps with the same batch and channels for student and teacher; the {who} maps "
                f"are student {np.shape(s)} and teacher {np.shape(t)}"
            )
    teacher_lower, teacher_upper = jax.lax.stop_gradient(teacher_lower), jax.lax.stop_gradient(teacher_upper)
    s_low, t_low = _layer(student_lower, teacher_lower, k)
    s_up, t_up = _layer(student_upper, teacher_upper, k)
    if s_low.shape[-1] != s_up.shape[-1]:
        raise ValueError(
            f"kdsvd: k={k} singular vectors do not exist for both layers (maps {np.shape(student_lower)} and "
            f"{np.shape(student_upper)} have {min(s_low.shape[-1], s_up.shape[-1])}); lower k"
        )
    diff = _rbf(s_up, s_low) - _rbf(t_up, t_low)
    return jnp.sum(diff * diff, axis=(1, 2, 3))
