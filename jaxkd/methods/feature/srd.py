"""SRD as a method: a trainable linear projector, batch normalization of both embeddings, the log-sum
feature term, and KD on the logits."""

from __future__ import annotations

import jax.numpy as jnp

from jaxkd import losses
from jaxkd.checks import check_positive, check_temperature
from jaxkd.losses.core import to_float
from jaxkd.methods.base import LossAux, LossInputs, Method, MethodVars, Needs, Weight
from jaxkd.methods import features
from jaxkd.methods.feature.connectors import LinearConnector
from jaxkd.methods.registry import register

__all__ = ["srd"]


def batch_standardize(x, mask, eps: float):
    """``(x − mean) / sqrt(var + eps)`` per dimension over the (unmasked) batch, the biased variance:
    ``BatchNorm1d(affine=False)`` in training mode."""
    x = to_float(x)
    w = jnp.ones(x.shape[:1], x.dtype) if mask is None else jnp.asarray(mask, x.dtype)
    n = jnp.maximum(jnp.sum(w), 1.0)
    mean = jnp.sum(w[:, None] * x, axis=0) / n
    var = jnp.sum(w[:, None] * (x - mean) ** 2, axis=0) / n
    return (x - mean) / jnp.sqrt(var + eps)


@register(
    "srd",
    paper="Miles & Mikolajczyk, *Understanding the Role of the Projector in Knowledge Distillation*, AAAI 2024",
    losses=("srd", "forward_kl"),
)
def srd(
    *,
    student_feature: str = "pooled",
    teacher_feature: str | None = None,
    exponent: float = 4.0,
    temperature: float = 1.0,
    feature_weight: float = 2.0,
    bn_eps: float = 1e-4,
    weight: Weight = 1.0,
    name: str = "srd",
) -> Method:
    """SRD (Miles & Mikolajczyk, AAAI 2024; official code roymiles/Simple-Recipe-Distillation):

    ``L = feature_weight · log Σ |BN(W e_s) − BN(e_t)|^α + τ² · KL(p_t^τ ‖ p_s^τ)``

    with ``e`` the pooled features, ``W`` a trainable linear projector to the teacher's width (a method
    parameter) and ``BN`` a batch normalization without affine parameters (``eps = 1e-4``) using the
    batch's statistics, on both sides, as the official ``OurDistillationLoss`` computes it
    (:func:`jaxkd.losses.srd`; ``α = 4``, ``τ = 1``, ``feature_weight = 2``; its ImageNet recipe is
    ``ce + srd``). torchdistill's ``SRDLoss`` is the same sum without ``τ²`` (equal at ``τ = 1``); its
    ``SRDModelWrapper`` normalizes the teacher with a BatchNorm inside the teacher, which in eval mode uses
    its initial running statistics (the identity up to ``1/sqrt(1 + eps)``), where the official code
    normalizes both with the batch's statistics, as here. Metrics: ``feature``, ``kl``.
    """
    check_positive("exponent", exponent)
    check_temperature("temperature", temperature)
    check_positive("feature_weight", feature_weight)
    check_positive("bn_eps", bn_eps)
    t_name = student_feature if teacher_feature is None else teacher_feature

    def feats(inputs: LossInputs):
        return features.embedding_pair(inputs, student_feature, t_name, method=name)

    def init(rng, inputs: LossInputs) -> MethodVars:
        s, t = feats(inputs)
        return MethodVars(params=features.module_init(LinearConnector(t.shape[-1]), rng, s).params)

    def loss(vars: MethodVars, inputs: LossInputs, rng):
        s, t = feats(inputs)
        s, _ = features.module_apply(LinearConnector(t.shape[-1]), MethodVars(vars.params), s)
        mask = inputs.example_mask
        feature = losses.srd(batch_standardize(s, mask, bn_eps), batch_standardize(t, mask, bn_eps),
                             exponent=exponent, mask=mask)
        zs, zt = inputs.output("student", method=name).logits, inputs.target("teacher", method=name).logits
        kl = losses.forward_kl(zs, zt, temperature=temperature, mask=mask)
        value = feature_weight * feature + temperature**2 * kl
        return value, LossAux({"feature": feature, "kl": kl}, vars.state)

    return Method(name=name, loss=loss, init=init, weight=weight, needs=Needs(participants=("teacher",)))
