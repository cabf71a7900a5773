"""OFD as a method: 1x1 conv + BN connectors on the student's pre-ReLU stage outputs, margins from the
frozen teacher's BatchNorm parameters."""

from __future__ import annotations

import re
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxkd import losses
from jaxkd.methods.base import LossAux, LossInputs, Method, MethodVars, Needs, Weight
from jaxkd.methods.registry import register
from jaxkd.methods.features import (
    module_apply, module_init, param_at, participant_variables, student_feature, teacher_feature,
)
from jaxkd.models.cifar_resnet import batch_norm, conv_init

__all__ = ["ofd"]


class OFDConnector(nn.Module):
    """OFD's ``build_feature_connector``: a bias-free 1x1 convolution (init ``N(0, 2/(k·k·out))``, the
    fan-out Kaiming init) to the teacher's channels, then BatchNorm (scale 1, bias 0)."""

    channels: int

    @nn.compact
    def __call__(self, x, *, train: bool):
        x = nn.Conv(self.channels, (1, 1), use_bias=False, kernel_init=conv_init, name="conv")(jnp.asarray(x, jnp.float32))
        return batch_norm(train, jnp.float32, "bn")(x)


def _default_bn(params, feature: str, method: str) -> str:
    """The BatchNorm before the ReLU of ``stage<k>_preact`` on the CIFAR ResNets: ``bn2`` of the stage's
    last block (the official ``get_bn_before_relu`` of RepDistiller-style ResNets)."""
    match = re.fullmatch(r"stage(\d+)_preact", feature)
    blocks = sorted(
        (int(m.group(1)), key) for key in params
        if match and (m := re.fullmatch(rf"stage{match.group(1)}_block(\d+)", key))
    ) if match else []
    if not blocks:
        raise ValueError(
            f"{method!r}: no default BatchNorm for the teacher feature {feature!r}; pass teacher_bns=(...) with the "
            f"path of the BatchNorm before each feature's ReLU (e.g. 'stage1_block2/bn2')"
        )
    return f"{blocks[-1][1]}/bn2"


@register(
    "ofd", inputs="feature_maps",
    paper="Heo et al., *A Comprehensive Overhaul of Feature Distillation*, ICCV 2019",
    losses=("ofd",),
)
def ofd(
    *,
    student_features: Sequence[str] = ("stage1_preact", "stage2_preact", "stage3_preact"),
    teacher_features: Sequence[str] | None = None,
    teacher_bns: Sequence[str] | None = None,
    teacher: str = "teacher",
    weight: Weight = 1.0,
    name: str = "ofd",
) -> Method:
    """OFD (Heo, Kim, Yun, Park, Kwak & Choi, ICCV 2019), following clovaai/overhaul-distillation
    (``CIFAR-100/distiller.py``).

    For each pair ``i`` of pre-ReLU features (default the three stage outputs before their ReLU),
    ``ofd_i = losses.ofd(connector_i(s_i), t_i, margin_i)`` with :class:`OFDConnector` (trainable) and
    the teacher's per-channel margins :func:`jaxkd.losses.ofd_margin` from the affine parameters
    (``scale``, ``bias``) of the BatchNorm before that ReLU, read from the frozen teacher's variables
    each step; the total is ``Σ_i ofd_i / 2^(n−1−i)`` (the deepest pair has weight 1). ``teacher_bns``
    gives those BatchNorms' parameter paths (default: ``bn2`` of each stage's last block, the CIFAR
    ResNets' BN before the residual sum).

    The official loop adds ``loss_distill.sum() / batch_size / 1000`` to CE: the spec is
    ``ce + 0.001 * ofd``. Deviations: the official CIFAR code runs the teacher in train mode (batch
    statistics) during distillation; here the frozen teacher is in eval mode as for every method. On a
    ResNet the pre-ReLU feature is the residual sum, while the margin describes only its BN branch (the
    official ResNet ``get_bn_before_relu`` makes the same approximation).
    Metrics: one per student feature.
    """
    s_names = (student_features,) if isinstance(student_features, str) else tuple(student_features)
    t_names = s_names if teacher_features is None else (
        (teacher_features,) if isinstance(teacher_features, str) else tuple(teacher_features))
    if not s_names or len(s_names) != len(t_names):
        raise ValueError(f"{name!r}: {len(s_names)} student features {s_names} but {len(t_names)} teacher features {t_names}")
    if teacher_bns is not None and len(tuple(teacher_bns)) != len(t_names):
        raise ValueError(f"{name!r}: teacher_bns has {len(tuple(teacher_bns))} entries for {len(t_names)} features")
    n = len(s_names)

    def pairs(inputs: LossInputs):
        for s_name, t_name in zip(s_names, t_names):
            s = student_feature(inputs, s_name, method=name)
            t = teacher_feature(inputs, t_name, method=name, participant=teacher)
            if tuple(s.shape[:-1]) != tuple(t.shape[:-1]):
                raise ValueError(
                    f"{name!r}: the 1x1 connector keeps the spatial size, but student {s_name!r} {tuple(s.shape)} and "
                    f"teacher {t_name!r} {tuple(t.shape)} differ"
                )
            yield s_name, t_name, s, t

    def margins(inputs: LossInputs):
        params = participant_variables(inputs, teacher, method=name)["params"]
        paths = tuple(teacher_bns) if teacher_bns is not None else tuple(_default_bn(params, t, name) for t in t_names)
        out = []
        for path in paths:
            bn = param_at(params, path, who=f"participant {teacher!r}", method=name)
            out.append(jax.lax.stop_gradient(losses.ofd_margin(bn["scale"], bn["bias"])))
        return out

    def init(rng, inputs: LossInputs) -> MethodVars:
        params, state = {}, {}
        for i, ((_, t_name, s, t), margin, r) in enumerate(zip(pairs(inputs), margins(inputs), jax.random.split(rng, n))):
            if margin.shape != (t.shape[-1],):
                raise ValueError(
                    f"{name!r}: the BatchNorm for {t_name!r} has {margin.shape[0]} channels, the feature {t.shape[-1]}"
                )
            v = module_init(OFDConnector(int(t.shape[-1])), r, s)
            params[str(i)], state[str(i)] = v.params, v.state
        return MethodVars(params=params, state=state)

    def loss(vars: MethodVars, inputs: LossInputs, rng):
        total = jnp.zeros((), jnp.float32)
        metrics, new_state = {}, {}
        for i, ((s_name, _, s, t), margin) in enumerate(zip(pairs(inputs), margins(inputs))):
            key = str(i)
            s, new_state[key] = module_apply(OFDConnector(int(t.shape[-1])), MethodVars(vars.params[key], vars.state[key]), s)
            value = jnp.asarray(losses.ofd(s, t, margin, mask=inputs.example_mask), jnp.float32)
            metrics[s_name] = value
            total = total + value / 2 ** (n - 1 - i)
        return total, LossAux(metrics if n > 1 else {}, new_state)

    return Method(name=name, loss=loss, init=init, weight=weight, needs=Needs(participants=(teacher,)))
