"""Correlation congruence as a method: trainable linear embeddings of both models' pooled features."""

from __future__ import annotations

import jax

from jaxkd import losses
from jaxkd.checks import check_choice, check_int, check_positive
from jaxkd.methods.base import LossAux, LossInputs, Method, MethodVars, Needs, Weight
from jaxkd.methods.feature.connectors import LinearEmbed
from jaxkd.methods import features
from jaxkd.methods.registry import register

__all__ = ["cc"]


@register(
    "cc",
    paper="Peng et al., *Correlation Congruence for Knowledge Distillation*, ICCV 2019",
    losses=("cc", "cc_kernel"),
    status="supported (RepDistiller's official-code form; the paper's Taylor-RBF kernel as torchdistill computes it "
    "with form='paper')",
)
def cc(
    *,
    student_feature: str = "pooled",
    teacher_feature: str | None = None,
    embed_dim: int = 128,
    form: str = "authors",
    kernel: str = "gaussian",
    gamma: float = 0.4,
    order: int = 2,
    normalize: bool = False,
    weight: Weight = 1.0,
    name: str = "cc",
) -> Method:
    """Correlation congruence (:func:`jaxkd.losses.cc`) between trainable linear embeddings.

    Peng et al., ICCV 2019, as RepDistiller runs it: both the student's and the teacher's pooled features
    (``feat[-1]``) go through their own ``LinearEmbed`` (a linear map to ``embed_dim = 128``, no
    normalization; both are method parameters trained with the student — the teacher's embedding learns
    from this loss, the teacher does not), and the loss correlates the residuals of consecutive examples
    (see :func:`jaxkd.losses.cc` for how the official code differs from the paper's kernel). RepDistiller's
    CIFAR setting is ``ce + 0.02 * cc``. Under a sharded batch the consecutive pairs are the global batch's.

    ``form="paper"`` replaces the loss by the paper's kernel correlation matrices as torchdistill's
    ``CCKDLoss`` computes them (:func:`jaxkd.losses.cc_kernel` with ``kernel``, ``gamma``, ``order``: the
    Taylor-expanded Gaussian RBF, ``‖C_s − C_t‖_F / B²``), on the same trainable linear embeddings
    (torchdistill's ``Linear4CCKD``), so torchdistill configs' weights carry over (its ImageNet sample:
    ``gamma=0.4, order=2``, weight 0.003 beside ``kd(temperature=1)``). The expansion approximates the RBF
    kernel only for unit-norm embeddings; neither torchdistill nor the default here normalizes them, and
    unnormalized embeddings make the polynomial (hence the loss) large: ``normalize=True`` L2-normalizes
    both embeddings first (CRD's ``Embed``), the paper's kernel proper.
    """
    embed_dim = check_int("embed_dim", embed_dim, low=1)
    check_choice("form", form, ("authors", "paper"))
    check_choice("kernel", kernel, ("gaussian", "bilinear"))
    check_positive("gamma", gamma)
    order = check_int("order", order, low=1)
    s_name = student_feature
    t_name = s_name if teacher_feature is None else teacher_feature
    if not isinstance(normalize, bool):
        raise ValueError(f"normalize must be True or False, got normalize={normalize!r}")
    embed = LinearEmbed(embed_dim, normalize=normalize)

    def feats(inputs: LossInputs):
        return (features.student_feature(inputs, s_name, method=name),
                features.teacher_feature(inputs, t_name, method=name))

    def init(rng, inputs: LossInputs) -> MethodVars:
        s, t = feats(inputs)
        rs, rt = jax.random.split(rng)
        vs, vt = features.module_init(embed, rs, s), features.module_init(embed, rt, t)
        return MethodVars(params={"embed_s": vs.params, "embed_t": vt.params})

    def loss(vars: MethodVars, inputs: LossInputs, rng):
        s, t = feats(inputs)
        es, _ = features.module_apply(embed, MethodVars(vars.params["embed_s"]), s)
        et, _ = features.module_apply(embed, MethodVars(vars.params["embed_t"]), t)
        if form == "paper":
            value = losses.cc_kernel(es, et, kernel=kernel, gamma=gamma, order=order, mask=inputs.example_mask)
        else:
            value = losses.cc(es, et, mask=inputs.example_mask)
        return value, LossAux({}, vars.state)

    return Method(name=name, loss=loss, init=init, weight=weight, needs=Needs(participants=("teacher",)))
