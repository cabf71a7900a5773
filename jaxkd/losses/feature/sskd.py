"""SSKD: knowledge distillation with a self-supervised rotation task (Xu et al., ECCV 2020)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxkd.checks import check_in_range, check_temperature
from jaxkd.losses.core import Array, kl_from_log_probs, l2_normalize, log_softmax, relational_loss, to_float

__all__ = ["sskd_contrastive_ce", "sskd_terms"]

#: Views per image: the image itself (view 0) and its rotations by 90°, 180° and 270° (views 1-3).
NUM_VIEWS = 4


def _check_views(name: str, x, ndim: int = 3) -> None:
    shape = np.shape(x)
    if len(shape) != ndim or shape[1] != NUM_VIEWS:
        raise ValueError(f"{name} must be [N, {NUM_VIEWS}, ...] (image, view; view 0 the unrotated image) with "
                         f"{ndim} axes, got shape {shape}")


def _rotation_similarities(ss: Array, valid: Array) -> Array:
    """``[3N, N]`` cosine similarities between every rotated view's embedding (rows, image-major: image 0's
    views 1-3, then image 1's, ...) and every image's unrotated one (columns); masked images' columns are
    ``-inf`` (left out of every softmax and rank)."""
    x = l2_normalize(to_float(ss), axis=-1, eps=1e-8)
    normal = x[:, 0]
    rotated = x[:, 1:].reshape(-1, x.shape[-1])
    sims = rotated @ normal.T
    return jnp.where(valid[None, :], sims, -jnp.inf)


def _kept(scores: Array, target: Array, rows_valid: Array, ratio: float) -> Array:
    """Which rows SSKD distills: those whose target is ranked first by ``scores`` (``[M, K]``), plus the
    ``floor(ratio · #wrong)`` wrong ones whose target ranks best (ties by row order), among valid rows."""
    target_score = jnp.take_along_axis(scores, target[:, None], axis=-1)
    rank = jnp.sum(scores > target_score, axis=-1)  # the target's 0-based place in the descending order
    correct = rows_valid & (rank == 0)
    wrong = rows_valid & (rank > 0)
    index = jnp.arange(rank.shape[0])
    before = (rank[None, :] < rank[:, None]) | ((rank[None, :] == rank[:, None]) & (index[None, :] < index[:, None]))
    place = jnp.sum(wrong[None, :] & before, axis=-1)  # among the wrong rows, in (rank, row) order
    keep_wrong = jnp.floor(jnp.sum(wrong).astype(jnp.float32) * ratio)
    return correct | (wrong & (place < keep_wrong))


def _mean_kl(log_p_teacher: Array, log_p_student: Array, rows: Array) -> Array:
    """``Σ_rows KL(p_t ‖ p_s) / #rows`` (``KLDivLoss(reduction="batchmean")`` over the kept rows; 0 if none)."""
    kl = kl_from_log_probs(log_p_teacher, log_p_student)
    n = jnp.sum(rows)
    return jnp.where(n > 0, jnp.sum(jnp.where(rows, kl, 0.0)) / jnp.maximum(n, 1), 0.0)


@relational_loss
def sskd_terms(
    student_logits: Array,
    teacher_logits: Array,
    student_ss: Array,
    teacher_ss: Array,
    labels: Array,
    *,
    kl_temperature: float = 4.0,
    ss_temperature: float = 0.5,
    tf_temperature: float = 4.0,
    ss_ratio: float = 0.75,
    tf_ratio: float = 1.0,
    example_weights: Array,
) -> tuple[Array, Array, Array]:
    """SSKD's ``(kl, ss, tf)`` terms (Xu, Liu, Li & Loy, "Knowledge Distillation Meets Self-Supervision",
    ECCV 2020), each with its ``T²``.

    Every image comes in four views, ``v = 0`` itself and ``v = 1, 2, 3`` its rotations (inputs
    ``[N, 4, ...]``; the official batch of ``4N`` rows, image-major, is ``x.reshape(N, 4, ...)``). With
    ``KL_T(a ‖ b)`` the KL divergence between ``softmax(a/T)`` and ``softmax(b/T)``:

    * ``kl = T_kl² · mean_n KL_T(z_t[n, 0] ‖ z_s[n, 0])`` — Hinton's KD on the unrotated views;
    * ``tf = T_tf² · mean_{kept} KL_T(z_t[n, v] ‖ z_s[n, v])`` over rotated views ``v ≥ 1`` — KD on the
      transformed data, over the views the teacher classifies correctly plus the fraction ``tf_ratio`` of
      the wrong ones whose label it ranks highest;
    * ``ss = T_ss² · mean_{kept} KL_T(c_t[r] ‖ c_s[r])`` — the self-supervised term: for each rotated view
      ``r`` (of image ``n``), ``c[r, m]`` is the cosine similarity of its self-supervision embedding with
      the unrotated view of image ``m`` (``[3N, N]``); the target is ``m = n``, and the rows kept are those
      where the teacher's similarities rank ``n`` first plus the fraction ``ss_ratio`` of the others
      ranking it highest.

    This is torchdistill's ``SSKDLoss`` (``torchdistill/losses/mid_level.py``, yoshitomo-matsubara/torchdistill
    at 3e4373c, a refactoring of the official xuguodong03/SSKD ``student.py``) without its cross-entropy
    term (a separate ``ce`` in jaxkd); its weights ``[ce, kl, ss, tf]`` are ``[1.0, 0.9, 10.0, 2.7]`` in its
    ImageNet config, ``T_kl = T_tf = 4``, ``T_ss = 0.5``, ``ss_ratio = 0.75``, ``tf_ratio = 1.0``. The kept
    rows are chosen by the teacher (gradient-free); among wrong rows of equal rank the earlier row is kept
    (torchdistill's ``torch.argsort`` leaves that order unspecified).

    With a mask, masked images are left out as rows and as candidates ``m`` of the similarity softmax.

    Args:
      student_logits, teacher_logits: ``[N, 4, K]``.
      student_ss, teacher_ss: ``[N, 4, D]`` and ``[N, 4, D']``, the self-supervision heads' outputs.
      labels: ``[N]`` integer class labels of the images.
      kl_temperature, ss_temperature, tf_temperature: the three temperatures.
      ss_ratio, tf_ratio: in ``[0, 1]``, the fraction of the wrongly ranked rows kept.
    """
    for name, value in (("kl_temperature", kl_temperature), ("ss_temperature", ss_temperature),
                        ("tf_temperature", tf_temperature)):
        check_temperature(name, value)
    check_in_range("ss_ratio", ss_ratio, 0.0, 1.0)
    check_in_range("tf_ratio", tf_ratio, 0.0, 1.0)
    for name, x in (("student_logits", student_logits), ("teacher_logits", teacher_logits),
                    ("student_ss", student_ss), ("teacher_ss", teacher_ss)):
        _check_views(name, x)
    if np.shape(student_logits) != np.shape(teacher_logits):
        raise ValueError(f"sskd: student and teacher logits differ in shape: {np.shape(student_logits)} and "
                         f"{np.shape(teacher_logits)}")
    n = np.shape(student_logits)[0]
    if np.shape(student_ss)[0] != n or np.shape(teacher_ss)[0] != n or np.shape(labels) != (n,):
        raise ValueError(f"sskd: inputs disagree on the number of images {n}: ss {np.shape(student_ss)}, "
                         f"{np.shape(teacher_ss)}, labels {np.shape(labels)}")
    valid = jnp.asarray(example_weights) > 0
    rows_valid = jnp.repeat(valid, NUM_VIEWS - 1)
    teacher_logits = jax.lax.stop_gradient(teacher_logits)
    teacher_ss = jax.lax.stop_gradient(teacher_ss)

    log_s = log_softmax(student_logits[:, 0], kl_temperature)
    kl = kl_temperature**2 * _mean_kl(log_softmax(teacher_logits[:, 0], kl_temperature), log_s, valid)

    num_classes = np.shape(student_logits)[-1]
    aug_t = log_softmax(teacher_logits[:, 1:].reshape(-1, num_classes), tf_temperature)
    aug_s = log_softmax(student_logits[:, 1:].reshape(-1, num_classes), tf_temperature)
    aug_labels = jnp.repeat(jnp.asarray(labels, jnp.int32), NUM_VIEWS - 1)
    kept_tf = _kept(aug_t, aug_labels, rows_valid, tf_ratio)
    tf = tf_temperature**2 * _mean_kl(aug_t, aug_s, kept_tf)

    sims_s, sims_t = _rotation_similarities(student_ss, valid), _rotation_similarities(teacher_ss, valid)
    own_image = jnp.repeat(jnp.arange(n), NUM_VIEWS - 1)
    kept_ss = _kept(sims_t, own_image, rows_valid, ss_ratio)
    ss = ss_temperature**2 * _mean_kl(log_softmax(sims_t, ss_temperature), log_softmax(sims_s, ss_temperature), kept_ss)
    dtype = jnp.promote_types(kl.dtype, ss.dtype)
    return kl.astype(dtype), ss.astype(dtype), tf.astype(dtype)


@relational_loss
def sskd_contrastive_ce(ss: Array, *, example_weights: Array) -> Array:
    """SSKD's self-supervision task (Xu et al., ECCV 2020): each rotated view must pick out its own image.

    For the ``[3N, N]`` cosine similarities ``c[r, m]`` between rotated view ``r`` (of image ``n``) and the
    unrotated view of image ``m`` (``ss`` is ``[N, 4, D]``, view 0 unrotated), the cross-entropy of
    ``softmax_m c[r, m]`` (no temperature) against ``m = n``, averaged over the ``3N`` rows. This is
    torchdistill's ``AuxSSKDLoss`` (``torchdistill/losses/mid_level.py`` at 3e4373c; the official code's
    first stage), which trains the teacher's self-supervision head on the frozen teacher's features before
    distillation. With a mask, masked images are neither rows nor candidates.

    Args:
      ss: ``[N, 4, D]`` self-supervision head outputs.
    """
    _check_views("ss", ss)
    valid = jnp.asarray(example_weights) > 0
    n = np.shape(ss)[0]
    logp = log_softmax(_rotation_similarities(ss, valid))
    own = jnp.take_along_axis(logp, jnp.repeat(jnp.arange(n), NUM_VIEWS - 1)[:, None], axis=-1)[:, 0]
    rows_valid = jnp.repeat(valid, NUM_VIEWS - 1)
    count = jnp.sum(rows_valid)
    return jnp.where(count > 0, -jnp.sum(jnp.where(rows_valid, own, 0.0)) / jnp.maximum(count, 1), 0.0)
