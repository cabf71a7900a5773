"""MST-Distill as a method: masked (specialized) teachers, an instance-level router, top-k routed KD.

Li, Yang, Chen, Dong, Chen & Wang, "MST-Distill: Mixture of Specialized Teachers for Cross-Modal Knowledge
Distillation", ACM MM 2025; official code ``Gray-OREO/MST-Distill`` (``KD_methods/MST.py``,
``main-MST-Distill.py``, commit 093b2fe). Only the paper's abstract was available to this implementation;
every formula below is the official code's. What the official code does, and what jaxkd does of it:

* **Specialized teachers.** A MaskNet (``MaskNet_1d``) multiplies one intermediate feature of a teacher by a
  learned per-example sigmoid mask, and the teacher's remaining layers run on the masked feature; each
  (teacher, masked layer) pair is one specialized teacher. jaxkd masks the teacher's ``pooled`` embedding
  (the classifier's input), so the remaining layer is the teacher's own classifier (``fc``), read
  gradient-stopped: one specialized teacher per teacher participant. The MaskNet is the official one: each of
  the ``d`` feature entries becomes a token (``Linear(d, hidden·d)``), multi-head self-attention over the
  ``d`` tokens, ``Linear(hidden, 1)``, sigmoid; ``hidden = d // (hidden_factor·heads) · heads``.
* **Mask objective** (stage 2): each MaskNet is trained so the masked teacher matches the student,
  ``T²·KL(p_s ‖ p_masked)`` at ``T = 4`` (``distillation_loss_detached(outputs_t, outputs_s)``: the student
  detached, the teacher frozen). Its gradient reaches the mask parameters only.
* **Router** (``GateNet``): ``Linear(C, 2C) → Linear(2C, N)`` (no activation, as released) on the student's
  logits, softmax. The student learns (stage 3) from the top-``k`` teachers it picks
  (:func:`jaxkd.losses.mst_distill`, teachers detached) plus ``balance_weight`` × the load-balancing term.
  Top-k selection has no gradient, so **the router is trained by the load-balancing term only** (as in the
  official code, where the router's input — the student's logits — also receives that term's gradient).
* **Stages.** The official run co-trains teachers and student (stage 1), trains the masks with everything
  else frozen (stage 2), then trains student and router with the masks frozen (stage 3). Here the teachers
  are participants (frozen, trained beforehand, or trained by another term); ``mask_steps=n`` runs stage 2
  for the first ``n`` steps (only the mask objective) and stage 3 after (no gradient reaches the masks; an
  optimizer with momentum still carries their last updates, as for any stage weight); ``mask_steps=None``
  trains masks, router and student together from the first step. The paper's teachers are cross-modal and
  multimodal; jaxkd's participants read the same input, so the mechanism runs over ``N`` teachers of one
  modality.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp

from jaxkd import losses
from jaxkd.checks import check_choice, check_int, check_nonnegative, check_temperature
from jaxkd.losses.logit.mst_distill import load_balancing
from jaxkd.methods.base import LossAux, LossInputs, Method, MethodVars, Needs, Weight, check_roles
from jaxkd.methods.features import dense_layer
from jaxkd.methods.heads import dense, dense_init
from jaxkd.methods.registry import register
from jaxkd.models.base import get_feature

__all__ = ["mst_distill"]


def _xavier_uniform(rng: jax.Array, d_in: int, d_out: int) -> jax.Array:
    bound = math.sqrt(6.0 / (d_in + d_out))
    return jax.random.uniform(rng, (d_in, d_out), jnp.float32, -bound, bound)


def mask_net_init(rng: jax.Array, feature_dim: int, *, heads: int = 3, hidden_factor: int = 2) -> dict:
    """The parameters of the official ``MaskNet_1d`` for a ``feature_dim``-wide feature, initialized as PyTorch
    does (``nn.Linear``: U(±1/√fan_in); ``nn.MultiheadAttention``: Xavier-uniform input projection, zero biases)."""
    hidden = feature_dim // (hidden_factor * heads) * heads
    if hidden < heads:
        raise ValueError(f"a MaskNet over {feature_dim} features with {heads} heads and hidden_factor={hidden_factor} "
                         f"has no hidden width (feature_dim // (hidden_factor·heads) = 0); use fewer heads or a "
                         f"smaller factor")
    k = jax.random.split(rng, 4)
    out_proj = dense_init(k[2], hidden, hidden)
    return {
        "embed": dense_init(k[0], feature_dim, hidden * feature_dim),
        "in_proj": {"kernel": _xavier_uniform(k[1], hidden, 3 * hidden), "bias": jnp.zeros(3 * hidden, jnp.float32)},
        "out_proj": {"kernel": out_proj["kernel"], "bias": jnp.zeros(hidden, jnp.float32)},
        "fc": dense_init(k[3], hidden, 1),
    }


def mask_net_apply(params: dict, feature: jax.Array, *, heads: int) -> jax.Array:
    """The mask ``[B, d]`` in ``(0, 1)`` for a ``[B, d]`` feature: every entry a token of width ``hidden``,
    PyTorch's multi-head self-attention over the ``d`` tokens, a linear read-out and a sigmoid."""
    b, d = feature.shape
    hidden = params["out_proj"]["kernel"].shape[0]
    tokens = dense(params["embed"], feature).reshape(b, d, hidden)
    q, k, v = jnp.split(dense(params["in_proj"], tokens), 3, axis=-1)
    split = lambda x: x.reshape(b, d, heads, hidden // heads)
    scores = jnp.einsum("bqhc,bkhc->bhqk", split(q), split(k)) / math.sqrt(hidden // heads)
    attended = jnp.einsum("bhqk,bkhc->bqhc", jax.nn.softmax(scores, axis=-1), split(v)).reshape(b, d, hidden)
    return jax.nn.sigmoid(dense(params["fc"], dense(params["out_proj"], attended))[..., 0])


def _router_init(rng: jax.Array, num_classes: int, num_teachers: int) -> list[dict]:
    k1, k2 = jax.random.split(rng)
    return [dense_init(k1, num_classes, 2 * num_classes), dense_init(k2, 2 * num_classes, num_teachers)]


def _router_apply(layers: list[dict], logits: jax.Array) -> jax.Array:
    # The released GateNet has no nonlinearity between its two layers.
    return dense(layers[1], dense(layers[0], logits))


@register(
    "mst_distill",
    paper="Li et al., *MST-Distill: Mixture of Specialized Teachers for Cross-Modal KD*, ACM MM 2025",
    losses=("mst_distill", "kd"),
    status="supported (N teachers on one input; masks on the teachers' `pooled` embedding; stages 2-3 in one "
    "state, teachers as participants)",
)
def mst_distill(
    *,
    teachers: Sequence[str] = ("teacher", "teacher2"),
    k: int = 1,
    temperature: float = 4.0,
    balance_weight: float = 1.0,
    balance_mode: str = "kl",
    mask_heads: int = 3,
    mask_hidden_factor: int = 2,
    mask_steps: int | None = None,
    feature: str = "pooled",
    classifier: str = "fc",
    student: str = "student",
    weight: Weight = 1.0,
    name: str = "mst_distill",
) -> Method:
    """MST-Distill (module docstring): the student learns from the top-``k`` of ``N >= 2`` masked teachers an
    instance-level router picks; chain it with ``ce`` (the official stage 3 is ``CE + KD_topk + LB``, all
    weights 1).

    ``teachers`` are participant names (any architectures over the student's classes, each with a
    ``feature`` embedding feeding a dense ``classifier``). Official: ``k = 1``, ``T = 4``, 3 mask heads,
    hidden factor 2, ``balance_mode="kl"``. Metrics: ``kd``, ``load_balance``, ``mask_kd`` (the masks'
    objective, summed over teachers), ``route_<teacher>`` (the router's mean probability of each teacher).
    """
    teachers = tuple(teachers)
    if not all(isinstance(t, str) and t for t in teachers) or len(set(teachers)) != len(teachers):
        raise ValueError(f"{name}: teachers must be distinct participant names, got {teachers!r}")
    if len(teachers) < 2:
        raise ValueError(f"{name}: a router needs at least two teachers to choose between, got {teachers!r}")
    if student in teachers:
        raise ValueError(f"{name}: the student {student!r} cannot be one of its own teachers {teachers}")
    for t in teachers:
        check_roles(name, student, t)
    k = check_int("k", k, low=1)
    if k > len(teachers):
        raise ValueError(f"{name}: k={k} exceeds the number of teachers {len(teachers)}")
    check_temperature("temperature", temperature)
    check_nonnegative("balance_weight", balance_weight)
    check_choice("balance_mode", balance_mode, ("kl", "cv"))
    mask_heads = check_int("mask_heads", mask_heads, low=1)
    mask_hidden_factor = check_int("mask_hidden_factor", mask_hidden_factor, low=1)
    if mask_steps is not None:
        mask_steps = check_int("mask_steps", mask_steps, low=0)

    def init(rng, inputs: LossInputs) -> MethodVars:
        keys = jax.random.split(rng, len(teachers) + 1)
        masks = {}
        for key, t in zip(keys[1:], teachers):
            f = get_feature(inputs.target(t, method=name), feature, who=t)
            if f.ndim != 2:
                raise ValueError(f"{name}: masks a [batch, dim] feature; {t!r}'s {feature!r} has shape {f.shape}")
            masks[t] = mask_net_init(key, f.shape[-1], heads=mask_heads, hidden_factor=mask_hidden_factor)
        num_classes = inputs.output(student, method=name).logits.shape[-1]
        return MethodVars(params={"router": _router_init(keys[0], num_classes, len(teachers)), "masks": masks})

    def masked_teacher_logits(params, inputs: LossInputs, t: str) -> jax.Array:
        f = jnp.asarray(get_feature(inputs.target(t, method=name), feature, who=t), jnp.float32)
        fc = dense_layer(inputs, t, classifier, method=name)
        return (mask_net_apply(params["masks"][t], f, heads=mask_heads) * f) @ fc["kernel"] + fc["bias"]

    def loss(vars: MethodVars, inputs: LossInputs, rng):
        del rng
        zs = inputs.output(student, method=name).logits
        mask = inputs.example_mask
        masked = [masked_teacher_logits(vars.params, inputs, t) for t in teachers]
        # Stage 2: each mask pulls its teacher towards the (detached) student; reaches the mask parameters only.
        target = jax.lax.stop_gradient(zs)
        mask_kd = sum(losses.kd(z, target, temperature=temperature, mask=mask) for z in masked)
        # Stage 3: the router reads the student's logits (not detached, as released); the teachers are detached.
        probs = jax.nn.softmax(_router_apply(vars.params["router"], zs), axis=-1)
        zt = jax.lax.stop_gradient(jnp.stack(masked, axis=-2))
        kd = losses.mst_distill(zs, zt, probs, k=k, temperature=temperature, mask=mask)
        balance = load_balancing(probs, mode=balance_mode, mask=mask)
        distill = kd + balance_weight * balance
        if mask_steps is None:
            total = mask_kd + distill
        else:
            in_mask_stage = (inputs.step < mask_steps).astype(jnp.float32)
            total = in_mask_stage * mask_kd + (1.0 - in_mask_stage) * distill
        metrics = {"kd": kd, "load_balance": balance, "mask_kd": mask_kd}
        for i, t in enumerate(teachers):
            metrics[f"route_{t}"] = losses.reduce_loss(probs[:, i], mask=mask)
        return total, LossAux(metrics, vars.state)

    return Method(name=name, loss=loss, init=init, weight=weight,
                  needs=Needs(participants=teachers, trained=(student,)))
