"""OFA-KD: branch heads project intermediate student features to logits, each distilled with the OFA loss."""

from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxkd import losses
from jaxkd.checks import check_int, check_nonnegative, check_positive, check_temperature
from jaxkd.methods.base import LossAux, LossInputs, Method, MethodVars, Needs, Weight, check_roles
from jaxkd.methods.features import module_apply, module_init, student_feature
from jaxkd.methods.registry import LOGIT_ROLES, register
from jaxkd.models.base import get_feature
from jaxkd.models.cifar_resnet import batch_norm

__all__ = ["ofa"]

# The official init (``distillers/utils.py: init_weights``): kaiming-normal (fan_out, ReLU) convolutions,
# truncated-normal (std 0.02) linear weights with zero biases.
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
_dense_init = nn.initializers.truncated_normal(0.02)


class SepConv(nn.Module):
    """OFA's ``SepConv`` (downsample by 2): depthwise 3x3 stride 2 → pointwise → BN → ReLU → depthwise 3x3 →
    pointwise to ``features`` → BN → ReLU (no biases)."""

    features: int

    @nn.compact
    def __call__(self, x, *, train: bool):
        c = x.shape[-1]
        common = dict(use_bias=False, kernel_init=_conv_init)
        x = nn.Conv(c, (3, 3), strides=2, padding=1, feature_group_count=c, **common)(x)
        x = nn.Conv(c, (1, 1), **common)(x)
        x = nn.relu(batch_norm(train, jnp.float32, "bn1")(x))
        x = nn.Conv(c, (3, 3), strides=1, padding=1, feature_group_count=c, **common)(x)
        x = nn.Conv(self.features, (1, 1), **common)(x)
        return nn.relu(batch_norm(train, jnp.float32, "bn2")(x))


class TokenBlock(nn.Module):
    """A pre-norm transformer block (timm's ``Block``: LN → MHSA → residual, LN → MLP(4×, GELU) → residual)."""

    num_heads: int

    @nn.compact
    def __call__(self, x, *, train: bool):
        del train
        d = x.shape[-1]
        y = nn.LayerNorm(epsilon=1e-6)(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=self.num_heads, kernel_init=_dense_init)(y, y)
        y = nn.LayerNorm(epsilon=1e-6)(x)
        y = nn.Dense(4 * d, kernel_init=_dense_init)(y)
        y = nn.Dense(d, kernel_init=_dense_init)(nn.gelu(y, approximate=False))
        return x + y


def pooled_conv_branch(x, width: int, downsamples: int, *, train: bool):
    """A branch head's convolutional trunk on a ``[B, H, W, C]`` map, then global average pooling: a 1x1
    convolution to ``width`` when ``downsamples == 0``, else ``downsamples`` stride-2 :class:`SepConv` blocks
    doubling the channels, the last one to ``width``. Called inside a module's ``nn.compact`` method, so its
    layers are that module's (``Conv_0``, ``sepconv{i}``)."""
    if downsamples == 0:
        x = nn.Conv(width, (1, 1), kernel_init=_conv_init)(x)
    channels = x.shape[-1]
    for i in range(downsamples):
        out = width if i == downsamples - 1 else 2 * channels
        x = SepConv(out, name=f"sepconv{i}")(x, train=train)
        channels = out
    return jnp.mean(x, axis=(1, 2))


class BranchHead(nn.Module):
    """An OFA branch: an intermediate feature of any layout to ``num_classes`` logits.

    * NHWC maps ``[B, H, W, C]`` (CNN stages): ``downsamples`` :class:`SepConv` blocks (channels doubling,
      the last to ``width``), or a 1x1 convolution to ``width`` when ``downsamples = 0``; then global
      average pooling and a linear classifier — the official CNN projector.
    * Tokens ``[B, N, D]`` (ViT/MLP stages): a linear map to ``width``, one :class:`TokenBlock`, the mean
      over tokens and a linear classifier. The official projector also merges patches down to a 7x7 grid
      and stacks ``max(4 − stage, 1)`` blocks and reads the class token when there is one; here the token
      count and class token are not assumed (any ``N``), so the patch merging is replaced by the linear map.
    * Embeddings ``[B, D]``: a linear classifier.
    """

    num_classes: int
    width: int
    downsamples: int = 0

    @nn.compact
    def __call__(self, x, *, train: bool):
        x = jnp.asarray(x, jnp.float32)
        if x.ndim == 4:
            x = pooled_conv_branch(x, self.width, self.downsamples, train=train)
        elif x.ndim == 3:
            x = nn.Dense(self.width, kernel_init=_dense_init)(x)
            heads = 4 if self.width % 4 == 0 else 1
            x = TokenBlock(heads)(x, train=train)
            x = jnp.mean(x, axis=1)
        elif x.ndim != 2:
            raise ValueError(f"a branch head reads [B, H, W, C] maps, [B, N, D] tokens or [B, D] embeddings, got {x.shape}")
        return nn.Dense(self.num_classes, kernel_init=_dense_init, bias_init=nn.initializers.zeros)(x)


def _stage_names(stages) -> tuple[str, ...]:
    names = (stages,) if isinstance(stages, str) else tuple(stages)
    if not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"stages must be feature names, got {stages!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"stages must be distinct, got {names!r}")
    return names


def branch_heads(
    inputs: LossInputs, stages: Sequence[str], *, width: int | None, embedding: str, method: str, participant: str = "student",
    teacher: str | None = "teacher",
) -> dict[str, BranchHead]:
    """One :class:`BranchHead` per stage, sized from the (abstract or concrete) features.

    The width is ``width`` or, by default, the official ``max(student dim, teacher dim)`` of the final
    embeddings ``embedding`` for maps and the student's for tokens (without a teacher: the student's). A
    map's number of downsampling blocks is ``log2`` of its height over the smallest height among the map
    stages (the official ``4 − stage`` for a four-stage network: the last stage gets the 1x1 convolution).
    """
    student = inputs.output(participant, method=method)
    num_classes = student.logits.shape[-1]
    features = {s: student_feature(inputs, s, method=method, participant=participant) for s in stages}
    if width is None:
        dims = [get_feature(student, embedding, who=f"participant {participant!r} ({method!r})").shape[-1]]
        if teacher is not None:
            dims.append(get_feature(inputs.target(teacher, method=method), embedding,
                                    who=f"participant {teacher!r} ({method!r})").shape[-1])
        map_width, token_width = max(dims), dims[0]
    else:
        map_width = token_width = width
    heights = [f.shape[1] for f in features.values() if f.ndim == 4]
    smallest = min(heights) if heights else 1
    heads = {}
    for s, f in features.items():
        if f.ndim not in (2, 3, 4):
            raise ValueError(f"{method!r}: stage {s!r} has shape {tuple(f.shape)}; a branch head reads maps, tokens or embeddings")
        if f.ndim == 4:
            ratio = f.shape[1] / smallest
            downsamples = int(round(math.log2(ratio))) if ratio >= 1 else 0
            heads[s] = BranchHead(num_classes, map_width, downsamples)
        else:
            heads[s] = BranchHead(num_classes, token_width)
    return heads


def init_heads(heads: dict[str, nn.Module], rng, inputs: LossInputs, *, method: str, participant: str = "student") -> MethodVars:
    params, state = {}, {}
    for (s, head), r in zip(heads.items(), jax.random.split(rng, max(len(heads), 1))):
        v = module_init(head, r, student_feature(inputs, s, method=method, participant=participant))
        params[s], state[s] = v.params, v.state
    return MethodVars(params=params, state=state)


def apply_heads(heads: dict[str, nn.Module], vars: MethodVars, inputs: LossInputs, *, method: str, participant: str = "student"):
    logits, state = {}, {}
    for s, head in heads.items():
        f = student_feature(inputs, s, method=method, participant=participant)
        logits[s], state[s] = module_apply(head, MethodVars(vars.params[s], vars.state[s]), f)
    return logits, state


@register(
    "ofa", inputs="feature_maps",
    paper="Hao et al., *One-for-All: Bridge the Gap Between Heterogeneous Architectures in Knowledge Distillation*, NeurIPS 2023",
    losses=("ofa",),
    contract=LOGIT_ROLES,
)
def ofa(
    *,
    stages: Sequence[str] = ("stage1", "stage2", "stage3"),
    eps: float | Sequence[float] = 1.0,
    temperature: float = 1.0,
    branch_weight: float = 1.0,
    logit_weight: float = 1.0,
    width: int | None = None,
    embedding: str = "pooled",
    student: str = "student",
    teacher: str = "teacher",
    weight: Weight = 1.0,
    name: str = "ofa",
) -> Method:
    """OFA-KD (:func:`jaxkd.losses.ofa`): a trainable branch head on each student stage projects it to
    logits, and every branch and the student's own logits learn the teacher's target-enhanced distribution:

    ``L = branch_weight · Σ_j OFA(head_j(f_s^j), z_t; ε_j) + logit_weight · OFA(z_s, z_t; ε_last)``

    Hao et al., NeurIPS 2023; the official ``distillers/ofa.py`` (github.com/Hao840/OFAKD) with its
    defaults: ``ε = 1`` for every term (one value, or one per stage plus one for the logits), ``T = 1``,
    weights 1 (``--ofa-loss-weight``, ``--kd-loss-weight``); the official CE term (with label smoothing
    0.1) is the user's ``ce``. Branch heads (:class:`BranchHead`) read NHWC maps, token sequences
    ``[B, N, D]`` or embeddings, so a ViT teacher with a CNN student and the reverse both work: only the
    teacher's logits are distilled. The heads are trained with the student and unused at inference.
    Metrics: ``logits`` and one per stage.

    ``student``/``teacher`` name the participants in the two roles, as in :func:`~jaxkd.methods.kd`: the
    branch heads read the stages of the participant in the ``student`` role, and the teacher's logits (and
    its embedding width, for the default head width) are a gradient-stopped target.
    """
    check_roles(name, student, teacher)
    stage_names = _stage_names(stages)
    eps_values = (eps,) * (len(stage_names) + 1) if not isinstance(eps, (tuple, list)) else tuple(eps)
    if len(eps_values) != len(stage_names) + 1:
        raise ValueError(
            f"eps must be one number or one per stage plus one for the logits ({len(stage_names) + 1}), got {eps!r}"
        )
    for e in eps_values:
        check_positive("eps", e)
    check_temperature("temperature", temperature)
    check_nonnegative("branch_weight", branch_weight)
    check_nonnegative("logit_weight", logit_weight)
    if width is not None:
        width = check_int("width", width, low=1)

    def heads_of(inputs):
        return branch_heads(inputs, stage_names, width=width, embedding=embedding, method=name, participant=student,
                            teacher=teacher)

    def init(rng, inputs: LossInputs) -> MethodVars:
        return init_heads(heads_of(inputs), rng, inputs, method=name, participant=student)

    def loss(vars: MethodVars, inputs: LossInputs, rng):
        zt = inputs.target(teacher, method=name).logits
        labels, mask = inputs.labels(name), inputs.label_mask
        head_logits, state = apply_heads(heads_of(inputs), vars, inputs, method=name, participant=student)
        metrics = {}
        branches = jnp.zeros((), jnp.float32)
        for (s, z), e in zip(head_logits.items(), eps_values):
            metrics[s] = losses.ofa(z, zt, labels, eps=e, temperature=temperature, mask=mask)
            branches = branches + metrics[s]
        metrics["logits"] = losses.ofa(
            inputs.output(student, method=name).logits, zt, labels, eps=eps_values[-1],
            temperature=temperature, mask=mask,
        )
        return branch_weight * branches + logit_weight * metrics["logits"], LossAux(metrics, state)

    return Method(name=name, loss=loss, init=init, weight=weight,
                  needs=Needs(trained=(student,), participants=(teacher,), labels=True))
