"""LSSKD as a method: auxiliary classifiers on the student's stages, layered self-supervised self-distillation
(no teacher)."""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from jaxkd import losses
from jaxkd.checks import check_int, check_nonnegative, check_temperature
from jaxkd.methods.base import LossAux, LossInputs, Method, MethodVars, Needs, Weight
from jaxkd.methods.features import apply_participant, module_apply
from jaxkd.methods.feature.ofa import _stage_names, apply_heads, branch_heads, init_heads
from jaxkd.methods.registry import register
from jaxkd.models.base import get_feature

__all__ = ["lsskd"]

#: The self-supervised transformations: rotations by k·90°, k = 0..3 (SLA's and HSAKD's).
NUM_ROTATIONS = 4


def rotated_copies(images: jax.Array, num_rotations: int = NUM_ROTATIONS) -> jax.Array:
    """``[B, H, W, C]`` square images -> ``[num_rotations, B, H, W, C]``: copy ``k`` is every image rotated
    by ``k·90°`` counter-clockwise in the ``(H, W)`` plane (``jnp.rot90(x, k, axes=(1, 2))``, the NHWC form
    of HSAKD's ``torch.rot90(x, k, (2, 3))`` on NCHW). Not a loss (a helper of the LSSKD method)."""
    num_rotations = check_int("num_rotations", num_rotations, low=1)
    if jnp.ndim(images) != 4 or images.shape[1] != images.shape[2]:
        raise ValueError(
            f"rotated copies need square images [B, H, W, C] with H == W, got shape {jnp.shape(images)}"
        )
    return jnp.stack([jnp.rot90(images, k, axes=(1, 2)) for k in range(num_rotations)])


@register(
    "lsskd", inputs="feature_maps",
    paper="Dahri et al., *A Layered Self-Supervised Knowledge Distillation Framework for Efficient Multimodal "
    "Learning on the Edge*, 2025",
    losses=("lsskd", "lsskd_terms"),
    status="supported (rotation-augmented joint labels as in HSAKD/SLA; stage-to-stage transfer reconstructed, "
    "no official code)",
)
def lsskd(
    *,
    stages: Sequence[str] = ("stage1", "stage2", "stage3"),
    temperature: float = 3.0,
    aux_ce_weight: float = 1.0,
    aux_kd_weight: float = 1.0,
    final_kd_weight: float = 1.0,
    rotations: bool = True,
    width: int | None = None,
    embedding: str = "pooled",
    weight: Weight = 1.0,
    name: str = "lsskd",
) -> Method:
    """LSSKD (:func:`jaxkd.losses.lsskd`): an auxiliary classifier on each of the student's ``stages``
    (the branch heads of :class:`jaxkd.methods.feature.ofa.BranchHead`: downsampling convolutions to the width
    of the student's ``embedding``, pooling, a linear classifier), trained with self-supervised augmented
    labels and the final classifier's distribution, which in turn learns their mean distribution. No
    teacher: ``"ce + lsskd"``. The auxiliary classifiers are dropped at inference. Metrics: ``ce_aux``,
    ``kd_aux``, ``kd_final``.

    With ``rotations`` (the default, the paper's self-supervised augmented task as in HSAKD and SLA), the
    student runs again inside the step on the four rotations (0°, 90°, 180°, 270°, :func:`rotated_copies`)
    of the batch's images, stacked into one batch of ``4B`` (its current variables, in train mode, so the
    gradients reach its parameters; the BatchNorm statistics of this extra forward are not kept: the
    student's running statistics come from its ordinary forward on the unrotated batch). Each auxiliary
    classifier reads its stage's features of every rotated copy and predicts the joint ``(class,
    rotation)`` label among ``4·C`` (index ``4·y + k``, HSAKD's layout), trained by cross-entropy; its class
    prediction is SLA's aggregate over the four copies, ``ā_c = (1/4) Σ_k a(rot_k x)_{4c + k}``, which is
    what the two-way KL with the final classifier (on the unrotated input) uses. The images must be
    square ``[B, H, W, C]``. With ``rotations=False`` the auxiliary classifiers predict the ``C`` classes of
    the unrotated features of the ordinary forward (no extra forward).

    Documented assumptions (see :func:`jaxkd.losses.lsskd`; no official code is public): the layer-to-layer
    transfer is the two-way KL between the aggregated auxiliary distributions and the final classifier,
    with the current step's predictions as targets.
    """
    stage_names = _stage_names(stages)
    check_temperature("temperature", temperature)
    for n, v in (("aux_ce_weight", aux_ce_weight), ("aux_kd_weight", aux_kd_weight), ("final_kd_weight", final_kd_weight)):
        check_nonnegative(n, v)
    if not isinstance(rotations, bool):
        raise ValueError(f"rotations must be True or False, got rotations={rotations!r}")
    if width is not None:
        width = check_int("width", width, low=1)
    m = NUM_ROTATIONS if rotations else 1

    def heads_of(inputs):
        heads = branch_heads(inputs, stage_names, width=width, embedding=embedding, method=name, teacher=None)
        if m == 1:
            return heads
        return {s: h.clone(num_classes=h.num_classes * m) for s, h in heads.items()}

    def init(rng, inputs: LossInputs) -> MethodVars:
        return init_heads(heads_of(inputs), rng, inputs, method=name)

    def rotated_logits(heads, vars: MethodVars, inputs: LossInputs, rng):
        """The heads' joint logits on the student's features of the rotated copies: ``[B, L, 4, 4·C]``."""
        participant = inputs.participant("student", method=name)
        x = participant.model_input(inputs.batch, name="student")
        if jnp.ndim(x) != 4 or x.shape[1] != x.shape[2]:
            raise ValueError(
                f"{name}: rotations need the student's input to be square images [B, H, W, C], got shape "
                f"{jnp.shape(x)}; use lsskd(rotations=False) for other inputs"
            )
        b = x.shape[0]
        copies = rotated_copies(x, m)
        outputs = apply_participant(inputs, "student", copies.reshape(m * b, *x.shape[1:]), train=True, method=name,
                                    rngs={"dropout": rng})
        logits, state = [], {}
        for s in stage_names:
            f = get_feature(outputs, s, who=f"the student ({name!r})")
            out, state[s] = module_apply(heads[s], MethodVars(vars.params[s], vars.state[s]), f)
            logits.append(jnp.moveaxis(out.reshape(m, b, -1), 0, 1))  # [B, 4, 4·C]
        return jnp.stack(logits, axis=1), state

    def loss(vars: MethodVars, inputs: LossInputs, rng):
        heads = heads_of(inputs)
        if m == 1:
            head_logits, state = apply_heads(heads, vars, inputs, method=name)
            aux = jnp.stack([head_logits[s] for s in stage_names], axis=-2)
        else:
            aux, state = rotated_logits(heads, vars, inputs, rng)
        labels, mask = inputs.labels(name), inputs.label_mask
        final = inputs.output("student", method=name).logits
        ce_aux, kd_aux, kd_final = losses.lsskd_terms(
            final, aux, jax.lax.stop_gradient(final), jax.lax.stop_gradient(aux), labels,
            temperature=temperature, transformations=m, mask=mask,
        )
        value = aux_ce_weight * ce_aux + aux_kd_weight * kd_aux + final_kd_weight * kd_final
        return value, LossAux({"ce_aux": ce_aux, "kd_aux": kd_aux, "kd_final": kd_final}, state)

    return Method(name=name, loss=loss, init=init, weight=weight, needs=Needs(labels=True))
