"""ICKD: inter-channel correlation (row-normalized channel Gram matrices) matched between student and teacher."""

from __future__ import annotations

import jax.numpy as jnp

from jaxkd.losses.core import Array, l2_normalize, per_example_loss, to_float

__all__ = ["ickd"]


def _channel_correlation(x: Array) -> Array:
    x = to_float(x)
    x = x.reshape(x.shape[0], -1, x.shape[-1])  # [B, HW, C]
    gram = jnp.einsum("bnc,bnd->bcd", x, x)  # [B, C, C]
    return l2_normalize(gram, axis=-1)


@per_example_loss
def ickd(student_feature: Array, teacher_feature: Array) -> Array:
    """Inter-channel correlation KD, ICKD-C (Liu et al., "Exploring Inter-Channel Correlation for
    Diversity-Preserved Knowledge Distillation", ICCV 2021), per example.

    For a map ``f [H, W, C]`` (NHWC; ``[N, C]`` tokens or any ``[..., C]`` work alike) flattened to
    ``F [HW, C]``, the channel Gram ``G = Fᵀ F [C, C]`` with each row L2-normalized, and

    ``l = ‖Ĝ_s − Ĝ_t‖²_F / C``

    The batch mean is the official CIFAR-100 code's ``(G_diff²).sum() / (ch · bsz)`` (ADLab-AutoDrive/ICKD,
    ``Cifar100/distiller_zoo/ICKD.py``: ``bmm(f, fᵀ)``, ``F.normalize(dim=2)``), which this follows; the
    paper's Eq. writes the un-normalized correlation, the official code normalizes each row, as here.
    The official ImageNet code divides by the batch size once more: its ``ChSimLoss.batch_loss``
    (``ImageNet/torchdistill/losses/single.py``, commit 107935f, and torchdistill's ``ChSimLoss``, which
    refactors it) is ``(G_diff²).sum() / (ch · bsz · bsz)``, i.e. this batch mean divided by ``B``; a
    weight from an ImageNet config (``weight: 1`` per feature pair there) corresponds to ``weight / B``
    here at its batch size ``B`` (the CIFAR weight 2.5 carries over as it is). The
    student feature is expected through the method's 1x1 conv + BN connector (same channel count ``C``
    as the teacher's; the spatial sizes may differ, the Gram does not depend on them).
    """
    s, t = jnp.shape(student_feature), jnp.shape(teacher_feature)
    if len(s) < 2 or len(t) < 2 or s[0] != t[0] or s[-1] != t[-1]:
        raise ValueError(
            f"ickd takes student and teacher features [B, ..., C] with the same batch and channel count, got "
            f"{s} and {t}"
        )
    diff = _channel_correlation(student_feature) - _channel_correlation(teacher_feature)
    return jnp.sum(diff * diff, axis=(-2, -1)) / s[-1]
