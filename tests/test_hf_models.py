"""Hugging Face checkpoints in and out (jaxkd.models.hf): logits equal transformers' for llama (with
llama3 and linear RoPE scaling), qwen2 (q/k/v biases), qwen3 (q/k norm, explicit head_dim), mistral
(sliding window shorter than the sequence), tied and untied; greedy generation; to_hf round trips; clear
errors for bad checkpoints."""

import dataclasses
import json
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from jaxkd.models import from_hf, to_hf  # noqa: E402
from jaxkd.models import sampling  # noqa: E402
from jaxkd.models.hf import init_student_from, student_layers  # noqa: E402
from jaxkd.models.lm import LOGICAL_AXES, LMConfig, TransformerLM, lm  # noqa: E402

TOL = 1e-4
SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8}

FAMILIES = {
    "llama_llama3": ("LlamaConfig", dict(rope_scaling=dict(LLAMA3), rope_theta=500000.0)),
    "llama_linear_tied": ("LlamaConfig", dict(rope_scaling={"rope_type": "linear", "factor": 2.0},
                                              tie_word_embeddings=True, attention_bias=True)),
    "mistral": ("MistralConfig", dict(sliding_window=3)),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", dict(head_dim=12, rms_norm_eps=1e-5)),
}


def _hf_model(config_name, extra, seed=0):
    torch.manual_seed(seed)
    config = getattr(transformers, config_name)(**SMALL, **extra)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # non-trivial norms and biases (their inits are ones and zeros)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    """(name, transformers model, checkpoint dir, jaxkd model, variables)."""
    config_name, extra = FAMILIES[request.param]
    hf = _hf_model(config_name, extra)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path, safe_serialization=True)
    model, variables = from_hf(path)
    return request.param, hf, path, model, variables


def _batch(pad):
    rng = np.random.RandomState(1)
    tokens = rng.randint(0, SMALL["vocab_size"], (3, 8))
    mask = np.ones((3, 8), bool)
    if pad == "right":
        mask[0, 5:] = False
        mask[2, 7:] = False
    else:
        mask[0, :3] = False
        mask[2, :1] = False
    return tokens, mask


def _hf_logits(hf, tokens, mask):
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)  # jaxkd's default positions
    with torch.no_grad():
        return hf(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask.astype(np.int64)),
                  position_ids=torch.tensor(positions)).logits.numpy()


def _jax_logits(model, variables, tokens, mask):
    return np.asarray(model.apply(variables, {"tokens": tokens, "mask": mask}, train=False).logits)


def assert_logits_equal_transformers(family, pad):
    """jaxkd's logits equal transformers' at every real position of a right- or left-padded batch."""
    name, hf, _, model, variables = family
    tokens, mask = _batch(pad)
    ref = _hf_logits(hf, tokens, mask)
    out = _jax_logits(model, variables, tokens, mask)
    delta = np.abs(out - ref)[mask].max()
    print(f"{name} {pad}-padded max |dlogit| = {delta:.2e}")
    assert delta < TOL


@pytest.mark.parametrize("pad", ["right", "left"])
def test_logits_equal_transformers(family, pad):
    assert_logits_equal_transformers(family, pad)


def test_config_mapping(family):
    name, hf, _, model, variables = family
    config = model.module.config
    assert config.tie_embeddings == hf.config.tie_word_embeddings
    assert ("head" in variables["params"]) == (not config.tie_embeddings)
    expected = {
        "llama_llama3": dict(rope_base=500000.0, rope_scaling=tuple(sorted(LLAMA3.items()))),
        "llama_linear_tied": dict(qkv_bias=True, out_bias=True),
        "mistral": dict(sliding_window=3),
        "qwen2": dict(qkv_bias=True, out_bias=False),
        "qwen3": dict(qk_norm=True, attention_head_dim=12, head_dim=12, norm_eps=1e-5),
    }[name]
    for field, value in expected.items():
        assert getattr(config, field) == value, field
    boxes = jax.tree.leaves(variables, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert all(isinstance(b, nn.LogicallyPartitioned) and set(b.names) <= set(LOGICAL_AXES) for b in boxes)
    assert config.num_params == sum(p.numel() for p in hf.parameters()) == sum(
        np.size(x) for x in jax.tree.leaves(variables))


@pytest.mark.parametrize("family", ["llama_llama3", "llama_linear_tied", "mistral"], indirect=True)
def test_options_matter(family):
    """The option under test changes the logits: dropping it breaks the match (the test is not vacuous)."""
    name, hf, _, model, variables = family
    config = model.module.config
    change = {"llama_llama3": dict(rope_scaling=None), "llama_linear_tied": dict(rope_scaling=None),
              "mistral": dict(sliding_window=None)}[name]  # qwen2/3's biases and q/k norms are parameters: a load fails without them
    tokens, mask = _batch("right")
    plain = _jax_logits(lm(dataclasses.replace(config, **change)), variables, tokens, mask)
    assert np.abs(plain - _hf_logits(hf, tokens, mask))[mask].max() > 1e-3


def test_round_trip(family, tmp_path):
    name, hf, _, model, variables = family
    model_type = to_hf(model, variables, tmp_path)
    assert model_type == hf.config.model_type
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(back) is type(hf)
    tokens, mask = _batch("right")
    assert np.abs(_hf_logits(back, tokens, mask) - _hf_logits(hf, tokens, mask))[mask].max() < 1e-6
    again, again_vars = from_hf(tmp_path)
    assert again.module.config == model.module.config
    chex_equal = jax.tree.map(lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)),
                              jax.tree.leaves(again_vars), jax.tree.leaves(variables))
    assert all(chex_equal)


@pytest.mark.parametrize("family", ["qwen3", "mistral"], indirect=True)  # q/k norm; a window the generation outgrows
def test_greedy_generation_equals_transformers(family):
    name, hf, _, model, variables = family
    prompt = np.random.RandomState(2).randint(0, SMALL["vocab_size"], (2, 5))
    with torch.no_grad():
        ref = hf.generate(torch.tensor(prompt), attention_mask=torch.ones(2, 5, dtype=torch.long),
                          do_sample=False, max_new_tokens=6, min_new_tokens=6, pad_token_id=0).numpy()
    out = sampling.generate(model.module.config, variables, prompt, rng=jax.random.PRNGKey(0), max_new_tokens=6,
                            temperature=0.0)
    np.testing.assert_array_equal(np.asarray(out.tokens), ref)


def test_bf16_stays_bf16(tmp_path):
    hf = _hf_model("LlamaConfig", {}).to(torch.bfloat16)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    model, variables = from_hf(tmp_path)
    assert model.module.config.param_dtype == jnp.bfloat16
    assert variables["params"]["embedding"].value.dtype == jnp.bfloat16
    np.testing.assert_array_equal(
        np.asarray(variables["params"]["embedding"].value).view(np.uint16),
        hf.model.embed_tokens.weight.detach().view(torch.int16).numpy().view(np.uint16))
    _, as32 = from_hf(tmp_path, dtype=jnp.float32)
    assert as32["params"]["embedding"].value.dtype == jnp.float32
    to_hf(model, variables, tmp_path / "out")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert back.model.embed_tokens.weight.dtype == torch.bfloat16
    assert torch.equal(back.model.embed_tokens.weight, hf.model.embed_tokens.weight)


@pytest.mark.parametrize("family", ["llama_llama3"], indirect=True)
def test_legacy_rope_fields_and_sharded_index(family, tmp_path):
    """transformers 4's ``rope_theta`` / ``rope_scaling`` spelling, and a sharded index, read the same."""
    name, _, path, model, variables = family
    cfg = json.loads((path / "config.json").read_text())
    rope = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rope.pop("rope_theta")
    cfg["rope_scaling"] = rope
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    # the weights as a two-file "sharded" checkpoint (the index points both names at one file)
    shutil.copy(path / "model.safetensors", tmp_path / "model-00001-of-00001.safetensors")
    with __import__("safetensors").safe_open(path / "model.safetensors", "np") as f:
        names = list(f.keys())
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {n: "model-00001-of-00001.safetensors" for n in names}}))
    again, again_vars = from_hf(tmp_path)
    assert again.module.config == model.module.config
    tokens, mask = _batch("right")
    np.testing.assert_array_equal(_jax_logits(again, again_vars, tokens, mask),
                                  _jax_logits(model, variables, tokens, mask))


def _copy(path, tmp_path, edit=None):
    shutil.copytree(path, tmp_path / "ckpt")
    if edit is not None:
        cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())
        edit(cfg)
        (tmp_path / "ckpt" / "config.json").write_text(json.dumps(cfg))
    return tmp_path / "ckpt"


@pytest.mark.parametrize("family", ["qwen3"], indirect=True)
def test_bad_checkpoints(family, tmp_path):
    name, _, path, model, variables = family
    with pytest.raises(ValueError, match="no config.json"):
        from_hf(tmp_path)
    with pytest.raises(ValueError, match=r"model_type 'bert' is not supported; supported: \['llama'"):
        from_hf(_copy(path, tmp_path / "a", lambda c: c.update(model_type="bert")))
    with pytest.raises(ValueError, match="use_mrope"):
        from_hf(_copy(path, tmp_path / "g", lambda c: c.update(model_type="qwen2", use_mrope=True, head_dim=8) or c.pop("attention_bias")))
    with pytest.raises(ValueError, match="hidden_act='gelu'"):
        from_hf(_copy(path, tmp_path / "b", lambda c: c.update(hidden_act="gelu")))
    with pytest.raises(ValueError, match=r"\['quantization_config'\] are not implemented"):
        from_hf(_copy(path, tmp_path / "c", lambda c: c.update(quantization_config={"bits": 4})))
    with pytest.raises(ValueError, match="rope_type 'yarn' is not implemented"):
        from_hf(_copy(path, tmp_path / "d", lambda c: c.update(
            rope_parameters={"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4})))
    with pytest.raises(ValueError, match="layer_types"):
        from_hf(_copy(path, tmp_path / "e", lambda c: c.update(
            sliding_window=4, layer_types=["full_attention", "sliding_attention"])))
    # weights: a missing tensor, a wrong shape (named with both shapes)
    params = jax.tree.map(np.asarray, variables)
    config = model.module.config
    to_hf(config, params, tmp_path / "f")
    from jaxkd.models import hf as hf_lib

    import safetensors

    with safetensors.safe_open(tmp_path / "f" / "model.safetensors", "np") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    missing = dict(tensors)
    del missing["model.layers.1.self_attn.k_norm.weight"]
    hf_lib._write_safetensors(tmp_path / "f" / "model.safetensors", missing)
    with pytest.raises(ValueError, match=r"missing tensor 'model.layers.1.self_attn.k_norm.weight' \(expected shape \(12,\)\)"):
        from_hf(tmp_path / "f")
    wrong = dict(tensors)
    wrong["model.layers.0.mlp.up_proj.weight"] = np.zeros((64, 30), np.float32)
    hf_lib._write_safetensors(tmp_path / "f" / "model.safetensors", wrong)
    with pytest.raises(ValueError, match=r"'model.layers.0.mlp.up_proj.weight' has shape \(64, 30\), the config implies \(64, 32\)"):
        from_hf(tmp_path / "f")
    extra = dict(tensors, **{"model.layers.0.mlp.up_proj.bias": np.zeros(64, np.float32)})
    hf_lib._write_safetensors(tmp_path / "f" / "model.safetensors", extra)
    with pytest.raises(ValueError, match="does not implement.*up_proj.bias"):
        from_hf(tmp_path / "f")
    (tmp_path / "f" / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="no model.safetensors"):
        from_hf(tmp_path / "f")


def test_export_checks(tmp_path):
    config = LMConfig(vocab_size=64, d_model=32, num_layers=1, num_heads=4, d_ff=64, max_len=16, qk_norm=True)
    model = lm(config)
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))
    with pytest.raises(ValueError, match="not a 'llama' model: qk_norm=True"):
        to_hf(model, variables, tmp_path, model_type="llama")
    with pytest.raises(ValueError, match="model_type 'bert' is not supported"):
        to_hf(model, variables, tmp_path, model_type="bert")
    with pytest.raises(ValueError, match="exports jaxkd.models.lm models"):
        to_hf(dataclasses.replace(model, module=None), variables, tmp_path)
    # a plain jaxkd LM exports as llama and loads with equal logits
    plain = lm(dataclasses.replace(config, qk_norm=False, tie_embeddings=False, num_kv_heads=2))
    variables = plain.init(jax.random.PRNGKey(1), jnp.zeros((1, 4), jnp.int32))
    assert to_hf(plain, variables, tmp_path / "plain") == "llama"
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "plain").eval()
    tokens, mask = _batch("left")
    tokens = tokens % 64
    out = _jax_logits(plain, variables, tokens, mask)
    assert np.abs(out - _hf_logits(back, tokens, mask))[mask].max() < TOL
    assert isinstance(plain.module, TransformerLM)


@pytest.mark.parametrize("family", ["qwen3"], indirect=True)
def test_student_from_teacher_layers(family):
    name, _, _, teacher, variables = family
    assert student_layers(12, 6) == (0, 2, 4, 6, 8, 11)  # Distil-Whisper's maximally spaced
    assert student_layers(12, 3, "first_n") == (0, 1, 2)
    assert student_layers(12, strategy="every_other") == (0, 2, 4, 6, 8, 10)
    tokens, mask = _batch("right")
    same, same_vars = init_student_from(teacher, variables, (0, 1))  # every layer: the teacher itself
    np.testing.assert_array_equal(_jax_logits(same, same_vars, tokens, mask), _jax_logits(teacher, variables, tokens, mask))
    student, student_vars = init_student_from(teacher, variables, ("maximally_spaced", 1))
    config = student.module.config
    assert config.num_layers == 1 and config.qk_norm and config.head_dim == 12
    assert student_vars["params"]["block_0"] is variables["params"]["block_1"]
    assert student_vars["params"]["embedding"] is variables["params"]["embedding"]
    assert np.isfinite(_jax_logits(student, student_vars, tokens, mask)).all()
    with pytest.raises(ValueError, match="increasing teacher layer indices"):
        init_student_from(teacher, variables, (1, 0))
    with pytest.raises(ValueError, match="unknown layer strategy"):
        init_student_from(teacher, variables, "every_third")


# --- Gemma 2, Gemma 3 text, GPT-2 ------------------------------------------------------------------------

GEMMA = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
             head_dim=16, vocab_size=128, max_position_embeddings=64, sliding_window=3, query_pre_attn_scalar=12)
NEW_FAMILIES = {
    "gemma2": ("Gemma2Config", dict(GEMMA, final_logit_softcapping=2.0, attn_logit_softcapping=1.5)),
    "gemma3_text": ("Gemma3TextConfig", dict(
        GEMMA, final_logit_softcapping=3.0, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}})),
    "gpt2": ("GPT2Config", dict(n_embd=32, n_layer=2, n_head=4, vocab_size=128, n_positions=64, bos_token_id=None,
                                eos_token_id=None)),
}


@pytest.fixture(scope="module", params=sorted(NEW_FAMILIES))
def new_family(request, tmp_path_factory):
    """(name, transformers model, checkpoint dir, jaxkd model, variables) for gemma2, gemma3_text, gpt2."""
    config_name, extra = NEW_FAMILIES[request.param]
    torch.manual_seed(0)
    config = getattr(transformers, config_name)(**extra)
    config._attn_implementation = "eager"  # the reference attention (Gemma's soft-capping)
    hf = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path, safe_serialization=True)
    model, variables = from_hf(path)
    return request.param, hf, path, model, variables


@pytest.mark.parametrize("pad", ["right", "left"])
def test_new_families_logits_equal_transformers(new_family, pad):
    assert_logits_equal_transformers(new_family, pad)


def test_new_families_config_and_options(new_family):
    name, hf, _, model, variables = new_family
    config = model.module.config
    expected = {
        "gemma2": dict(sliding_window=3, sliding_layers=(True, False, True), attn_softcap=1.5, final_softcap=2.0,
                       attention_scale=12 ** -0.5, head_dim=16, norm_plus_one=True, sandwich_norm=True,
                       embedding_scale=True, mlp_activation="gelu_tanh", qk_norm=False, local_rope_base=None),
        "gemma3_text": dict(sliding_layers=(True, False, True), attn_softcap=None, final_softcap=3.0, qk_norm=True,
                            rope_base=1e6, local_rope_base=100.0, rope_scaling=(("factor", 2.0), ("rope_type", "linear"))),
        "gpt2": dict(norm_type="layer", position_embedding="learned", mlp_gate=False, mlp_bias=True, qkv_bias=True,
                     out_bias=True, d_ff=128, norm_eps=1e-5, tie_embeddings=True),
    }[name]
    for field, value in expected.items():
        assert getattr(config, field) == value, field
    boxes = jax.tree.leaves(variables, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert all(isinstance(b, nn.LogicallyPartitioned) and set(b.names) <= set(LOGICAL_AXES) for b in boxes)
    assert config.num_params == sum(p.numel() for p in hf.parameters()) == sum(
        np.size(x) for x in jax.tree.leaves(variables))
    # each option matters: dropping it breaks the match (the test is not vacuous)
    changes = {"gemma2": [dict(attn_softcap=None), dict(final_softcap=None), dict(sliding_layers=None),
                          dict(attention_scale=None)],
               "gemma3_text": [dict(local_rope_base=None), dict(final_softcap=None), dict(sliding_window=None,
                                                                                           sliding_layers=None)],
               "gpt2": [dict(attention_scale=1.0)]}[name]
    tokens, mask = _batch("right")
    ref = _hf_logits(hf, tokens, mask)
    for change in changes:
        plain = _jax_logits(lm(dataclasses.replace(config, **change)), variables, tokens, mask)
        assert np.abs(plain - ref)[mask].max() > 1e-3, change


def test_new_families_round_trip(new_family, tmp_path):
    name, hf, _, model, variables = new_family
    assert to_hf(model, variables, tmp_path) == hf.config.model_type
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert type(back) is type(hf)
    tokens, mask = _batch("left")
    assert np.abs(_hf_logits(back, tokens, mask) - _hf_logits(hf, tokens, mask))[mask].max() < 1e-6
    again, again_vars = from_hf(tmp_path)
    assert again.module.config == model.module.config
    assert all(np.array_equal(np.asarray(a), np.asarray(b))
               for a, b in zip(jax.tree.leaves(again_vars), jax.tree.leaves(variables)))


@pytest.mark.parametrize("new_family", ["gemma3_text", "gpt2"], indirect=True)  # windows + two RoPE bases; learned positions
def test_new_families_greedy_generation(new_family):
    """Gemma 3's local layers (window 3) are outgrown by the generation: the KV cache reads per-layer windows."""
    name, hf, _, model, variables = new_family
    prompt = np.random.RandomState(2).randint(0, 128, (2, 5))
    with torch.no_grad():
        ref = hf.generate(torch.tensor(prompt), attention_mask=torch.ones(2, 5, dtype=torch.long),
                          do_sample=False, max_new_tokens=6, min_new_tokens=6, pad_token_id=0).numpy()
    out = sampling.generate(model.module.config, variables, prompt, rng=jax.random.PRNGKey(0), max_new_tokens=6,
                            temperature=0.0)
    np.testing.assert_array_equal(np.asarray(out.tokens), ref)


def test_new_families_refusals(new_family, tmp_path):
    name, _, path, model, variables = new_family
    bad = {
        "gemma2": [(dict(hidden_activation="gelu"), "hidden_activation='gelu'"),
                   (dict(use_bidirectional_attention=True), "use_bidirectional_attention"),
                   (dict(layer_types=["sliding_attention", "chunked_attention", "full_attention"]), "layer_types"),
                   (dict(altup_num_inputs=4), r"\['altup_num_inputs'\] are not implemented")],
        "gemma3_text": [(dict(rope_parameters={"full_attention": {"rope_type": "yarn", "factor": 2.0},
                                               "sliding_attention": {"rope_type": "default"}}), "rope_type 'yarn'"),
                        (dict(rope_parameters={"full_attention": {"rope_type": "default"},
                                               "sliding_attention": {"rope_type": "linear", "factor": 2.0}}),
                         "sliding_attention layers")],
        "gpt2": [(dict(activation_function="relu"), "activation_function='relu'"),
                 (dict(scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx"),
                 (dict(add_cross_attention=True), "add_cross_attention")],
    }[name]
    for i, (edit, match) in enumerate(bad):
        with pytest.raises(ValueError, match=match):
            from_hf(_copy(path, tmp_path / str(i), lambda c, edit=edit: c.update(edit)))
    config = model.module.config
    other = {"gemma2": "llama", "gemma3_text": "gemma2", "gpt2": "gemma2"}[name]
    with pytest.raises(ValueError, match=f"not a '{other}' model"):
        to_hf(config, variables, tmp_path / "x", model_type=other)


@pytest.mark.parametrize("new_family", ["gemma2"], indirect=True)  # gemma3_text and gpt2 decode in the generation test
def test_new_families_kv_cache_equals_forward(new_family):
    """prefill + decode_step on a left-padded batch give the full forward's logits (per-layer windows, softcaps)."""
    name, _, _, model, variables = new_family
    from jaxkd.models.lm import decode_step, prefill

    config = model.module.config
    tokens, mask = _batch("left")
    full = _jax_logits(model, variables, tokens, mask)
    logits, cache = prefill(variables, config, tokens[:, :4], mask[:, :4], cache_len=8)
    steps = [np.asarray(logits)]
    for t in range(4, 8):
        step, cache = decode_step(variables, config, tokens[:, t], cache)
        steps.append(np.asarray(step)[:, None])
    np.testing.assert_allclose(np.concatenate(steps, axis=1)[mask], full[mask], atol=1e-5)


@pytest.mark.parametrize("new_family", ["gpt2", "gemma2"], indirect=True)
def test_gpt2_hub_layout_and_gemma_fused_softcap(new_family, tmp_path):
    """GPT-2 as the Hub stores it (GPT2Model's names without ``transformer.``, the old ``attn.bias`` mask
    buffers) reads the same; Gemma's capped logits are ``softcap(hidden @ output_projection)``."""
    name, _, path, model, variables = new_family
    tokens, mask = _batch("right")
    if name == "gpt2":
        import safetensors

        from jaxkd.models import hf as hf_lib

        with safetensors.safe_open(path / "model.safetensors", "np") as f:
            tensors = {k.removeprefix("transformer."): f.get_tensor(k) for k in f.keys() if k != "lm_head.weight"}
        tensors["h.0.attn.bias"] = np.tril(np.ones((1, 1, 64, 64), np.float32))
        (tmp_path / "hub").mkdir()
        shutil.copy(path / "config.json", tmp_path / "hub" / "config.json")
        hf_lib._write_safetensors(tmp_path / "hub" / "model.safetensors", tensors)
        again, again_vars = from_hf(tmp_path / "hub")
        np.testing.assert_array_equal(_jax_logits(again, again_vars, tokens, mask),
                                      _jax_logits(model, variables, tokens, mask))
    else:
        from jaxkd.models.lm import output_projection

        config = model.module.config
        out = model.apply(variables, {"tokens": tokens, "mask": mask}, train=False)
        raw = np.asarray(out.features["hidden"]) @ np.asarray(output_projection(variables, config))
        capped = np.tanh(raw / config.final_softcap) * config.final_softcap
        np.testing.assert_allclose(capped, np.asarray(out.logits), atol=1e-5)
        assert np.abs(raw - np.asarray(out.logits)).max() > 1e-2  # the cap is not a no-op here


@pytest.mark.parametrize("new_family", ["gemma2"], indirect=True)
def test_gemma_student_keeps_layer_windows(new_family):
    name, _, _, teacher, variables = new_family
    student, student_vars = init_student_from(teacher, variables, (1, 2))
    assert student.module.config.sliding_layers == (False, True)
    tokens, mask = _batch("right")
    assert np.isfinite(_jax_logits(student, student_vars, tokens, mask)).all()
