"""DMAE: the student sees a randomly masked input and aligns its features with the teacher's."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxkd import losses
from jaxkd.checks import check_choice, check_int, check_number
from jaxkd.methods.base import LossAux, LossInputs, Method, MethodVars, Needs, Weight
from jaxkd.methods.feature.connectors import LinearConnector, connector_between
from jaxkd.methods.features import apply_participant, module_apply, module_init, student_feature, teacher_feature
from jaxkd.methods.registry import register
from jaxkd.models.base import get_feature

__all__ = ["dmae"]


def random_patch_mask(rng: jax.Array, batch: int, grid: tuple[int, int], mask_ratio: float) -> jax.Array:
    """Boolean ``[batch, gh, gw]``, True where a patch stays visible: per example exactly
    ``int(L · (1 − mask_ratio))`` of the ``L = gh·gw`` patches, uniformly at random (MAE's
    ``random_masking``: argsort of uniform noise). Not a loss (a helper of the DMAE method)."""
    gh, gw = grid
    num = gh * gw
    keep = int(num * (1 - mask_ratio))
    noise = jax.random.uniform(rng, (batch, num))
    rank = jnp.argsort(jnp.argsort(noise, axis=-1), axis=-1)
    return (rank < keep).reshape(batch, gh, gw)


@register(
    "dmae", inputs="feature_maps",
    paper="Bai, Wang, Xiao, Wei, Wang, Yuille, Zhou & Xie, *Masked Autoencoders Enable Efficient Knowledge "
    "Distillers*, CVPR 2023",
    losses=("dmae",),
)
def dmae(
    *,
    student_feature_name: str = "stage3",
    teacher_feature_name: str = "stage3",
    mask_ratio: float = 0.75,
    patch_size: int = 4,
    distance: str = "l1",
    normalize: bool = True,
    visible_only: bool = True,
    teacher_sees: str = "masked",
    student: str = "student",
    teacher: str = "teacher",
    weight: Weight = 1.0,
    name: str = "dmae",
) -> Method:
    """DMAE's feature distillation (:func:`jaxkd.losses.dmae`) from a student that sees a masked input.

    Inside the step, a fraction ``mask_ratio`` of the input's ``patch_size × patch_size`` patches is drawn
    with the step's rng (:func:`random_patch_mask`) and zeroed; the student model runs again on that
    input (its current variables, so gradients reach its parameters; the BatchNorm statistics of this
    extra forward are not kept), its feature goes through a trainable projection (official
    ``fc-1layer``: a linear map of the channels; a :class:`~jaxkd.methods.feature.connectors.ConvRegressor`
    when the maps' resolutions differ) and is aligned with the teacher's feature by the L1 distance of
    ``l2``-normalized features (official ``embedding_distillation_func L1``). With ``visible_only`` only
    the feature positions whose patch (nearest, after resizing the patch grid to the map) was visible
    are compared, as the official code compares the visible tokens only.

    With ``teacher_sees="masked"`` (the default, as the official code: ``engine_distill.py`` runs the
    teacher's ``forward_encoder_customized(imgs, mask_ratio)`` in eval mode under ``torch.no_grad`` and
    hands the same mask to the student) the teacher also runs again inside the step on the same masked
    input — its own model input with the same patches zeroed, its variables from ``inputs.variables``,
    eval mode, ``stop_gradient`` — so both networks see only the visible patches; with ``"full"`` the
    teacher's feature comes from its ordinary forward on the full input (no extra forward). The teacher's
    input must then be ``[B, H, W, C]`` images of the student's height and width.

    Differences from the official code (github.com/UCSC-VLAA/DMAE), which distils ViTs by dropping the
    masked tokens: a CNN cannot drop pixels, so they are zeroed (for both networks); the MAE
    pixel-reconstruction term (for pre-training) is not part of this method. Defaults follow the official ``pretrain.sh`` (mask
    ratio 0.75, L1); ``stage3`` is the CIFAR ResNets' map whose 8×8 grid matches 4×4 patches of a 32×32
    input. The method's image input is ``[B, H, W, C]`` with ``H, W`` divisible by ``patch_size``.
    Metric: ``visible_fraction``.
    """
    check_number("mask_ratio", mask_ratio, low=0.0, high=1.0, high_open=True)
    patch_size = check_int("patch_size", patch_size, low=1)
    check_choice("distance", distance, ("l1", "l2"))
    check_choice("teacher_sees", teacher_sees, ("masked", "full"))
    if student == teacher:
        raise ValueError(f"{name}: the student and the teacher must be different participants, both are {student!r}")

    def connector(s_shape, t_shape):
        if tuple(s_shape[1:-1]) == tuple(t_shape[1:-1]):
            return LinearConnector(t_shape[-1])
        return connector_between(s_shape, t_shape)

    def init(rng, inputs: LossInputs) -> MethodVars:
        s = student_feature(inputs, student_feature_name, method=name, participant=student)
        t = teacher_feature(inputs, teacher_feature_name, method=name, participant=teacher)
        return module_init(connector(s.shape, t.shape), rng, s)

    def masked_teacher_feature(inputs: LossInputs, pixels):
        """The teacher's feature of its own input with the student's masked patches zeroed (eval mode,
        gradient-stopped variables and outputs)."""
        participant = inputs.participant(teacher, method=name)
        tx = participant.model_input(inputs.batch, name=teacher)
        if jnp.ndim(tx) != 4 or tuple(tx.shape[:3]) != tuple(pixels.shape[:3]):
            raise ValueError(
                f"{name}: teacher_sees='masked' needs the teacher's input to be images [B, H, W, C] of the "
                f"student's size {tuple(pixels.shape[:3])}, got shape {jnp.shape(tx)}; use teacher_sees='full'"
            )
        masked_tx = jnp.where(pixels, tx, jnp.zeros((), tx.dtype))
        outputs = apply_participant(inputs, teacher, masked_tx, train=False, method=name)
        feature = get_feature(outputs, teacher_feature_name, who=f"participant {teacher!r}")
        return jax.lax.stop_gradient(feature)

    def loss(vars: MethodVars, inputs: LossInputs, rng):
        x = inputs.participant(student, method=name).model_input(inputs.batch, name=student)
        if jnp.ndim(x) != 4:
            raise ValueError(f"{name}: the student's input must be images [B, H, W, C], got shape {jnp.shape(x)}")
        b, h, w, _ = x.shape
        if h % patch_size or w % patch_size:
            raise ValueError(f"{name}: patch_size={patch_size} must divide the input's {h}x{w} images")
        visible = random_patch_mask(rng, b, (h // patch_size, w // patch_size), mask_ratio)
        pixels = jnp.repeat(jnp.repeat(visible, patch_size, axis=1), patch_size, axis=2)[..., None]
        masked_x = jnp.where(pixels, x, jnp.zeros((), x.dtype))
        outputs = apply_participant(inputs, student, masked_x, train=True, method=name)
        s = get_feature(outputs, student_feature_name, who=f"participant {student!r}")
        if teacher_sees == "masked":
            t = masked_teacher_feature(inputs, pixels)
        else:
            t = teacher_feature(inputs, teacher_feature_name, method=name, participant=teacher)
        s, state = module_apply(connector(s.shape, t.shape), vars, s)
        positions = None
        if visible_only and t.ndim == 4:
            positions = jax.image.resize(visible.astype(jnp.float32), (b, t.shape[1], t.shape[2]), "nearest") > 0.5
        value = losses.dmae(s, t, positions, distance=distance, normalize=normalize, mask=inputs.example_mask)
        return value, LossAux({"visible_fraction": jnp.mean(visible.astype(jnp.float32))}, state)

    return Method(name=name, loss=loss, init=init, weight=weight, needs=Needs(participants=(student, teacher)))
