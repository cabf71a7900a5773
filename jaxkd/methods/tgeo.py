"""TGeo-KD as a method: a trainable fusion network, updated through a one-step lookahead on a meta batch.

The released code never trains its fusion network (α is computed under ``no_grad`` and the validation
loss does not depend on it; ``shared/FORMULAS.md`` §9). jaxkd implements the paper's bilevel objective
the way it can be computed honestly in one step — the one-step-lookahead hypergradient of
learning-to-reweight methods:

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
import jax.numpy as jnp

from jaxkd import losses
from jaxkd.losses._core import check_positive
from jaxkd.losses.tgeo import fused_kd_ce, fusion_inputs
from jaxkd.methods.base import LossAux, LossInputs, Method, MethodVars, Weight, example_mask, require, require_teacher
from jaxkd.methods.heads import dense, dense_init


def _fusion_init(rng: jax.Array, d_in: int, hidden: Sequence[int]) -> list[dict]:
    sizes = [d_in, *hidden, 1]
    keys = jax.random.split(rng, len(sizes) - 1)
    return [dense_init(k, a, b) for k, a, b in zip(keys, sizes[:-1], sizes[1:])]


def _fusion_apply(layers: list[dict], x: jax.Array) -> jax.Array:
    for layer in layers[:-1]:
        x = jax.nn.leaky_relu(dense(layer, x), negative_slope=0.01)  # PyTorch's LeakyReLU default
    return jax.nn.sigmoid(dense(layers[-1], x))[..., 0]


def tgeo_kd(
    *,
    temperature: float = 1.5,
    lookahead_lr: float = 0.05,
    hidden: Sequence[int] = (32, 16),
    meta_prefix: str = "meta_",
    weight: Weight = 1.0,
    name: str = "tgeo_kd",
) -> Method:
    """TGeo-KD (Hu et al., "Less or More From Teacher: Exploiting Trilateral Geometry For Knowledge
    Distillation", ICLR 2024) with the bilevel update as a one-step lookahead (module docstring).

    Needs a held-out meta batch in the batch: ``batch[meta_prefix + input_key]`` and
    ``batch[meta_prefix + "label"]``. The fusion network (official: 9C → 32 → 16 → 1, LeakyReLU,
    sigmoid) is stepped by the student's optimizer (official: its own Adam, lr 0.1); ``lookahead_lr``
    should be about the student's learning rate. It replaces ``ce + kd``. Official T = 1.5. Metrics:
    ``student_loss``, ``meta_ce``, ``ratio_mean``.
    """
    check_positive("temperature", temperature)
    check_positive("lookahead_lr", lookahead_lr)
    meta_label_key = meta_prefix + "label"

    def init(rng: jax.Array, inputs: LossInputs) -> MethodVars:
        num_classes = inputs.student.logits.shape[-1]
        return MethodVars(params={"fusion": _fusion_init(rng, 9 * num_classes, tuple(hidden))})

    def loss(vars: MethodVars, inputs: LossInputs, rng: jax.Array):
        del rng
        teacher_logits = jax.lax.stop_gradient(require_teacher(inputs, method=name).logits)
        labels = require(inputs.batch, "label", method=name)
        meta_x = require(inputs.batch, meta_prefix + inputs.input_key, method=name)
        meta_y = require(inputs.batch, meta_label_key, method=name)
        mask = example_mask(inputs.batch)
        ratio = _fusion_apply(vars.params["fusion"], fusion_inputs(inputs.student.logits, teacher_logits, labels, mask))

        student_loss = fused_kd_ce(inputs.student.logits, teacher_logits, labels, jax.lax.stop_gradient(ratio),
                                   temperature=temperature, mask=mask)

        variables = jax.lax.stop_gradient(inputs.student_variables)
        params, model_state = variables["params"], {k: v for k, v in variables.items() if k != "params"}
        apply = inputs.student_model.apply

        def inner(p):
            logits = apply({"params": p, **model_state}, inputs.model_input, train=True).logits
            return fused_kd_ce(logits, teacher_logits, labels, ratio, temperature=temperature, mask=mask)

        grads = jax.grad(inner)(params)
        lookahead = jax.tree.map(lambda p, g: p - lookahead_lr * g, params, grads)
        meta_logits = apply({"params": lookahead, **model_state}, meta_x, train=True).logits
        meta_ce = losses.cross_entropy(meta_logits, meta_y, mask=inputs.batch.get(meta_prefix + "mask"))

        metrics = {"student_loss": student_loss, "meta_ce": meta_ce, "ratio_mean": jnp.mean(ratio)}
        return student_loss + meta_ce, LossAux(metrics, vars.state)

    # The meta input's key depends on the state's input_key, so only the labels are declared here; a
    # missing meta input still fails at create time, when the loss is traced.
    return Method(name=name, loss=loss, init=init, weight=weight, needs_teacher=True,
                  batch_keys=("label", meta_label_key))
