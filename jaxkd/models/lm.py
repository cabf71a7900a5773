"""A decoder-only transformer language model (teacher and student for LM distillation) and its KV cache.

Architecture (the LLaMA family: Touvron et al., "LLaMA: Open and Efficient Foundation Language Models",
2023; layout and logical axis names after MaxText, AI-Hypercomputer/maxtext ``layers/llama2.py``):

* token embedding ``E [V, d]``;
* ``num_layers`` pre-norm blocks ``x + Attn(RMSNorm(x))`` then ``x + MLP(RMSNorm(x))``;
* RMSNorm (Zhang & Sennrich, "Root Mean Square Layer Normalization", 2019):
  ``y = x / sqrt(mean(x²) + eps) · scale``, computed in float32 whatever the compute dtype;
* causal self-attention with grouped-query heads (Ainslie et al., "GQA: Training Generalized Multi-Query
  Transformer Models from Multi-Head Checkpoints", 2023): ``num_heads`` query heads share
  ``num_kv_heads`` key/value heads, query head ``h`` reading key/value head ``h // (num_heads /
  num_kv_heads)`` (HF ``repeat_kv``'s order); ``softmax(q kᵀ / sqrt(head_dim))`` in float32;
* rotary position embeddings (Su et al., "RoFormer: Enhanced Transformer with Rotary Position
  Embedding", 2021) on queries and keys, in the "rotate half" layout of GPT-NeoX / HF LLaMA / MaxText
  (the two halves of each head's features form the rotated pairs; Meta's original LLaMA code pairs
  adjacent features instead, which is the same model up to a fixed permutation of the q/k features):
  ``θ_i = rope_base^(-2i / head_dim)``, ``(x₁, x₂) -> (x₁ cos pθ − x₂ sin pθ, x₂ cos pθ + x₁ sin pθ)``
  at position ``p``;
* gated MLP, SwiGLU (Shazeer, "GLU Variants Improve Transformer", 2020):
  ``W_down (silu(x W_gate) ⊙ (x W_up))``;
* a final RMSNorm and the output head: ``logits = h Eᵀ`` (tied, the default) or ``h W_head``.

No biases by default (LLaMA). Options of :class:`LMConfig`, each off by default, cover the Hugging Face
families :mod:`jaxkd.models.hf` reads and writes (Mistral, Qwen2, Qwen3): ``qkv_bias`` / ``out_bias``
(``block_{i}/attention/{query_bias [H, hd], key_bias, value_bias [K, hd], out_bias [d]}``), ``qk_norm``
(``block_{i}/attention/{query_norm, key_norm}/scale [hd]``), ``attention_head_dim`` (a head width other
than ``d / H``), ``rope_scaling`` (linear, LLaMA 3.1) and ``sliding_window``; Gemma 2 / 3 (``sliding_layers``,
``local_rope_base``, ``norm_plus_one``, ``sandwich_norm``, ``embedding_scale``, ``mlp_activation="gelu_tanh"``,
``attention_scale``, ``attn_softcap``, ``final_softcap``), GPT-2 (``norm_type="layer"``,
``position_embedding="learned"``, ``mlp_gate=False``, ``mlp_bias``) and the mixture-of-experts MLP of
Qwen3-MoE and Mixtral (``num_experts``, ``num_experts_per_tok``, ``moe_d_ff``, ``norm_topk_prob``: see
:class:`MoEMLP`; the per-layer router logits are sown as the ``router_logits`` feature for
:func:`load_balancing_loss`).

Parameters are ``param_dtype`` (float32); activations and matmuls run in
``dtype`` (bfloat16 allowed) with float32 normalization, softmax and RoPE; **logits are always float32**
(the vocabulary projection accumulates in float32).

Inputs: ``{"tokens": int [B, T], "mask": bool [B, T], "positions": int [B, T]}``; ``mask`` is optional
(all True), ``positions`` is optional; a bare integer array is taken as ``tokens``. ``mask`` is the
padding mask of the next-token convention (True = real token): a key position whose mask is False is
never attended to, and its token id never reaches the network (its embedding is zeroed), so padding may
hold any id. A query with no real key at or before it (left padding) gets a zero attention output
instead of NaN: padded positions' outputs are finite and meaningless (but the same with a KV cache). Token ids are
clipped into ``[0, V)`` (values cannot be checked under ``jit``). Default positions are
``max(cumsum(mask) - 1, 0)`` along the sequence: the first real token of every row is at position 0,
so a left-padded prompt is embedded exactly like the unpadded one (and right-padded continuations
continue from the last real token); an explicit ``positions`` input overrides them. An optional
``"segment_ids"`` input (int ``[B, T]``, :data:`jaxkd.batch.SEGMENT_IDS`, one id per packed document of a
row) restricts attention to keys of the query's own segment, and the default positions then restart at 0
in every segment: a packed document is computed as if it were alone in its row (the packing of
``DataCollatorWithFlattening`` in transformers/TRL's ``padding_free``, here with an explicit mask).

Features sown (``"intermediates"``): ``block0`` … ``block{L-1}`` (the ``[B, T, d]`` residual stream
after each block, compute dtype) and ``hidden`` (the final-normed ``[B, T, d]`` states, the input of
the output projection: ``logits = hidden @ output_projection(params, config)``); a mixture-of-experts model
also sows ``router_logits`` (``[L', B, T, E]``, the router logits of its ``L'`` mixture-of-experts layers,
compute dtype).

Logical axis names (every parameter carries them through ``nn.with_logical_partitioning``):

==============  ======================================================================
``vocab``       vocabulary rows of the embedding / columns of the untied head
``embed``       the model width ``d_model`` (the residual stream)
``heads``       query heads
``kv_heads``    key/value heads
``head_dim``    features per head
``mlp``         the MLP's hidden width ``d_ff``
``norm``        RMSNorm scales
``position``    rows of the learned position embedding (``position_embedding="learned"``)
``expert``      the experts of a mixture-of-experts MLP (``num_experts``)
==============  ======================================================================

Parameter tree: ``embedding [V, d] (vocab, embed)``; ``block_{i}/attention_norm/scale [d] (norm)``;
``block_{i}/attention/{query [d, H, hd] (embed, heads, head_dim), key, value [d, K, hd] (embed,
kv_heads, head_dim), out [H, hd, d] (heads, head_dim, embed)}``; ``block_{i}/mlp_norm/scale``;
``block_{i}/mlp/{gate, up [d, d_ff] (embed, mlp), down [d_ff, d] (mlp, embed)}`` (a mixture of ``E``
experts of width ``f = moe_d_ff`` instead: ``block_{i}/mlp/{router [d, E] (embed, expert), experts_gate,
experts_up [E, d, f] (expert, embed, mlp), experts_down [E, f, d] (expert, mlp, embed)}``, in the layers
``moe_layers`` names);
``final_norm/scale``; ``head [d, V] (embed, vocab)`` when untied. :func:`lm_logical_rules` maps them
onto the ``(data, fsdp, tensor)`` mesh.

Dropout is not implemented (LLaMA-style pre-training uses none): ``train`` is accepted and ignored.

KV cache (pure, jittable functions on the unboxed ``params``): :func:`init_cache`, :func:`prefill`,
:func:`decode_step`. :class:`LMConfig` is a static pytree (no leaves), so it may be passed straight
through ``jax.jit``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax.core import meta

from jaxkd.checks import check_int, check_number
from jaxkd.models import mixed_matmul
from jaxkd.models.base import Model, from_linen
from jaxkd.sharding import FSDP, TENSOR, Rules

__all__ = [
    "KVCache",
    "LMConfig",
    "LM_PRESETS",
    "LOGICAL_AXES",
    "TransformerLM",
    "decode_step",
    "init_cache",
    "lm",
    "load_balancing_loss",
    "lm_config",
    "lm_logical_rules",
    "output_projection",
    "prefill",
]

Array = jax.Array

#: Every logical axis name a :class:`TransformerLM` parameter uses.
LOGICAL_AXES = ("vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", "norm", "position", "expert")

# Masked attention scores: the most negative finite float32, not -inf, so that a query row whose keys
# are all masked gets a finite softmax (then zeroed) instead of NaN, in value and gradient; in a row
# with one real key the masked entries still get exactly zero weight (exp underflows to 0).
_MASKED_SCORE = float(np.finfo(np.float32).min)


@dataclasses.dataclass(frozen=True)
class LMConfig:
    """Hyper-parameters of a :class:`TransformerLM`.

    Attributes:
      vocab_size: ``V``, vocabulary entries.
      d_model: ``d``, the residual-stream width.
      num_layers: transformer blocks.
      num_heads: query heads ``H``; must divide ``d_model`` (``head_dim = d_model / H``, which must be
        even for the rotary pairs).
      d_ff: the SwiGLU hidden width.
      max_len: the longest sequence the model accepts (and the default KV-cache length).
      num_kv_heads: key/value heads ``K`` (grouped-query attention); must divide ``num_heads``;
        ``None`` means ``num_heads`` (plain multi-head attention), ``1`` is multi-query attention.
      tie_embeddings: the output head is the transposed embedding (True) or its own ``[d, V]`` kernel.
      rope_base: the rotary base (10000 in RoFormer and LLaMA).
      norm_eps: RMSNorm's epsilon.
      dtype: activation/compute dtype (float32 or bfloat16 …); logits are float32 regardless.
      param_dtype: parameter dtype.
      attention_head_dim: features per head when they are not ``d_model / num_heads`` (Qwen3's explicit
        ``head_dim``); ``None`` (the default) means ``d_model / num_heads``. Must be even.
      rope_scaling: ``None`` (plain RoPE) or a frequency rescaling of transformers'
        ``modeling_rope_utils.py``, given as a dict (stored as a sorted tuple of items, so the config stays
        hashable): ``{"rope_type": "linear", "factor": f}`` (every inverse frequency divided by ``f``) or
        ``{"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
        "original_max_position_embeddings"}`` (LLaMA 3.1: long wavelengths divided by ``factor``, short
        ones kept, the band between interpolated) or ``{"rope_type": "dynamic", "factor",
        "original_max_position_embeddings"}`` (dynamic NTK: when a forward's largest position ``p`` reaches
        past ``L = original_max_position_embeddings``, the base becomes ``base · (f (p + 1) / L - (f - 1))
        ^ (hd / (hd - 2))``; see :func:`_dynamic_inv_freq`).
      qkv_bias: biases on the query, key and value projections (Qwen2; LLaMA's ``attention_bias``).
      out_bias: a bias on the attention output projection (LLaMA's ``attention_bias``).
      qk_norm: RMSNorm over ``head_dim`` (its own ``[head_dim]`` scale) on the queries and the keys of each
        head, before RoPE (Qwen3).
      sliding_window: ``None`` (full causal attention) or ``w``: query slot ``t`` reads key slots
        ``s`` with ``t - w < s <= t`` only (Mistral; transformers' ``sliding_window_overlay``). Slots, not
        positions: left padding counts, as in transformers.
      sliding_layers: ``None`` (the window, if any, applies to every layer) or one bool per layer, True for
        the layers that use ``sliding_window`` (Gemma 2 / 3's ``layer_types``: local and global layers
        alternate); the others attend to every earlier slot. The KV cache keeps every slot either way.
      local_rope_base: ``None`` or the RoPE base of the sliding-window layers (Gemma 3's
        ``rope_local_base_freq``; ``rope_scaling`` then applies to the global layers only).
      norm_type: ``"rms"`` (RMSNorm, the default) or ``"layer"`` (LayerNorm with a bias, GPT-2:
        ``(x - mean) / sqrt(var + eps) · scale + bias``, in float32; ``block_{i}/…_norm/{scale, bias}``).
      norm_plus_one: RMSNorm multiplies by ``1 + scale`` (Gemma; the scale is initialized to zero),
        computed in float32 as transformers' ``GemmaRMSNorm``; also the q/k norms.
      sandwich_norm: Gemma 2 / 3's extra norms on the block outputs: ``x + N_post(Attn(N(x)))`` and
        ``x + N_post(MLP(N(x)))`` (``block_{i}/post_attention_norm``, ``block_{i}/post_mlp_norm``).
      embedding_scale: the token embeddings are multiplied by ``sqrt(d_model)`` (Gemma), the factor cast to
        the parameter dtype first as transformers does (bfloat16 rounds ``sqrt(3072)`` to 55.5).
      position_embedding: ``"rope"`` (the default) or ``"learned"``: absolute position embeddings
        ``position_embedding [max_len, d]`` added to the token embeddings, no rotation (GPT-2's ``wpe``).
      mlp_activation: ``"silu"`` (the default) or ``"gelu_tanh"`` (the tanh approximation of GELU:
        transformers' ``gelu_pytorch_tanh`` and ``gelu_new``).
      mlp_gate: the MLP is gated, ``W_down (act(x W_gate) ⊙ x W_up)`` (the default), or not:
        ``W_down act(x W_up)`` (GPT-2).
      mlp_bias: biases on the MLP's projections (``block_{i}/mlp/{gate_bias, up_bias [d_ff], down_bias [d]}``).
      attention_scale: the factor of the attention scores; ``None`` is ``1 / sqrt(head_dim)`` (Gemma:
        ``query_pre_attn_scalar ** -0.5``; GPT-2's ``scale_attn_weights=False``: 1).
      attn_softcap: ``None`` or ``c``: scores ``-> c · tanh(scores / c)`` after scaling, before masking
        (Gemma 2's ``attn_logit_softcapping``).
      final_softcap: ``None`` or ``c``: logits ``-> c · tanh(logits / c)`` in float32 (Gemma's
        ``final_logit_softcapping``). The sown ``hidden`` and :func:`output_projection` give the logits
        *before* the cap: fused vocabulary losses take ``softcap=config.final_softcap``.
      num_experts: ``None`` (a dense MLP, the default) or ``E``: every block's MLP is a mixture of ``E``
        gated experts with a top-``k`` softmax router (:class:`MoEMLP`; Qwen3-MoE, Mixtral). Needs
        ``mlp_gate=True`` and ``mlp_bias=False``.
      num_experts_per_tok: ``k``, the experts each token is routed to (``1 <= k <= E``); required with
        ``num_experts``.
      moe_d_ff: each expert's hidden width ``f``; ``None`` means ``d_ff`` (Mixtral's experts are
        ``intermediate_size`` wide, Qwen3-MoE's ``moe_intermediate_size``).
      norm_topk_prob: the ``k`` selected router probabilities are renormalized to sum to 1 (Mixtral
        always; Qwen3-MoE's ``norm_topk_prob``); False keeps the plain softmax probabilities.
      moe_layers: ``None`` (with ``num_experts``: every layer is a mixture) or one bool per layer, True for
        the mixture-of-experts layers, the others a dense gated MLP of width ``d_ff`` (Qwen3-MoE's
        ``mlp_only_layers`` and ``decoder_sparse_step``). At least one layer must be a mixture.
      router_aux_loss_coef: the weight a training loss gives :func:`load_balancing_loss` (transformers adds
        ``router_aux_loss_coef · aux_loss`` to the LM loss when asked for router logits). The forward pass
        does not use it; it is kept so a checkpoint's value survives :func:`jaxkd.models.hf.to_hf`.
    """

    vocab_size: int
    d_model: int
    num_layers: int
    num_heads: int
    d_ff: int
    max_len: int
    num_kv_heads: int | None = None
    tie_embeddings: bool = True
    rope_base: float = 10000.0
    norm_eps: float = 1e-6
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_head_dim: int | None = None
    rope_scaling: Any = None
    qkv_bias: bool = False
    out_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    sliding_layers: Any = None
    local_rope_base: float | None = None
    norm_type: str = "rms"
    norm_plus_one: bool = False
    sandwich_norm: bool = False
    embedding_scale: bool = False
    position_embedding: str = "rope"
    mlp_activation: str = "silu"
    mlp_gate: bool = True
    mlp_bias: bool = False
    attention_scale: float | None = None
    attn_softcap: float | None = None
    final_softcap: float | None = None
    num_experts: int | None = None
    num_experts_per_tok: int | None = None
    moe_d_ff: int | None = None
    norm_topk_prob: bool = True
    moe_layers: Any = None
    router_aux_loss_coef: float = 0.001

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "num_layers", "num_heads", "d_ff", "max_len"):
            object.__setattr__(self, name, check_int(name, getattr(self, name), low=1))
        kv = self.num_heads if self.num_kv_heads is None else check_int("num_kv_heads", self.num_kv_heads, low=1)
        object.__setattr__(self, "num_kv_heads", kv)
        if self.attention_head_dim is not None:
            hd = check_int("attention_head_dim", self.attention_head_dim, low=1)
            object.__setattr__(self, "attention_head_dim", hd)
            if hd % 2:
                raise ValueError(f"attention_head_dim must be even (rotary embeddings rotate feature pairs), got {hd}")
        elif self.d_model % self.num_heads:
            raise ValueError(f"num_heads must divide d_model, got d_model={self.d_model}, num_heads={self.num_heads}")
        elif (self.d_model // self.num_heads) % 2:
            raise ValueError(
                f"head_dim = d_model / num_heads = {self.d_model // self.num_heads} must be even (rotary "
                f"embeddings rotate feature pairs), got d_model={self.d_model}, num_heads={self.num_heads}"
            )
        if self.num_heads % kv:
            raise ValueError(f"num_kv_heads must divide num_heads, got num_heads={self.num_heads}, num_kv_heads={kv}")
        if not isinstance(self.tie_embeddings, (bool, np.bool_)):
            raise ValueError(f"tie_embeddings must be a bool, got {self.tie_embeddings!r}")
        check_number("rope_base", self.rope_base, low=1.0, low_open=True)
        check_number("norm_eps", self.norm_eps, low=0.0, low_open=True)
        for name in ("dtype", "param_dtype"):
            try:
                dtype = jnp.dtype(getattr(self, name))
            except TypeError:
                raise ValueError(f"{name} must be a floating dtype, got {getattr(self, name)!r}") from None
            if not jnp.issubdtype(dtype, jnp.floating):
                raise ValueError(f"{name} must be a floating dtype, got {dtype}")
            object.__setattr__(self, name, dtype)  # one hashable representation for jit's static equality
        object.__setattr__(self, "tie_embeddings", bool(self.tie_embeddings))
        object.__setattr__(self, "rope_base", float(self.rope_base))
        object.__setattr__(self, "norm_eps", float(self.norm_eps))
        for name in ("qkv_bias", "out_bias", "qk_norm", "norm_plus_one", "sandwich_norm", "embedding_scale",
                     "mlp_gate", "mlp_bias"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
            object.__setattr__(self, name, bool(getattr(self, name)))
        if self.sliding_window is not None:
            object.__setattr__(self, "sliding_window", check_int("sliding_window", self.sliding_window, low=1))
        object.__setattr__(self, "rope_scaling", _check_rope_scaling(self.rope_scaling))
        if self.sliding_layers is not None:
            layers = tuple(self.sliding_layers)
            if len(layers) != self.num_layers or not all(isinstance(x, (bool, np.bool_)) for x in layers):
                raise ValueError(f"sliding_layers must be one bool per layer ({self.num_layers}), got {self.sliding_layers!r}")
            if self.sliding_window is None:
                raise ValueError("sliding_layers needs a sliding_window")
            object.__setattr__(self, "sliding_layers", tuple(bool(x) for x in layers))
        for name in ("local_rope_base", "attention_scale", "attn_softcap", "final_softcap"):
            if getattr(self, name) is not None:
                check_number(name, getattr(self, name), low=0.0, low_open=True)
                object.__setattr__(self, name, float(getattr(self, name)))
        for name, allowed in (("norm_type", ("rms", "layer")), ("position_embedding", ("rope", "learned")),
                              ("mlp_activation", ("silu", "gelu_tanh"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {list(allowed)}, got {getattr(self, name)!r}")
        if self.norm_plus_one and self.norm_type != "rms":
            raise ValueError("norm_plus_one applies to RMSNorm (norm_type='rms')")
        self._check_moe()

    def _check_moe(self) -> None:
        if not isinstance(self.norm_topk_prob, (bool, np.bool_)):
            raise ValueError(f"norm_topk_prob must be a bool, got {self.norm_topk_prob!r}")
        object.__setattr__(self, "norm_topk_prob", bool(self.norm_topk_prob))
        check_number("router_aux_loss_coef", self.router_aux_loss_coef, low=0.0)
        object.__setattr__(self, "router_aux_loss_coef", float(self.router_aux_loss_coef))
        if self.num_experts is None:
            unused = [f"{name}={getattr(self, name)!r}" for name in ("num_experts_per_tok", "moe_d_ff", "moe_layers")
                      if getattr(self, name) is not None]
            if unused:
                raise ValueError(f"{', '.join(unused)} needs num_experts (a mixture-of-experts MLP); got num_experts=None")
            return
        experts = check_int("num_experts", self.num_experts, low=1)
        object.__setattr__(self, "num_experts", experts)
        if self.num_experts_per_tok is None:
            raise ValueError(f"num_experts={experts} needs num_experts_per_tok (the top-k experts of each token)")
        top_k = check_int("num_experts_per_tok", self.num_experts_per_tok, low=1)
        if top_k > experts:
            raise ValueError(f"num_experts_per_tok must be at most num_experts={experts}, got {top_k}")
        object.__setattr__(self, "num_experts_per_tok", top_k)
        if self.moe_d_ff is not None:
            object.__setattr__(self, "moe_d_ff", check_int("moe_d_ff", self.moe_d_ff, low=1))
        if not self.mlp_gate or self.mlp_bias:
            raise ValueError(f"a mixture-of-experts MLP (num_experts={experts}) is gated and bias-free: got "
                             f"mlp_gate={self.mlp_gate}, mlp_bias={self.mlp_bias}")
        if self.moe_layers is not None:
            layers = tuple(self.moe_layers)
            if len(layers) != self.num_layers or not all(isinstance(x, (bool, np.bool_)) for x in layers):
                raise ValueError(f"moe_layers must be one bool per layer ({self.num_layers}), got {self.moe_layers!r}")
            if not any(layers):
                raise ValueError(f"moe_layers={self.moe_layers!r} has no mixture-of-experts layer: a dense model is "
                                 f"num_experts=None")
            object.__setattr__(self, "moe_layers", tuple(bool(x) for x in layers))

    def is_moe(self, layer: int) -> bool:
        """Whether layer ``layer``'s MLP is the mixture of experts."""
        return self.num_experts is not None and (self.moe_layers is None or self.moe_layers[layer])

    @property
    def expert_d_ff(self) -> int | None:
        """Each expert's hidden width: ``moe_d_ff``, else ``d_ff`` (None for a dense model)."""
        if self.num_experts is None:
            return None
        return self.d_ff if self.moe_d_ff is None else self.moe_d_ff

    def is_sliding(self, layer: int) -> bool:
        """Whether layer ``layer`` attends through the sliding window."""
        return self.sliding_window is not None and (self.sliding_layers is None or self.sliding_layers[layer])

    @property
    def head_dim(self) -> int:
        """Features per head: ``attention_head_dim`` when given, else ``d_model / num_heads``."""
        return self.d_model // self.num_heads if self.attention_head_dim is None else self.attention_head_dim

    @property
    def rope_scaling_dict(self) -> dict[str, Any] | None:
        """``rope_scaling`` as a dict (None when unscaled)."""
        return None if self.rope_scaling is None else dict(self.rope_scaling)

    @property
    def num_params(self) -> int:
        """The exact parameter count: ``V d`` (embedding) ``+ L [2d + d·H·hd + 2·d·K·hd + H·hd·d +
        3·d·d_ff] + d`` (final norm) ``+ d V`` when the head is untied (plus the optional biases
        ``(H + 2K) hd`` and ``d`` and q/k norm scales ``2 hd`` per block). A mixture of ``E`` experts of
        width ``f`` replaces ``3·d·d_ff`` by ``d·E`` (the router) ``+ 3·E·d·f`` in each mixture layer."""
        positions = self.max_len * self.d_model if self.position_embedding == "learned" else 0
        return (self.num_non_embedding_params + positions
                + self.vocab_size * self.d_model * (1 if self.tie_embeddings else 2))

    @property
    def num_non_embedding_params(self) -> int:
        """Parameters outside the embedding and the output head (Kaplan et al., "Scaling Laws for Neural
        Language Models", 2020, count these); the :data:`LM_PRESETS` names give this number roughly."""
        d, hd = self.d_model, self.head_dim
        attention = d * self.num_heads * hd + 2 * d * self.num_kv_heads * hd + self.num_heads * hd * d
        if self.qkv_bias:
            attention += (self.num_heads + 2 * self.num_kv_heads) * hd
        if self.out_bias:
            attention += d
        if self.qk_norm:
            attention += 2 * hd
        mlp = (3 if self.mlp_gate else 2) * d * self.d_ff
        if self.mlp_bias:
            mlp += (2 if self.mlp_gate else 1) * self.d_ff + d
        moe = 0 if self.num_experts is None else d * self.num_experts + 3 * self.num_experts * d * self.expert_d_ff
        moe_layers = sum(self.is_moe(i) for i in range(self.num_layers))  # the router and E stacked gated experts
        norm = d if self.norm_type == "rms" else 2 * d
        block = (4 if self.sandwich_norm else 2) * norm + attention
        return self.num_layers * block + (self.num_layers - moe_layers) * mlp + moe_layers * moe + norm


_ROPE_SCALING_KEYS = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "dynamic": ("factor", "original_max_position_embeddings"),
}


def _check_rope_scaling(scaling: Any) -> tuple[tuple[str, Any], ...] | None:
    """``None`` or the rope scaling as a sorted tuple of ``(key, value)`` items, checked."""
    if scaling is None:
        return None
    items = dict(scaling)
    kind = items.get("rope_type")
    if kind not in _ROPE_SCALING_KEYS:
        raise ValueError(
            f"rope_scaling rope_type must be one of {sorted(_ROPE_SCALING_KEYS)} (YaRN, LongRoPE and the others of "
            f"transformers' modeling_rope_utils.py are not implemented), got {scaling!r}"
        )
    expected = {"rope_type", *_ROPE_SCALING_KEYS[kind]}
    if set(items) != expected:
        raise ValueError(f"rope_scaling of rope_type {kind!r} takes exactly the keys {sorted(expected)}, got {sorted(items)}")
    for key in _ROPE_SCALING_KEYS[kind]:
        if key == "original_max_position_embeddings":
            items[key] = check_int(f"rope_scaling[{key!r}]", items[key], low=1)
        else:
            check_number(f"rope_scaling[{key!r}]", items[key], low=0.0, low_open=True)
            items[key] = float(items[key])
    if kind == "llama3" and items["high_freq_factor"] == items["low_freq_factor"]:
        raise ValueError(f"rope_scaling llama3 needs high_freq_factor != low_freq_factor, got {scaling!r}")
    return tuple(sorted(items.items()))


# Static pytree: jax.jit takes an LMConfig argument as part of the (hashed) tree structure.
jax.tree_util.register_static(LMConfig)


#: Architecture presets (``vocab_size`` and ``max_len`` are given to :func:`lm_config`). A name gives the
#: rough *non-embedding* parameter count (:attr:`LMConfig.num_non_embedding_params`): the embedding's
#: share depends on the tokenizer. ``lm_1b`` is TinyLlama-1.1B's shape (Zhang et al., 2024: 22 layers,
#: d=2048, 32 heads, 4 KV heads, d_ff=5632, untied); ``lm_7b`` is LLaMA-7B's (32 layers, d=4096, 32 heads,
#: d_ff=11008, untied). The small ones are tied, with SwiGLU widths near LLaMA's ``8d/3``.
LM_PRESETS: dict[str, dict[str, Any]] = {
    "lm_1m": dict(d_model=128, num_layers=6, num_heads=4, d_ff=256),            # 0.98M
    "lm_4m": dict(d_model=256, num_layers=6, num_heads=4, d_ff=512),            # 3.9M
    "lm_25m": dict(d_model=512, num_layers=8, num_heads=8, d_ff=1408),          # 25.7M
    "lm_125m": dict(d_model=768, num_layers=12, num_heads=12, d_ff=3584),       # 127M
    "lm_1b": dict(d_model=2048, num_layers=22, num_heads=32, num_kv_heads=4, d_ff=5632,
                  tie_embeddings=False),                                        # 0.97B (+ 2·V·d)
    "lm_7b": dict(d_model=4096, num_layers=32, num_heads=32, d_ff=11008,
                  tie_embeddings=False),                                        # 6.5B (+ 2·V·d)
}


def lm_config(name: str, *, vocab_size: int, max_len: int = 2048, **overrides: Any) -> LMConfig:
    """The :data:`LM_PRESETS` architecture ``name`` for a vocabulary; ``overrides`` replace any field
    (``dtype=jnp.bfloat16``, ``num_kv_heads=...``, ``tie_embeddings=...``)."""
    try:
        preset = LM_PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown LM preset {name!r}; available: {sorted(LM_PRESETS)}") from None
    return LMConfig(**{**preset, "vocab_size": vocab_size, "max_len": max_len, **overrides})


def lm_logical_rules() -> Rules:
    """:class:`jaxkd.sharding.Rules` for :class:`TransformerLM` (MaxText's layout on a (data, fsdp,
    tensor) mesh): ``embed`` over ``fsdp`` (ZeRO-3-style sharding of every matrix along the model
    width), and ``vocab``, ``heads``, ``kv_heads`` and ``mlp`` over ``tensor`` (Megatron's column/row
    split: attention heads and the MLP's hidden units are independent, so each tensor shard computes its
    own heads/units and one reduction follows the output projection). ``head_dim`` and ``norm`` stay
    replicated.

    The sharded sizes must divide by the mesh axes: with a tensor axis of size ``n``, ``vocab_size``,
    ``num_heads``, ``num_kv_heads`` and ``d_ff`` must be multiples of ``n`` (pad the vocabulary, or use
    ``Rules.overrides`` for a model with fewer KV heads than tensor shards).

    Mixture-of-experts weights (``[E, d, f]``, ``[E, f, d]``, router ``[d, E]``): ``expert`` over ``fsdp``.
    MaxText (``configs/base.yml``: ``['exp', 'expert']``) puts the experts on a mesh axis of their own that
    also splits the batch (expert parallelism); of this mesh's axes ``fsdp`` is the one with that role, so
    each fsdp shard keeps ``E / n`` whole experts, and the experts' ``mlp`` still goes over ``tensor``
    (MaxText's ``mlp_moe``), the Megatron split inside every expert. The expert rule comes first because
    the first rule to claim a mesh axis wins: on the expert weights ``embed`` then stays whole (``fsdp``
    is taken, as MaxText's ``embed_moe`` excludes the expert axis). ``num_experts`` must divide by the
    fsdp size (else ``Rules.overrides``).
    """
    return Rules(logical=(
        ("expert", FSDP),
        ("vocab", TENSOR),
        ("embed", FSDP),
        ("heads", TENSOR),
        ("kv_heads", TENSOR),
        ("mlp", TENSOR),
        ("head_dim", None),
        ("norm", None),
        ("position", None),
    ))


def _param(module: nn.Module, name: str, init, shape: tuple[int, ...], axes: tuple[str, ...]) -> Array:
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, module.config.param_dtype)


def _fan_in(in_axis, out_axis):
    # LeCun normal on the contracted axes (the fan-in of a multi-axis kernel is their product).
    return nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=in_axis, out_axis=out_axis)


class RMSNorm(nn.Module):
    """``x / sqrt(mean(x²) + eps) · scale`` over the last axis, in float32; returns the compute dtype."""

    config: LMConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        init = nn.initializers.zeros if cfg.norm_plus_one else nn.initializers.ones
        scale = _param(self, "scale", init, (x.shape[-1],), ("norm",))
        x32 = x.astype(jnp.float32)
        if cfg.norm_type == "layer":  # GPT-2's LayerNorm (torch's: biased variance)
            centered = x32 - jnp.mean(x32, axis=-1, keepdims=True)
            y = centered * jax.lax.rsqrt(jnp.mean(jnp.square(centered), axis=-1, keepdims=True) + cfg.norm_eps)
            bias = _param(self, "bias", nn.initializers.zeros, (x.shape[-1],), ("norm",))
            return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(cfg.dtype)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + cfg.norm_eps)
        scale32 = scale.astype(jnp.float32)
        if cfg.norm_plus_one:  # Gemma: (1 + w), in float32
            scale32 = 1.0 + scale32
        return (y * scale32).astype(cfg.dtype)


def _rotary(x: Array, cos: Array, sin: Array) -> Array:
    """Rotate-half RoPE of ``x [B, T, heads, hd]`` with ``cos, sin [B, T, hd/2]``, in float32."""
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1).astype(x.dtype)


def _scaled_inv_freq(config: LMConfig) -> np.ndarray:
    """The rescaled inverse frequencies ``[head_dim / 2]`` float32, computed as transformers
    ``modeling_rope_utils.py`` does (``_compute_linear_scaling_rope_parameters``,
    ``_compute_llama3_parameters``), in float32."""
    dim = config.head_dim
    inv_freq = (1.0 / (np.float32(config.rope_base) ** (np.arange(0, dim, 2).astype(np.float32) / np.float32(dim))))
    inv_freq = inv_freq.astype(np.float32)
    scaling = config.rope_scaling_dict
    factor = np.float32(scaling["factor"])
    if scaling["rope_type"] == "linear":
        return (inv_freq / factor).astype(np.float32)
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = (2 * math.pi / inv_freq).astype(np.float32)
    scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq).astype(np.float32)
    smooth = ((old_len / wavelen - low) / (high - low)).astype(np.float32)
    smoothed = ((1 - smooth) * scaled / factor + smooth * scaled).astype(np.float32)
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def _dynamic_inv_freq(positions: Array, config: LMConfig) -> Array:
    """Dynamic NTK-aware RoPE (bloc97 and emozilla, 2023; transformers' ``_compute_dynamic_ntk_parameters``):
    with ``n = max(max(positions) + 1, L)``, ``L = original_max_position_embeddings``,
    ``base' = base · (f · n / L - (f - 1)) ^ (hd / (hd - 2))`` and ``inv_freq = base' ^ (-2i / hd)``, in float32.

    ``n`` is the largest position of *this call* (the whole batch; one token's position in a decode step), so
    a KV cache keeps each key rotated as it was when written — as transformers' ``dynamic_rope_update``
    does while a sequence grows. transformers also keeps the largest ``n`` seen across calls (a model
    that once read a longer batch scales a later, shorter one as the longer): that history is not a
    function of the inputs and is not reproduced.
    """
    scaling = config.rope_scaling_dict
    dim, factor, original = config.head_dim, scaling["factor"], scaling["original_max_position_embeddings"]
    n = jnp.maximum(jnp.max(positions) + 1, original).astype(jnp.float32)
    base = config.rope_base * (factor * n / original - (factor - 1)) ** (dim / (dim - 2))
    return 1.0 / base ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)


def _rope_angles(positions: Array, config: LMConfig, local: bool = False) -> tuple[Array, Array]:
    half = config.head_dim // 2
    if local:  # Gemma 3's sliding layers: their own base, unscaled
        inv_freq = (1.0 / (np.float32(config.local_rope_base) ** (np.arange(0, config.head_dim, 2).astype(np.float32)
                                                                    / np.float32(config.head_dim)))).astype(np.float32)
        inv_freq = jnp.asarray(inv_freq)
    elif config.rope_scaling is None:
        inv_freq = config.rope_base ** (-jnp.arange(half, dtype=jnp.float32) * 2.0 / config.head_dim)
    elif config.rope_scaling_dict["rope_type"] == "dynamic":
        inv_freq = _dynamic_inv_freq(positions, config)
    else:
        inv_freq = jnp.asarray(_scaled_inv_freq(config))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    return jnp.cos(angles), jnp.sin(angles)


class Attention(nn.Module):
    """Grouped-query causal self-attention with RoPE; reads and writes an optional per-layer KV cache."""

    config: LMConfig

    @nn.compact
    def __call__(self, x, cos, sin, allowed, kv=None, index=None):
        """``x [B, T, d]``; ``allowed [B, T, S]`` (query t may read key slot s); ``kv = (keys, values)``
        ``[B, S, K, hd]``, this layer's cache, which the new keys join at slot ``index`` (None: the keys
        are x's own). Returns ``(out [B, T, d], (new keys, new values) [B, T, K, hd])``."""
        cfg = self.config
        d, h, k, hd = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        wq = _param(self, "query", _fan_in(0, (1, 2)), (d, h, hd), ("embed", "heads", "head_dim"))
        wk = _param(self, "key", _fan_in(0, (1, 2)), (d, k, hd), ("embed", "kv_heads", "head_dim"))
        wv = _param(self, "value", _fan_in(0, (1, 2)), (d, k, hd), ("embed", "kv_heads", "head_dim"))
        wo = _param(self, "out", _fan_in((0, 1), 2), (h, hd, d), ("heads", "head_dim", "embed"))
        dt = cfg.dtype
        q = mixed_matmul.einsum("btd,dhk->bthk", x, wq.astype(dt))
        new_key = mixed_matmul.einsum("btd,dhk->bthk", x, wk.astype(dt))
        new_value = mixed_matmul.einsum("btd,dhk->bthk", x, wv.astype(dt))
        if cfg.qkv_bias:
            q = q + _param(self, "query_bias", nn.initializers.zeros, (h, hd), ("heads", "head_dim")).astype(dt)
            new_key = new_key + _param(self, "key_bias", nn.initializers.zeros, (k, hd), ("kv_heads", "head_dim")).astype(dt)
            new_value = new_value + _param(self, "value_bias", nn.initializers.zeros, (k, hd),
                                           ("kv_heads", "head_dim")).astype(dt)
        if cfg.qk_norm:
            q = RMSNorm(cfg, name="query_norm")(q)
            new_key = RMSNorm(cfg, name="key_norm")(new_key)
        if cos is not None:
            q = _rotary(q, cos, sin)
            new_key = _rotary(new_key, cos, sin)
        key, value = new_key, new_value
        if kv is not None:
            zero = jnp.zeros((), jnp.int32)
            start = (zero, jnp.asarray(index, jnp.int32), zero, zero)
            key = jax.lax.dynamic_update_slice(kv[0], new_key.astype(kv[0].dtype), start).astype(dt)
            value = jax.lax.dynamic_update_slice(kv[1], new_value.astype(kv[1].dtype), start).astype(dt)
        b, t = x.shape[:2]
        q = q.reshape(b, t, k, h // k, hd)  # query head j*G + g reads kv head j (HF repeat_kv's order)
        scores = mixed_matmul.einsum("btkgh,bskh->bkgts", q, key, out_dtype=jnp.float32)
        scores = scores / math.sqrt(hd) if cfg.attention_scale is None else scores * cfg.attention_scale
        if cfg.attn_softcap is not None:  # Gemma 2: c · tanh(scores / c), before the mask
            scores = jnp.tanh(scores / cfg.attn_softcap) * cfg.attn_softcap
        scores = jnp.where(allowed[:, None, None], scores, _MASKED_SCORE)
        # A query with no key to read (a padded position before the row's first real token) gets a zero
        # attention output, the same with or without a cache.
        readable = jnp.any(allowed, axis=-1)[:, None, None, :, None]
        weights = jnp.where(readable, jax.nn.softmax(scores, axis=-1), 0.0).astype(dt)
        out = mixed_matmul.einsum("bkgts,bskh->btkgh", weights, value).reshape(b, t, h, hd)
        out = mixed_matmul.einsum("bthk,hkd->btd", out, wo.astype(dt))
        if cfg.out_bias:
            out = out + _param(self, "out_bias", nn.initializers.zeros, (d,), ("embed",)).astype(dt)
        return out, (new_key, new_value)


class MLP(nn.Module):
    """SwiGLU: ``W_down (silu(x W_gate) ⊙ x W_up)``; GeGLU with ``mlp_activation="gelu_tanh"``; without the
    gate (``mlp_gate=False``) ``W_down act(x W_up)``; optional biases."""

    config: LMConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        dt = cfg.dtype

        def dense(name, inputs, shape, axes):
            # An einsum like the attention projections (not ``@``): qwix's LoRA and int8 quantization
            # (jaxkd.models.lora, jaxkd.models.quantize) intercept jnp.einsum (mixed_matmul calls it then).
            y = mixed_matmul.einsum("btd,df->btf", inputs, _param(self, name, _fan_in(0, 1), shape, axes).astype(dt))
            if cfg.mlp_bias:
                y = y + _param(self, f"{name}_bias", nn.initializers.zeros, shape[-1:], axes[-1:]).astype(dt)
            return y

        act = jax.nn.silu if cfg.mlp_activation == "silu" else lambda z: jax.nn.gelu(z, approximate=True)
        wide = ((cfg.d_model, cfg.d_ff), ("embed", "mlp"))
        if cfg.mlp_gate:
            hidden = act(dense("gate", x, *wide)) * dense("up", x, *wide)
        else:
            hidden = act(dense("up", x, *wide))
        return dense("down", hidden, (cfg.d_ff, cfg.d_model), ("mlp", "embed"))


class MoEMLP(nn.Module):
    """A mixture of ``E`` gated experts with a top-``k`` softmax router (Shazeer et al., "Outrageously Large
    Neural Networks: The Sparsely-Gated Mixture-of-Experts Layer", 2017; Jiang et al., "Mixtral of Experts",
    2024), as transformers' ``models/qwen3_moe/modeling_qwen3_moe.py`` (``Qwen3MoeSparseMoeBlock``) and
    ``models/mixtral/modeling_mixtral.py`` (``MixtralSparseMoeBlock``) compute it:

    * router logits ``r = x W_router`` (``[B, T, E]``, compute dtype), probabilities ``p = softmax(r)`` in
      float32;
    * the ``k`` largest ``p``, renormalized to sum to 1 when ``norm_topk_prob``. Exactly equal values go
      lowest expert index first (``jax.lax.top_k``, XLA's stable TopK). ``torch.topk`` on CPU orders exact
      ties its own way (its selection is not stable: ``softmax([1, 1, 1, 0])`` gives experts 1 and 2), so
      an exactly tied router (an all-zero one, say) may route differently from transformers; trained or
      random float weights tie with probability zero;
    * ``y = Σ_{e in top-k} w_e · W_down,e (act(x W_gate,e) ⊙ x W_up,e)``.

    Computed densely: every expert runs on every token and a ``[B, T, E]`` combine matrix (the top-k
    weights, zero for the other experts) weights the hidden units before the down projection (linear, so
    equal to weighting each expert's output). Exact, free of gathers and capacity limits, and shardable by
    the ``expert`` axis like any einsum; it costs ``E / k`` times the routed FLOPs (a grouped-matmul
    dispatch, MaxText's ``sparse_matmul``, would be the fast path). Returns ``(y [B, T, d], r)``.
    """

    config: LMConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        dt, d, e, f = cfg.dtype, cfg.d_model, cfg.num_experts, cfg.expert_d_ff
        # LeCun normal per expert: the expert axis is a batch axis, not part of the fan-in
        def experts_init(in_axis, out_axis):
            return nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=in_axis,
                                                    out_axis=out_axis, batch_axis=(0,))

        router = _param(self, "router", _fan_in(0, 1), (d, e), ("embed", "expert"))
        w_gate = _param(self, "experts_gate", experts_init(1, 2), (e, d, f), ("expert", "embed", "mlp"))
        w_up = _param(self, "experts_up", experts_init(1, 2), (e, d, f), ("expert", "embed", "mlp"))
        w_down = _param(self, "experts_down", experts_init(1, 2), (e, f, d), ("expert", "mlp", "embed"))
        router_logits = mixed_matmul.einsum("btd,de->bte", x, router.astype(dt))
        probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)
        top_probs, top_experts = jax.lax.top_k(probs, cfg.num_experts_per_tok)
        if cfg.norm_topk_prob:
            top_probs = top_probs / jnp.sum(top_probs, axis=-1, keepdims=True)
        combine = jnp.sum(jax.nn.one_hot(top_experts, e, dtype=jnp.float32) * top_probs[..., None], axis=-2)
        act = jax.nn.silu if cfg.mlp_activation == "silu" else lambda z: jax.nn.gelu(z, approximate=True)
        hidden = (act(mixed_matmul.einsum("btd,edf->btef", x, w_gate.astype(dt)))
                  * mixed_matmul.einsum("btd,edf->btef", x, w_up.astype(dt)))
        hidden = hidden * combine.astype(dt)[..., None]
        return mixed_matmul.einsum("btef,efd->btd", hidden, w_down.astype(dt)), router_logits


class Block(nn.Module):
    """Pre-norm block: ``x + Attn(RMSNorm(x))``, then ``x + MLP(RMSNorm(x))``, the MLP a mixture of experts
    when ``moe``. Returns ``(x, new_kv, router_logits)`` (``None`` for a dense MLP)."""

    config: LMConfig
    moe: bool = False

    @nn.compact
    def __call__(self, x, cos, sin, allowed, kv=None, index=None):
        cfg = self.config
        y, new_kv = Attention(cfg, name="attention")(RMSNorm(cfg, name="attention_norm")(x), cos, sin, allowed, kv, index)
        if cfg.sandwich_norm:
            y = RMSNorm(cfg, name="post_attention_norm")(y)
        x = x + y
        router_logits = None
        if not self.moe:
            y = MLP(cfg, name="mlp")(RMSNorm(cfg, name="mlp_norm")(x))
        else:
            y, router_logits = MoEMLP(cfg, name="mlp")(RMSNorm(cfg, name="mlp_norm")(x))
        if cfg.sandwich_norm:
            y = RMSNorm(cfg, name="post_mlp_norm")(y)
        x = x + y
        return x, new_kv, router_logits


@flax.struct.dataclass
class KVCache:
    """Keys and values of every layer for ``S`` slots, and where the next tokens go.

    Attributes:
      keys, values: ``[L, B, S, num_kv_heads, head_dim]`` (keys already rotated).
      mask: ``[B, S]`` bool, the slots holding real tokens (False: empty or padding).
      position: ``[B]`` int32, each row's next RoPE position (its number of real tokens so far).
      index: ``[]`` int32, the next slot to write (shared by the rows: padding occupies slots too).
    """

    keys: Array
    values: Array
    mask: Array
    position: Array
    index: Array

    @property
    def length(self) -> int:
        return self.keys.shape[2]


def _parse_inputs(x: Any, config: LMConfig) -> tuple[Array, Array, Array | None]:
    """``(tokens [B, T] int32, mask [B, T] bool, positions [B, T] int32 or None)`` with checks."""
    if isinstance(x, Mapping):
        unknown = sorted(set(x) - {"tokens", "mask", "positions", "segment_ids"})
        if unknown or "tokens" not in x:
            raise ValueError(
                f"TransformerLM input must be a dict with 'tokens' and optionally 'mask', 'positions' and "
                f"'segment_ids'; got "
                f"keys {sorted(x)}" + (f" (unknown: {unknown})" if unknown else "")
            )
        tokens, mask, positions = x["tokens"], x.get("mask"), x.get("positions")
    else:
        tokens, mask, positions = x, None, None
    tokens = jnp.asarray(tokens)
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"TransformerLM tokens must be integer ids, got dtype {tokens.dtype} (shape {tokens.shape})")
    if tokens.ndim != 2:
        raise ValueError(f"TransformerLM tokens must have shape [batch, length], got shape {tokens.shape}")
    if tokens.shape[1] > config.max_len:
        raise ValueError(
            f"TransformerLM: sequence length {tokens.shape[1]} exceeds max_len={config.max_len} (tokens shape "
            f"{tokens.shape})"
        )
    if mask is None:
        mask = jnp.ones(tokens.shape, bool)
    else:
        mask = jnp.asarray(mask)
        if mask.shape != tokens.shape:
            raise ValueError(f"mask must have the tokens' shape {tokens.shape}, got {mask.shape}")
        mask = mask.astype(bool)
    if positions is not None:
        positions = jnp.asarray(positions)
        if positions.shape != tokens.shape or not jnp.issubdtype(positions.dtype, jnp.integer):
            raise ValueError(
                f"positions must be integers of the tokens' shape {tokens.shape}, got {positions.dtype} {positions.shape}"
            )
        positions = positions.astype(jnp.int32)
    return tokens.astype(jnp.int32), mask, positions


def _default_positions(mask: Array) -> Array:
    """``max(cumsum(mask) - 1, 0)``: each row's real tokens are numbered 0, 1, … whatever the padding."""
    return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=1) - 1, 0)


def _segment_ids(x: Any, shape: tuple[int, ...]) -> Array | None:
    """The optional ``"segment_ids"`` input (int32 ``[B, T]``, checked), or ``None``."""
    segment_ids = x.get("segment_ids") if isinstance(x, Mapping) else None
    if segment_ids is None:
        return None
    segment_ids = jnp.asarray(segment_ids)
    if segment_ids.shape != shape or not jnp.issubdtype(segment_ids.dtype, jnp.integer):
        raise ValueError(f"segment_ids must be integers of the tokens' shape {shape}, got "
                         f"{segment_ids.dtype} {segment_ids.shape}")
    return segment_ids.astype(jnp.int32)


def _segment_positions(mask: Array, segment_ids: Array) -> Array:
    """Each real token's index among the real tokens of its segment (0, 1, … per packed document)."""
    count = jnp.cumsum(mask.astype(jnp.int32), axis=1)  # real tokens up to and including t
    starts = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool),
                              segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    before = jax.lax.cummax(jnp.where(starts, count - mask.astype(jnp.int32), 0), axis=1)
    return jnp.maximum(count - before - 1, 0)


class TransformerLM(nn.Module):
    """Decoder-only transformer LM (see the module docstring). ``__call__(x, train)`` returns float32
    logits ``[B, T, V]``; with ``cache=`` (a :class:`KVCache`) it writes the tokens into the cache and
    returns ``(logits, new_cache)``."""

    config: LMConfig

    @nn.compact
    def __call__(self, x, train: bool = False, *, cache: KVCache | None = None):
        del train  # no dropout
        cfg = self.config
        tokens, mask, positions = _parse_inputs(x, cfg)
        segment_ids = _segment_ids(x, tokens.shape)
        b, t = tokens.shape
        embedding = _param(self, "embedding", nn.initializers.normal(cfg.d_model ** -0.5),
                           (cfg.vocab_size, cfg.d_model), ("vocab", "embed"))
        # Padding never reaches the network: its (arbitrary, maybe out-of-range) ids are replaced by zeros.
        h = jnp.take(embedding, jnp.clip(tokens, 0, cfg.vocab_size - 1), axis=0)
        if cfg.embedding_scale:  # Gemma: sqrt(d), cast to the weights' dtype first (transformers)
            h = h * jnp.asarray(math.sqrt(cfg.d_model), jnp.float32).astype(h.dtype)
        h = h.astype(cfg.dtype)
        h = jnp.where(mask[..., None], h, 0)

        if cache is None:
            if positions is None:
                positions = _default_positions(mask) if segment_ids is None else _segment_positions(mask, segment_ids)
            key_mask, query_slots, num_slots = mask, jnp.arange(t), t
        else:
            if segment_ids is not None:
                raise ValueError("segment_ids (packed documents) cannot be written into a KV cache: decode one "
                                 "document per row")
            if t > cache.length:
                raise ValueError(f"{t} tokens do not fit a KV cache of {cache.length} slots")
            if positions is None:
                positions = cache.position[:, None] + _default_positions(mask)
            key_mask = jax.lax.dynamic_update_slice(cache.mask, mask, (jnp.zeros((), jnp.int32), cache.index))
            query_slots, num_slots = cache.index + jnp.arange(t), cache.length
        # Query t (at slot query_slots[t]) reads the real keys at slots up to its own.
        allowed = key_mask[:, None, :] & (jnp.arange(num_slots)[None, None, :] <= query_slots[None, :, None])
        if segment_ids is not None:  # packed documents: a query reads only its own document's keys
            allowed = allowed & (segment_ids[:, :, None] == segment_ids[:, None, :])
        full_allowed = allowed
        if cfg.sliding_window is not None:  # and only the last sliding_window slots (Mistral; Gemma's local layers)
            allowed = allowed & (jnp.arange(num_slots)[None, None, :] > query_slots[None, :, None] - cfg.sliding_window)
        if cfg.position_embedding == "learned":  # GPT-2: absolute positions added, no rotation
            table = _param(self, "position_embedding", nn.initializers.normal(0.02), (cfg.max_len, cfg.d_model),
                           ("position", "embed"))
            h = h + jnp.take(table, jnp.clip(positions, 0, cfg.max_len - 1), axis=0).astype(cfg.dtype)
            h = jnp.where(mask[..., None], h, 0)
            cos = sin = local_cos = local_sin = None
        else:
            cos, sin = _rope_angles(positions, cfg)
            local_cos, local_sin = (cos, sin) if cfg.local_rope_base is None else _rope_angles(positions, cfg, local=True)

        keys, values = (None, None) if cache is None else (cache.keys, cache.values)
        router_logits = []
        for i in range(cfg.num_layers):
            kv = None if cache is None else (keys[i], values[i])
            sliding = cfg.is_sliding(i)
            h, (new_key, new_value), layer_router_logits = Block(cfg, moe=cfg.is_moe(i), name=f"block_{i}")(
                h, local_cos if sliding else cos, local_sin if sliding else sin, allowed if sliding else full_allowed,
                kv, None if cache is None else cache.index)
            self.sow("intermediates", f"block{i}", h)
            if layer_router_logits is not None:
                router_logits.append(layer_router_logits)
            if cache is not None:
                # Written into the whole [L, ...] buffer: in place under jit, where stacking per-layer
                # copies would rewrite the entire cache at every decoding step.
                start = (jnp.asarray(i, jnp.int32), jnp.zeros((), jnp.int32), cache.index,
                         jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))
                keys = jax.lax.dynamic_update_slice(keys, new_key[None].astype(keys.dtype), start)
                values = jax.lax.dynamic_update_slice(values, new_value[None].astype(values.dtype), start)
        if cfg.num_experts is not None:  # for load_balancing_loss, as transformers' output_router_logits
            self.sow("intermediates", "router_logits", jnp.stack(router_logits))
        h = RMSNorm(cfg, name="final_norm")(h)
        self.sow("intermediates", "hidden", h)
        if cfg.tie_embeddings:
            projection = embedding.T
        else:
            projection = _param(self, "head", _fan_in(0, 1), (cfg.d_model, cfg.vocab_size), ("embed", "vocab"))
        logits = mixed_matmul.einsum("btd,dv->btv", h, projection.astype(cfg.dtype), out_dtype=jnp.float32)
        logits = logits.astype(jnp.float32)
        if cfg.final_softcap is not None:  # Gemma: c · tanh(logits / c)
            logits = jnp.tanh(logits / cfg.final_softcap) * cfg.final_softcap
        if cache is None:
            return logits
        new_cache = KVCache(
            keys=keys, values=values, mask=key_mask,
            position=cache.position + jnp.sum(mask, axis=1, dtype=jnp.int32), index=cache.index + t,
        )
        return logits, new_cache


def lm(config: LMConfig, name: str | None = None) -> Model:
    """A :class:`TransformerLM` as a :class:`jaxkd.models.base.Model`.

    Its input is ``{"tokens": int [B, T], "mask": bool [B, T]}`` (``mask`` optional, all True; an
    optional ``"positions"``; or a bare token array); ``apply`` returns ``Outputs(logits [B, T, V]
    float32, features {"block0", …, "hidden"}, model_state={})``. ``init`` gives parameters boxed with
    their logical axis names (:func:`jaxkd.create` shards them by :func:`lm_logical_rules` when the
    participant's rules say so).
    """
    if not isinstance(config, LMConfig):
        raise ValueError(f"config must be an LMConfig, got {type(config).__name__}")
    return from_linen(TransformerLM(config), name=name or f"lm_d{config.d_model}_l{config.num_layers}")


def _params_tree(params: Any) -> Any:
    """The ``params`` collection, unboxed; a full variables dict ``{"params": ...}`` is accepted too."""
    if isinstance(params, Mapping) and "params" in params and "embedding" not in params:
        params = params["params"]
    return meta.unbox(params)


def output_projection(params: Any, config: LMConfig) -> Array:
    """The ``[d_model, V]`` output projection: ``embedding.T`` when tied, the head kernel otherwise, so
    that ``logits = hidden @ output_projection(params, config)`` (``hidden`` the sown final-normed
    states; in float32 the equality is exact up to rounding). For fused vocabulary losses that never
    materialize the logits."""
    params = _params_tree(params)
    return params["embedding"].T if config.tie_embeddings else params["head"]


def init_cache(config: LMConfig, batch_size: int, max_len: int | None = None, dtype: Any = None) -> KVCache:
    """An empty :class:`KVCache` of ``max_len`` slots (default ``config.max_len``) in ``dtype`` (default
    the compute dtype)."""
    batch_size = check_int("batch_size", batch_size, low=1)
    max_len = config.max_len if max_len is None else check_int("max_len", max_len, low=1)
    if max_len > config.max_len:
        raise ValueError(f"a KV cache of max_len={max_len} slots exceeds the model's max_len={config.max_len}")
    dtype = config.dtype if dtype is None else jnp.dtype(dtype)
    shape = (config.num_layers, batch_size, max_len, config.num_kv_heads, config.head_dim)
    return KVCache(
        keys=jnp.zeros(shape, dtype), values=jnp.zeros(shape, dtype), mask=jnp.zeros((batch_size, max_len), bool),
        position=jnp.zeros((batch_size,), jnp.int32), index=jnp.zeros((), jnp.int32),
    )


def prefill(params: Any, config: LMConfig, tokens: Array, mask: Array | None = None, *,
            cache_len: int | None = None) -> tuple[Array, KVCache]:
    """Runs the prompt ``tokens [B, T]`` (padding ``mask``, left or right) through the model and returns
    ``(logits [B, T, V], cache)``, a fresh cache of ``cache_len`` slots (default ``config.max_len``) holding
    the prompt in slots ``0..T-1``. The logits equal the full forward pass's."""
    tokens = jnp.asarray(tokens)
    x = {"tokens": tokens} if mask is None else {"tokens": tokens, "mask": mask}
    cache = init_cache(config, tokens.shape[0], cache_len)
    if tokens.ndim == 2 and tokens.shape[1] > cache.length:
        raise ValueError(f"a prompt of {tokens.shape[1]} tokens does not fit cache_len={cache.length}")
    return TransformerLM(config).apply({"params": _params_tree(params)}, x, cache=cache)


def decode_step(params: Any, config: LMConfig, token: Array, cache: KVCache) -> tuple[Array, KVCache]:
    """Feeds one real token per row (``token [B]`` int) at slot ``cache.index`` and position
    ``cache.position``; returns ``(logits [B, V] float32, cache)``. Writing past the cache's last slot
    cannot be checked under ``jit`` (the index is traced): XLA clamps the write, so keep the number of
    decoded tokens within ``cache.length - prompt length`` (:func:`jaxkd.models.sampling.generate` does)."""
    token = jnp.asarray(token)
    if token.ndim != 1:
        raise ValueError(f"decode_step takes one token per row, shape [batch], got shape {token.shape}")
    logits, cache = TransformerLM(config).apply({"params": _params_tree(params)}, token[:, None], cache=cache)
    return logits[:, 0], cache


def load_balancing_loss(router_logits: Any, num_experts: int, top_k: int, mask: Any = None) -> Array:
    """The auxiliary load-balancing loss of a mixture-of-experts LM (Fedus et al., "Switch Transformers:
    Scaling to Trillion Parameter Models with Simple and Efficient Sparsity", 2021, eqs. 4-6), as
    transformers' ``load_balancing_loss_func`` (``models/mixtral/modeling_mixtral.py``,
    ``models/qwen3_moe/modeling_qwen3_moe.py``) computes it, with every layer's tokens pooled:

    ``p = softmax(router_logits)`` (float32), ``f_e = Σ m · [e in top_k(p)] / N`` (the fraction of routed
    slots that go to expert ``e``: the ``f_e`` sum to ``k``), ``P_e = Σ m · p_e / N``, ``loss = E Σ_e f_e P_e``,
    the sums over layers and tokens, ``m`` the padding mask (1 for real tokens) and ``N = L · Σ m``. Perfect
    balance gives ``k``. Equal probabilities go to the lowest expert index first (``jax.lax.top_k``).

    Args:
      router_logits: ``[L, B, T, E]`` (the ``router_logits`` feature a mixture-of-experts
        :class:`TransformerLM` sows) or one layer's ``[B, T, E]``.
      num_experts: ``E``; must equal the logits' last dimension.
      top_k: the experts per token (``LMConfig.num_experts_per_tok``).
      mask: optional ``[B, T]`` padding mask (True / 1 = real token). A batch with no real token gives 0,
        not NaN.

    Returns the scalar float32 loss (to be added with ``router_aux_loss_coef``, transformers' 0.001 default).
    """
    router_logits = jnp.asarray(router_logits)
    num_experts = check_int("num_experts", num_experts, low=1)
    top_k = check_int("top_k", top_k, low=1)
    if router_logits.ndim == 3:
        router_logits = router_logits[None]
    if router_logits.ndim != 4 or router_logits.shape[-1] != num_experts:
        raise ValueError(f"router_logits must be [layers, batch, length, num_experts={num_experts}] or [batch, "
                         f"length, num_experts], got shape {router_logits.shape}")
    if top_k > num_experts:
        raise ValueError(f"top_k must be at most num_experts={num_experts}, got {top_k}")
    if mask is None:
        weight = jnp.ones(router_logits.shape[1:3], jnp.float32)
    else:
        mask = jnp.asarray(mask)
        if mask.shape != router_logits.shape[1:3]:
            raise ValueError(f"mask must be [batch, length] = {router_logits.shape[1:3]}, got shape {mask.shape}")
        weight = mask.astype(jnp.float32)
    probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)
    _, selected = jax.lax.top_k(probs, top_k)
    routed = jnp.sum(jax.nn.one_hot(selected, num_experts, dtype=jnp.float32), axis=-2)  # [L, B, T, E]
    rows = router_logits.shape[0] * jnp.maximum(jnp.sum(weight), 1.0)
    tokens_per_expert = jnp.einsum("lbte,bt->e", routed, weight) / rows
    prob_per_expert = jnp.einsum("lbte,bt->e", probs, weight) / rows
    return num_experts * jnp.sum(tokens_per_expert * prob_per_expert)
