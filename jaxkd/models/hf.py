"""Hugging Face checkpoints in and out: the LLaMA family (``llama``, ``mistral``, ``qwen2``, ``qwen3``),
Gemma 2 and 3 (``gemma2``, ``gemma3_text``) and ``gpt2``.

:func:`from_hf` reads a transformers checkpoint directory (``config.json`` and ``model.safetensors`` or a
sharded ``model.safetensors.index.json``) into a :func:`jaxkd.models.lm.lm` model and its variables;
:func:`to_hf` writes one back that ``transformers.AutoModelForCausalLM.from_pretrained`` loads with the
same logits. All four families are the one decoder of :mod:`jaxkd.models.lm` with options, so the KV
cache, :func:`jaxkd.models.sampling.generate`, the fused vocabulary losses and the sharding rules work
for every imported model.

Followed (transformers 5.x): ``models/llama/modeling_llama.py`` (``attention_bias`` on q, k, v and o),
``models/mistral/modeling_mistral.py`` (``sliding_window``), ``models/qwen2/modeling_qwen2.py`` (biases
on q, k, v only), ``models/qwen3/modeling_qwen3.py`` (``q_norm``/``k_norm`` over ``head_dim`` before
RoPE, explicit ``head_dim``), ``modeling_rope_utils.py`` (``rope_parameters`` / the older ``rope_theta``
and ``rope_scaling``: default, ``linear`` and ``llama3``), ``masking_utils.py`` (the sliding window:
query slot ``t`` reads key slots ``s > t - sliding_window``), ``models/gemma2/modeling_gemma2.py`` and
``models/gemma3/modeling_gemma3.py`` (GeGLU, ``(1 + w)`` RMSNorm in float32, embeddings times ``sqrt(d)``
cast to the weights' dtype, sandwich norms, ``query_pre_attn_scalar``, attention and final logit soft-caps
— Gemma 3 applies no attention soft-cap —, per-layer ``layer_types`` windows, Gemma 3's q/k norms and local
RoPE base), ``models/gpt2/modeling_gpt2.py`` (LayerNorm, learned positions, ``Conv1D`` ``[in, out]``
weights, ``c_attn`` split into q, k, v, biases everywhere, ``gelu_new``).

Config fields are mapped one by one; a field that would change the model and is not implemented
(``hidden_act`` other than ``silu``, ``mlp_bias``, dynamic/YaRN RoPE, a per-layer mix of sliding and full
attention, quantization …) or is unknown raises a ``ValueError`` naming it. The fields known not to
change the forward pass are listed in :data:`IGNORED_FIELDS`.

Weights are read memory-mapped; bfloat16 tensors (which numpy lacks) are read as raw bytes and viewed as
``ml_dtypes.bfloat16``, so a bf16 checkpoint stays bf16 unless ``dtype`` says otherwise.
"""

from __future__ import annotations

import json
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

from jaxkd.models.base import Model
from jaxkd.models.lm import LMConfig, TransformerLM, lm
from jaxkd.models.vocab import truncate_vocab
from jaxkd.checks import check_int

__all__ = ["IGNORED_FIELDS", "SUPPORTED_MODEL_TYPES", "from_hf", "init_student_from", "student_layers", "to_hf"]

#: The transformers ``model_type`` values :func:`from_hf` and :func:`to_hf` handle.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "gpt2")

_ARCHITECTURES = {
    "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
    "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM", "gpt2": "GPT2LMHeadModel",
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
            "llama3": {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}}
    if kind not in keys:
        raise _error(path, f"rope_type {kind!r} is not implemented (jaxkd implements default, linear and llama3 "
                           f"of transformers' modeling_rope_utils.py)")
    if params.keys() != keys[kind]:
        raise _error(path, f"rope_type {kind!r} with parameters {sorted(params)} is not implemented (expected "
                           f"{sorted(keys[kind])})")
    return float(theta), {"rope_type": kind, **params}


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
    elif model_type == "mistral":
        qkv_bias = out_bias = False
    else:
        qkv_bias = out_bias = bool(cfg.get("attention_bias", False))
    window = None
    if model_type == "mistral":
        window = cfg.get("sliding_window", 4096)
        if cfg.get("layer_types") is not None:
            raise _error(path, "layer_types for mistral is not implemented")
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
    config = LMConfig(
        vocab_size=cfg["vocab_size"], d_model=d, num_layers=cfg["num_hidden_layers"], num_heads=heads,
        d_ff=cfg["intermediate_size"], max_len=cfg["max_position_embeddings"],
        num_kv_heads=cfg.get("num_key_value_heads") or heads,
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)), rope_base=theta,
        norm_eps=cfg.get("rms_norm_eps", 1e-6), dtype=dtype, param_dtype=dtype, attention_head_dim=head_dim,
        rope_scaling=scaling, qkv_bias=qkv_bias, out_bias=out_bias, qk_norm=model_type == "qwen3",
        sliding_window=window,
    )
    return model_type, config


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

# (hf name, jaxkd param path, hf shape, hf -> jaxkd, jaxkd -> hf)
_Entry = tuple[str, tuple[str, ...], tuple[int, ...], Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray], np.ndarray]]


def _same(x):
    return x


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
        for j, name in enumerate(("query", "key", "value")):
            yield (f"{pre}attn.c_attn.weight", (blk, "attention", name), (d, 3 * h * hd),
                   lambda w, j=j: w[:, j * h * hd:(j + 1) * h * hd].reshape(d, h, hd), lambda p: p.reshape(d, -1))
            yield (f"{pre}attn.c_attn.bias", (blk, "attention", f"{name}_bias"), (3 * h * hd,),
                   lambda b, j=j: b[j * h * hd:(j + 1) * h * hd].reshape(h, hd), lambda p: p.reshape(-1))
        yield (f"{pre}attn.c_proj.weight", (blk, "attention", "out"), (h * hd, d),
               lambda w: w.reshape(h, hd, d), lambda p: p.reshape(h * hd, d))
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
        return lambda w: w.T.reshape(w.shape[1], *out_shape), lambda p: p.reshape(p.shape[0], -1).T

    yield "model.embed_tokens.weight", ("embedding",), (v, d), _same, _same
    for i in range(config.num_layers):
        pre, blk = f"model.layers.{i}.", f"block_{i}"
        for hf_name, name, n in (("q_proj", "query", h), ("k_proj", "key", k), ("v_proj", "value", k)):
            yield (f"{pre}self_attn.{hf_name}.weight", (blk, "attention", name), (n * hd, d), *linear_in((n, hd)))
            if config.qkv_bias:
                yield (f"{pre}self_attn.{hf_name}.bias", (blk, "attention", f"{name}_bias"), (n * hd,),
                       lambda b, n=n: b.reshape(n, hd), lambda p: p.reshape(-1))
        yield (f"{pre}self_attn.o_proj.weight", (blk, "attention", "out"), (d, h * hd),
               lambda w: w.T.reshape(h, hd, d), lambda p: p.reshape(h * hd, d).T)
        if config.out_bias:
            yield f"{pre}self_attn.o_proj.bias", (blk, "attention", "out_bias"), (d,), _same, _same
        if config.qk_norm:
            yield f"{pre}self_attn.q_norm.weight", (blk, "attention", "query_norm", "scale"), (hd,), _same, _same
            yield f"{pre}self_attn.k_norm.weight", (blk, "attention", "key_norm", "scale"), (hd,), _same, _same
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

    def get(self, name: str) -> np.ndarray:
        file = self.files[name]
        name = name[len(self.prefix):]
        start, header = self._header(file)
        entry = header[name]
        if entry["dtype"] == "BF16":  # numpy has no bfloat16: the raw bytes, viewed as ml_dtypes'
            begin, end = entry["data_offsets"]
            raw = np.memmap(file, dtype=np.uint16, mode="r", offset=start + begin, shape=((end - begin) // 2,))
            return raw.view(ml_dtypes.bfloat16).reshape(entry["shape"])
        with safetensors.safe_open(file, "np") as f:
            return f.get_tensor(name)


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

def from_hf(path: str | os.PathLike, *, dtype: Any = None, vocab_size: int | None = None) -> tuple[Model, dict]:
    """A transformers checkpoint directory as ``(model, variables)``: ``model`` is :func:`jaxkd.models.lm.lm`
    of the mapped :class:`~jaxkd.models.lm.LMConfig` (``model.module.config``), ``variables`` is
    ``{"params": ...}`` boxed with the logical axis names, as ``model.init`` gives.

    ``dtype``: the parameter and compute dtype; ``None`` keeps the checkpoint's (the embedding's dtype:
    bfloat16 stays bfloat16). Logits are float32 regardless.

    ``vocab_size``: the tokenizer's real vocabulary (``HFTokenizer.vocab_size``). An embedding padded past it
    (Qwen2.5: 151936 or 152064 rows for 151665 tokens) is cut to it with
    :func:`jaxkd.models.vocab.truncate_vocab`, so the padded rows are in no logit, softmax or divergence;
    the variables keep every row (:func:`to_hf` writes them back whole).

    Raises:
      ValueError: no ``config.json``; an unsupported ``model_type`` (the message lists
        :data:`SUPPORTED_MODEL_TYPES`); a config field jaxkd does not implement (named); no safetensors
        weights; a missing tensor, or one of the wrong shape (named, with both shapes); a tensor jaxkd
        would not use; a ``vocab_size`` larger than the model's embedding (both sizes named).
    """
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
        dtype = tensors.get(embedding_name).dtype
    dtype = jnp.dtype(dtype)
    _, config = config_from_hf(cfg, dtype=dtype, path=config_file)
    if vocab_size is not None:
        vocab_size = check_int("vocab_size", vocab_size, low=1)
        if vocab_size > config.vocab_size:
            raise _error(path, f"the tokenizer's vocabulary ({vocab_size} tokens) is larger than the model's "
                               f"embedding ({config.vocab_size} rows): not this model's tokenizer")
    model = lm(config, name=f"hf_{cfg['model_type']}")
    abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))["params"]
    flat = {path_: leaf for path_, leaf in _flatten(abstract)}
    params: dict = {}
    used = set()
    cache: dict[str, np.ndarray] = {}
    for hf_name, key, hf_shape, to_jax, _ in _weight_map(config):
        if hf_name not in tensors.files:
            raise _error(path, f"missing tensor {hf_name!r} (expected shape {hf_shape})")
        shape = tensors.shape(hf_name)
        if shape != hf_shape:
            raise _error(path, f"tensor {hf_name!r} has shape {shape}, the config implies {hf_shape}")
        used.add(hf_name)
        box = flat.pop(key)
        if hf_name not in cache:
            cache = {hf_name: np.asarray(tensors.get(hf_name))}  # GPT-2's c_attn: three entries in a row
        value = jnp.asarray(to_jax(cache[hf_name]), dtype)
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
    if config.qk_norm != (model_type == "qwen3"):
        problems.append(f"qk_norm={config.qk_norm}")
    if model_type == "qwen2" and not (config.qkv_bias and not config.out_bias):
        problems.append(f"qkv_bias={config.qkv_bias}, out_bias={config.out_bias} (qwen2 has q/k/v biases only)")
    if model_type in ("llama", "qwen3") and config.qkv_bias != config.out_bias:
        problems.append(f"qkv_bias={config.qkv_bias} != out_bias={config.out_bias} ({model_type}'s attention_bias "
                        f"is on q, k, v and o alike)")
    if model_type == "mistral" and (config.qkv_bias or config.out_bias):
        problems.append("attention biases")
    if model_type != "mistral" and config.sliding_window is not None:
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

    ``model_type``: default ``qwen3`` when the config has ``qk_norm``, ``qwen2`` with q/k/v biases only,
    ``mistral`` with a sliding window, ``llama`` otherwise. Returns the model type written.

    Raises:
      ValueError: ``model`` is not a TransformerLM; ``model_type`` unsupported, or not what the config is
        (e.g. ``qk_norm`` exported as ``llama``).
    """
    if isinstance(model, Model):
        if not isinstance(model.module, TransformerLM):
            raise ValueError(f"to_hf exports jaxkd.models.lm models, got {model.name!r}")
        config = model.module.config
    elif isinstance(model, LMConfig):
        config = model
    else:
        raise ValueError(f"model must be a jaxkd.models.lm model or an LMConfig, got {type(model).__name__}")
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
        parts.setdefault(hf_name, []).append(np.asarray(to_torch(np.asarray(jax.device_get(value)))))
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
    if config.rope_scaling is not None:
        rope.update(config.rope_scaling_dict)
    cfg = {
        "architectures": [_ARCHITECTURES[model_type]], "model_type": model_type,
        "vocab_size": config.vocab_size, "hidden_size": config.d_model, "intermediate_size": config.d_ff,
        "num_hidden_layers": config.num_layers, "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads, "head_dim": config.head_dim,
        "max_position_embeddings": config.max_len, "rms_norm_eps": config.norm_eps, "hidden_act": "silu",
        "tie_word_embeddings": config.tie_embeddings, "rope_parameters": rope, "dtype": dtype,
        "bos_token_id": bos_token_id, "eos_token_id": eos_token_id, "pad_token_id": pad_token_id,
        "use_cache": True,
    }
    if model_type in ("llama", "qwen3"):
        cfg["attention_bias"] = config.qkv_bias
    if model_type == "llama":
        cfg["mlp_bias"] = False
    if model_type == "mistral":
        cfg["sliding_window"] = config.sliding_window
    if model_type in ("qwen2", "qwen3"):
        cfg.update(use_sliding_window=False, sliding_window=None,
                   layer_types=["full_attention"] * config.num_layers)
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
    if isinstance(teacher, Model):
        if not isinstance(teacher.module, TransformerLM):
            raise ValueError(f"init_student_from takes a jaxkd.models.lm teacher, got {teacher.name!r}")
        config = teacher.module.config
    elif isinstance(teacher, LMConfig):
        config = teacher
    else:
        raise ValueError(f"teacher must be a jaxkd.models.lm model or an LMConfig, got {type(teacher).__name__}")
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
    student_config = dataclasses.replace(config, num_layers=len(layers), sliding_layers=sliding)
    return lm(student_config, name=f"student_of_{config.num_layers}_layers_{len(layers)}"), {"params": student}
