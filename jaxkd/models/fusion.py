"""Decoding-time fusion of several language models that share a vocabulary (nothing is trained).

A *fused model* is a list of members ``[(LMConfig, params), ...]`` (:class:`jaxkd.models.lm.TransformerLM`
configurations and their parameters, any sizes, one vocabulary) and a ``combine`` function that maps the
members' next-token logits, a list of ``[B, V]`` arrays in member order, to the fused logits ``[B, V]``.
The fused next-token distribution is ``softmax(combine([z_0, …, z_{M-1}]))``.

* :func:`fused_generate` samples from it with one KV cache per member: every step decodes each member
  once on the sampled token and combines their logits, inside
  :func:`jaxkd.models.sampling.sample_loop`'s ``lax.scan`` (one compiled program under ``jax.jit``).
* :func:`fused_log_probs` scores text under it by teacher forcing: one full forward pass per member, the
  combine applied at every position. The fused model's bits per byte on held-out text need no sampling;
  and the KV-cached decoder's per-step distribution equals this one (tested). :func:`member_logits` gives
  the members' own logits, for statistics of a combine (e.g. dynamic fusion's chosen weights).
* Combine functions (hashable frozen dataclasses, so ``jax.jit`` with a static ``combine`` compiles once
  per configuration):

  - :func:`proxy_tuning` — Liu et al., "Tuning Language Models by Proxy" (COLM 2024):
    ``z̃ = z_large + α (z_tuned − z_untuned)`` (:func:`jaxkd.losses.fusion.logit_fusion.proxy_tuning_logits`);
  - :func:`dynamic_logits_fusion` — Fan et al., "On Giant's Shoulders: Effortless Weak to Strong by
    Dynamic Logits Fusion" (NeurIPS 2024): ``z̃ = z_large + Σ_t α_t (z_t − z_small)`` with the weights
    ``α_t`` searched at every step to match each expert's KL shift
    (:func:`jaxkd.losses.fusion.logit_fusion.dynamic_logits_fusion`).

  Both name the members by their index in the member list.

Generation follows :func:`jaxkd.models.sampling.generate` exactly (prompt padding, positions, EOS, the
sampling filters and ``fold_in(rng, i)`` per step): with a single member and ``combine = lambda z: z[0]``
the two give the same tokens.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxkd.checks import check_choice, check_int, check_number
from jaxkd.losses.fusion import logit_fusion
from jaxkd.models.lm import LMConfig, TransformerLM, _params_tree, decode_step, prefill
from jaxkd.models.sampling import (
    Generation,
    _check_eos_id,
    _check_options,
    _empty_generation,
    _last_prompt_logits,
    _sample_after_prompt,
    check_prompt,
)

__all__ = [
    "DynamicLogitsFusion",
    "ProxyTuning",
    "check_members",
    "dynamic_logits_fusion",
    "fused_generate",
    "fused_log_probs",
    "member_logits",
    "proxy_tuning",
]

Array = jax.Array
#: ``combine(list of M member logits [B, V]) -> fused logits [B, V]``.
Combine = Callable[[list], Array]


def check_members(members: Any) -> int:
    """Checks a member list ``[(LMConfig, params), ...]`` and returns the shared vocabulary size.

    Raises:
      ValueError: no members, a member that is not a ``(LMConfig, params)`` pair, or members whose
        ``vocab_size`` differ (the message names every size: logits can only be combined entry by
        entry over one vocabulary).
    """
    if isinstance(members, (str, bytes)) or not isinstance(members, Sequence) or len(members) == 0:
        got = type(members).__name__ + (" of length 0" if isinstance(members, Sequence) else "")
        raise ValueError(f"members must be a non-empty sequence of (LMConfig, params) pairs, got {got}")
    for i, member in enumerate(members):
        if not isinstance(member, Sequence) or len(member) != 2 or not isinstance(member[0], LMConfig):
            raise ValueError(f"members[{i}] must be a pair (LMConfig, params), got {type(member).__name__}"
                             + (f" of length {len(member)}" if isinstance(member, Sequence) else ""))
    sizes = [config.vocab_size for config, _ in members]
    if len(set(sizes)) > 1:
        listed = ", ".join(f"members[{i}] has vocab_size={v}" for i, v in enumerate(sizes))
        raise ValueError(f"fused members must share one vocabulary, got different sizes: {listed}")
    return sizes[0]


def _combined(combine: Combine, logits: list, shape: tuple[int, int]) -> Array:
    """``combine(logits)``, checked to be ``[B, V]`` and returned in float32 at least."""
    out = combine(list(logits))
    if np.shape(out) != tuple(shape):
        raise ValueError(f"combine must return fused logits of shape [batch, vocab] = {tuple(shape)}, got "
                         f"{np.shape(out)}")
    out = jnp.asarray(out)
    return out.astype(jnp.promote_types(out.dtype, jnp.float32))


def fused_generate(members: Sequence[tuple[LMConfig, Any]], combine: Combine, prompt_tokens: Array,
                   prompt_mask: Array | None = None, *, rng: Array, max_new_tokens: int, temperature: float = 1.0,
                   top_k: int | None = None, top_p: float | None = None, eos_id: int | None = None) -> Generation:
    """Continues each prompt row with ``max_new_tokens`` tokens sampled from the fused model.

    Each member prefills the prompt ``[B, P]`` (left- or right-padded by ``prompt_mask``, default all
    real) into its own KV cache of ``P + N`` slots; the first new token is drawn from
    ``combine([z_m at each row's last real prompt token])``, every later one from ``combine`` of the
    members' :func:`jaxkd.models.lm.decode_step` logits on the previous token — one ``lax.scan`` over
    :func:`jaxkd.models.sampling.sample_loop`, every member decoded at every step. Parameters are wrapped
    in ``stop_gradient`` (sampling is not differentiated).

    Jittable with ``combine``, ``max_new_tokens``, ``temperature``, ``top_k``, ``top_p`` and ``eos_id``
    static (the configs inside ``members`` are static pytrees), e.g.
    ``jax.jit(fused_generate, static_argnums=1, static_argnames=("max_new_tokens", "temperature"))``.

    Args:
      members: ``[(LMConfig, params), ...]`` sharing one vocabulary (params: the unboxed ``params``
        collection or the variables dict).
      combine: ``list of [B, V] member logits -> [B, V]`` fused logits (e.g. :func:`proxy_tuning`).
      prompt_tokens, prompt_mask: as in :func:`jaxkd.models.sampling.generate`.
      rng, max_new_tokens, temperature, top_k, top_p, eos_id: as in :func:`jaxkd.models.sampling.sample_loop`
        (``temperature=0``: greedy argmax of the fused logits).

    Returns:
      A :class:`jaxkd.models.sampling.Generation` (``log_probs`` under the fused sampling distribution).
      ``max_new_tokens=0`` returns the prompt and ``[B, 0]`` arrays and runs no member.

    Raises:
      ValueError: bad members (:func:`check_members`, a vocabulary mismatch names the sizes);
        ``P + max_new_tokens`` above some member's ``max_len``; a prompt that is not integer ``[B, P >= 1]``
        or a mask of another shape; ``eos_id`` outside ``[0, V)``; bad sampling options; ``combine``
        returning another shape than ``[B, V]``.
    """
    vocab = check_members(members)
    n = check_int("max_new_tokens", max_new_tokens, low=0)
    _check_options(temperature, top_k, top_p)
    prompt_tokens, prompt_mask = check_prompt(prompt_tokens, prompt_mask)
    b, p = prompt_tokens.shape
    for i, (config, _) in enumerate(members):
        if p + n > config.max_len:
            raise ValueError(f"prompt length {p} + max_new_tokens {n} = {p + n} exceeds members[{i}]'s "
                             f"max_len={config.max_len}")
    _check_eos_id(eos_id, vocab)
    prompt_tokens = prompt_tokens.astype(jnp.int32)
    if n == 0:
        return _empty_generation(prompt_tokens, prompt_mask)

    configs = [config for config, _ in members]
    params = jax.lax.stop_gradient([params for _, params in members])
    first, caches = [], []
    for config, member_params in zip(configs, params):
        logits, cache = prefill(member_params, config, prompt_tokens, prompt_mask, cache_len=p + n)
        first.append(_last_prompt_logits(logits, prompt_mask))
        caches.append(cache)
    first_logits = _combined(combine, first, (b, vocab))

    def step(caches, token):
        logits, new_caches = [], []
        for config, member_params, cache in zip(configs, params, caches):
            z, cache = decode_step(member_params, config, token, cache)
            logits.append(z)
            new_caches.append(cache)
        return _combined(combine, logits, (b, vocab)), new_caches

    return _sample_after_prompt(
        step, caches, first_logits, rng, prompt_tokens, prompt_mask, max_new_tokens=n, temperature=temperature,
        top_k=top_k, top_p=top_p, eos_id=eos_id,
    )


def fused_log_probs(members: Sequence[tuple[LMConfig, Any]], combine: Combine, tokens: Array,
                    mask: Array | None = None) -> Array:
    """Next-token log-probabilities ``[B, T, V]`` of the fused model at every position (teacher forcing).

    ``log_softmax(combine([z_0[:, t], …, z_{M-1}[:, t]]))`` with ``z_m = TransformerLM(config_m)`` applied
    to ``{"tokens", "mask"}`` (full forward passes, the default positions). Position ``t`` scores token
    ``t + 1`` (the next-token convention: targets ``tokens[:, 1:]`` under ``mask[:, 1:] & mask[:, :-1]``).
    ``combine`` sees the ``B·T`` positions as rows: ``[B·T, V]`` arrays. Values at padded positions are
    finite and meaningless. This is the distribution :func:`fused_generate` samples at temperature 1.

    Raises:
      ValueError: bad members, tokens not integer ``[B, T]``, a mask of another shape, ``T`` above a
        member's ``max_len``, or ``combine`` returning another shape.
    """
    logits = member_logits(members, tokens, mask)
    b, t, vocab = logits[0].shape
    fused = _combined(combine, [z.reshape(b * t, vocab) for z in logits], (b * t, vocab))
    return jax.nn.log_softmax(fused, axis=-1).reshape(b, t, vocab)


def member_logits(members: Sequence[tuple[LMConfig, Any]], tokens: Array, mask: Array | None = None) -> list:
    """Every member's float32 logits ``[B, T, V]`` on ``{"tokens", "mask"}`` (full forward passes, default
    positions), in member order: what :func:`fused_log_probs` combines. For statistics of a combine at
    every position (e.g. :meth:`DynamicLogitsFusion.weights`).

    Raises:
      ValueError: bad members, tokens not integer ``[B, T]``, a mask of another shape, ``T`` above a
        member's ``max_len``.
    """
    check_members(members)
    tokens = jnp.asarray(tokens)
    if not jnp.issubdtype(tokens.dtype, jnp.integer) or tokens.ndim != 2:
        raise ValueError(f"tokens must be integer ids of shape [batch, length], got {tokens.dtype} {tokens.shape}")
    mask = jnp.ones(tokens.shape, bool) if mask is None else jnp.asarray(mask)
    if mask.shape != tokens.shape:
        raise ValueError(f"mask must have the tokens' shape {tokens.shape}, got {mask.shape}")
    x = {"tokens": tokens.astype(jnp.int32), "mask": mask.astype(bool)}
    return [TransformerLM(config).apply({"params": _params_tree(params)}, x) for config, params in members]


def _check_index(name: str, value: Any) -> int:
    return check_int(name, value, low=0)


def _member(logits: list, index: int, role: str) -> Array:
    if index >= len(logits):
        raise ValueError(f"the combine reads members[{index}] as the {role}, but only {len(logits)} members are given")
    return logits[index]


@dataclasses.dataclass(frozen=True)
class ProxyTuning:
    """The combine of :func:`proxy_tuning` (hashable: a static ``jax.jit`` argument)."""

    large: int
    small_tuned: int
    small_untuned: int
    alpha: float = 1.0

    def __call__(self, logits: list) -> Array:
        return logit_fusion.proxy_tuning_logits(
            _member(logits, self.large, "large model"), _member(logits, self.small_tuned, "small tuned model"),
            _member(logits, self.small_untuned, "small untuned model"), alpha=self.alpha)


def proxy_tuning(large: int, small_tuned: int, small_untuned: int, alpha: float = 1.0) -> ProxyTuning:
    """The proxy-tuning combine ``z_large + α (z_tuned − z_untuned)`` over members named by index.

    Liu, Han, Wang, Tsvetkov, Choi & Smith, "Tuning Language Models by Proxy" (COLM 2024), Eq. 1 (the
    product of experts ``p_large · p_tuned / p_untuned``; the official code, ``alisawuffles/proxy-tuning``,
    adds raw logits with the weight ``alpha``); the arithmetic is
    :func:`jaxkd.losses.fusion.logit_fusion.proxy_tuning_logits`. ``alpha=0`` gives the large model exactly.

    Args:
      large, small_tuned, small_untuned: indices into the member list.
      alpha: the weight of the tuning offset (a number).
    """
    indices = [_check_index(n, v) for n, v in
               (("large", large), ("small_tuned", small_tuned), ("small_untuned", small_untuned))]
    check_number("alpha", alpha)
    return ProxyTuning(*indices, alpha=float(alpha))


@dataclasses.dataclass(frozen=True)
class DynamicLogitsFusion:
    """The combine of :func:`dynamic_logits_fusion` (hashable: a static ``jax.jit`` argument)."""

    large: int
    experts: tuple[int, ...]
    small_untuned: int
    alpha_grid: tuple[float, ...] = logit_fusion.DEFAULT_ALPHA_GRID
    search: str = "one_expert"

    def weights(self, logits: list) -> tuple[Array, Array]:
        """``(fused logits [..., V], the chosen weights [..., E])`` from the member logits ``[..., V]`` (e.g.
        :func:`member_logits` at every position: the weights the decoder would choose there)."""
        experts = jnp.stack([_member(logits, e, f"expert {i}") for i, e in enumerate(self.experts)])
        return logit_fusion.dynamic_logits_fusion(
            _member(logits, self.large, "large model"), experts,
            _member(logits, self.small_untuned, "small untuned model"), alpha_grid=self.alpha_grid,
            search=self.search)

    def __call__(self, logits: list) -> Array:
        return self.weights(logits)[0]


def dynamic_logits_fusion(large: int, experts: Sequence[tuple[int, int]], *,
                          alpha_grid: Sequence[float] = logit_fusion.DEFAULT_ALPHA_GRID,
                          search: str = "one_expert") -> DynamicLogitsFusion:
    """The dynamic-logits-fusion combine over members named by index.

    Fan, Lu, Wei, Tian, Qu, Chen & Cheng, "On Giant's Shoulders: Effortless Weak to Strong by Dynamic Logits
    Fusion" (NeurIPS 2024): at every step ``z̃ = z_large + Σ_t α_t (z_t − z_small)`` with ``α`` chosen from
    ``alpha_grid`` to minimize the paper's Eq. 5,
    ``Σ_t (KL(P̃‖P) − KL(Q_t‖Q))² + (KL(P‖P̃) − KL(Q‖Q_t))²`` (the search is
    :func:`jaxkd.losses.fusion.logit_fusion.dynamic_logits_fusion`'s; ``search="one_expert"`` is the paper's
    multi-expert search, one expert active per candidate).

    Args:
      large: index of the large model.
      experts: ``[(tuned, untuned), ...]`` index pairs, one per expert. The paper tunes every expert from
        one small model, whose logits both the offsets and the KL targets use, so every pair must name the
        same ``untuned`` member.
      alpha_grid, search: see :func:`jaxkd.losses.fusion.logit_fusion.dynamic_logits_fusion`.

    Raises:
      ValueError: no experts, a pair that is not two indices ``>= 0``, experts with different untuned
        members, a bad ``search``.
    """
    check_choice("search", search, ("one_expert", "grid"))
    if isinstance(experts, (str, bytes)) or not isinstance(experts, Sequence) or len(experts) == 0:
        raise ValueError(f"experts must be a non-empty sequence of (tuned, untuned) index pairs, got {experts!r}")
    pairs = []
    for i, pair in enumerate(experts):
        if not isinstance(pair, Sequence) or len(pair) != 2:
            raise ValueError(f"experts[{i}] must be a (tuned, untuned) pair of member indices, got {pair!r}")
        pairs.append((_check_index(f"experts[{i}][0]", pair[0]), _check_index(f"experts[{i}][1]", pair[1])))
    untuned = {u for _, u in pairs}
    if len(untuned) != 1:
        raise ValueError(f"every expert must be tuned from the same small model (one untuned member), got experts "
                         f"{pairs} with untuned members {sorted(untuned)}")
    grid = tuple(float(a) for a in np.asarray(alpha_grid, np.float64).reshape(-1))
    for i, a in enumerate(grid):
        check_number(f"alpha_grid[{i}]", a)
    if not grid:
        raise ValueError("alpha_grid must hold at least one weight")
    return DynamicLogitsFusion(_check_index("large", large), tuple(t for t, _ in pairs), untuned.pop(), grid, search)
