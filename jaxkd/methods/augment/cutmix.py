"""CutMix inside the train step: a box of example ``j`` pasted into example ``i``, seen by every participant."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxkd import batch_transforms as bt
from jaxkd.batch import IMAGE, MASK
from jaxkd.checks import check_positive
from jaxkd.methods.augment.mixup import transform_metrics
from jaxkd.methods.base import LossAux, LossInputs, Method, MethodVars, Needs, require
from jaxkd.methods.registry import register

__all__ = ["cutmix"]


@register("cutmix", paper="Yun et al., *CutMix: Regularization Strategy to Train Strong Classifiers with Localizable "
          "Features*, ICCV 2019", example="alpha=1")
def cutmix(*, alpha: float = 1.0, input_key: str = IMAGE, name: str = "cutmix") -> Method:
    """A batch transform: ``λ ~ Beta(α, α)`` and one box per batch of area ``≈ (1 − λ)·H·W`` cut from example
    ``j`` (a random permutation of the valid examples) and pasted into example ``i``; ``λ`` is then corrected
    to the exact pasted area, ``λ = 1 − box area / (H·W)``, as the official code does (``rand_bbox`` and the
    adjustment after it in clovaai/CutMix-PyTorch ``train.py``, commit 9dc8245, whose ``W``/``H`` are an NCHW
    batch's axes 2 and 3; one ``λ`` and box per batch there too; it applies CutMix with a probability, here
    every step). Every participant sees the pasted image; :func:`~jaxkd.methods.ce` scores
    ``λ·CE(y_i) + (1 − λ)·CE(y_j)`` from the recorded mix. Padding rows are never pasted into real ones.
    Its own loss is 0 (it reports ``lambda``). ``alpha <= 0`` raises ``ValueError``.
    """
    check_positive("alpha", alpha)

    def prepare(vars: MethodVars, batch, rng):
        del vars
        images = require(batch, input_key, method=name)
        if images.ndim != 4:
            raise ValueError(f"{name!r} pastes boxes of images [B, H, W, C], got batch[{input_key!r}] of shape "
                             f"{tuple(images.shape)}")
        valid = batch.get(MASK)
        k_partner, k_lambda, k_box = jax.random.split(rng, 3)
        partner = bt.mix_partners(k_partner, images.shape[0], valid)
        inside, lam = bt.cutmix_box_mask(k_box, bt.sample_mix_lambda(k_lambda, alpha), images.shape[1],
                                         images.shape[2])
        return bt.with_mix(batch, input_key, bt.cutmix_images(images, partner, inside), partner, lam, valid)

    def loss(vars: MethodVars, inputs: LossInputs, rng):
        return jnp.zeros((), jnp.float32), LossAux(transform_metrics(inputs), vars.state)

    return Method(name=name, loss=loss, prepare=prepare, needs=Needs(batch_keys=(input_key,)))
