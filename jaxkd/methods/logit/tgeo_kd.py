"""TGeo-KD as a method: a trainable fusion network, updated through a one-step lookahead on a meta batch.

The released code (``Chengming0501/TGeo-KD``) never trains its fusion network: α is computed under
``no_grad`` and the validation loss does not depend on it. jaxkd implements the paper's bilevel objective
the way it can be computed honestly in one step — the one-step-lookahead hypergradient of
learning-to-reweight methods::

    α = σ(MLP_φ(geometry))                                  per example, from detached inputs
    L_student(θ) = mean_i[sg(α_i)·T²·KL_i(θ) + (1 − sg(α_i))·CE_i(θ)]          (trains θ only)
    θ' = sg(θ) − η·∇_θ mean_i[α_i·T²·KL_i + (1 − α_i)·CE_i] |_{θ = sg(θ)}     (depends on φ via α)
    L_meta(φ) = CE(f(θ'; x_meta), y_meta)                                     (trains φ only)

and returns ``L_student + L_meta``: the student never sees the meta labels' gradient, and the fusion
network is trained to make one student step on the training batch help on the held-out meta batch.
"""

from __future__ import annotations

from typing import Sequence

import jax

from jaxkd.batch import MASK
from jaxkd import losses
from jaxkd.checks import check_int, check_positive, check_temperature
from jaxkd.methods.base import LossAux, LossInputs, Method, MethodVars, Needs, Weight, check_roles, require
from jaxkd.methods.features import participant_variables
from jaxkd.methods.heads import dense, dense_init
from jaxkd.methods.registry import LOGIT_ROLES, register
from jaxkd.models.base import merge_variables, split_variables

__all__ = ["tgeo_kd"]


def _fusion_init(rng: jax.Array, d_in: int, hidden: Sequence[int]) -> list[dict]:
    sizes = [d_in, *hidden, 1]
    keys = jax.random.split(rng, len(sizes) - 1)
    return [dense_init(k, a, b) for k, a, b in zip(keys, sizes[:-1], sizes[1:])]


def _fusion_apply(layers: list[dict], x: jax.Array) -> jax.Array:
    for layer in layers[:-1]:
        x = jax.nn.leaky_relu(dense(layer, x), negative_slope=0.01)  # PyTorch's LeakyReLU default
    return jax.nn.sigmoid(dense(layers[-1], x))[..., 0]


@register(
    "tgeo_kd",
    paper="Hu et al., *Less or More From Teacher: Exploiting Trilateral Geometry for KD*, ICLR 2024",
    losses=("tgeo_kd", "fusion_inputs"),
    status="supported (bilevel as a one-step lookahead on a held-out meta batch; the released code never "
    "trains its fusion net)",
    contract=LOGIT_ROLES,
)
def tgeo_kd(
    *,
    temperature: float = 1.5,
    lookahead_lr: float = 0.05,
    hidden: Sequence[int] = (32, 16),
    meta_prefix: str = "meta_",
    student: str = "student",
    teacher: str = "teacher",
    weight: Weight = 1.0,
    name: str = "tgeo_kd",
) -> Method:
    """TGeo-KD (Hu et al., "Less or More From Teacher: Exploiting Trilateral Geometry For Knowledge
    Distillation", ICLR 2024) with the bilevel update as a one-step lookahead (module docstring).

    Needs a held-out meta batch in the batch: the model input and the labels under ``meta_prefix`` +
    their keys (``"meta_image"``, ``"meta_label"`` by default). The fusion network (official: 9C → 32 →
    16 → 1, LeakyReLU, sigmoid) is stepped by the student's optimizer (official: its own Adam, lr 0.1);
    ``lookahead_lr`` should be about the student's learning rate. It replaces ``ce + kd``. Official
    T = 1.5. Metrics: ``student_loss``, ``meta_ce``, ``ratio_mean``.

    ``student``/``teacher`` name the participants in the two roles, as in :func:`~jaxkd.methods.kd`: the
    lookahead step and the meta cross-entropy are those of the participant in the ``student`` role (its
    model on the meta batch), and the teacher's logits are a gradient-stopped target.
    """
    check_temperature("temperature", temperature)
    check_roles(name, student, teacher)
    check_positive("lookahead_lr", lookahead_lr)
    hidden = tuple(check_int("hidden", h, low=1) for h in hidden)

    def init(rng, inputs: LossInputs) -> MethodVars:
        num_classes = inputs.output(student, method=name).logits.shape[-1]
        return MethodVars(params={"fusion": _fusion_init(rng, 9 * num_classes, hidden)})

    def loss(vars: MethodVars, inputs: LossInputs, rng):
        student_logits = inputs.output(student, method=name).logits
        teacher_logits = inputs.target(teacher, method=name).logits
        labels, mask = inputs.labels(name), inputs.label_mask
        # The meta batch carries the training batch's keys under meta_prefix; the student reads it the way
        # it reads its own batch (its input key, keys or function).
        meta_batch = {k[len(meta_prefix):]: v for k, v in inputs.batch.items() if k.startswith(meta_prefix)}
        meta_y = require(inputs.batch, meta_prefix + inputs.label_key, method=name)
        meta_x = inputs.model_input_of(meta_batch, student)
        geometry = losses.fusion_inputs(student_logits, teacher_logits, labels, mask)
        ratio = _fusion_apply(vars.params["fusion"], geometry)
        student_loss = losses.tgeo_kd(
            student_logits, teacher_logits, labels, jax.lax.stop_gradient(ratio), temperature=temperature,
            mask=mask,
        )

        params, model_state = split_variables(jax.lax.stop_gradient(participant_variables(inputs, student, method=name)))
        apply = inputs.participant(student, method=name).model.apply
        x = inputs.model_input_of(inputs.batch, student)

        def inner(p):
            logits = apply(merge_variables(p, model_state), x, train=True).logits
            return losses.tgeo_kd(logits, teacher_logits, labels, ratio, temperature=temperature, mask=mask)

        grads = jax.grad(inner)(params)
        lookahead = jax.tree.map(lambda p, g: p - lookahead_lr * g, params, grads)
        meta_logits = apply(merge_variables(lookahead, model_state), meta_x, train=True).logits
        meta_ce = losses.cross_entropy(meta_logits, meta_y, mask=inputs.batch.get(meta_prefix + MASK))

        metrics = {"student_loss": student_loss, "meta_ce": meta_ce, "ratio_mean": losses.reduce_loss(ratio, mask=mask)}
        return student_loss + meta_ce, LossAux(metrics, vars.state)

    return Method(name=name, loss=loss, init=init, weight=weight,
                  needs=Needs(trained=(student,), participants=(teacher,), labels=True, meta_prefix=meta_prefix))
