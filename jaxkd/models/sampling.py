"""Sampling from language models: filtered next-token distributions, a model-agnostic ``lax.scan`` loop,
and KV-cached generation for :class:`jaxkd.models.lm.TransformerLM`.

Everything is jittable with the sampling options static (Python numbers), so generation runs inside a
jitted train step (on-policy distillation: Agarwal et al., "On-Policy Distillation of Language Models:
Learning from Self-Generated Mistakes", 2024; MiniLLM's student sampling). Sampling is not
differentiated: :func:`generate` stops the gradient of the parameters it reads, so its outputs are
constants of the step.

The filters follow Hugging Face ``transformers``' logits warpers, in their order (temperature, then
top-k, then top-p: ``TemperatureLogitsWarper``, ``TopKLogitsWarper``, ``TopPLogitsWarper``):

* temperature ``τ``: ``logits / τ``; ``τ = 0`` is greedy decoding (``argmax``, exactly, first index on
  ties), a deterministic choice whose log-probability is 0.
* top-k (Fan et al., "Hierarchical Neural Story Generation", 2018): keeps the entries ``>=`` the
  ``k``-th largest logit. Ties at the boundary are all kept (as HF's warper does: it removes
  ``logits < topk(logits, k)[-1]``), so more than ``k`` entries may survive.
* top-p / nucleus (Holtzman et al., "The Curious Case of Neural Text Degeneration", 2020): of the
  distribution ``π = softmax(filtered logits)``, keeps the smallest set of most probable entries whose
  total probability is ``>= p`` — entry ``i`` in descending order survives when the mass strictly
  before it is ``< p`` — so the top entry always survives. Entries tied with the last kept one are kept
  too (the set does not depend on how a sort orders ties). HF's warper removes the entries whose
  ascending cumulative mass is ``<= 1 - p``, the same set up to float rounding and ties.

``-inf`` logits (excluded vocabulary) keep probability 0 through every filter and are never sampled
(unless a whole row is ``-inf``, which has no distribution: the result is then arbitrary).
"""

from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp

from jaxkd.checks import check_int, check_number, is_concrete
from jaxkd.models.lm import LMConfig, decode_step, prefill

__all__ = ["Generation", "filter_logits", "generate", "sample_logits", "sample_loop"]

Array = jax.Array


def _check_options(temperature: Any, top_k: Any, top_p: Any) -> None:
    check_number("temperature", temperature, low=0.0)
    if top_k is not None:
        check_int("top_k", top_k, low=1)
    if top_p is not None:
        check_number("top_p", top_p, low=0.0, high=1.0, low_open=True)


def _greedy(temperature: Any) -> bool:
    return is_concrete(temperature) and float(temperature) == 0.0


def filter_logits(logits: Array, *, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None) -> Array:
    """Log-probabilities ``[..., V]`` of the sampling distribution: ``log_softmax`` of ``logits / τ``
    after top-k and top-p filtering, ``-inf`` for the removed entries (see the module docstring).

    ``temperature`` must be ``> 0`` here (greedy decoding has no distribution to filter: see
    :func:`sample_logits`); a traced temperature is taken as positive. ``top_k >= V`` and ``top_p = 1``
    filter nothing.
    """
    _check_options(temperature, top_k, top_p)
    if _greedy(temperature):
        raise ValueError("filter_logits needs temperature > 0 (temperature 0 is greedy argmax, a point mass)")
    x = jnp.asarray(logits, jnp.promote_types(jnp.result_type(logits), jnp.float32)) / temperature
    vocab = x.shape[-1]
    if top_k is not None and top_k < vocab:
        kth = jax.lax.top_k(x, top_k)[0][..., -1:]
        x = jnp.where(x >= kth, x, -jnp.inf)
    if top_p is not None and top_p < 1.0:
        sorted_x = -jnp.sort(-x, axis=-1)  # descending; -inf entries last
        sorted_p = jax.nn.softmax(sorted_x, axis=-1)
        before = jnp.cumsum(sorted_p, axis=-1) - sorted_p  # mass strictly before each entry
        kept = jnp.sum(before < top_p, axis=-1, keepdims=True)  # >= 1: the top entry has 0 before it
        threshold = jnp.take_along_axis(sorted_x, kept - 1, axis=-1)
        x = jnp.where(x >= threshold, x, -jnp.inf)
    return jax.nn.log_softmax(x, axis=-1)


def _sample_with_log_prob(logits: Array, rng: Array, temperature: Any, top_k: Any, top_p: Any) -> tuple[Array, Array]:
    if _greedy(temperature):
        token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return token, jnp.zeros(token.shape, jnp.float32)
    log_p = filter_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p)
    token = jax.random.categorical(rng, log_p, axis=-1).astype(jnp.int32)
    return token, jnp.take_along_axis(log_p, token[..., None], axis=-1)[..., 0].astype(jnp.float32)


def sample_logits(logits: Array, rng: Array, *, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None) -> Array:
    """One token id per row of ``logits [..., V]`` (int32 ``[...]``), drawn from :func:`filter_logits`'s
    distribution; ``temperature=0`` returns ``argmax(logits)`` exactly (``top_k``/``top_p`` are then
    irrelevant and ``rng`` unused).

    Raises:
      ValueError: ``temperature < 0``, ``top_k`` not an integer ``>= 1``, ``top_p`` not in ``(0, 1]``.
    """
    _check_options(temperature, top_k, top_p)
    return _sample_with_log_prob(logits, rng, temperature, top_k, top_p)[0]


def sample_loop(step_fn: Callable[[Any, Array], tuple[Array, Any]], carry: Any, first_logits: Array, rng: Array,
                *, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, eos_id: int | None = None) -> tuple[Array, Array, Array]:
    """Samples ``N = max_new_tokens`` tokens autoregressively with any next-token source.

    Token ``0`` is drawn from ``first_logits [B, V]``; token ``i + 1`` from the logits of
    ``step_fn(carry, token_i) -> (logits [B, V], carry)`` (a KV-cached decoder, or several models'
    logits combined at decoding time, e.g. proxy tuning). ``step_fn`` runs ``N - 1`` times inside one
    ``lax.scan``: no call is wasted on a token nobody samples. Step ``i`` uses ``fold_in(rng, i)``.

    Returns:
      ``(tokens [B, N] int32, mask [B, N] bool, log_probs [B, N] float32)``: ``mask`` is True up to and
      including each row's first ``eos_id`` (all True without ``eos_id``); after it the row's tokens are
      ``eos_id`` and their log-probabilities 0. ``log_probs`` are the sampled tokens' log-probabilities
      under the sampling distribution (temperature-scaled, filtered, renormalized; 0 for greedy).
      ``N = 0`` gives empty ``[B, 0]`` arrays without calling ``step_fn``.

    Raises:
      ValueError: ``max_new_tokens`` not an integer ``>= 0``, ``eos_id`` not an integer ``>= 0``, or a bad
        sampling option (:func:`sample_logits`).
    """
    n = check_int("max_new_tokens", max_new_tokens, low=0)
    _check_options(temperature, top_k, top_p)
    if eos_id is not None:
        eos_id = check_int("eos_id", eos_id, low=0)
    first_logits = jnp.asarray(first_logits)
    if first_logits.ndim != 2:
        raise ValueError(f"first_logits must have shape [batch, vocab], got shape {first_logits.shape}")
    b = first_logits.shape[0]
    if n == 0:
        return jnp.zeros((b, 0), jnp.int32), jnp.zeros((b, 0), bool), jnp.zeros((b, 0), jnp.float32)

    def draw(logits, i, done):
        token, log_p = _sample_with_log_prob(logits, jax.random.fold_in(rng, i), temperature, top_k, top_p)
        valid = ~done
        if eos_id is not None:
            # Finished rows repeat EOS (a fixed filler, as HF pads finished rows), scored 0.
            token = jnp.where(done, eos_id, token)
            done = done | (token == eos_id)
        return token, jnp.where(valid, log_p, 0.0), valid, done

    token0, log_p0, valid0, done0 = draw(first_logits, 0, jnp.zeros((b,), bool))

    def body(state, i):
        carry, token, done = state
        logits, carry = step_fn(carry, token)
        token, log_p, valid, done = draw(logits, i, done)
        return (carry, token, done), (token, valid, log_p)

    _, (tokens, valid, log_p) = jax.lax.scan(body, (carry, token0, done0), jnp.arange(1, n))
    stack = lambda first, rest: jnp.concatenate([first[:, None], rest.T], axis=1)  # noqa: E731
    return stack(token0, tokens), stack(valid0, valid), stack(log_p0, log_p)


@flax.struct.dataclass
class Generation:
    """What :func:`generate` returns (a pytree).

    Attributes:
      tokens: ``[B, P + N]`` the prompt followed by the new tokens.
      mask: ``[B, P + N]`` the prompt's mask followed by ``new_mask``: feed ``{"tokens", "mask"}`` to the
        model to score the whole sequence (its default positions then equal the ones used while sampling).
      new_tokens, new_mask, log_probs: ``[B, N]`` from :func:`sample_loop`.
    """

    tokens: Array
    mask: Array
    new_tokens: Array
    new_mask: Array
    log_probs: Array


def check_prompt(prompt_tokens: Array, prompt_mask: Array | None) -> tuple[Array, Array]:
    """``(tokens, bool mask)`` of a prompt: integer ``[B, P >= 1]`` ids and a mask of that shape (all True
    when ``None``); ``ValueError`` otherwise."""
    prompt_tokens = jnp.asarray(prompt_tokens)
    if not jnp.issubdtype(prompt_tokens.dtype, jnp.integer):
        raise ValueError(f"prompt_tokens must be integer ids, got dtype {prompt_tokens.dtype}")
    if prompt_tokens.ndim != 2 or prompt_tokens.shape[1] == 0:
        raise ValueError(f"prompt_tokens must have shape [batch, length >= 1], got shape {prompt_tokens.shape}")
    b, p = prompt_tokens.shape
    prompt_mask = jnp.ones((b, p), bool) if prompt_mask is None else jnp.asarray(prompt_mask)
    if prompt_mask.shape != (b, p):
        raise ValueError(f"prompt_mask must have the prompt's shape {(b, p)}, got {prompt_mask.shape}")
    return prompt_tokens, prompt_mask.astype(bool)


def _check_eos_id(eos_id: int | None, vocab_size: int) -> None:
    if eos_id is not None and check_int("eos_id", eos_id, low=0) >= vocab_size:
        raise ValueError(f"eos_id must lie in [0, vocab_size={vocab_size}), got eos_id={eos_id}")


def _empty_generation(prompt_tokens: Array, prompt_mask: Array) -> Generation:
    """The :class:`Generation` of ``max_new_tokens=0``: the prompt, and ``[B, 0]`` new arrays."""
    empty = jnp.zeros((prompt_tokens.shape[0], 0), jnp.int32)
    return Generation(prompt_tokens, prompt_mask, empty, empty.astype(bool), empty.astype(jnp.float32))


def _last_prompt_logits(logits: Array, prompt_mask: Array) -> Array:
    """``[B, V]``: a prefill's logits ``[B, P, V]`` at each row's last real prompt token (``P - 1`` for left
    padding; 0 for a fully padded row), which the first new token is drawn from."""
    last = jnp.max(jnp.where(prompt_mask, jnp.arange(prompt_mask.shape[1]), 0), axis=1)
    return jnp.take_along_axis(logits, last[:, None, None], axis=1)[:, 0]


def _sample_after_prompt(step_fn: Callable[[Any, Array], tuple[Array, Any]], carry: Any, first_logits: Array,
                         rng: Array, prompt_tokens: Array, prompt_mask: Array, **options) -> Generation:
    """:func:`sample_loop` (``options``: its keyword arguments) continuing the prompt, as a :class:`Generation`."""
    new_tokens, new_mask, log_probs = sample_loop(step_fn, carry, first_logits, rng, **options)
    return Generation(
        tokens=jnp.concatenate([prompt_tokens, new_tokens], axis=1),
        mask=jnp.concatenate([prompt_mask, new_mask], axis=1),
        new_tokens=new_tokens, new_mask=new_mask, log_probs=log_probs,
    )


def generate(config: LMConfig, params: Any, prompt_tokens: Array, prompt_mask: Array | None = None, *, rng: Array,
             max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             eos_id: int | None = None) -> Generation:
    """Continues each prompt row with ``max_new_tokens`` sampled tokens, using the KV cache.

    The prompt ``[B, P]`` may be left- or right-padded (``prompt_mask``, default all real): the first new
    token is drawn from the logits at each row's last real prompt token, and new tokens take the next
    positions after the row's real tokens. The cache has ``P + N`` slots. ``params`` (the unboxed
    ``params`` collection, or the variables dict) are wrapped in ``stop_gradient``: sampling is not
    differentiated. Jittable with ``config``, ``max_new_tokens``, ``temperature``, ``top_k``, ``top_p`` and
    ``eos_id`` static (``config`` is a static pytree, so it may be a ``jit`` argument).

    ``max_new_tokens=0`` returns the prompt unchanged (``tokens``/``mask`` are the prompt and its mask,
    the new arrays are ``[B, 0]``) and runs no model.

    Raises:
      ValueError: ``max_new_tokens < 0``; ``P + max_new_tokens > config.max_len``; non-integer or
        non-``[B, P]`` prompt tokens, an empty prompt, a mask of another shape; ``eos_id`` outside
        ``[0, vocab_size)``; bad sampling options.
    """
    n = check_int("max_new_tokens", max_new_tokens, low=0)
    _check_options(temperature, top_k, top_p)
    prompt_tokens, prompt_mask = check_prompt(prompt_tokens, prompt_mask)
    p = prompt_tokens.shape[1]
    if p + n > config.max_len:
        raise ValueError(
            f"prompt length {p} + max_new_tokens {n} = {p + n} exceeds the model's max_len={config.max_len}"
        )
    _check_eos_id(eos_id, config.vocab_size)
    prompt_tokens = prompt_tokens.astype(jnp.int32)
    if n == 0:
        return _empty_generation(prompt_tokens, prompt_mask)

    params = jax.lax.stop_gradient(params)
    logits, cache = prefill(params, config, prompt_tokens, prompt_mask, cache_len=p + n)

    def step(cache, token):
        return decode_step(params, config, token, cache)

    return _sample_after_prompt(
        step, cache, _last_prompt_logits(logits, prompt_mask), rng, prompt_tokens, prompt_mask, max_new_tokens=n,
        temperature=temperature, top_k=top_k, top_p=top_p, eos_id=eos_id,
    )

