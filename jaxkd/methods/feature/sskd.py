"""SSKD as a method: both models run on the four rotations of the batch; self-supervision heads on their
pooled features; KD on the unrotated and the rotated views and on the rotation-similarity task."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxkd import losses
from jaxkd.checks import check_in_range, check_nonnegative, check_temperature
from jaxkd.methods.base import LossAux, LossInputs, Method, MethodVars, Needs, Weight
from jaxkd.methods.features import apply_participant, module_apply, module_init
from jaxkd.methods.feature.connectors import _torch_bias_init, _torch_kernel_init
from jaxkd.methods.feature.lsskd import rotated_copies
from jaxkd.methods.registry import register
from jaxkd.models.base import get_feature

__all__ = ["SSHead", "rotation_views", "sskd"]


class SSHead(nn.Module):
    """The self-supervision head of the official code (``proj_head``) and torchdistill's ``SSWrapper4SSKD``:
    linear, ReLU, linear, all of the input's width."""

    @nn.compact
    def __call__(self, x, *, train: bool):
        del train
        x = jnp.asarray(x, jnp.float32)
        d = x.shape[-1]
        dense = lambda name: nn.Dense(d, kernel_init=_torch_kernel_init, bias_init=_torch_bias_init(d), name=name)  # noqa: E731
        return dense("fc2")(nn.relu(dense("fc1")(x)))


def rotation_views(images: jax.Array) -> jax.Array:
    """``[N, H, W, C]`` square images -> ``[4N, H, W, C]``, image-major: rows ``4n .. 4n+3`` are image ``n``
    rotated by 0°, 90°, 180°, 270° (the official SSKD data layout, ``x.view(-1, c, h, w)`` of its
    ``[N, 4, c, h, w]`` batches). :func:`sskd` builds this inside the step; a data pipeline that wants the
    official layout (torchdistill's) can apply it to its batches."""
    copies = rotated_copies(images, losses.feature.sskd.NUM_VIEWS)  # [4, N, ...]
    return jnp.moveaxis(copies, 0, 1).reshape(-1, *images.shape[1:])


@register(
    "sskd", inputs="feature_maps",
    paper="Xu et al., *Knowledge Distillation Meets Self-Supervision*, ECCV 2020",
    losses=("sskd_terms", "sskd_contrastive_ce"),
    status="supported (the teacher's self-supervision head trained alongside, not in a first stage)",
)
def sskd(
    *,
    kl_weight: float = 0.9,
    ss_weight: float = 10.0,
    tf_weight: float = 2.7,
    aux_weight: float = 1.0,
    kl_temperature: float = 4.0,
    ss_temperature: float = 0.5,
    tf_temperature: float = 4.0,
    ss_ratio: float = 0.75,
    tf_ratio: float = 1.0,
    embedding: str = "pooled",
    weight: Weight = 1.0,
    name: str = "sskd",
) -> Method:
    """SSKD (:func:`jaxkd.losses.sskd_terms`):
    ``kl_weight·kl + ss_weight·ss + tf_weight·tf + aux_weight·aux``.

    Inside the step, the student (train mode, its current variables) and the teacher (eval mode) run
    again on the four rotations of the batch's square images (:func:`rotation_views`: ``4N`` images,
    image-major, as the official code batches them); their logits and ``embedding`` features are read as
    ``[N, 4, ...]``. Each has a self-supervision head (:class:`SSHead`, a method parameter). ``aux`` is
    :func:`jaxkd.losses.sskd_contrastive_ce` of the teacher's head on the (gradient-stopped) teacher
    features: it trains the teacher's head, which the official code (xuguodong03/SSKD ``student.py``) and
    torchdistill (``AuxSSKDLoss``) train in a first stage on the frozen teacher (60 epochs) before the
    student's; here it trains alongside, and the ``ss`` term reads it gradient-stopped. The defaults are
    the official CIFAR-100 ones, where the cross-entropy weight is 0.1: ``0.1 * ce + sskd`` (torchdistill's
    ImageNet config: ``ce + sskd``). The BatchNorm statistics of the extra forward are not kept. Metrics:
    ``kl``, ``ss``, ``tf``, ``aux``.
    """
    for n, v in (("kl_weight", kl_weight), ("ss_weight", ss_weight), ("tf_weight", tf_weight),
                 ("aux_weight", aux_weight)):
        check_nonnegative(n, v)
    for n, v in (("kl_temperature", kl_temperature), ("ss_temperature", ss_temperature),
                 ("tf_temperature", tf_temperature)):
        check_temperature(n, v)
    check_in_range("ss_ratio", ss_ratio, 0.0, 1.0)
    check_in_range("tf_ratio", tf_ratio, 0.0, 1.0)
    head = SSHead()

    def init(rng, inputs: LossInputs) -> MethodVars:
        s = get_feature(inputs.output("student", method=name), embedding, who=f"the student ({name!r})")
        t = get_feature(inputs.target("teacher", method=name), embedding, who=f"the teacher ({name!r})")
        rs, rt = jax.random.split(rng)
        return MethodVars(params={"student_head": module_init(head, rs, s).params,
                                  "teacher_head": module_init(head, rt, t).params})

    def views(inputs: LossInputs, participant: str, x, train: bool, rng):
        """``participant``'s logits and features of the rotated views, ``[N, 4, ...]``."""
        out = apply_participant(inputs, participant, x, train=train, method=name, rngs={"dropout": rng})
        feature = get_feature(out, embedding, who=f"the {participant} ({name!r})")
        n = x.shape[0] // 4
        return out.logits.reshape(n, 4, -1), feature.reshape(n, 4, -1)

    def loss(vars: MethodVars, inputs: LossInputs, rng):
        x = inputs.participant("student", method=name).model_input(inputs.batch, name="student")
        if jnp.ndim(x) != 4 or x.shape[1] != x.shape[2]:
            raise ValueError(f"{name}: the rotations need square images [B, H, W, C], got shape {jnp.shape(x)}")
        rotated = rotation_views(x)
        zs, fs = views(inputs, "student", rotated, True, rng)
        zt, ft = jax.lax.stop_gradient(views(inputs, "teacher", rotated, False, rng))
        ss_s, _ = module_apply(head, MethodVars(vars.params["student_head"]), fs)
        ss_t, _ = module_apply(head, MethodVars(vars.params["teacher_head"]), ft)
        mask = inputs.label_mask
        kl, ss, tf = losses.sskd_terms(
            zs, zt, ss_s, ss_t, inputs.labels(name), kl_temperature=kl_temperature, ss_temperature=ss_temperature,
            tf_temperature=tf_temperature, ss_ratio=ss_ratio, tf_ratio=tf_ratio, mask=mask)
        aux = losses.sskd_contrastive_ce(ss_t, mask=mask)
        value = kl_weight * kl + ss_weight * ss + tf_weight * tf + aux_weight * aux
        return value, LossAux({"kl": kl, "ss": ss, "tf": tf, "aux": aux}, vars.state)

    return Method(name=name, loss=loss, init=init, weight=weight, needs=Needs(participants=("teacher",), labels=True))
