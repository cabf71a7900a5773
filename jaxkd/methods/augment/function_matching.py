"""Function matching (Beyer et al., CVPR 2022): the same aggressive view to teacher and student, KL at T = 1."""

from __future__ import annotations

from jaxkd.batch import IMAGE
from jaxkd.checks import check_temperature
from jaxkd.methods.augment.inception_crop import inception_crop
from jaxkd.methods.augment.mixup import mixup
from jaxkd.methods.base import Method, chain
from jaxkd.methods.logit.kd import kd
from jaxkd.methods.registry import register

__all__ = ["function_matching"]


@register("function_matching", paper="Beyer et al., *Knowledge distillation: A good teacher is patient and "
          "consistent*, CVPR 2022", losses=("kd",))
def function_matching(*, alpha: float = 1.0, area_range: tuple[float, float] = (0.05, 1.0),
                      ratio_range: tuple[float, float] = (3 / 4, 4 / 3), flip: float = 0.5, temperature: float = 1.0,
                      teacher: str = "teacher", input_key: str = IMAGE) -> Method:
    """``inception_crop(...) + mixup(alpha) + kd(temperature)``: every step, one inception crop and flip per
    image and mixup of the whole batch (big_vision's ``mixup`` with ``p = 1``: ``λ ~ Beta(1, 1)``, one per
    batch), built inside the compiled step and shown to teacher *and* student — the paper's "consistent"
    teaching — then the KL from the teacher's predictions at ``T = 1`` (``kd`` is ``T²·KL``; no labels). It
    follows big_vision's ``trainers/proj/distill/distill.py`` and ``configs/proj/distill/bigsweep_flowers_pet.py``
    (``inception_crop|flip_lr``, ``mixup=dict(p=1.0, n=2)``, ``distance="kl"``). Two differences: big_vision
    mixes each image with its neighbour (``jnp.roll``) and sorts the two weights so the image keeps the larger
    one, where :func:`mixup` draws a random permutation and an unsorted ``λ`` (the same pairs of weights, for a
    label-free loss); and the temperature of its configs varies per dataset (1 to 10), the paper's default
    being 1. The paper's other half is patience: schedules of thousands of epochs.

    A chain of three members named ``inception_crop``, ``mixup`` and ``kd``.
    """
    check_temperature("temperature", temperature)
    return chain(inception_crop(area_range=area_range, ratio_range=ratio_range, flip=flip, input_key=input_key),
                 mixup(alpha=alpha, input_key=input_key), kd(temperature=temperature, teacher=teacher))
