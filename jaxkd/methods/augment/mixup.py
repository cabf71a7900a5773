"""mixup inside the train step: teacher and student both see ``λ·x_i + (1 − λ)·x_j``."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxkd import batch_transforms as bt
from jaxkd.batch import IMAGE, MASK, MIX_LAMBDA
from jaxkd.checks import check_positive
from jaxkd.methods.base import LossAux, LossInputs, Method, MethodVars, Needs, require
from jaxkd.methods.registry import register

__all__ = ["mixup"]


def transform_metrics(inputs: LossInputs) -> dict:
    """The mean own-content weight ``λ`` over the valid examples of a mixed batch (``lambda``)."""
    lam = inputs.batch[MIX_LAMBDA]
    valid = inputs.example_mask
    w = jnp.ones_like(lam) if valid is None else jnp.asarray(valid, jnp.float32)
    return {"lambda": jnp.sum(lam * w) / jnp.maximum(jnp.sum(w), 1.0)}


@register("mixup", paper="Zhang et al., *mixup: Beyond Empirical Risk Minimization*, ICLR 2018; for KD, Choi et al., "
          "*Understanding the Role of Mixup in Knowledge Distillation*, WACV 2023", example="alpha=1")
def mixup(*, alpha: float = 1.0, per_example: bool = False, input_key: str = IMAGE, name: str = "mixup") -> Method:
    """A batch transform: ``x̃_i = λ·x_i + (1 − λ)·x_j``, ``j`` a random permutation of the batch's valid
    examples, ``λ ~ Beta(α, α)`` — one ``λ`` per batch (Zhang et al.'s official code and big_vision's
    ``mixup``) or, with ``per_example=True``, one per example (the MIX-KD code of Choi et al., ``FMU``, draws
    ``numpy.random.beta(α, α, [B, 1])``). Every participant sees ``x̃`` (the teacher too), and the batch records
    the mix (``mix_partner``, ``mix_lambda``) so :func:`~jaxkd.methods.ce` scores
    ``λ·CE(y_i) + (1 − λ)·CE(y_j)``: ``"mixup(alpha=1) + ce + kd(temperature=4)"`` is the paper's recipe. Other
    label-reading methods see example ``i``'s own label. Padding rows (``batch["mask"]``) are never mixed into
    real ones. Within micro-batches (``make_train_step(microbatches=k)``) partners are drawn per micro-batch.

    The mixed-label CE is what the MIX-KD code's ``mixstd`` loss scores (``-log_softmax(z) · targets_shuffle``,
    the mixed one-hot target; its plain ``kd`` branch passes the batch's unmixed ``target`` to the CE, whose rows
    are not the mixed images' — not followed here).

    Temperature: Choi et al. (WACV 2023) trace mixup's interplay with KD to *smoothness*: mixup and a high
    distillation temperature both smooth the teacher's targets, and together they can over-smooth them
    and hurt the student; their code's remedies are mixing only part of the batch (``PMU``) and
    standardizing the logits.

    Its own loss is 0 (it reports ``lambda``, the mean ``λ``). ``input_key`` is the batch entry mixed (float
    images ``[B, H, W, C]``). ``alpha <= 0`` raises ``ValueError``.
    """
    check_positive("alpha", alpha)

    def prepare(vars: MethodVars, batch, rng):
        del vars
        images = require(batch, input_key, method=name)
        valid = batch.get(MASK)
        k_partner, k_lambda = jax.random.split(rng)
        partner = bt.mix_partners(k_partner, images.shape[0], valid)
        lam = bt.sample_mix_lambda(k_lambda, alpha, (images.shape[0],) if per_example else ())
        return bt.with_mix(batch, input_key, bt.mixup_images(images, partner, lam), partner, lam, valid)

    def loss(vars: MethodVars, inputs: LossInputs, rng):
        return jnp.zeros((), jnp.float32), LossAux(transform_metrics(inputs), vars.state)

    return Method(name=name, loss=loss, prepare=prepare, needs=Needs(batch_keys=(input_key,)))
