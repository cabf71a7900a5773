"""SimKD as a method: a trainable projector onto the teacher's last feature map, and the teacher's own
classifier reused at inference."""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxkd import losses
from jaxkd.checks import check_int
from jaxkd.methods.base import LossAux, LossInputs, Method, MethodVars, Needs, Weight
from jaxkd.methods.features import dense_layer, module_apply, module_init, student_feature, teacher_feature
from jaxkd.methods.registry import register
from jaxkd.models.base import Outputs, get_feature
from jaxkd.models.cifar_resnet import batch_norm

__all__ = ["simkd"]

# PyTorch's default Conv2d init (kaiming_uniform, a=√5): U(−1/√fan_in, 1/√fan_in).
_torch_conv_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


class SimKDProjector(nn.Module):
    """SimKD's ``transfer`` bottleneck (DefangChen/SimKD, ``models/util.py``, ``class SimKD``), NHWC:
    conv1x1 → BN → ReLU → conv3x3 → BN → ReLU → conv1x1 → BN → ReLU, bias-free convolutions, widths
    ``channels // factor``, ``channels // factor``, ``channels``. (The official 3x3 is a full
    convolution; its depthwise ``groups=`` variant is commented out there.)"""

    channels: int
    factor: int = 2

    @nn.compact
    def __call__(self, x, *, train: bool):
        mid = self.channels // self.factor
        x = jnp.asarray(x, jnp.float32)
        for i, (width, kernel) in enumerate(((mid, 1), (mid, 3), (self.channels, 1))):
            x = nn.Conv(width, (kernel, kernel), padding=kernel // 2, use_bias=False, kernel_init=_torch_conv_init,
                        name=f"conv{i + 1}")(x)
            x = nn.relu(batch_norm(train, jnp.float32, f"bn{i + 1}")(x))
        return x


def adaptive_average_pool(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """PyTorch's ``adaptive_avg_pool2d`` of an NHWC map to ``size`` when the map's size is a multiple of it
    (non-overlapping windows); a ``ValueError`` names both sizes otherwise."""
    b, h, w, c = x.shape
    th, tw = size
    if (th, tw) == (h, w):
        return x
    if h % th or w % tw:
        raise ValueError(f"cannot average-pool a {h}x{w} map to {th}x{tw}: the sizes must divide")
    return jnp.mean(x.reshape(b, th, h // th, tw, w // tw, c), axis=(2, 4))


def _classifier(inputs: LossInputs, teacher: str, path: str, method: str) -> dict[str, jax.Array]:
    return dense_layer(inputs, teacher, path, method=method)


@register(
    "simkd", inputs="feature_maps",
    paper="Chen et al., *Knowledge Distillation with the Reused Teacher Classifier*, CVPR 2022",
    losses=("simkd",),
    status="supported (evaluation uses the teacher's classifier)",
)
def simkd(
    *,
    factor: int = 2,
    student_feature_name: str = "stage3",
    teacher_feature_name: str = "stage3",
    classifier: str = "fc",
    teacher: str = "teacher",
    weight: Weight = 1.0,
    name: str = "simkd",
) -> Method:
    """SimKD (Chen, Mei, Zhang, Wang, Wang & Chen, "Knowledge Distillation with the Reused Teacher
    Classifier", CVPR 2022), following DefangChen/SimKD.

    The student's last feature map (``stage3``, RepDistiller's ``feat[-2]``) goes through
    :class:`SimKDProjector` (trainable; BatchNorm statistics in method state) to the teacher's channels;
    the loss is :func:`jaxkd.losses.simkd`, the MSE to the teacher's map (the larger map is first
    average-pooled to the smaller one's size, as the official code does). At inference
    (:attr:`Method.predict`, used by evaluation) the student's logits are the *teacher's* classifier
    applied to the globally pooled projected feature; the student's own classifier is unused.

    Design: the teacher's classifier (its dense layer at ``classifier``, ``"fc"`` on the CIFAR models)
    is read from the frozen teacher's variables (``LossInputs.variables[teacher]``) and copied into the
    method state at ``init`` and again at every loss call (the teacher is frozen, so the copy never
    changes); ``predict`` only sees the method variables and the student's outputs, and reads it there.

    The official recipe trains with this loss alone (``-c 0 -d 0 -b 1``): the spec is ``simkd``, with no
    ``ce``; the train step's ``accuracy`` metric is the student's own (unused) head — evaluation is what
    scores SimKD.
    """
    factor = check_int("factor", factor, low=1)
    geometry: dict[str, tuple[int, int]] = {}

    def aligned(s: Any, t: Any) -> tuple[int, int]:
        (_, sh, sw, _), (_, th, tw, _) = s.shape, t.shape
        return (th, tw) if sh > th else (sh, sw)

    def features(inputs: LossInputs):
        s = student_feature(inputs, student_feature_name, method=name)
        t = teacher_feature(inputs, teacher_feature_name, method=name, participant=teacher)
        if len(s.shape) != 4 or len(t.shape) != 4:
            raise ValueError(
                f"{name!r} projects feature maps [B, H, W, C]; got student {student_feature_name!r} {tuple(s.shape)} "
                f"and teacher {teacher_feature_name!r} {tuple(t.shape)}"
            )
        return s, t

    def projector(t_shape) -> SimKDProjector:
        channels = int(t_shape[-1])
        if channels // factor < 1:
            raise ValueError(f"{name!r}: factor={factor} leaves no channels for a teacher map of {channels} channels")
        return SimKDProjector(channels, factor)

    def init(rng, inputs: LossInputs) -> MethodVars:
        s, t = features(inputs)
        size = aligned(s, t)
        geometry["size"] = size
        v = module_init(projector(t.shape), rng, jax.ShapeDtypeStruct((s.shape[0], *size, s.shape[-1]), jnp.float32))
        state = {"projector": v.state, "classifier": _classifier(inputs, teacher, classifier, name)}
        if state["classifier"]["kernel"].shape[0] != t.shape[-1]:
            raise ValueError(
                f"{name!r}: the teacher's classifier {classifier!r} takes {state['classifier']['kernel'].shape[0]} "
                f"features, but the teacher map {teacher_feature_name!r} has {t.shape[-1]} channels"
            )
        return MethodVars(params={"projector": v.params}, state=state)

    def loss(vars: MethodVars, inputs: LossInputs, rng):
        s, t = features(inputs)
        size = aligned(s, t)
        s, t = adaptive_average_pool(s, size), adaptive_average_pool(t, size)
        projected, proj_state = module_apply(
            projector(t.shape), MethodVars(vars.params["projector"], vars.state["projector"]), s
        )
        value = losses.simkd(projected, t, mask=inputs.example_mask)
        state = {"projector": proj_state, "classifier": _classifier(inputs, teacher, classifier, name)}
        return value, LossAux({}, state)

    def predict(vars: MethodVars, outputs: Outputs) -> jax.Array:
        s = get_feature(outputs, student_feature_name, who="student")
        if "size" not in geometry:
            raise ValueError(f"{name!r}: predict needs the method initialized first (jaxkd.create)")
        s = adaptive_average_pool(s, geometry["size"])
        channels = vars.state["classifier"]["kernel"].shape[0]
        projected, _ = module_apply(
            SimKDProjector(channels, factor), MethodVars(vars.params["projector"], vars.state["projector"]), s,
            train=False,
        )
        pooled = jnp.mean(projected, axis=(1, 2))
        fc = vars.state["classifier"]
        return pooled @ fc["kernel"] + fc["bias"]

    return Method(name=name, loss=loss, init=init, weight=weight, needs=Needs(participants=(teacher,)), predict=predict)
