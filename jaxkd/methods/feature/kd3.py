"""KD³ as a method: combined-prediction instance selection, selection-weighted KD and embedding alignment
(through a linear connector when the widths differ), classifier-parameter alignment, and the MixDistribution
instance alignment (the student re-run on a batch whose per-example input statistics are mixed)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxkd import losses
from jaxkd.checks import check_in_range, check_nonnegative, check_positive, check_temperature
from jaxkd.losses.core import to_float
from jaxkd.methods.base import LossAux, LossInputs, Method, MethodVars, Needs, Weight, check_roles
from jaxkd.methods.feature.connectors import LinearConnector
from jaxkd.methods.registry import LOGIT_ROLES, register
from jaxkd.methods.features import (
    apply_participant, module_apply, module_init, param_at, participant_variables, student_feature, teacher_feature,
)
from jaxkd.models.base import get_feature

__all__ = ["kd3"]


def _random_partners(rng: jax.Array, batch: int, mask) -> jax.Array:
    """``[batch]`` int32: a uniformly random permutation of the valid examples (masked ones map to themselves)."""
    valid = jnp.ones((batch,), bool) if mask is None else jnp.asarray(mask, bool)
    noise = jax.random.uniform(rng, (batch,))
    shuffled = jnp.argsort(jnp.where(valid, noise, 2.0))  # valid indices in random order, then the masked ones
    ordered = jnp.argsort(~valid)  # valid indices in order, then the masked ones (stable sort: same tail)
    return jnp.arange(batch, dtype=jnp.int32).at[ordered].set(shuffled.astype(jnp.int32))


def mix_distribution(
    rng: jax.Array,
    x: jax.Array,
    *,
    alpha: float = 0.1,
    eps: float = 1e-6,
    mask: jax.Array | None = None,
    mix_weight: jax.Array | float | None = None,
    partner: jax.Array | None = None,
) -> jax.Array:
    """KD³'s MixDistribution perturbation (this implementation's reading; Tang et al., ICCV 2023): every
    example keeps its content but gets a new distribution, its per-channel statistics mixed with those of
    another example of the batch (MixStyle's rule, Zhou, Yang, Qiao & Xiang, "Domain Generalization with
    MixStyle", ICLR 2021, official ``mixstyle.py``):

    ``x̃_i = σ_mix · (x_i − μ_i) / σ_i + μ_mix``,  ``μ_mix = λ_i μ_i + (1 − λ_i) μ_{π(i)}``,
    ``σ_mix = λ_i σ_i + (1 − λ_i) σ_{π(i)}``, ``λ_i ~ Beta(α, α)``,

    with ``μ_i``, ``σ_i = sqrt(var_i + eps)`` the mean and standard deviation of example ``i`` per channel
    over its spatial positions (``x`` is ``[B, ..., C]``, channels last; a ``[B, D]`` input has one channel,
    its ``D`` values) and ``π`` a random permutation of the valid examples (``mask``: a masked example
    is never a partner and keeps its own statistics, i.e. is returned as it is). The statistics are gradient-stopped,
    as MixStyle detaches them. Unlike MixStyle, the perturbation is always applied (no probability ``p``):
    it makes the extra view the instance alignment needs. The variance is the population one (MixStyle's
    ``torch.var`` is unbiased: the same ``σ_mix/σ_i`` up to ``eps``). Not a loss (a helper of the method).

    Args:
      rng: the key that draws ``λ`` and ``π``.
      x: float ``[B, ...]``; the result has its shape and dtype (computed in at least float32).
      alpha: ``α`` of the Beta distribution (MixStyle's default 0.1: ``λ`` mostly near 0 or 1).
      eps: added to the variance.
      mask: boolean ``[B]``, the valid examples (partners are drawn among them).
      mix_weight: a fixed ``λ`` (scalar or ``[B]``) instead of a draw (``1`` returns ``x``).
      partner: a fixed int ``[B]`` ``π`` instead of a draw.
    """
    check_positive("alpha", alpha)
    check_positive("eps", eps)
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating) or x.ndim < 2:
        raise ValueError(f"mix_distribution perturbs float inputs [B, ...], got {x.dtype} of shape {x.shape}")
    b = x.shape[0]
    xf = to_float(x)
    axes = tuple(range(1, x.ndim - 1)) if x.ndim >= 3 else (1,)
    mu = jax.lax.stop_gradient(jnp.mean(xf, axis=axes, keepdims=True))
    sig = jax.lax.stop_gradient(jnp.sqrt(jnp.var(xf, axis=axes, keepdims=True) + eps))
    key_weight, key_partner = jax.random.split(rng)
    if mix_weight is None:
        lam = jax.random.beta(key_weight, alpha, alpha, (b,), xf.dtype)
    else:
        lam = jnp.asarray(mix_weight, xf.dtype)
        if lam.shape not in ((), (b,)):
            raise ValueError(f"mix_weight must be a scalar or [{b}], got shape {lam.shape}")
        lam = jnp.broadcast_to(lam, (b,))
    if partner is None:
        partner = _random_partners(key_partner, b, mask)
    elif jnp.shape(partner) != (b,):
        raise ValueError(f"partner must be [{b}] example indices, got shape {jnp.shape(partner)}")
    lam = lam.reshape((b,) + (1,) * (x.ndim - 1))
    mu_mix = lam * mu + (1.0 - lam) * mu[partner]
    sig_mix = lam * sig + (1.0 - lam) * sig[partner]
    return ((xf - mu) / sig * sig_mix + mu_mix).astype(x.dtype)


@register(
    "kd3",
    paper="Tang, Chen, Niu, Sugiyama & Gong, *Distribution Shift Matters for Knowledge Distillation with Webly "
    "Collected Images*, ICCV 2023",
    losses=("kd3_selection", "kd3_terms", "kd3_classifier_alignment", "kd3_instance_alignment"),
    status="supported (all three components reconstructed from the paper's abstract, no official code: "
    "selection, feature and classifier alignment, and MixDistribution, assumed to be MixStyle-like mixing of "
    "per-example input channel statistics with InfoNCE alignment of the re-run student to the clean teacher)",
    contract=LOGIT_ROLES,
)
def kd3(
    *,
    temperature: float = 4.0,
    threshold: float = 0.5,
    teacher_weight: float = 0.5,
    feature_weight: float = 1.0,
    classifier_weight: float = 1.0,
    alignment_weight: float = 1.0,
    alignment_temperature: float = 0.07,
    mix_alpha: float = 0.1,
    embedding: str = "pooled",
    teacher_embedding: str | None = None,
    classifier: str = "fc",
    student: str = "student",
    teacher: str = "teacher",
    weight: Weight = 1.0,
    name: str = "kd3",
) -> Method:
    """KD³ (Tang, Chen, Niu, Sugiyama & Gong, "Distribution Shift Matters for Knowledge Distillation with
    Webly Collected Images", ICCV 2023).

    ``L = Σ_i w_i [kd_i + β·feature_i] / Σ_i w_i + γ · classifier + δ · alignment``:

    * ``w_i`` — :func:`jaxkd.losses.kd3_selection`: example ``i`` is distilled when the combined
      prediction ``λ·p_t + (1 − λ)·p_s`` (``λ = teacher_weight``) has confidence ``>= threshold``;
    * ``kd_i``, ``feature_i`` — :func:`jaxkd.losses.kd3_terms`: ``T²·KL(p_t^T ‖ p_s^T)`` and the mean
      squared error between the student's ``embedding`` (through a trainable
      :class:`~jaxkd.methods.feature.connectors.LinearConnector` when its width differs from the teacher's) and the
      teacher's; ``β = feature_weight``;
    * ``classifier`` — :func:`jaxkd.losses.kd3_classifier_alignment` between the student's classifier
      (its dense layer at ``classifier``, ``"fc"`` on the CIFAR models and the MLP: read from the student's
      differentiated variables) and the teacher's, pulled back through the connector; ``γ =
      classifier_weight`` (0 leaves the student's classifier alone);
    * ``alignment`` — the MixDistribution block: :func:`mix_distribution` gives every valid example of
      the student's input (float ``[B, ..., C]``, e.g. NHWC images) a new distribution by mixing its
      per-channel mean and standard deviation with another example's (``λ ~ Beta(mix_alpha, mix_alpha)``
      and the partner drawn with the step's rng), the student model runs again on that perturbed batch
      (its current variables, so gradients reach its parameters; as in DMAE the BatchNorm statistics of
      this extra forward are not kept), and :func:`jaxkd.losses.kd3_instance_alignment` (InfoNCE over the
      valid examples, temperature ``alignment_temperature``) aligns its ``embedding`` (through the same
      connector) with the teacher's embedding of the clean input; ``δ = alignment_weight`` (default 1;
      0 skips the extra forward).

    No official code was found and the paper's full text was not reachable: the abstract fixes the
    three ingredients, not their formulas; every choice (convex combination and confidence threshold
    for the selection, KL for the logits, MSE for features and parameters, the defaults) is this
    implementation's and is stated in the loss docstrings. MixDistribution in particular is assumed to
    be MixStyle's statistics mixing applied to the *input* (a perturbation inside the network would need
    re-running part of an arbitrary model, which a method cannot do generically) and an InfoNCE
    alignment of all valid examples (not only the selected ones); ``mix_alpha = 0.1`` is MixStyle's
    default and ``τ = 0.07`` RepDistiller's CRD default. The selection is recomputed every step from the
    current student (the paper's "dynamic" selection). Metrics: ``kd``, ``feature``, ``classifier``,
    ``alignment``, ``selected`` (fraction of valid examples selected).

    ``student``/``teacher`` name the participants in the two roles, as in :func:`~jaxkd.methods.kd`: the
    learner's logits, embedding, classifier and re-run input are those of the participant in the
    ``student`` role; the teacher's logits, embedding and classifier are gradient-stopped targets (a
    trained participant in the ``teacher`` role is never moved by this term).
    """
    check_roles(name, student, teacher)
    check_temperature("temperature", temperature)
    check_in_range("threshold", threshold, 0.0, 1.0)
    check_in_range("teacher_weight", teacher_weight, 0.0, 1.0)
    check_nonnegative("feature_weight", feature_weight)
    check_nonnegative("classifier_weight", classifier_weight)
    check_nonnegative("alignment_weight", alignment_weight)
    check_temperature("alignment_temperature", alignment_temperature)
    check_positive("mix_alpha", mix_alpha)
    t_name = teacher_embedding or embedding

    def embeddings(inputs: LossInputs):
        s = student_feature(inputs, embedding, method=name, participant=student)
        t = teacher_feature(inputs, t_name, method=name, participant=teacher)
        if len(s.shape) != 2 or len(t.shape) != 2:
            raise ValueError(
                f"{name!r} aligns [B, D] embeddings; got student {embedding!r} {tuple(s.shape)} and teacher "
                f"{t_name!r} {tuple(t.shape)}"
            )
        return s, t

    def dense_of(inputs: LossInputs, participant: str, *, target: bool = False):
        """The participant's classifier ``(kernel, bias)``: the learner's differentiated, a target's
        gradient-stopped."""
        params = participant_variables(inputs, participant, method=name)["params"]
        fc = param_at(params, classifier, who=f"participant {participant!r}", method=name)
        if not hasattr(fc, "keys") or "kernel" not in fc:
            raise ValueError(f"{name!r}: {participant!r}'s {classifier!r} is not a dense layer with a 'kernel'")
        kernel, bias = fc["kernel"], fc.get("bias")
        return jax.lax.stop_gradient((kernel, bias)) if target else (kernel, bias)

    def student_input(inputs: LossInputs):
        x = inputs.participant(student, method=name).model_input(inputs.batch, name=student)
        dtype = getattr(x, "dtype", None)
        if dtype is None or not jnp.issubdtype(dtype, jnp.floating) or len(x.shape) < 2:
            raise ValueError(
                f"{name!r}: MixDistribution perturbs the student's input, which must be one float array [B, ...] "
                f"(e.g. NHWC images); got {type(x).__name__ if dtype is None else f'{dtype} {tuple(x.shape)}'} "
                "(set alignment_weight=0 to leave this term out)"
            )
        return x

    def init(rng, inputs: LossInputs) -> MethodVars:
        s, t = embeddings(inputs)
        if alignment_weight:
            student_input(inputs)
        if classifier_weight:
            for participant, width in ((student, s.shape[-1]), (teacher, t.shape[-1])):
                kernel, _ = dense_of(inputs, participant)
                if kernel.shape[0] != width:
                    raise ValueError(
                        f"{name!r}: {participant!r}'s classifier {classifier!r} takes {kernel.shape[0]} features but "
                        f"its embedding has {width}; pick the embedding the classifier reads"
                    )
        if s.shape[-1] == t.shape[-1]:
            return MethodVars()
        v = module_init(LinearConnector(t.shape[-1]), rng, s)
        return MethodVars(params={"connector": v.params})

    def loss(vars: MethodVars, inputs: LossInputs, rng):
        s, t = embeddings(inputs)
        zs, zt = inputs.output(student, method=name).logits, inputs.target(teacher, method=name).logits
        connector = None
        if "connector" in vars.params:
            s, _ = module_apply(LinearConnector(t.shape[-1]), MethodVars(vars.params["connector"], {}), s)
            connector = vars.params["connector"]["Dense_0"]
        selected = losses.kd3_selection(zs, zt, threshold=threshold, teacher_weight=teacher_weight)
        kd, feature = losses.kd3_terms(zs, zt, s, t, temperature=temperature, mask=inputs.example_mask,
                                       weights=selected)
        total = kd + feature_weight * feature
        metrics = {"kd": kd, "feature": feature,
                   "selected": losses.reduce_loss(selected, mask=inputs.example_mask)}
        if classifier_weight:
            ws, bs = dense_of(inputs, student)
            wt, bt = dense_of(inputs, teacher, target=True)
            cls = losses.kd3_classifier_alignment(
                ws, bs, wt, bt, None if connector is None else connector["kernel"],
                None if connector is None else connector["bias"],
            )
            metrics["classifier"] = cls
            total = total + classifier_weight * cls
        if alignment_weight:
            mixed = mix_distribution(rng, student_input(inputs), alpha=mix_alpha, mask=inputs.example_mask)
            outputs = apply_participant(inputs, student, mixed, train=True, method=name)
            s_mix = get_feature(outputs, embedding, who=f"participant {student!r}")
            if connector is not None:
                s_mix, _ = module_apply(LinearConnector(t.shape[-1]), MethodVars(vars.params["connector"], {}), s_mix)
            align = losses.kd3_instance_alignment(s_mix, t, temperature=alignment_temperature,
                                                  mask=inputs.example_mask)
            metrics["alignment"] = align
            total = total + alignment_weight * align
        return jnp.asarray(total, jnp.float32), LossAux(metrics, vars.state)

    return Method(name=name, loss=loss, init=init, weight=weight, needs=Needs(trained=(student,), participants=(teacher,)))
