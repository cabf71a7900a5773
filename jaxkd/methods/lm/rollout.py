"""Sequences a model generates inside the compiled train step, for the on-policy LM methods (GKD, SeqKD,
MiniLLM, DistiLLM, ADPA, preference distillation).

A method replaces (part of) the batch with continuations of the batch's prompts — the first
``prompt_length`` tokens of each row — continued to the row's full length with the KV-cache sampler
(:func:`jaxkd.models.sampling.generate`), inside the same ``jit`` as the update: no separate generation
engine, no host round trip (EasyDeL and TRL generate between steps). Sampling is not differentiated
(the sampled tokens are constants; gradients flow through the re-run forward passes only).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxkd import losses
from jaxkd.batch import MASK, TOKENS
from jaxkd.methods.base import LossInputs
from jaxkd.methods.features import participant_variables

__all__ = ["generate_continuations"]


def lm_config_of(inputs: LossInputs, participant: str, method: str):
    model = inputs.participant(participant, method=method).model
    config = getattr(model.module, "config", None)
    if config is None:
        raise ValueError(f"{method!r} generates with participant {participant!r} ({model.name}), which is not a "
                         "jaxkd language model (jaxkd.models.lm.lm)")
    return config


def generate_continuations(
    inputs: LossInputs, participant: str, tokens: jax.Array, mask: jax.Array, rng: jax.Array, *,
    prompt_length: int, temperature: float, top_k: int | None, top_p: float | None, eos_id: int | None,
    method: str,
) -> tuple[jax.Array, jax.Array]:
    """Participant ``participant`` continues ``tokens[:, :prompt_length]`` to the rows' full length.

    Returns ``(tokens, mask)`` of the rows' shape: the prompt, then the sampled tokens; the mask keeps the
    prompt's mask and marks generated tokens up to and including the first EOS. Gradient-stopped.
    """
    from jaxkd.models.sampling import generate

    length = tokens.shape[1]
    if not 1 <= prompt_length < length:
        raise ValueError(f"{method!r}: prompt_length must lie in [1, {length}) for sequences of length {length}, "
                         f"got {prompt_length}")
    config = lm_config_of(inputs, participant, method)
    params = jax.lax.stop_gradient(participant_variables(inputs, participant, method=method)["params"])
    out = generate(config, params, tokens[:, :prompt_length], mask[:, :prompt_length], rng=rng,
                   max_new_tokens=length - prompt_length, temperature=temperature, top_k=top_k, top_p=top_p,
                   eos_id=eos_id)
    return jax.lax.stop_gradient(out.tokens), jax.lax.stop_gradient(out.mask)


def generated_target_mask(mask: jax.Array, prompt_length: int) -> jax.Array:
    """Targets that are generated tokens (index ``≥ prompt_length``) of a generated row, ``[B, T−1]``."""
    _, target_mask = losses.next_token_targets(jnp.zeros(mask.shape, jnp.int32), mask)
    is_generated = jnp.arange(1, mask.shape[1]) >= prompt_length
    return target_mask & is_generated


def learner_rollout(inputs: LossInputs, rng, *, prompt_length, temperature, top_k, top_p, eos_id, method,
                     learner: str = "student"):
    """The batch with every row continued by ``learner`` (the participant in the ``student`` role) after its
    prompt, for the on-policy methods: ``(x, generated target mask)``."""
    tokens, mask = inputs.batch[TOKENS], inputs.batch[MASK]
    gen_tokens, gen_mask = generate_continuations(
        inputs, learner, tokens, mask, rng, prompt_length=prompt_length, temperature=temperature, top_k=top_k,
        top_p=top_p, eos_id=eos_id, method=method)
    return {TOKENS: gen_tokens.astype(tokens.dtype), MASK: gen_mask}, generated_target_mask(gen_mask, prompt_length)
