"""BYOT as a method: shallow classifiers on the student's stages (method parameters) learn from the labels, from the
student's own deepest classifier and from its deepest embedding (self-distillation; no teacher network)."""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxkd import losses
from jaxkd.checks import check_in_range, check_int, check_nonnegative, check_temperature
from jaxkd.methods.base import LossAux, LossInputs, Method, MethodVars, Needs, Weight
from jaxkd.methods.feature.ofa import _dense_init, _stage_names, branch_heads, init_heads, pooled_conv_branch
from jaxkd.methods.features import module_apply, student_feature
from jaxkd.methods.registry import register
from jaxkd.models.base import get_feature

__all__ = ["byot"]


class ByotHead(nn.Module):
    """A BYOT shallow classifier: a bottleneck to the deepest embedding's width, pooling, a linear classifier.

    On an NHWC map: ``downsamples`` :class:`~jaxkd.methods.feature.ofa.SepConv` blocks (the authors' ResNet
    bottlenecks are these depthwise-separable convolutions, as OFA's branches are), or a 1x1 convolution when
    ``downsamples = 0``, then global average pooling: the embedding ``h``. On a ``[B, D]`` embedding, a linear
    map to ``width``. Returns ``(h, logits)``: ``h`` is what the feature hint compares with the deepest
    embedding.
    """

    num_classes: int
    width: int
    downsamples: int = 0

    @nn.compact
    def __call__(self, x, *, train: bool):
        x = jnp.asarray(x, jnp.float32)
        if x.ndim == 4:
            h = pooled_conv_branch(x, self.width, self.downsamples, train=train)
        elif x.ndim == 2:
            h = nn.Dense(self.width, kernel_init=_dense_init)(x)
        else:
            raise ValueError(f"a BYOT head reads [B, H, W, C] maps or [B, D] embeddings, got shape {x.shape}")
        return h, nn.Dense(self.num_classes, kernel_init=_dense_init, bias_init=nn.initializers.zeros)(h)


@register(
    "byot", inputs="feature_maps",
    paper="Zhang et al., *Be Your Own Teacher: Improve the Performance of CNNs via Self Distillation*, ICCV 2019",
    losses=("byot", "byot_terms"),
    status="supported (shallow classifiers as method parameters; the student's own classifier is the deepest)",
)
def byot(
    *,
    stages: Sequence[str] = ("stage1", "stage2"),
    deepest: str | None = "stage3",
    embedding: str = "pooled",
    temperature: float = 3.0,
    alpha: float = 0.3,
    feature_weight: float = 0.03,
    width: int | None = None,
    weight: Weight = 1.0,
    name: str = "byot",
) -> Method:
    """BYOT (Zhang et al., "Be Your Own Teacher: Improve the Performance of Convolutional Neural Networks via Self
    Distillation", ICCV 2019; authors' code ``ArchipLab-LinfengZhang/pytorch-self-distillation-final``).

    A shallow classifier (:class:`ByotHead`: bottleneck, pooling, linear) on each of the student's ``stages``;
    its parameters are method parameters (trained with the student, dropped at inference). The student's own
    classifier is the deepest one, and evaluation scores it. The loss is :func:`jaxkd.losses.byot` — for every
    shallow classifier ``(1 − α)·CE`` with the labels, ``α·KL`` to the deepest classifier's softened
    distribution and ``λ·‖h_i − f_C‖²`` to the deepest embedding ``f_C = features[embedding]``, both targets
    gradient-stopped (the deepest classifier is taught by the labels alone): ``"ce + byot"`` is the whole
    method. Defaults are the authors' (``T = 3``, ``α = 0.3``, ``λ = 0.03``).

    The bottleneck brings each stage to the deepest embedding's width (``width``, default that of
    ``embedding``) and, for maps, to the resolution of the ``deepest`` map (``log2`` of the ratio of heights
    in stride-2 SepConv blocks; ``None``: the smallest of ``stages``) before pooling.

    How it differs from :func:`~jaxkd.methods.lsskd`, which also trains auxiliary classifiers on the stages
    (and whose :func:`~jaxkd.methods.feature.ofa.branch_heads` sizing this reuses): LSSKD's heads predict
    rotation-augmented joint labels and teach the final classifier back (two-way KL), with no feature term;
    BYOT's heads learn the plain labels, from the deepest classifier only (one way), plus the feature hint
    to the deepest embedding, so its heads also return their embedding. Metrics: ``ce``, ``kd``, ``hint``
    (each summed over the shallow classifiers).
    """
    stage_names = _stage_names(stages)
    if deepest is not None and (not isinstance(deepest, str) or not deepest):
        raise ValueError(f"deepest must be a feature name or None, got deepest={deepest!r}")
    check_temperature("temperature", temperature)
    check_in_range("alpha", alpha, 0.0, 1.0)
    check_nonnegative("feature_weight", feature_weight)
    if width is not None:
        width = check_int("width", width, low=1)

    def heads_of(inputs: LossInputs) -> dict[str, ByotHead]:
        # Sized with the deepest map among the stages, so every bottleneck downsamples to its resolution.
        sizing = stage_names + ((deepest,) if deepest is not None and deepest not in stage_names else ())
        heads = branch_heads(inputs, sizing, width=width, embedding=embedding, method=name, teacher=None)
        return {s: ByotHead(heads[s].num_classes, heads[s].width, heads[s].downsamples) for s in stage_names}

    def init(rng, inputs: LossInputs) -> MethodVars:
        return init_heads(heads_of(inputs), rng, inputs, method=name)

    def loss(vars: MethodVars, inputs: LossInputs, rng):
        student = inputs.output("student", method=name)
        final_features = get_feature(student, embedding, who=f"the student ({name!r})")
        embeddings, logits, state = [], [], {}
        for s, head in heads_of(inputs).items():
            f = student_feature(inputs, s, method=name)
            (h, z), state[s] = module_apply(head, MethodVars(vars.params[s], vars.state[s]), f)
            embeddings.append(h)
            logits.append(z)
        aux_logits, aux_features = jnp.stack(logits, axis=-2), jnp.stack(embeddings, axis=-2)
        if aux_features.shape[-1] != final_features.shape[-1]:
            raise ValueError(
                f"{name}: the heads' width {aux_features.shape[-1]} differs from the student's {embedding!r} width "
                f"{final_features.shape[-1]}; leave width=None"
            )
        targets = jax.lax.stop_gradient((student.logits, final_features))
        labels, mask = inputs.labels(name), inputs.label_mask
        ce, kd, hint = losses.byot_terms(aux_logits, aux_features, *targets, labels, temperature=temperature,
                                         mask=mask)
        value = (1.0 - alpha) * ce + alpha * kd + feature_weight * hint
        return value, LossAux({"ce": ce, "kd": kd, "hint": hint}, state)

    return Method(name=name, loss=loss, init=init, weight=weight, needs=Needs(labels=True))
