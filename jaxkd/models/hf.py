"""Hugging Face checkpoints in and out: the LLaMA family (``llama``, ``mistral``, ``qwen2``, ``qwen3``),
Gemma 2 and 3 (``gemma2``, ``gemma3_text``), ``gpt2`` and the mixtures of experts ``qwen3_moe`` and ``mixtral``.

:func:`from_hf` reads a transformers checkpoint directory (``config.json`` and ``model.safetensors`` or a
sharded ``model.safetensors.index.json``) into a :func:`jaxkd.models.lm.lm` model and its variables;
:func:`to_hf` writes one back that ``transformers.AutoModelForCausalLM.from_pretrained`` loads with the
same logits. All the families are the one decoder of :mod:`jaxkd.models.lm` with options, so the KV
cache, :func:`jaxkd.models.sampling.generate`, the fused vocabulary losses and the sharding rules work
for every imported model.

Followed (transformers 5.x): ``models/llama/modeling_llama.py`` (``attention_bias`` on q, k, v and o),
``models/mistral/modeling_mistral.py`` (``sliding_window``), ``models/qwen2/modeling_qwen2.py`` (biases
on q, k, v only), ``models/qwen3/modeling_qwen3.py`` (``q_norm``/``k_norm`` over ``head_dim`` before
RoPE, explicit ``head_dim``), ``modeling_rope_utils.py`` (``rope_parameters`` / the older ``rope_theta``
and ``rope_scaling``: default, ``linear``, ``llama3`` and ``dynamic``), ``masking_utils.py`` (the sliding window:
query slot ``t`` reads key slots ``s > t - sliding_window``), ``models/gemma2/modeling_gemma2.py`` and
``models/gemma3/modeling_gemma3.py`` (GeGLU, ``(1 + w)`` RMSNorm in float32, embeddings times ``sqrt(d)``
cast to the weights' dtype, sandwich norms, ``query_pre_attn_scalar``, attention and final logit soft-caps
— Gemma 3 applies no attention soft-cap —, per-layer ``layer_types`` windows, Gemma 3's q/k norms and local
RoPE base), ``models/gpt2/modeling_gpt2.py`` (LayerNorm, learned positions, ``Conv1D`` ``[in, out]``
weights, ``c_attn`` split into q, k, v, biases everywhere, ``gelu_new``),
``models/qwen3_moe/modeling_qwen3_moe.py`` (Qwen3's attention, every MLP a mixture of ``num_experts``
experts of width ``moe_intermediate_size``, top-``num_experts_per_tok`` softmax router, ``norm_topk_prob``)
and ``models/mixtral/modeling_mixtral.py`` (Mistral's attention with an optional ``sliding_window``,
``num_local_experts`` experts of width ``intermediate_size``, top-k weights always renormalized); the experts
are read and written one tensor per expert, as ``save_pretrained`` writes them and Hub checkpoints hold them
(``mlp.experts.{e}.{gate,up,down}_proj.weight``; Mixtral's ``block_sparse_moe.experts.{e}.{w1,w3,w2}.weight``),
and stacked on jaxkd's ``expert`` axis. Qwen3-MoE's dense layers between sparse ones (``mlp_only_layers``,
``decoder_sparse_step``) are ``LMConfig.moe_layers``.

Config fields are mapped one by one; a field that would change the model and is not implemented
(``hidden_act`` other than ``silu``, ``mlp_bias``, YaRN/LongRoPE, a per-layer mix of sliding and full
attention, quantization …) or is unknown raises a ``ValueError`` naming it. The fields known not to
change the forward pass are listed in :data:`IGNORED_FIELDS`.

Weights are read memory-mapped; bfloat16 tensors (which numpy lacks) are read as raw bytes and viewed as
``ml_dtypes.bfloat16``, so a bf16 checkpoint stays bf16 unless ``dtype`` says otherwise. With a ``mesh``,
:func:`from_hf` reads each shard from its own slice of the file (the weight map's transposes and reshapes
translate a shard's index into HF rows and columns), so a checkpoint is never gathered in host memory.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Any, Callable, Iterator

import dataclasses

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import safetensors
from flax.core import meta
from jax.sharding import Mesh, NamedSharding

from jaxkd.models.base import Model
from jaxkd.models.lm import LMConfig, TransformerLM, lm
from jaxkd.models.vocab import truncate_vocab
from jaxkd.checks import check_int
from jaxkd.sharding import Rules, boxed_shardings

__all__ = ["IGNORED_FIELDS", "SUPPORTED_MODEL_TYPES", "from_hf", "init_student_from", "student_layers", "to_hf"]

#: The transformers ``model_type`` values :func:`from_hf` and :func:`to_hf` handle.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "gpt2", "qwen3_moe", "mixtral")

# The mixture-of-experts families (LMConfig.num_experts set).
_MOE_TYPES = ("qwen3_moe", "mixtral")

_ARCHITECTURES = {
    "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
    "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM", "gpt2": "GPT2LMHeadModel",
    "qwen3_moe": "Qwen3MoeForCausalLM", "mixtral": "MixtralForCausalLM",
}

#: ``config.json`` fields that do not change the forward pass (bookkeeping, generation defaults, training-
#: only dropout, initialization, output switches).
IGNORED_FIELDS = frozenset({
    "_name_or_path", "_attn_implementation_autoset", "architectures", "model_type", "transformers_version",
    "torch_dtype", "dtype", "bos_token_id", "eos_token_id", "pad_token_id", "use_cache", "initializer_range",
    "attention_dropout", "output_attentions", "output_hidden_states", "return_dict", "id2label", "label2id",
    "problem_type", "chunk_size_feed_forward", "is_encoder_decoder", "tokenizer_class", "pretraining_tp",
    "max_window_layers", "torchscript", "use_bfloat16", "tf_legacy_loss", "pruned_heads", "is_decoder",
    "add_cross_attention", "cross_attention_hidden_size", "finetuning_task", "task_specific_params",
    "prefix", "sep_token_id", "decoder_start_token_id", "tie_encoder_decoder", "output_scores",
    "return_dict_in_generate", "num_labels", "_commit_hash", "base_model_tp_plan", "base_model_pp_plan",
})

# Fields mapped onto LMConfig (or checked for the one value jaxkd implements).
_MAPPED_FIELDS = {
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings", "hidden_act",
    "head_dim", "rope_theta", "rope_scaling", "rope_parameters",
}
_FAMILY_FIELDS = {
    "llama": {"attention_bias", "mlp_bias"},
    "mistral": {"sliding_window"},
    "qwen2": {"sliding_window", "use_sliding_window", "layer_types", "use_mrope"},
    "qwen3": {"attention_bias", "sliding_window", "use_sliding_window", "layer_types"},
    # output_router_logits only adds outputs; router_jitter_noise is training-time noise on the router input
    # (transformers applies it only in training mode, like dropout: jaxkd's forward is the eval forward)
    "mixtral": {"sliding_window", "num_local_experts", "num_experts", "num_experts_per_tok", "router_aux_loss_coef",
                "output_router_logits", "router_jitter_noise"},
    "qwen3_moe": {"attention_bias", "sliding_window", "use_sliding_window", "num_local_experts", "num_experts",
                  "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob", "decoder_sparse_step",
                  "mlp_only_layers", "router_aux_loss_coef", "output_router_logits"},
}

_GEMMA_FIELDS = {
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_activation", "hidden_act", "max_position_embeddings", "rms_norm_eps",
    "tie_word_embeddings", "rope_parameters", "rope_theta", "rope_scaling", "attention_bias", "query_pre_attn_scalar",
    "sliding_window", "layer_types", "final_logit_softcapping", "attn_logit_softcapping",
    "use_bidirectional_attention", "cache_implementation",
}
_GPT2_FIELDS = {
    "vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner", "activation_function", "layer_norm_epsilon",
    "scale_attn_weights", "scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn", "tie_word_embeddings",
    "resid_pdrop", "embd_pdrop", "attn_pdrop", "summary_type", "summary_use_proj", "summary_activation",
    "summary_proj_to_labels", "summary_first_dropout", "n_ctx",
}
_EXTRA_FIELDS = {
    "gemma2": _GEMMA_FIELDS,
    "gemma3_text": _GEMMA_FIELDS | {"rope_local_base_freq", "sliding_window_pattern", "_sliding_window_pattern"},
    "gpt2": _GPT2_FIELDS,
}


def _error(path: Path, message: str) -> ValueError:
    return ValueError(f"{path}: {message}")


def _rope(cfg: dict, path: Path) -> tuple[float, dict | None]:
    """``(rope_theta, rope_scaling or None)`` from ``rope_parameters`` (transformers 5) or the older
    ``rope_theta`` / ``rope_scaling`` fields."""
    params = cfg.get("rope_parameters")
    if params is not None:
        params = dict(params)
        theta = params.pop("rope_theta", cfg.get("rope_theta", 10000.0))
    else:
        theta = cfg.get("rope_theta", 10000.0)
        params = dict(cfg.get("rope_scaling") or {})
    if "type" in params:  # the oldest spelling
        params.setdefault("rope_type", params.pop("type"))
    kind = params.pop("rope_type", "default")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise _error(path, f"rope partial_rotary_factor={params['partial_rotary_factor']} is not implemented "
                           f"(jaxkd rotates every head feature)")
    params.pop("partial_rotary_factor", None)
    if kind == "default":
        if params:
            raise _error(path, f"unexpected default-RoPE parameters {sorted(params)}")
        return float(theta), None
    keys = {"linear": {"factor"},
            "llama3": {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"},
            "dynamic": {"factor"}}
    if kind not in keys:
        raise _error(path, f"rope_type {kind!r} is not implemented (jaxkd implements default, linear, llama3 and "
                           f"dynamic of transformers' modeling_rope_utils.py)")
    if kind == "dynamic":  # transformers scales from max_position_embeddings; jaxkd keeps it in the scaling
        params.pop("original_max_position_embeddings", None)
    if params.keys() != keys[kind]:
        raise _error(path, f"rope_type {kind!r} with parameters {sorted(params)} is not implemented (expected "
                           f"{sorted(keys[kind])})")
    return float(theta), {"rope_type": kind, **params}


def _dynamic_context(scaling: dict | None, max_positions: int) -> tuple[dict | None, int]:
    """``(rope_scaling, max_len)``: dynamic NTK RoPE scales from ``max_position_embeddings`` (kept in jaxkd's
    scaling as ``original_max_position_embeddings``) up to ``factor`` times it, jaxkd's ``max_len``."""
    if scaling is None or scaling["rope_type"] != "dynamic":
        return scaling, max_positions
    return ({**scaling, "original_max_position_embeddings": max_positions},
            int(math.ceil(scaling["factor"] * max_positions)))


def config_from_hf(cfg: dict, *, dtype: Any = jnp.float32, path: Path | str = "config.json") -> tuple[str, LMConfig]:
    """``(model_type, LMConfig)`` for a parsed transformers ``config.json``; refuses what jaxkd does not
    implement (see the module docstring)."""
    path = Path(path)
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise _error(path, f"model_type {model_type!r} is not supported; supported: {list(SUPPORTED_MODEL_TYPES)}")
    if model_type in _EXTRA_FIELDS:
        known = IGNORED_FIELDS | _EXTRA_FIELDS[model_type]
    else:
        known = IGNORED_FIELDS | _MAPPED_FIELDS | _FAMILY_FIELDS[model_type]
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise _error(path, f"config fields {unknown} are not implemented by jaxkd for model_type {model_type!r} "
                           f"(they may change the model; known-irrelevant fields are jaxkd.models.hf.IGNORED_FIELDS)")
    if model_type == "gpt2":
        return model_type, _gpt2_config(cfg, dtype, path)
    if model_type in ("gemma2", "gemma3_text"):
        return model_type, _gemma_config(cfg, model_type, dtype, path)
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads", "max_position_embeddings") if cfg.get(k) is None]
    if missing:
        raise _error(path, f"config.json lacks {missing}")
    if cfg.get("hidden_act", "silu") != "silu":
        raise _error(path, f"hidden_act={cfg['hidden_act']!r} is not implemented (jaxkd's MLP is SwiGLU: silu)")
    if cfg.get("mlp_bias", False):
        raise _error(path, "mlp_bias=True is not implemented")
    if cfg.get("use_mrope", False):
        raise _error(path, "use_mrope=True (multimodal RoPE) is not implemented")
    d, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim", 128 if model_type == "qwen3" else None)
    if head_dim is not None and d % heads == 0 and head_dim == d // heads:
        head_dim = None
    if model_type == "qwen2":
        qkv_bias, out_bias = True, False
    elif model_type in ("mistral", "mixtral"):
        qkv_bias = out_bias = False
    else:
        qkv_bias = out_bias = bool(cfg.get("attention_bias", False))
    window = None
    if model_type == "mistral":
        window = cfg.get("sliding_window", 4096)
        if cfg.get("layer_types") is not None:
            raise _error(path, "layer_types for mistral is not implemented")
    elif model_type == "mixtral":  # every layer through the window when one is set (MixtralModel's mask)
        window = cfg.get("sliding_window")
    elif model_type == "qwen3_moe":  # Qwen3MoeConfig keeps sliding_window only with use_sliding_window, for every layer
        window = cfg.get("sliding_window", 4096) if cfg.get("use_sliding_window", False) else None
    else:
        layers = cfg["num_hidden_layers"]
        layer_types = cfg.get("layer_types")
        if layer_types is None:
            sliding = cfg.get("use_sliding_window", False) and cfg.get("sliding_window") is not None
            start = cfg.get("max_window_layers", layers)
            layer_types = ["sliding_attention" if sliding and i >= start else "full_attention" for i in range(layers)]
        kinds = set(layer_types)
        if kinds == {"sliding_attention"}:
            window = cfg.get("sliding_window")
        elif kinds != {"full_attention"}:
            raise _error(path, f"layer_types {layer_types} (a per-layer mix of sliding-window and full attention, or "
                               f"another attention) is not implemented")
    theta, scaling = _rope(cfg, path)
    scaling, max_len = _dynamic_context(scaling, cfg["max_position_embeddings"])
    config = LMConfig(
        vocab_size=cfg["vocab_size"], d_model=d, num_layers=cfg["num_hidden_layers"], num_heads=heads,
        d_ff=cfg["intermediate_size"], max_len=max_len,
        num_kv_heads=cfg.get("num_key_value_heads") or heads,
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)), rope_base=theta,
        norm_eps=cfg.get("rms_norm_eps", 1e-6), dtype=dtype, param_dtype=dtype, attention_head_dim=head_dim,
        rope_scaling=scaling, qkv_bias=qkv_bias, out_bias=out_bias, qk_norm=model_type in ("qwen3", "qwen3_moe"),
        sliding_window=window, **(_moe_options(cfg, model_type, path) if model_type in _MOE_TYPES else {}),
    )
    return model_type, config


def _moe_options(cfg: dict, model_type: str, path: Path) -> dict:
    """The :class:`~jaxkd.models.lm.LMConfig` mixture-of-experts fields of a ``qwen3_moe``
    (``models/qwen3_moe/configuration_qwen3_moe.py``) or ``mixtral`` (``models/mixtral/configuration_mixtral.py``)
    config. Both spell the expert count ``num_experts`` or ``num_local_experts`` (an ``attribute_map`` alias:
    ``save_pretrained`` writes the latter, Hub Qwen3-MoE configs the former)."""
    qwen = model_type == "qwen3_moe"
    counts = {cfg[k] for k in ("num_experts", "num_local_experts") if cfg.get(k) is not None}
    if len(counts) > 1:
        raise _error(path, f"num_experts={cfg['num_experts']} and num_local_experts={cfg['num_local_experts']} differ")
    experts = counts.pop() if counts else (128 if qwen else 8)
    if not isinstance(experts, int) or experts < 1:
        raise _error(path, f"num_experts={experts!r} is not implemented for {model_type} (a dense model is qwen3 / "
                           f"mistral; jaxkd's mixture needs num_experts >= 1)")
    options = dict(num_experts=experts, num_experts_per_tok=cfg.get("num_experts_per_tok", 8 if qwen else 2),
                   router_aux_loss_coef=cfg.get("router_aux_loss_coef", 0.001))
    if not qwen:  # Mixtral's experts are intermediate_size wide and always renormalize the top-k weights
        return dict(options, norm_topk_prob=True)
    # Qwen3MoeDecoderLayer: layer i is sparse iff i is not in mlp_only_layers and (i + 1) % decoder_sparse_step
    # == 0; the others are dense MLPs of width intermediate_size.
    step, dense = cfg.get("decoder_sparse_step", 1), cfg.get("mlp_only_layers") or []
    if not isinstance(step, int) or step < 1:
        raise _error(path, f"decoder_sparse_step={step!r} is not implemented (a positive integer)")
    if not isinstance(dense, list) or not all(isinstance(i, int) for i in dense):
        raise _error(path, f"mlp_only_layers={dense!r} is not implemented (a list of layer indices)")
    layers = tuple(i not in dense and (i + 1) % step == 0 for i in range(cfg["num_hidden_layers"]))
    if not any(layers):
        raise _error(path, f"mlp_only_layers={dense} and decoder_sparse_step={step} leave no mixture-of-experts "
                           f"layer: a dense model (read it as qwen3)")
    return dict(options, moe_d_ff=cfg.get("moe_intermediate_size", 768), moe_layers=None if all(layers) else layers,
                norm_topk_prob=bool(cfg.get("norm_topk_prob", False)))


def _gemma_config(cfg: dict, model_type: str, dtype: Any, path: Path) -> LMConfig:
    """Gemma 2 (``models/gemma2/modeling_gemma2.py``) and Gemma 3 text (``models/gemma3/modeling_gemma3.py``)."""
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads") if cfg.get(k) is None]
    if missing:
        raise _error(path, f"config.json lacks {missing}")
    gemma3 = model_type == "gemma3_text"
    act = cfg.get("hidden_activation") or "gelu_pytorch_tanh"
    if act not in ("gelu_pytorch_tanh", "gelu_new"):
        raise _error(path, f"hidden_activation={act!r} is not implemented (jaxkd's Gemma MLP is GeGLU with the tanh "
                           f"approximation, gelu_pytorch_tanh)")
    if cfg.get("use_bidirectional_attention"):
        raise _error(path, "use_bidirectional_attention=True is not implemented (jaxkd's decoder is causal)")
    layers = cfg["num_hidden_layers"]
    layer_types = cfg.get("layer_types")
    if layer_types is None:
        pattern = 2 if not gemma3 else (cfg.get("sliding_window_pattern") or cfg.get("_sliding_window_pattern") or 6)
        layer_types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(layers)]
    if len(layer_types) != layers or not set(layer_types) <= {"sliding_attention", "full_attention"}:
        raise _error(path, f"layer_types {layer_types} is not implemented (one of sliding_attention / full_attention "
                           f"per layer)")
    sliding = tuple(t == "sliding_attention" for t in layer_types)
    window = cfg.get("sliding_window", 4096) if any(sliding) else None
    if any(sliding) and window is None:
        raise _error(path, "sliding_attention layers without a sliding_window")
    # RoPE: gemma2 one set; gemma3 the global layers' (maybe scaled) and the local layers' own base
    params = cfg.get("rope_parameters")
    local_base = None
    if gemma3:
        if params is not None and ("full_attention" in params or "sliding_attention" in params):
            theta, scaling = _rope({"rope_parameters": {"rope_theta": 1e6, **params.get("full_attention", {})}}, path)
            local_base, local_scaling = _rope(
                {"rope_parameters": {"rope_theta": 1e4, **params.get("sliding_attention", {})}}, path)
            if local_scaling is not None:
                raise _error(path, f"a scaled RoPE on the sliding_attention layers ({local_scaling}) is not implemented")
        else:
            theta, scaling = _rope({"rope_theta": 1e6, **cfg}, path)
            local_base = float(cfg.get("rope_local_base_freq", 1e4))
        if not any(sliding):
            local_base = None
    else:
        theta, scaling = _rope(cfg, path)
    if scaling is not None and scaling["rope_type"] == "dynamic":
        raise _error(path, f"{model_type}: dynamic RoPE is implemented for the LLaMA-like families only")
    d, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim", 256)
    if head_dim is not None and d % heads == 0 and head_dim == d // heads:
        head_dim = None
    bias = bool(cfg.get("attention_bias", False))
    qpas = cfg.get("query_pre_attn_scalar", 256)
    final = cfg.get("final_logit_softcapping", None if gemma3 else 30.0)
    # gemma3's attention never passes attn_logit_softcapping to its attention function: not applied
    attn = None if gemma3 else cfg.get("attn_logit_softcapping", 50.0)
    return LMConfig(
        vocab_size=cfg["vocab_size"], d_model=d, num_layers=layers, num_heads=heads, d_ff=cfg["intermediate_size"],
        max_len=cfg.get("max_position_embeddings", 131072 if gemma3 else 8192),
        num_kv_heads=cfg.get("num_key_value_heads") or heads, tie_embeddings=bool(cfg.get("tie_word_embeddings", True)),
        rope_base=theta, norm_eps=cfg.get("rms_norm_eps", 1e-6), dtype=dtype, param_dtype=dtype,
        attention_head_dim=head_dim, rope_scaling=scaling, qkv_bias=bias, out_bias=bias, qk_norm=gemma3,
        sliding_window=window, sliding_layers=None if all(sliding) or not any(sliding) else sliding,
        local_rope_base=local_base, norm_plus_one=True, sandwich_norm=True, embedding_scale=True,
        mlp_activation="gelu_tanh", attention_scale=float(qpas) ** -0.5, attn_softcap=attn, final_softcap=final,
    )


def _gpt2_config(cfg: dict, dtype: Any, path: Path) -> LMConfig:
    """GPT-2 (``models/gpt2/modeling_gpt2.py``)."""
    missing = [k for k in ("vocab_size", "n_embd", "n_layer", "n_head", "n_positions") if cfg.get(k) is None]
    if missing:
        raise _error(path, f"config.json lacks {missing}")
    act = cfg.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise _error(path, f"activation_function={act!r} is not implemented (jaxkd's GPT-2 MLP uses gelu_new, the "
                           f"tanh approximation)")
    for name in ("scale_attn_by_inverse_layer_idx", "add_cross_attention"):
        if cfg.get(name):
            raise _error(path, f"{name}=True is not implemented")
    # reorder_and_upcast_attn only changes mixed-precision rounding: jaxkd's scores are float32 anyway
    d = cfg["n_embd"]
    return LMConfig(
        vocab_size=cfg["vocab_size"], d_model=d, num_layers=cfg["n_layer"], num_heads=cfg["n_head"],
        d_ff=cfg.get("n_inner") or 4 * d, max_len=cfg["n_positions"], tie_embeddings=bool(cfg.get("tie_word_embeddings", True)),
        norm_eps=cfg.get("layer_norm_epsilon", 1e-5), dtype=dtype, param_dtype=dtype, qkv_bias=True, out_bias=True,
        norm_type="layer", position_embedding="learned", mlp_activation="gelu_tanh", mlp_gate=False, mlp_bias=True,
        attention_scale=None if cfg.get("scale_attn_weights", True) else 1.0,
    )


def _embedding_name(model_type: str) -> str:
    return "transformer.wte.weight" if model_type == "gpt2" else "model.embed_tokens.weight"


# --- the weight map ----------------------------------------------------------------------------------------

# (hf name, jaxkd param path, hf shape, hf -> jaxkd, jaxkd -> hf). The hf name may be a tuple of names (one
# tensor per expert): the jaxkd value is np.stack([hf_to_jax(tensor(name)) for name in names], axis=0), each
# tensor of the hf shape, and to_hf splits axis 0 and applies jax_to_hf to each part.
_Entry = tuple[str | tuple[str, ...], tuple[str, ...], tuple[int, ...], Callable[[np.ndarray], np.ndarray],
               Callable[[np.ndarray], np.ndarray]]


def _same(x):
    return x


@dataclasses.dataclass(frozen=True)
class _Strided:
    """An HF -> jaxkd transform made of transposes, reshapes and a fixed sub-range (GPT-2's q, k, v thirds of
    ``c_attn``), written so that a jaxkd index translates into the HF block it comes from.

    jaxkd element ``j`` (shape :attr:`shape`) is the HF element whose index along HF axis ``a`` is
    ``offsets[a] + sum(steps[k] * j[k] for k with hf_axes[k] == a)``. A transpose maps each jaxkd axis to
    another HF axis with step 1; a reshape that splits HF axis ``a`` into ``(n, m)`` maps two jaxkd axes to
    ``a`` with steps ``m`` and 1. For a jaxkd block ``[start_k, stop_k)`` the HF block along ``a`` is
    ``[offsets[a] + sum(steps * start), offsets[a] + sum(steps * (stop - 1)) + 1)``: exactly the shard's
    elements when only the leading axis of a split is cut (heads, not ``head_dim``); when a trailing one is
    cut too, the bounding range (at most the tensor) is read and the shard picked from it.
    """

    shape: tuple[int, ...]
    hf_axes: tuple[int, ...]
    steps: tuple[int, ...]
    offsets: tuple[int, ...]

    def __call__(self, hf_array: np.ndarray) -> np.ndarray:
        """The whole jaxkd array of a whole HF tensor."""
        return self.read(lambda block: np.asarray(hf_array)[block], tuple(slice(0, n) for n in self.shape))

    def hf_block(self, index: tuple[slice, ...]) -> tuple[slice, ...]:
        """The HF slices (one per HF axis) that hold the jaxkd block ``index`` (normalized slices)."""
        lo, hi = list(self.offsets), list(self.offsets)
        for k, (axis, step) in enumerate(zip(self.hf_axes, self.steps)):
            lo[axis] += step * index[k].start
            hi[axis] += step * (index[k].stop - 1)
        return tuple(slice(a, b + 1) for a, b in zip(lo, hi))

    def view(self, hf_block: np.ndarray, index: tuple[slice, ...]) -> np.ndarray:
        """The jaxkd block ``index`` as a view walking ``hf_block`` (the HF array's :meth:`hf_block`, any
        strides: a slice of a memory map) by the layout's steps; nothing is copied."""
        shape = tuple(s.stop - s.start for s in index)
        strides = tuple(step * hf_block.strides[axis] for axis, step in zip(self.hf_axes, self.steps))
        return np.lib.stride_tricks.as_strided(hf_block, shape=shape, strides=strides, writeable=False)

    def read(self, read_hf: Callable[[tuple[slice, ...]], np.ndarray], index: tuple[slice, ...]) -> np.ndarray:
        """The jaxkd block ``index`` (normalized slices), from ``read_hf(hf slices)`` of :meth:`hf_block`."""
        return np.array(self.view(read_hf(self.hf_block(index)), index))


def _strided(shape: tuple[int, ...], hf_axes: tuple[int, ...], steps: tuple[int, ...],
             offsets: tuple[int, ...] | None = None) -> _Strided:
    hf_ndim = max(hf_axes) + 1
    return _Strided(tuple(shape), tuple(hf_axes), tuple(steps), tuple(offsets or (0,) * hf_ndim))


def _split(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The steps of the axes one HF axis is reshaped into (row-major): ``(n, m) -> (m, 1)``."""
    return tuple(int(np.prod(shape[k + 1:])) for k in range(len(shape)))


def _gpt2_weight_map(config: LMConfig) -> Iterator[_Entry]:
    """GPT-2's ``Conv1D`` weights are stored ``[in, out]``; ``c_attn`` holds q, k, v side by side (three
    entries of one tensor name: :func:`to_hf` concatenates them along the last axis)."""
    d, h, hd, f, v = config.d_model, config.num_heads, config.head_dim, config.d_ff, config.vocab_size
    yield "transformer.wte.weight", ("embedding",), (v, d), _same, _same
    yield "transformer.wpe.weight", ("position_embedding",), (config.max_len, d), _same, _same

    def norm(hf, jx):
        yield f"{hf}.weight", (*jx, "scale"), (d,), _same, _same
        yield f"{hf}.bias", (*jx, "bias"), (d,), _same, _same

    for i in range(config.num_layers):
        pre, blk = f"transformer.h.{i}.", f"block_{i}"
        yield from norm(f"{pre}ln_1", (blk, "attention_norm"))
        for j, name in enumerate(("query", "key", "value")):  # [d, 3 h hd]: the j-th third, split into heads
            yield (f"{pre}attn.c_attn.weight", (blk, "attention", name), (d, 3 * h * hd),
                   _strided((d, h, hd), (0, 1, 1), (1, hd, 1), (0, j * h * hd)), lambda p: p.reshape(d, -1))
            yield (f"{pre}attn.c_attn.bias", (blk, "attention", f"{name}_bias"), (3 * h * hd,),
                   _strided((h, hd), (0, 0), (hd, 1), (j * h * hd,)), lambda p: p.reshape(-1))
        yield (f"{pre}attn.c_proj.weight", (blk, "attention", "out"), (h * hd, d),
               _strided((h, hd, d), (0, 0, 1), (hd, 1, 1)), lambda p: p.reshape(h * hd, d))
        yield f"{pre}attn.c_proj.bias", (blk, "attention", "out_bias"), (d,), _same, _same
        yield from norm(f"{pre}ln_2", (blk, "mlp_norm"))
        yield f"{pre}mlp.c_fc.weight", (blk, "mlp", "up"), (d, f), _same, _same
        yield f"{pre}mlp.c_fc.bias", (blk, "mlp", "up_bias"), (f,), _same, _same
        yield f"{pre}mlp.c_proj.weight", (blk, "mlp", "down"), (f, d), _same, _same
        yield f"{pre}mlp.c_proj.bias", (blk, "mlp", "down_bias"), (d,), _same, _same
    yield from norm("transformer.ln_f", ("final_norm",))
    if not config.tie_embeddings:
        yield "lm_head.weight", ("head",), (v, d), np.transpose, np.transpose


def _weight_map(config: LMConfig) -> Iterator[_Entry]:
    if config.position_embedding == "learned":
        yield from _gpt2_weight_map(config)
        return
    d, h, k, hd, f, v = (config.d_model, config.num_heads, config.num_kv_heads, config.head_dim, config.d_ff,
                         config.vocab_size)

    def linear_in(out_shape):  # torch [out, in] -> jaxkd [in, *out_shape]
        to_jax = _strided((d, *out_shape), (1,) + (0,) * len(out_shape), (1, *_split(out_shape)))
        return to_jax, lambda p: p.reshape(p.shape[0], -1).T

    yield "model.embed_tokens.weight", ("embedding",), (v, d), _same, _same
    for i in range(config.num_layers):
        pre, blk = f"model.layers.{i}.", f"block_{i}"
        for hf_name, name, n in (("q_proj", "query", h), ("k_proj", "key", k), ("v_proj", "value", k)):
            yield (f"{pre}self_attn.{hf_name}.weight", (blk, "attention", name), (n * hd, d), *linear_in((n, hd)))
            if config.qkv_bias:
                yield (f"{pre}self_attn.{hf_name}.bias", (blk, "attention", f"{name}_bias"), (n * hd,),
                       _strided((n, hd), (0, 0), (hd, 1)), lambda p: p.reshape(-1))
        yield (f"{pre}self_attn.o_proj.weight", (blk, "attention", "out"), (d, h * hd),
               _strided((h, hd, d), (1, 1, 0), (hd, 1, 1)), lambda p: p.reshape(h * hd, d).T)
        if config.out_bias:
            yield f"{pre}self_attn.o_proj.bias", (blk, "attention", "out_bias"), (d,), _same, _same
        if config.qk_norm:
            yield f"{pre}self_attn.q_norm.weight", (blk, "attention", "query_norm", "scale"), (hd,), _same, _same
            yield f"{pre}self_attn.k_norm.weight", (blk, "attention", "key_norm", "scale"), (hd,), _same, _same
        if config.is_moe(i):
            yield from _experts_weight_map(config, pre, blk)
        else:
            yield f"{pre}mlp.gate_proj.weight", (blk, "mlp", "gate"), (f, d), np.transpose, np.transpose
            yield f"{pre}mlp.up_proj.weight", (blk, "mlp", "up"), (f, d), np.transpose, np.transpose
            yield f"{pre}mlp.down_proj.weight", (blk, "mlp", "down"), (d, f), np.transpose, np.transpose
        yield f"{pre}input_layernorm.weight", (blk, "attention_norm", "scale"), (d,), _same, _same
        if config.sandwich_norm:  # Gemma 2 / 3
            yield f"{pre}post_attention_layernorm.weight", (blk, "post_attention_norm", "scale"), (d,), _same, _same
            yield f"{pre}pre_feedforward_layernorm.weight", (blk, "mlp_norm", "scale"), (d,), _same, _same
            yield f"{pre}post_feedforward_layernorm.weight", (blk, "post_mlp_norm", "scale"), (d,), _same, _same
        else:
            yield f"{pre}post_attention_layernorm.weight", (blk, "mlp_norm", "scale"), (d,), _same, _same
    yield "model.norm.weight", ("final_norm", "scale"), (d,), _same, _same
    if not config.tie_embeddings:
        yield "lm_head.weight", ("head",), (v, d), np.transpose, np.transpose


def _experts_weight_map(config: LMConfig, pre: str, blk: str) -> Iterator[_Entry]:
    """The router and the experts as ``save_pretrained`` writes them (and Hub checkpoints hold them): one
    torch ``[out, in]`` tensor per expert and projection, stacked here on a leading expert axis.
    Qwen3-MoE: ``mlp.gate.weight [E, d]``, ``mlp.experts.{e}.{gate,up,down}_proj.weight``; Mixtral:
    ``block_sparse_moe.gate.weight``, ``block_sparse_moe.experts.{e}.{w1,w3,w2}.weight`` (gate, up, down).
    transformers 5 fuses them in memory (``experts.gate_up_proj [E, 2f, d]``) and splits them back on save."""
    d, e, f = config.d_model, config.num_experts, config.expert_d_ff
    qwen = config.qk_norm  # Qwen3-MoE has q/k norms, Mixtral none (to_hf checks the families)
    moe = f"{pre}mlp" if qwen else f"{pre}block_sparse_moe"
    names = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"} if qwen else {"gate": "w1", "up": "w3", "down": "w2"}
    yield f"{moe}.gate.weight", (blk, "mlp", "router"), (e, d), np.transpose, np.transpose
    for name, shape in (("gate", (f, d)), ("up", (f, d)), ("down", (d, f))):
        experts = tuple(f"{moe}.experts.{i}.{names[name]}.weight" for i in range(e))
        yield experts, (blk, "mlp", f"experts_{name}"), shape, np.transpose, np.transpose


# --- safetensors -------------------------------------------------------------------------------------------

class _Tensors:
    """The tensors of a checkpoint directory, by name, read lazily and memory-mapped."""

    def __init__(self, path: Path):
        index = path / "model.safetensors.index.json"
        single = path / "model.safetensors"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {name: path / file for name, file in weight_map.items()}
        elif single.exists():
            with safetensors.safe_open(single, "np") as f:
                self.files = {name: single for name in f.keys()}
        else:
            raise _error(path, "no model.safetensors or model.safetensors.index.json (only safetensors "
                               "checkpoints are read)")
        self._headers: dict[Path, tuple[int, dict]] = {}
        self.prefix = ""  # added to the stored names (GPT-2 checkpoints saved without "transformer.")

    def _header(self, file: Path) -> tuple[int, dict]:
        if file not in self._headers:
            with open(file, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                self._headers[file] = (8 + n, json.loads(fh.read(n)))
        return self._headers[file]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._header(self.files[name])[1][name[len(self.prefix):]]["shape"])

    def dtype(self, name: str) -> np.dtype:
        """The stored dtype, from the header (nothing read)."""
        code = self._header(self.files[name])[1][name[len(self.prefix):]]["dtype"]
        if code not in _NUMPY_DTYPES:
            raise ValueError(f"tensor {name!r} has dtype {code}; jaxkd reads {sorted(_NUMPY_DTYPES)}")
        return np.dtype(_NUMPY_DTYPES[code])

    def read(self, name: str, index: tuple[slice, ...], view: Callable[[np.ndarray], np.ndarray] | None = None
             ) -> np.ndarray:
        """``tensor[index]`` (one slice per axis), or ``view(tensor[index])``, copied once from a memory map of
        the file: the OS pages in only the pages that hold the block, unmapped when the call returns."""
        file = self.files[name]
        start, header = self._header(file)
        entry = header[name[len(self.prefix):]]
        dtype = self.dtype(name)
        begin, end = entry["data_offsets"]
        shape = tuple(entry["shape"])
        if end - begin != int(np.prod(shape)) * dtype.itemsize:
            raise ValueError(f"{file}: tensor {name!r} holds {end - begin} bytes, its shape {shape} and dtype "
                             f"{dtype} need {int(np.prod(shape)) * dtype.itemsize}")
        if not shape:
            return np.fromfile(file, dtype=dtype, count=1, offset=start + begin).reshape(())
        if 0 in shape:  # nothing to map
            empty = np.zeros(shape, dtype)[index]
            return np.array(empty if view is None else view(empty))
        # bfloat16 mapped as uint16 (np.memmap wants a builtin dtype), then viewed as ml_dtypes' bfloat16
        raw_dtype = np.dtype("<u2") if dtype == np.dtype(ml_dtypes.bfloat16) else dtype
        mapped = np.memmap(file, dtype=raw_dtype, mode="r", offset=start + begin, shape=shape)
        block = mapped[index]
        # the copy owns its memory; the map (the last reference) goes on return, and its pages with it
        return np.array(block if view is None else view(block)).view(dtype)

    def get(self, name: str) -> np.ndarray:
        """The whole tensor."""
        return self.read(name, tuple(slice(0, n) for n in self.shape(name)))


#: safetensors dtype codes -> the little-endian numpy dtype they are read as.
_NUMPY_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": ml_dtypes.bfloat16, "I64": "<i8", "I32": "<i4",
                 "I16": "<i2", "I8": "i1", "U8": "u1", "BOOL": "?"}


def _normalize(index: tuple, shape: tuple[int, ...]) -> tuple[slice, ...]:
    """``index`` (a sharding's per-device index: slices, maybe ``slice(None)``, maybe fewer than the axes)
    as ``slice(start, stop)`` per axis of ``shape``."""
    index = tuple(index) + (slice(None),) * (len(shape) - len(index))
    out = []
    for s, n in zip(index, shape):
        start, stop, step = s.indices(n)
        if step != 1:
            raise ValueError(f"a strided index {s} into shape {shape}; shards are contiguous blocks")
        out.append(slice(start, max(start, stop)))
    return tuple(out)


def _read_one(tensors: _Tensors, name: str, to_jax: Callable, shape: tuple[int, ...],
              index: tuple[slice, ...]) -> np.ndarray:
    """The block ``index`` of the jaxkd array (shape ``shape``) that ``to_jax`` makes of tensor ``name``."""
    if to_jax is _same:
        return tensors.read(name, index)
    if to_jax is np.transpose:
        return tensors.read(name, index[::-1], np.transpose)
    if isinstance(to_jax, _Strided):
        return tensors.read(name, to_jax.hf_block(index), lambda block: to_jax.view(block, index))
    # an arbitrary function: no index translation, so the whole tensor is read
    whole = tensors.read(name, tuple(slice(0, n) for n in tensors.shape(name)))
    return np.ascontiguousarray(np.asarray(to_jax(whole))[index])


def _read_entry(tensors: _Tensors, hf_name: str | tuple[str, ...], to_jax: Callable, shape: tuple[int, ...],
                index: tuple) -> np.ndarray:
    """Block ``index`` of the jaxkd parameter (shape ``shape``) of one weight-map entry, reading only the
    HF slices it comes from (:class:`_Strided`, ``np.transpose`` or the identity; any other ``to_jax``
    reads its tensor whole). A tuple of names is a stack of experts, ``np.stack([to_jax(t) for t in
    names])``: only the experts in ``index[0]`` are read."""
    index = _normalize(index, shape)
    if isinstance(hf_name, tuple):
        experts = range(len(hf_name))[index[0]]
        return np.stack([_read_one(tensors, hf_name[e], to_jax, shape[1:], index[1:]) for e in experts], axis=0)
    return _read_one(tensors, hf_name, to_jax, shape, index)


_SAFETENSORS_DTYPES = {
    np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(ml_dtypes.bfloat16): "BF16",
    np.dtype(np.float64): "F64",
}


def _write_safetensors(file: Path, tensors: dict[str, np.ndarray]) -> None:
    """The safetensors format (an 8-byte little-endian header length, a JSON header, the raw data),
    written directly so bfloat16 works without torch."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, array in tensors.items():
        size = array.nbytes
        header[name] = {"dtype": _SAFETENSORS_DTYPES[array.dtype], "shape": list(array.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(file, "wb") as fh:
        fh.write(struct.pack("<Q", len(blob)))
        fh.write(blob)
        for array in tensors.values():
            fh.write(np.ascontiguousarray(array).tobytes())


# --- in and out --------------------------------------------------------------------------------------------

def from_hf(path: str | os.PathLike, *, dtype: Any = None, vocab_size: int | None = None, mesh: Mesh | None = None,
            rules: Rules | None = None) -> tuple[Model, dict]:
    """A transformers checkpoint directory as ``(model, variables)``: ``model`` is :func:`jaxkd.models.lm.lm`
    of the mapped :class:`~jaxkd.models.lm.LMConfig` (``model.module.config``), ``variables`` is
    ``{"params": ...}`` boxed with the logical axis names, as ``model.init`` gives.

    ``dtype``: the parameter and compute dtype; ``None`` keeps the checkpoint's (the embedding's dtype:
    bfloat16 stays bfloat16). Logits are float32 regardless.

    ``vocab_size``: the tokenizer's real vocabulary (``HFTokenizer.vocab_size``). An embedding padded past it
    (Qwen2.5: 151936 or 152064 rows for 151665 tokens) is cut to it with
    :func:`jaxkd.models.vocab.truncate_vocab`, so the padded rows are in no logit, softmax or divergence;
    the variables keep every row (:func:`to_hf` writes them back whole).

    ``mesh``: ``None`` puts every parameter whole on the default device. With a
    :class:`jax.sharding.Mesh` each parameter is created sharded, never gathered: its ``NamedSharding``
    comes from its logical axis names and ``rules`` (:func:`jaxkd.sharding.boxed_shardings`; default
    :func:`jaxkd.sharding.default_rules` of the mesh, as a train state's participants get; pass
    :func:`jaxkd.models.lm.lm_logical_rules` for MaxText's fsdp + tensor layout), and only the blocks this
    host's devices hold (``sharding.addressable_devices_indices_map``) are read, each distinct block once
    (replicas share it), put on its devices and dropped before the next is read. A jaxkd block is
    translated into the HF slice it comes from (a transpose reverses the index; a reshape that splits an HF
    axis into heads x ``head_dim`` turns a block of heads into a contiguous range of rows; GPT-2's q, k, v
    are offsets into ``c_attn``) and read from a memory map of the safetensors file, so host memory holds
    the shards plus one block in flight, not the model twice (``benchmarks/hf_load_memory.py`` measures
    it). Every entry of the supported families
    translates; only a ``to_jax`` that is not the identity, ``np.transpose`` or a ``_Strided`` layout
    (none here) reads its tensor whole. An entry naming a tuple of tensors (stacked experts) reads only
    the experts in the block. ``rules`` without a ``mesh`` is an error.

    Raises:
      ValueError: no ``config.json``; an unsupported ``model_type`` (the message lists
        :data:`SUPPORTED_MODEL_TYPES`); a config field jaxkd does not implement (named); no safetensors
        weights; a missing tensor, or one of the wrong shape (named, with both shapes); a tensor jaxkd
        would not use; a ``vocab_size`` larger than the model's embedding (both sizes named); ``mesh``
        not a ``Mesh``, ``rules`` not a :class:`jaxkd.sharding.Rules` or given without a mesh; a shape the
        mesh axes do not divide (named by :func:`jaxkd.sharding.param_shardings`).
    """
    if mesh is not None and not isinstance(mesh, Mesh):
        raise ValueError(f"mesh must be a jax.sharding.Mesh (jaxkd.sharding.make_mesh) or None, got "
                         f"{type(mesh).__name__}")
    if rules is not None and not isinstance(rules, Rules):
        raise ValueError(f"rules must be a jaxkd.sharding.Rules or None, got {type(rules).__name__}")
    if rules is not None and mesh is None:
        raise ValueError("rules given without a mesh: they place parameters on a mesh's axes (pass mesh=)")
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise _error(path, "no config.json: not a transformers checkpoint directory")
    cfg = json.loads(config_file.read_text())
    tensors = _Tensors(path)
    embedding_name = _embedding_name(cfg.get("model_type"))
    if cfg.get("model_type") == "gpt2" and embedding_name not in tensors.files and "wte.weight" in tensors.files:
        tensors.files = {f"transformer.{n}": file for n, file in tensors.files.items()}  # GPT2Model's names
        tensors.prefix = "transformer."
    if dtype is None:
        if embedding_name not in tensors.files:
            raise _error(path, f"missing tensor {embedding_name!r}")
        dtype = tensors.dtype(embedding_name)
    dtype = jnp.dtype(dtype)
    _, config = config_from_hf(cfg, dtype=dtype, path=config_file)
    if vocab_size is not None:
        vocab_size = check_int("vocab_size", vocab_size, low=1)
        if vocab_size > config.vocab_size:
            raise _error(path, f"the tokenizer's vocabulary ({vocab_size} tokens) is larger than the model's "
                               f"embedding ({config.vocab_size} rows): not this model's tokenizer")
    model = lm(config, name=f"hf_{cfg['model_type']}")
    abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))["params"]
    shardings = None if mesh is None else dict(_flatten(boxed_shardings(abstract, mesh, rules)))
    flat = {path_: leaf for path_, leaf in _flatten(abstract)}
    params: dict = {}
    used = set()
    for hf_name, key, hf_shape, to_jax, _ in _weight_map(config):
        for name in hf_name if isinstance(hf_name, tuple) else (hf_name,):
            if name not in tensors.files:
                raise _error(path, f"missing tensor {name!r} (expected shape {hf_shape})")
            shape = tensors.shape(name)
            if shape != hf_shape:
                raise _error(path, f"tensor {name!r} has shape {shape}, the config implies {hf_shape}")
            used.add(name)
        box = flat.pop(key)
        shape = tuple(meta.unbox(box).shape)
        if mesh is None:
            value = jnp.asarray(_read_entry(tensors, hf_name, to_jax, shape, ()), dtype)
        else:
            value = _sharded_entry(tensors, hf_name, to_jax, shape, dtype, shardings[key])
        _set(params, key, box.replace_boxed(value) if isinstance(box, meta.AxisMetadata) else value)
    assert not flat, f"unmapped jaxkd parameters {sorted(flat)}"
    ignorable = {"lm_head.weight"} if config.tie_embeddings else set()
    buffers = ("rotary_emb.inv_freq", ".attn.bias", ".attn.masked_bias")  # GPT-2's old causal-mask buffers
    extra = sorted(n for n in set(tensors.files) - used - ignorable if not n.endswith(buffers))
    if extra:
        raise _error(path, f"tensors jaxkd does not implement: {extra[:8]}{' …' if len(extra) > 8 else ''}")
    if vocab_size is not None and vocab_size < config.vocab_size:
        model = truncate_vocab(model, vocab_size)
    return model, {"params": params}


def _sharded_entry(tensors: _Tensors, hf_name: str | tuple[str, ...], to_jax: Callable, shape: tuple[int, ...],
                   dtype: np.dtype, sharding: NamedSharding) -> jax.Array:
    """One parameter made shard by shard where ``sharding`` puts it: for each distinct block this host's
    devices hold (``sharding.addressable_devices_indices_map``), the block is read, put on its devices
    (replicas share the read) and dropped before the next is read; the array is assembled from the
    per-device buffers (``jax.make_array_from_single_device_arrays``).

    Why not ``jax.make_array_from_callback``: it reads every block of the host before putting any on a
    device, so the host holds its part of the tensor twice at once (measured by
    ``benchmarks/hf_load_memory.py``); one block at a time holds one block more than the result."""
    by_block: dict[tuple, list] = {}  # (start, stop) per axis -> the devices holding that block
    for device, index in sharding.addressable_devices_indices_map(shape).items():
        by_block.setdefault(tuple((s.start, s.stop) for s in _normalize(index, shape)), []).append(device)
    buffers = []
    for where, devices in by_block.items():
        index = tuple(slice(start, stop) for start, stop in where)
        block = _read_entry(tensors, hf_name, to_jax, shape, index).astype(dtype, copy=False)
        buffers += [jax.device_put(block, device) for device in devices]
        del block  # before the next block is read
    return jax.make_array_from_single_device_arrays(shape, sharding, buffers)


def _lm_config_of(value: Model | LMConfig, name: str, not_an_lm: str) -> LMConfig:
    """The :class:`LMConfig` of a :func:`jaxkd.models.lm.lm` model, or ``value`` itself when it is one;
    ``not_an_lm`` is the error for a model of another kind."""
    if isinstance(value, Model):
        if not isinstance(value.module, TransformerLM):
            raise ValueError(not_an_lm)
        return value.module.config
    if isinstance(value, LMConfig):
        return value
    raise ValueError(f"{name} must be a jaxkd.models.lm model or an LMConfig, got {type(value).__name__}")


def _flatten(tree, prefix=()):
    for name, value in tree.items():
        if isinstance(value, dict):
            yield from _flatten(value, prefix + (name,))
        else:
            yield prefix + (name,), value


def _set(tree: dict, key: tuple[str, ...], value: Any) -> None:
    for name in key[:-1]:
        tree = tree.setdefault(name, {})
    tree[key[-1]] = value


def _model_type_for(config: LMConfig) -> str:
    if config.num_experts is not None:
        return "qwen3_moe" if config.qk_norm else "mixtral"
    if config.position_embedding == "learned":
        return "gpt2"
    if config.sandwich_norm:
        return "gemma3_text" if config.qk_norm else "gemma2"
    if config.qk_norm:
        return "qwen3"
    if config.qkv_bias and not config.out_bias:
        return "qwen2"
    if config.sliding_window is not None:
        return "mistral"
    return "llama"


_PLAIN = dict(sliding_layers=None, local_rope_base=None, norm_type="rms", norm_plus_one=False, sandwich_norm=False,
              embedding_scale=False, position_embedding="rope", mlp_activation="silu", mlp_gate=True, mlp_bias=False,
              attention_scale=None, attn_softcap=None, final_softcap=None)
_GEMMA = dict(norm_type="rms", norm_plus_one=True, sandwich_norm=True, embedding_scale=True, position_embedding="rope",
              mlp_activation="gelu_tanh", mlp_gate=True, mlp_bias=False)
_FAMILY_OPTIONS = {
    "gemma2": dict(_GEMMA, qk_norm=False, local_rope_base=None),
    "gemma3_text": dict(_GEMMA, qk_norm=True, attn_softcap=None),
    "gpt2": dict(sliding_window=None, sliding_layers=None, local_rope_base=None, norm_type="layer", norm_plus_one=False,
                 sandwich_norm=False, embedding_scale=False, position_embedding="learned", mlp_activation="gelu_tanh",
                 mlp_gate=False, mlp_bias=True, qkv_bias=True, out_bias=True, qk_norm=False, attn_softcap=None,
                 final_softcap=None, rope_scaling=None, attention_head_dim=None),
}


def _check_exportable(config: LMConfig, model_type: str) -> None:
    problems = []
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"model_type {model_type!r} is not supported; supported: {list(SUPPORTED_MODEL_TYPES)}")
    if (config.num_experts is not None) != (model_type in _MOE_TYPES):
        raise ValueError(f"this LMConfig is not a {model_type!r} model: num_experts={config.num_experts} (the "
                         f"mixture-of-experts families are {list(_MOE_TYPES)})")
    if model_type in _FAMILY_OPTIONS:
        problems = [f"{k}={getattr(config, k)!r} (expected {v!r})" for k, v in _FAMILY_OPTIONS[model_type].items()
                    if getattr(config, k) != v]
        if model_type != "gpt2" and config.qkv_bias != config.out_bias:
            problems.append(f"qkv_bias={config.qkv_bias} != out_bias={config.out_bias} ({model_type}'s attention_bias "
                            f"is on q, k, v and o alike)")
        if model_type == "gpt2" and config.num_kv_heads != config.num_heads:
            problems.append(f"num_kv_heads={config.num_kv_heads} != num_heads={config.num_heads}")
        if model_type == "gpt2" and config.attention_scale not in (None, 1.0):
            problems.append(f"attention_scale={config.attention_scale} (GPT-2 scales by 1/sqrt(head_dim) or not at all)")
        if problems:
            raise ValueError(f"this LMConfig is not a {model_type!r} model: {'; '.join(problems)}")
        return
    problems = [f"{k}={getattr(config, k)!r}" for k, v in _PLAIN.items() if getattr(config, k) != v]
    if config.qk_norm != (model_type in ("qwen3", "qwen3_moe")):
        problems.append(f"qk_norm={config.qk_norm}")
    if model_type == "qwen2" and not (config.qkv_bias and not config.out_bias):
        problems.append(f"qkv_bias={config.qkv_bias}, out_bias={config.out_bias} (qwen2 has q/k/v biases only)")
    if model_type in ("llama", "qwen3", "qwen3_moe") and config.qkv_bias != config.out_bias:
        problems.append(f"qkv_bias={config.qkv_bias} != out_bias={config.out_bias} ({model_type}'s attention_bias "
                        f"is on q, k, v and o alike)")
    if model_type in ("mistral", "mixtral") and (config.qkv_bias or config.out_bias):
        problems.append("attention biases")
    if model_type == "mixtral" and not config.norm_topk_prob:
        problems.append("norm_topk_prob=False (Mixtral always renormalizes the top-k router weights)")
    if model_type == "mixtral" and config.moe_layers is not None:
        problems.append(f"moe_layers={config.moe_layers} (every Mixtral layer is a mixture of experts)")
    if model_type not in ("mistral", "mixtral", "qwen3_moe") and config.sliding_window is not None:
        problems.append(f"sliding_window={config.sliding_window}")
    if problems:
        raise ValueError(f"this LMConfig is not a {model_type!r} model: {'; '.join(problems)}")


def to_hf(model: Model | LMConfig, variables: Any, path: str | os.PathLike, *, model_type: str | None = None,
          bos_token_id: int | None = None, eos_token_id: int | None = None,
          pad_token_id: int | None = None) -> str:
    """Writes ``config.json``, ``model.safetensors`` and ``generation_config.json`` into the directory
    ``path`` so that ``transformers.AutoModelForCausalLM.from_pretrained(path)`` is the same model (same
    logits). ``model`` is a :func:`jaxkd.models.lm.lm` model (or its :class:`~jaxkd.models.lm.LMConfig`);
    ``variables`` its variables (or the ``params``). Tensors keep the parameter dtype.

    ``model_type``: default ``qwen3_moe`` / ``mixtral`` for a mixture of experts with / without ``qk_norm``,
    otherwise ``qwen3`` when the config has ``qk_norm``, ``qwen2`` with q/k/v biases only, ``mistral`` with a
    sliding window, ``llama`` otherwise. Returns the model type written.

    Raises:
      ValueError: ``model`` is not a TransformerLM; ``model_type`` unsupported, or not what the config is
        (e.g. ``qk_norm`` exported as ``llama``).
    """
    config = _lm_config_of(model, "model", f"to_hf exports jaxkd.models.lm models, got {getattr(model, 'name', None)!r}")
    model_type = _model_type_for(config) if model_type is None else model_type
    _check_exportable(config, model_type)
    params = variables
    if isinstance(params, dict) and "params" in params and "embedding" not in params:
        params = params["params"]
    params = meta.unbox(params)
    adapters = [k for k in jax.tree_util.tree_flatten_with_path(params)[0] if "_lora_" in jax.tree_util.keystr(k[0])]
    if adapters:  # written as they are, the weights would silently lose the adapters' update
        raise ValueError(f"to_hf exports a plain model, but the variables hold LoRA adapters "
                         f"({jax.tree_util.keystr(adapters[0][0])}, …): fold them in with "
                         "jaxkd.models.lora.merge_lora(model, variables) first")
    parts: dict[str, list] = {}
    shapes = {}
    for hf_name, key, hf_shape, _, to_torch in _weight_map(config):
        value = params
        for name in key:
            value = value[name]
        value = np.asarray(jax.device_get(value))
        if isinstance(hf_name, tuple):  # stacked experts: one tensor per expert
            assert len(hf_name) == value.shape[0], (hf_name, value.shape)
            for name, part in zip(hf_name, value):
                parts.setdefault(name, []).append(np.asarray(to_torch(part)))
                shapes[name] = hf_shape
            continue
        parts.setdefault(hf_name, []).append(np.asarray(to_torch(value)))
        shapes[hf_name] = hf_shape
    tensors = {}
    for hf_name, arrays in parts.items():  # GPT-2's c_attn: q, k, v side by side
        array = arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=-1)
        assert array.shape == shapes[hf_name], (hf_name, array.shape, shapes[hf_name])
        tensors[hf_name] = array
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    _write_safetensors(path / "model.safetensors", tensors)
    dtype = jnp.dtype(config.param_dtype).name
    if model_type in _FAMILY_OPTIONS:
        cfg = _family_config(config, model_type, dtype)
        cfg.update(bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id, use_cache=True)
    else:
        cfg = _llama_like_config(config, model_type, dtype, bos_token_id, eos_token_id, pad_token_id)
    (path / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    generation = {"_from_model_config": True}
    generation.update({k: v for k, v in (("bos_token_id", bos_token_id), ("eos_token_id", eos_token_id),
                                         ("pad_token_id", pad_token_id)) if v is not None})
    (path / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    return model_type


def _family_config(config: LMConfig, model_type: str, dtype: str) -> dict:
    """The ``config.json`` of a gemma2, gemma3_text or gpt2 export."""
    if model_type == "gpt2":
        return {
            "architectures": [_ARCHITECTURES[model_type]], "model_type": model_type, "vocab_size": config.vocab_size,
            "n_positions": config.max_len, "n_embd": config.d_model, "n_layer": config.num_layers,
            "n_head": config.num_heads, "n_inner": config.d_ff, "activation_function": "gelu_new",
            "layer_norm_epsilon": config.norm_eps, "scale_attn_weights": config.attention_scale is None,
            "tie_word_embeddings": config.tie_embeddings, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
            "dtype": dtype,
        }
    rope = {"rope_theta": config.rope_base, "rope_type": "default"}
    if config.rope_scaling is not None:
        rope.update(config.rope_scaling_dict)
    if model_type == "gemma3_text":
        local = config.rope_base if config.local_rope_base is None else config.local_rope_base
        rope = {"full_attention": rope, "sliding_attention": {"rope_type": "default", "rope_theta": local}}
    if config.attention_scale is None:
        qpas = config.head_dim
    else:
        qpas = config.attention_scale ** -2
        qpas = int(round(qpas)) if abs(qpas - round(qpas)) < 1e-6 * qpas else qpas
    cfg = {
        "architectures": [_ARCHITECTURES[model_type]], "model_type": model_type,
        "vocab_size": config.vocab_size, "hidden_size": config.d_model, "intermediate_size": config.d_ff,
        "num_hidden_layers": config.num_layers, "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads, "head_dim": config.head_dim,
        "max_position_embeddings": config.max_len, "rms_norm_eps": config.norm_eps,
        "hidden_activation": "gelu_pytorch_tanh", "tie_word_embeddings": config.tie_embeddings,
        "rope_parameters": rope, "attention_bias": config.qkv_bias, "query_pre_attn_scalar": qpas,
        "sliding_window": config.sliding_window,
        "layer_types": ["sliding_attention" if config.is_sliding(i) else "full_attention"
                        for i in range(config.num_layers)],
        "final_logit_softcapping": config.final_softcap, "attn_logit_softcapping": config.attn_softcap,
        "use_bidirectional_attention": False, "dtype": dtype,
    }
    return cfg


def _llama_like_config(config: LMConfig, model_type: str, dtype: str, bos_token_id, eos_token_id, pad_token_id) -> dict:
    rope = {"rope_theta": config.rope_base, "rope_type": "default"}
    max_positions = config.max_len
    if config.rope_scaling is not None:
        rope.update(config.rope_scaling_dict)
        if rope["rope_type"] == "dynamic":  # transformers scales from max_position_embeddings
            max_positions = rope.pop("original_max_position_embeddings")
    cfg = {
        "architectures": [_ARCHITECTURES[model_type]], "model_type": model_type,
        "vocab_size": config.vocab_size, "hidden_size": config.d_model, "intermediate_size": config.d_ff,
        "num_hidden_layers": config.num_layers, "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads, "head_dim": config.head_dim,
        "max_position_embeddings": max_positions, "rms_norm_eps": config.norm_eps, "hidden_act": "silu",
        "tie_word_embeddings": config.tie_embeddings, "rope_parameters": rope, "dtype": dtype,
        "bos_token_id": bos_token_id, "eos_token_id": eos_token_id, "pad_token_id": pad_token_id,
        "use_cache": True,
    }
    if model_type in ("llama", "qwen3", "qwen3_moe"):
        cfg["attention_bias"] = config.qkv_bias
    if model_type == "llama":
        cfg["mlp_bias"] = False
    if model_type == "mistral":
        cfg["sliding_window"] = config.sliding_window
    if model_type in ("qwen2", "qwen3"):
        cfg.update(use_sliding_window=False, sliding_window=None,
                   layer_types=["full_attention"] * config.num_layers)
    if model_type in _MOE_TYPES:  # the keys save_pretrained writes
        cfg.update(num_local_experts=config.num_experts, num_experts_per_tok=config.num_experts_per_tok,
                   router_aux_loss_coef=config.router_aux_loss_coef, output_router_logits=False,
                   sliding_window=config.sliding_window)
    if model_type == "mixtral":  # its experts are intermediate_size wide
        cfg.update(intermediate_size=config.expert_d_ff, router_jitter_noise=0.0)
    if model_type == "qwen3_moe":
        cfg.update(moe_intermediate_size=config.expert_d_ff, norm_topk_prob=config.norm_topk_prob,
                   decoder_sparse_step=1, mlp_only_layers=[i for i in range(config.num_layers) if not config.is_moe(i)],
                   use_sliding_window=config.sliding_window is not None)
    return cfg



# --- a student from its teacher's layers -------------------------------------------------------------------

_LAYER_STRATEGIES = ("maximally_spaced", "first_n", "every_other")


def student_layers(teacher_layers: int, num_layers: int | None = None, strategy: str = "maximally_spaced") -> tuple[int, ...]:
    """Which teacher layers a shallower student copies.

    ``"maximally_spaced"`` (Distil-Whisper's ``create_student_model.py``): ``linspace(0, L - 1, n)``
    rounded down, the last teacher layer always kept (12 → 6: ``(0, 2, 4, 6, 8, 11)``); ``"first_n"``: the
    first ``n``; ``"every_other"``: ``0, 2, 4, …`` (``num_layers`` not needed; DistilBERT copied every
    other layer, in practice ``(0, 2, 4, 7, 9, 11)`` of 12: pass such a list to :func:`init_student_from`
    directly).
    """
    if strategy not in _LAYER_STRATEGIES:
        raise ValueError(f"unknown layer strategy {strategy!r}; available: {list(_LAYER_STRATEGIES)}")
    if strategy == "every_other":
        return tuple(range(0, teacher_layers, 2))
    if num_layers is None or not 1 <= num_layers <= teacher_layers:
        raise ValueError(f"num_layers must be in [1, {teacher_layers}] for strategy {strategy!r}, got {num_layers!r}")
    if strategy == "first_n":
        return tuple(range(num_layers))
    mapping = np.linspace(0, teacher_layers - 1, num_layers, dtype=int)
    mapping[-1] = teacher_layers - 1
    return tuple(int(i) for i in mapping)


def init_student_from(teacher: Model | LMConfig, teacher_variables: Any, layers: Any) -> tuple[Model, dict]:
    """A shallower student initialized from its teacher: the same :class:`~jaxkd.models.lm.LMConfig` with
    ``num_layers = len(layers)``, the teacher's embedding, final norm and head, and student block ``i`` a
    copy of teacher block ``layers[i]`` (DistilBERT, Sanh et al. 2019; Distil-Whisper, Gandhi et al. 2023).

    ``layers``: teacher layer indices (increasing, no repeats), or a strategy name of
    :func:`student_layers` with the student depth, ``("maximally_spaced", 6)``, or ``"every_other"``.
    Returns ``(model, {"params": ...})`` (boxes, so logical axis names, kept as the teacher's).
    """
    config = _lm_config_of(teacher, "teacher",
                           f"init_student_from takes a jaxkd.models.lm teacher, got {getattr(teacher, 'name', None)!r}")
    if isinstance(layers, str):
        layers = student_layers(config.num_layers, None, layers)
    elif isinstance(layers, tuple) and len(layers) == 2 and isinstance(layers[0], str):
        layers = student_layers(config.num_layers, layers[1], layers[0])
    layers = tuple(int(i) for i in layers)
    if not layers or any(not 0 <= i < config.num_layers for i in layers) or list(layers) != sorted(set(layers)):
        raise ValueError(f"layers must be increasing teacher layer indices in [0, {config.num_layers}), got {layers}")
    params = teacher_variables
    if isinstance(params, dict) and "params" in params and "embedding" not in params:
        params = params["params"]
    student = {k: v for k, v in params.items() if not k.startswith("block_")}
    student.update({f"block_{i}": params[f"block_{j}"] for i, j in enumerate(layers)})
    sliding = None if config.sliding_layers is None else tuple(config.sliding_layers[j] for j in layers)
    moe = {} if config.moe_layers is None else dict(moe_layers=tuple(config.moe_layers[j] for j in layers))
    if moe and not any(moe["moe_layers"]):  # only dense layers copied: a dense student
        moe = dict(num_experts=None, num_experts_per_tok=None, moe_d_ff=None, moe_layers=None)
    student_config = dataclasses.replace(config, num_layers=len(layers), sliding_layers=sliding, **moe)
    return lm(student_config, name=f"student_of_{config.num_layers}_layers_{len(layers)}"), {"params": student}
