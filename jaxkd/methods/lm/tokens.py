"""Token-level methods for causal language models: next-token cross-entropy and token distillation.

An LM batch is ``{"tokens": int32 [B, T], "mask": bool [B, T]}`` (plus the global token count,
:data:`jaxkd.batch.TOKEN_NORMALIZER`); LM participants read ``("tokens", "mask")``. Every
method here scores position ``t``'s logits against token ``t + 1`` (:func:`jaxkd.losses.next_token_targets`)
and averages over the target tokens of the whole batch — exact under gradient accumulation and sharding.

The token divergences are the ones of :mod:`jaxkd.losses` applied per token (nothing is rewritten);
``fused=True`` computes the same value from the models' final hidden states and output projections in
vocabulary-bounded memory (:func:`jaxkd.losses.fused_linear_divergence`).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax

from jaxkd import losses
from jaxkd.checks import check_choice, check_in_range, check_int, check_temperature
from jaxkd.batch import MASK, TOKENS, batch_normalizer, normalizer_key_of
from jaxkd.losses.lm.tokens import next_token_targets, shift_logits
from jaxkd.methods.base import LossInputs, Method, Weight, check_roles, stateless_method
from jaxkd.methods.features import participant_variables
from jaxkd.methods.registry import LOGIT_ROLES, register
from jaxkd.models.base import Outputs

__all__ = ["lm_ce", "sparse_token_kd", "token_kd"]

#: The batch entries of an LM batch: token ids and the token mask, both [B, T] (:mod:`jaxkd.batch`).
_LM_KEYS = (TOKENS, MASK)

#: Divergence name -> (loss function, the hyper-parameters it takes besides the temperature).
TOKEN_DIVERGENCES: dict[str, tuple[Callable[..., jax.Array], tuple[str, ...]]] = {
    "forward_kl": (losses.forward_kl, ()),
    "reverse_kl": (losses.reverse_kl, ()),
    "js_divergence": (losses.js_divergence, ()),
    "generalized_jsd": (losses.generalized_jsd, ("beta",)),
    "skew_kl": (losses.skew_kl, ("alpha",)),
    "skew_reverse_kl": (losses.skew_reverse_kl, ("alpha",)),
    "total_variation": (losses.total_variation, ()),
}


def lm_targets(batch: Mapping[str, Any], tokens_key: str = TOKENS) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """``(targets [B, T-1], target_mask [B, T-1], normalizer)`` of an LM batch: the next tokens, which
    positions have a real input and a real target, and the global target count (``None`` when the batch
    does not carry it: the mean is then over this batch's targets)."""
    targets, target_mask = next_token_targets(batch[tokens_key], batch.get(MASK))
    return targets, target_mask, batch_normalizer(batch)


def token_divergence(divergence: str, *, temperature: float = 1.0, beta: float | None = None,
                     alpha: float | None = None) -> Callable[..., jax.Array]:
    """The per-token loss ``f(student_logits, teacher_logits, *, mask, normalizer, reduction)`` named
    ``divergence`` (a key of :data:`TOKEN_DIVERGENCES`), with its hyper-parameters bound and checked."""
    check_choice("divergence", divergence, tuple(TOKEN_DIVERGENCES))
    check_temperature("temperature", temperature)
    fn, takes = TOKEN_DIVERGENCES[divergence]
    given = {"beta": beta, "alpha": alpha}
    kwargs: dict[str, Any] = {"temperature": temperature}
    for key, value in given.items():
        if key in takes:
            value = {"beta": 0.5, "alpha": 0.1}[key] if value is None else value
            check_in_range(key, value, 0.0, 1.0)
            kwargs[key] = value
        elif value is not None:
            raise ValueError(f"divergence {divergence!r} takes no {key}= (only {list(takes) or 'temperature'})")

    def loss(student_logits, teacher_logits, **reduce):
        return fn(student_logits, teacher_logits, **kwargs, **reduce)

    loss.divergence, loss.kwargs = divergence, kwargs
    return loss


def output_projection_of(inputs: LossInputs, participant: str, *, method: str) -> jax.Array:
    """Participant ``participant``'s output projection ``[d, V]`` (its hidden states times this are its
    logits), cut to its declared vocabulary (:func:`jaxkd.models.vocab.truncate_vocab`). A trained
    participant's is differentiable; a frozen one's is gradient-stopped."""
    from jaxkd.models import lm as lm_models
    from jaxkd.models.vocab import truncate_projection

    model = inputs.participant(participant, method=method).model
    config = getattr(model.module, "config", None)
    if config is None:
        raise ValueError(f"{method!r}: participant {participant!r} ({model.name}) is not a jaxkd language model "
                         "(jaxkd.models.lm.lm): its output projection is unknown")
    params = participant_variables(inputs, participant, method=method)["params"]
    return truncate_projection(lm_models.output_projection(params, config), model)


@register("lm_ce", inputs="tokens", paper="next-token cross-entropy (the data term of LM distillation)", losses=("cross_entropy",))
def lm_ce(*, label_smoothing: float = 0.0, tokens_key: str = TOKENS, mask_key: str = MASK,
          normalizer_key: str | None = None, participant: str = "student", weight: Weight = 1.0,
          name: str = "lm_ce") -> Method:
    """The next-token cross-entropy of ``participant`` (the student) on the batch: ``−log p(x_{t+1} | x_≤t)``
    averaged over the target tokens (:func:`jaxkd.losses.cross_entropy` per token, shifted).
    ``tokens_key``/``mask_key`` name the batch entries the participant reads (a student with its own
    tokenizer reads e.g. ``"student_tokens"``); ``normalizer_key`` the global target count of that
    tokenization (default :func:`jaxkd.batch.normalizer_key_of` ``(tokens_key)``: ``"token_normalizer"``,
    ``"student_token_normalizer"``...; when the batch lacks it the mean is over the (micro-)batch's own
    targets). Registry ``"lm_ce"``."""
    check_in_range("label_smoothing", label_smoothing, 0.0, 1.0)
    count_key = normalizer_key_of(tokens_key) if normalizer_key is None else normalizer_key

    def compute(inputs: LossInputs, rng):
        targets, target_mask = next_token_targets(inputs.batch[tokens_key], inputs.batch.get(mask_key))
        # Each tokenization has its own global count (a second tokenization holds other tokens).
        normalizer = batch_normalizer(inputs.batch, count_key)
        logits = inputs.output(participant, method=name).logits
        return losses.cross_entropy(shift_logits(logits), targets, label_smoothing=label_smoothing,
                                    mask=target_mask, normalizer=normalizer)

    return stateless_method(name, compute, weight=weight,
                            participants=() if participant == "student" else (participant,),
                            batch_keys=(tokens_key, mask_key))


@register(
    "token_kd", inputs="tokens",
    paper="token-level KD of LMs: every divergence per next-token distribution (Kim & Rush 2016; GKD; DistiLLM)",
    losses=tuple(fn.__name__ for fn, _ in TOKEN_DIVERGENCES.values()) + ("fused_linear_divergence",),
    contract=LOGIT_ROLES,
)
def token_kd(
    *,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    beta: float | None = None,
    alpha: float | None = None,
    fused: bool = False,
    chunk_size: int = 512,
    student: str = "student",
    teacher: str = "teacher",
    weight: Weight = 1.0,
    name: str = "token_kd",
) -> Method:
    """Token-level distillation: ``divergence(p_S(·|x_≤t), p_T(·|x_≤t))`` averaged over the batch's target
    tokens (padding and the last position excluded), no ``T²`` (TRL's and DistiLLM's convention).

    Args:
      divergence: ``"forward_kl"``, ``"reverse_kl"``, ``"js_divergence"``, ``"generalized_jsd"`` (``beta``,
        TRL's convention: 0 forward, 1 reverse KL), ``"skew_kl"`` / ``"skew_reverse_kl"`` (``alpha``,
        DistiLLM) or ``"total_variation"``.
      fused: compute from the final hidden states (feature ``"hidden"``) and output projections, chunk by
        chunk, never holding ``[B, T, V]`` logits (:func:`jaxkd.losses.fused_linear_divergence`); the same
        value and gradients.
      chunk_size: tokens per chunk of the fused computation.
      student: the participant that learns (its logits, or hidden states and output projection, are trained).
      teacher: the participant distilled from (a gradient-stopped target, trained or not):
        ``token_kd(student="peer", teacher="student")`` teaches a peer and never trains the student.
    """
    loss_fn = token_divergence(divergence, temperature=temperature, beta=beta, alpha=alpha)
    check_int("chunk_size", chunk_size, low=1)
    check_roles(name, student, teacher)

    def compute(inputs: LossInputs, rng):
        targets, target_mask, normalizer = lm_targets(inputs.batch)
        if not fused:
            zs, zt = inputs.output(student, method=name).logits, inputs.target(teacher, method=name).logits
            return loss_fn(shift_logits(zs), shift_logits(zt), mask=target_mask, normalizer=normalizer)
        s_hidden = _hidden(inputs.output(student, method=name), student, name)
        t_hidden = _hidden(inputs.target(teacher, method=name), teacher, name)
        s_head = output_projection_of(inputs, student, method=name)
        t_head = jax.lax.stop_gradient(output_projection_of(inputs, teacher, method=name))
        return losses.fused_linear_divergence(
            s_hidden, s_head, t_hidden, t_head, divergence=divergence, mask=target_mask.reshape(-1),
            normalizer=normalizer, chunk_size=chunk_size, **loss_fn.kwargs)

    return stateless_method(name, compute, weight=weight, participants=(student, teacher),
                            trained=(student,), batch_keys=_LM_KEYS)


def _hidden(outputs: Outputs, participant: str, method: str) -> jax.Array:
    """Participant ``participant``'s final hidden states (from its ``outputs``) at the positions that have a
    target, ``[B·(T−1), d]``."""
    hidden = outputs.features.get("hidden")
    if hidden is None:
        raise ValueError(f"{method!r} (fused) needs participant {participant!r}'s final hidden states (feature "
                         "'hidden', sown by jaxkd.models.lm models)")
    hidden = hidden[:, :-1]
    return hidden.reshape(-1, hidden.shape[-1])


@register(
    "sparse_token_kd", inputs="tokens",
    paper="token-level KD against the teacher's top-k log-probabilities plus a tail bucket (offline teacher signals)",
    losses=("topk_teacher", "sparse_forward_kl"),
    contract=LOGIT_ROLES,
)
def sparse_token_kd(
    *,
    k: int = 8,
    tail: str = "bucket",
    temperature: float = 1.0,
    cached: bool = False,
    indices_key: str = "topk_indices",
    log_probs_key: str = "topk_log_probs",
    student: str = "student",
    teacher: str = "teacher",
    weight: Weight = 1.0,
    name: str = "sparse_token_kd",
) -> Method:
    """Token-level forward KL against a sparse teacher: its top-``k`` next-token log-probabilities (under
    the full softmax at ``T``) and the remaining mass as one tail category (``tail="bucket"``), or both
    renormalized over the top-k (``tail="drop"``) — :func:`jaxkd.losses.sparse_forward_kl` per token.

    Live (default): the top-k of the teacher's logits in the step. ``cached=True``: read
    ``batch[indices_key]`` / ``batch[log_probs_key]`` (``[B, T, k_stored]``, per *input* position, as
    :func:`jaxkd.data.text.teacher_cache.cache_teacher_topk` writes them), so no teacher runs at all; with the
    same ``k`` the two give the same loss and gradients (tested). ``k`` may be smaller than the stored
    number (the first ``k``, in decreasing probability).

    ``student``/``teacher`` name the participants in the two roles, as in :func:`token_kd` (live, the
    teacher's top-k is computed from its gradient-stopped logits; cached, no teacher is read).
    """
    check_int("k", k, low=1)
    check_roles(name, student, teacher)
    check_temperature("temperature", temperature)
    check_choice("tail", tail, ("drop", "bucket"))

    def compute(inputs: LossInputs, rng):
        _, target_mask, normalizer = lm_targets(inputs.batch)
        if cached:
            indices, log_probs = inputs.batch[indices_key], inputs.batch[log_probs_key]
            if k > indices.shape[-1]:
                raise ValueError(f"{name!r}: k={k} is larger than the {indices.shape[-1]} cached entries per token")
            indices, log_probs = indices[..., :k], log_probs[..., :k]
        else:
            indices, log_probs = losses.topk_teacher(inputs.target(teacher, method=name).logits, k,
                                                     temperature=temperature)
        zs = shift_logits(inputs.output(student, method=name).logits)
        return losses.sparse_forward_kl(zs, indices[:, :-1], log_probs[:, :-1], temperature=temperature, tail=tail,
                                        mask=target_mask, normalizer=normalizer)

    return stateless_method(name, compute, weight=weight, participants=(student,) if cached else (student, teacher), trained=(student,),
                            batch_keys=_LM_KEYS + ((indices_key, log_probs_key) if cached else ()))
