"""PAD-L2 as a method: the student's pooled features, with a trainable variance branch, against the teacher's."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxkd import losses
from jaxkd.checks import check_positive
from jaxkd.methods.base import LossAux, LossInputs, Method, MethodVars, Needs, Weight
from jaxkd.methods import features
from jaxkd.methods.feature.connectors import LinearConnector, _torch_bias_init, _torch_kernel_init
from jaxkd.methods.registry import register
from jaxkd.models.cifar_resnet import batch_norm

__all__ = ["pad_l2"]


class VarianceBranch(nn.Module):
    """torchdistill's ``VarianceBranch4PAD`` estimator: a linear layer and BatchNorm on the student's
    flattened features; its output is read as the log-variance of each teacher dimension."""

    features: int

    @nn.compact
    def __call__(self, x, *, train: bool):
        x = jnp.asarray(x, jnp.float32).reshape(x.shape[0], -1)
        x = nn.Dense(self.features, kernel_init=_torch_kernel_init, bias_init=_torch_bias_init(x.shape[-1]))(x)
        return batch_norm(train, jnp.float32, "bn")(x)


@register(
    "pad_l2",
    paper="Zhang et al., *Prime-Aware Adaptive Distillation*, ECCV 2020",
    losses=("pad_l2",),
    status="supported (torchdistill's PADL2Loss; the variance branch trained with the student in one stage)",
)
def pad_l2(
    *,
    student_feature: str = "pooled",
    teacher_feature: str | None = None,
    eps: float = 1e-6,
    weight: Weight = 1.0,
    name: str = "pad_l2",
) -> Method:
    """PAD-L2 (:func:`jaxkd.losses.pad_l2`): the student's features (``pooled``; through a trainable linear
    connector when the teacher's are wider or narrower) against the teacher's, each dimension weighted by
    ``1 / (eps + exp(v))`` with ``v`` predicted from the student's features by :class:`VarianceBranch` (a
    method parameter trained by this loss). torchdistill runs PAD on ImageNet as ``ce + pad_l2`` (weight 1)
    after a first stage that trains the student and its variance branch; here both train together from the
    start.
    """
    check_positive("eps", eps)
    t_name = student_feature if teacher_feature is None else teacher_feature

    def feats(inputs: LossInputs):
        return features.embedding_pair(inputs, student_feature, t_name, method=name)

    def init(rng, inputs: LossInputs) -> MethodVars:
        s, t = feats(inputs)
        rc, rv = jax.random.split(rng)
        params, state = {}, {}
        branch = features.module_init(VarianceBranch(t.shape[-1]), rv, s)
        params["variance"], state["variance"] = branch.params, branch.state
        if s.shape[-1] != t.shape[-1]:
            params["connector"] = features.module_init(LinearConnector(t.shape[-1]), rc, s).params
        return MethodVars(params=params, state=state)

    def loss(vars: MethodVars, inputs: LossInputs, rng):
        s, t = feats(inputs)
        log_variance, branch_state = features.module_apply(
            VarianceBranch(t.shape[-1]), MethodVars(vars.params["variance"], vars.state["variance"]), s)
        if "connector" in vars.params:
            s, _ = features.module_apply(LinearConnector(t.shape[-1]), MethodVars(vars.params["connector"]), s)
        value = losses.pad_l2(s, t, log_variance, eps=eps, mask=inputs.example_mask)
        return value, LossAux({"log_variance": jnp.mean(log_variance)}, {"variance": branch_state})

    return Method(name=name, loss=loss, init=init, weight=weight, needs=Needs(participants=("teacher",)))
