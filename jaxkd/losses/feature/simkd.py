"""SimKD: the student's projected feature regresses the teacher's last feature map (MSE)."""

from __future__ import annotations

from jaxkd.losses.core import Array, feature_mse, per_example_loss

__all__ = ["simkd"]


@per_example_loss
def simkd(student_feature: Array, teacher_feature: Array) -> Array:
    """SimKD's feature loss (Chen et al., "Knowledge Distillation with the Reused Teacher Classifier",
    CVPR 2022), per example: ``mean((P(f_s) − f_t)²)`` over the feature's entries.

    ``student_feature`` is the student's last feature map already through the projector ``P`` (see
    :func:`jaxkd.methods.simkd`); ``teacher_feature`` the teacher's map of the same shape
    ``[B, H, W, C]`` (or any ``[B, ...]``). The mean over the batch is the official ``nn.MSELoss()``
    (DefangChen/SimKD, ``helper/loops.py``: ``criterion_kd(trans_feat_s, trans_feat_t)``).
    """
    return feature_mse(
        student_feature, teacher_feature,
        mismatch="simkd takes the projected student feature and the teacher feature of one shape, got "
        "{student} and {teacher}",
    )
