"""FitNets' hint loss: the mean squared error between the (regressed) student hint and the teacher hint."""

from __future__ import annotations

from jaxkd.losses.core import Array, feature_mse, per_example_loss

__all__ = ["fitnets"]


@per_example_loss
def fitnets(student: Array, teacher: Array) -> Array:
    """The FitNets hint loss per example: ``mean_j (r(f_s)_j − f_t_j)²`` over every value of the hint.

    Romero, Ballas, Kahou, Chassang, Gatta & Bengio, "FitNets: Hints for Thin Deep Nets", ICLR 2015:
    the student's guided layer, mapped by a regressor ``r`` (done by the caller: :func:`jaxkd.methods.fitnets`
    uses RepDistiller's ``ConvReg``), is pulled towards the teacher's hint layer. The paper writes
    ``½‖u_h − r(v_g)‖²``; this follows RepDistiller's ``HintLoss`` (``distiller_zoo/FitNet.py``,
    ``nn.MSELoss()``): the mean over all elements, so the batch mean of these per-example values is
    exactly that MSE.

    Args:
      student: the regressed student feature ``[B, ...]`` (any layout; already the teacher's shape).
      teacher: the teacher feature, same shape.
    """
    return feature_mse(
        student, teacher,
        mismatch="fitnets needs the (regressed) student feature in the teacher feature's shape, got student "
        "{student} and teacher {teacher}; map the student with a connector first",
    )
