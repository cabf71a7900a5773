"""The inception crop (random resized crop) and flip inside the train step, one view for every participant."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxkd import batch_transforms as bt
from jaxkd.batch import IMAGE
from jaxkd.checks import check_in_range
from jaxkd.methods.base import LossAux, LossInputs, Method, MethodVars, Needs, require
from jaxkd.methods.registry import register

__all__ = ["inception_crop"]


@register("inception_crop", paper="Szegedy et al., *Going Deeper with Convolutions*, CVPR 2015 (as big_vision's "
          "`inception_crop`)")
def inception_crop(*, area_range: tuple[float, float] = (0.05, 1.0), ratio_range: tuple[float, float] = (3 / 4, 4 / 3),
                   flip: float = 0.5, input_key: str = IMAGE, name: str = "inception_crop") -> Method:
    """A batch transform: each image's random box — area fraction ``~ U(area_range)``, aspect ratio
    log-uniform in ``ratio_range``, first of 10 draws that fits, else the whole image
    (:func:`jaxkd.batch_transforms.inception_crop_boxes`) — resized back to the input size (bilinear, no
    antialiasing), then mirrored left-right with probability ``flip``: big_vision's
    ``inception_crop(size)|flip_lr`` preprocessing, whose defaults these are (``area_min=5``, TF's
    ``sample_distorted_bounding_box`` ratio range ``(3/4, 4/3)``). Computed in the compiled step (static
    shapes: ``jax.image.scale_and_translate`` per example), so teacher and student see the same view.

    Its own loss is 0. ``input_key`` is the batch entry cropped (float images ``[B, H, W, C]``).
    """
    bt.check_crop_ranges(area_range, ratio_range)
    area_range, ratio_range = tuple(map(float, area_range)), tuple(map(float, ratio_range))
    check_in_range("flip", flip, 0.0, 1.0)

    def prepare(vars: MethodVars, batch, rng):
        del vars
        images = require(batch, input_key, method=name)
        if images.ndim != 4:
            raise ValueError(f"{name!r} crops images [B, H, W, C], got batch[{input_key!r}] of shape "
                             f"{tuple(images.shape)}")
        k_box, k_flip = jax.random.split(rng)
        b, h, w = images.shape[:3]
        boxes = bt.inception_crop_boxes(k_box, b, h, w, area_range=area_range, ratio_range=ratio_range)
        images = bt.crop_and_resize(images, boxes)
        if flip:
            images = bt.flip_left_right(k_flip, images, flip)
        return {**batch, input_key: images}

    def loss(vars: MethodVars, inputs: LossInputs, rng):
        return jnp.zeros((), jnp.float32), LossAux({}, vars.state)

    return Method(name=name, loss=loss, prepare=prepare, needs=Needs(batch_keys=(input_key,)))
