"""What the token-level methods share (:mod:`~jaxkd.methods.lm.lm_ce`, :mod:`~jaxkd.methods.lm.token_kd`,
:mod:`~jaxkd.methods.lm.sparse_token_kd` and the other LM methods): an LM batch's targets, the divergence
by name, the participants' output projections.

An LM batch is ``{"tokens": int32 [B, T], "mask": bool [B, T]}`` (plus the global token count,
:data:`jaxkd.batch.TOKEN_NORMALIZER`); LM participants read ``("tokens", "mask")``. Every
token method scores position ``t``'s logits against token ``t + 1`` (:func:`jaxkd.losses.next_token_targets`)
and averages over the target tokens of the whole batch — exact under gradient accumulation and sharding.
A batch may also carry :data:`jaxkd.batch.SEGMENT_IDS` (packed documents: no target crosses a boundary) and
:data:`jaxkd.batch.LOSS_MASK` (completion-only loss, TRL's ``completion_only_loss``/``assistant_only_loss``:
prompt tokens are never targets); :func:`lm_targets` honours both, so every method built on it does.

The token divergences are the ones of :mod:`jaxkd.losses` applied per token (nothing is rewritten);
``fused=True`` computes the same value from the models' final hidden states and output projections in
vocabulary-bounded memory (:func:`jaxkd.losses.fused_linear_divergence`).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax

from jaxkd import losses
from jaxkd.checks import check_choice, check_in_range, check_temperature
from jaxkd.batch import MASK, TOKENS, batch_normalizer, batch_target_mask
from jaxkd.losses.lm.tokens import next_token_targets
from jaxkd.methods.base import LossInputs
from jaxkd.methods.features import participant_variables
from jaxkd.models.base import Outputs

__all__ = []

#: The batch entries of an LM batch: token ids and the token mask, both [B, T] (:mod:`jaxkd.batch`).
LM_KEYS = (TOKENS, MASK)

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
    positions have a real input and a real target — in the same packed document when the batch carries
    :data:`jaxkd.batch.SEGMENT_IDS`, and a loss token when it carries :data:`jaxkd.batch.LOSS_MASK`
    (completion-only loss: prompt tokens are never targets; :func:`jaxkd.batch.batch_target_mask`) — and
    the global target count (``None`` when the batch does not carry it: the mean is then over this batch's
    targets)."""
    targets, target_mask = next_token_targets(batch[tokens_key], batch.get(MASK))
    target_mask = target_mask & batch_target_mask(batch, tokens_key, MASK)
    return targets, target_mask, batch_normalizer(batch)


def full_length_mask(target_mask: jax.Array) -> jax.Array:
    """``[B, T − 1]`` target mask -> ``[B, T]`` with the last position False: a token loss over the models'
    whole ``[B, T, V]`` logits (position ``t`` scores token ``t + 1``; the last position scores nothing)
    then equals the loss over ``logits[:, :-1]`` without the two ``[B, T − 1, V]`` copies that slicing the
    logits and padding their gradient back cost (the largest arrays of an LM step)."""
    return jax.numpy.pad(target_mask, ((0, 0), (0, 1)))


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


def hidden_states_of(outputs: Outputs, participant: str, method: str) -> jax.Array:
    """Participant ``participant``'s final hidden states (from its ``outputs``) at the positions that have a
    target, ``[B·(T−1), d]``."""
    hidden = outputs.features.get("hidden")
    if hidden is None:
        raise ValueError(f"{method!r} (fused) needs participant {participant!r}'s final hidden states (feature "
                         "'hidden', sown by jaxkd.models.lm models)")
    hidden = hidden[:, :-1]
    return hidden.reshape(-1, hidden.shape[-1])
