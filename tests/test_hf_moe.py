"""Mixture-of-experts Hugging Face families (jaxkd.models.hf ``qwen3_moe`` and ``mixtral``, the MoE MLP of
jaxkd.models.lm): logits equal transformers' on right- and left-padded batches, greedy generation equals
``generate``, to_hf round trips, parameter counts, refusals, the load-balancing loss against transformers'
``load_balancing_loss_func``, and experts sharded over a simulated 8-device mesh."""

import dataclasses
import json
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from jaxkd import sharding  # noqa: E402
from jaxkd.models import from_hf, sampling, to_hf  # noqa: E402
from jaxkd.models import hf as hf_lib  # noqa: E402
from jaxkd.models.lm import LOGICAL_AXES, LMConfig, lm, lm_logical_rules, load_balancing_loss  # noqa: E402
from tests.test_hf_models import _batch, _hf_logits  # noqa: E402

V = 128  # test_hf_models._batch draws ids below 128
TINY = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            num_experts_per_tok=2, max_position_embeddings=64)
FAMILIES = {
    # Qwen3-MoE's default: the top-k weights are the plain softmax probabilities (norm_topk_prob=False);
    # an explicit head_dim other than d / H; decoder_sparse_step=2: layer 0 is a dense MLP of width
    # intermediate_size, layer 1 the mixture.
    "qwen3_moe": ("Qwen3MoeConfig", dict(TINY, intermediate_size=48, moe_intermediate_size=16, num_experts=4,
                                         head_dim=12, rms_norm_eps=1e-5, decoder_sparse_step=2)),
    # Mixtral renormalizes the top-k weights; a sliding window shorter than the batches; tied embeddings.
    "mixtral": ("MixtralConfig", dict(TINY, intermediate_size=16, num_local_experts=4, sliding_window=5,
                                      tie_word_embeddings=True)),
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    """(name, transformers model, checkpoint dir, jaxkd model, variables)."""
    config_name, extra = FAMILIES[request.param]
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(getattr(transformers, config_name)(**extra)).eval()
    with torch.no_grad():  # norms away from one, routers and experts of distinct scales (init std is 0.02)
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    model, variables = from_hf(path)
    return request.param, hf, path, model, variables


def _logits(model, variables, tokens, mask):
    """The jaxkd logits, jitted: one compile of the model costs less than compiling each operation eagerly."""
    apply = jax.jit(lambda v, x: model.apply(v, x, train=False).logits)
    return np.asarray(apply(variables, {"tokens": jnp.asarray(tokens), "mask": jnp.asarray(mask)}))


@pytest.mark.parametrize("pad", ["right", "left"])
def test_logits_equal_transformers(family, pad):
    """At every real position, within 1e-4 (float32)."""
    name, hf, _, model, variables = family
    tokens, mask = _batch(pad)
    delta = np.abs(_logits(model, variables, tokens, mask) - _hf_logits(hf, tokens, mask))[mask].max()
    print(f"{name} {pad}-padded max |dlogit| = {delta:.2e}")
    assert delta < 1e-4


def test_config_parameter_count_and_options_matter(family):
    name, hf, path, model, variables = family
    config = model.module.config
    expected = {"qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_d_ff=16, expert_d_ff=16, d_ff=48,
                                  norm_topk_prob=False, qk_norm=True, head_dim=12, tie_embeddings=False,
                                  moe_layers=(False, True)),
                "mixtral": dict(num_experts=4, num_experts_per_tok=2, moe_d_ff=None, expert_d_ff=16, d_ff=16,
                                norm_topk_prob=True, qk_norm=False, sliding_window=5, tie_embeddings=True,
                                moe_layers=None)}[name]
    for field, value in expected.items():
        assert getattr(config, field) == value, field
    mlp = variables["params"]["block_1"]["mlp"]
    assert {k: (v.value.shape, v.names) for k, v in mlp.items()} == {
        "router": ((32, 4), ("embed", "expert")),
        "experts_gate": ((4, 32, 16), ("expert", "embed", "mlp")),
        "experts_up": ((4, 32, 16), ("expert", "embed", "mlp")),
        "experts_down": ((4, 16, 32), ("expert", "mlp", "embed"))}
    if name == "qwen3_moe":  # the dense layer 0; mlp_only_layers is the other spelling of dense layers
        assert {k: v.value.shape for k, v in variables["params"]["block_0"]["mlp"].items()} == {
            "gate": (32, 48), "up": (32, 48), "down": (48, 32)}
        cfg = dict(hf.config.to_dict(), decoder_sparse_step=1, mlp_only_layers=[0])
        assert hf_lib.config_from_hf(cfg)[1] == config
        cfg["mlp_only_layers"] = []
        assert hf_lib.config_from_hf(cfg)[1].moe_layers is None
        # the Hub's spelling (Qwen3-30B-A3B's config.json): num_experts, rope_theta / rope_scaling, torch_dtype
        hub = json.loads((path / "config.json").read_text())
        hub["num_experts"] = hub.pop("num_local_experts")
        hub.update(rope_theta=hub.pop("rope_parameters")["rope_theta"], rope_scaling=None, max_window_layers=2,
                   torch_dtype="float32")
        assert hf_lib.config_from_hf(hub)[1] == config
        # a student of the dense layer alone is a dense model; of the sparse one, a mixture
        assert hf_lib.init_student_from(model, variables, (0,))[0].module.config.num_experts is None
        assert hf_lib.init_student_from(model, variables, (1,))[0].module.config.moe_layers == (True,)
    # expert 3's up projection of layer 1 is the transposed torch tensor, as saved
    up = hf.model.layers[1].mlp.experts.gate_up_proj[3, 16:].detach().numpy()  # [gate; up] fused in memory
    np.testing.assert_array_equal(np.asarray(mlp["experts_up"].value[3]), up.T)
    boxes = jax.tree.leaves(variables, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert all(isinstance(b, nn.LogicallyPartitioned) and set(b.names) <= set(LOGICAL_AXES) for b in boxes)
    assert config.num_params == hf.num_parameters() == sum(np.size(x) for x in jax.tree.leaves(variables))
    # each routing option changes the logits (the comparison with transformers is not vacuous)
    tokens, mask = _batch("right")
    ref = _hf_logits(hf, tokens, mask)
    changes = [dict(norm_topk_prob=not config.norm_topk_prob), dict(num_experts_per_tok=1)]
    if name == "mixtral":
        changes.append(dict(sliding_window=None))
    for change in changes:
        other = _logits(lm(dataclasses.replace(config, **change)), variables, tokens, mask)
        assert np.abs(other - ref)[mask].max() > 1e-3, change


def test_round_trip(family, tmp_path):
    name, hf, path, model, variables = family
    assert to_hf(model, variables, tmp_path) == name
    with safetensors.safe_open(path / "model.safetensors", "np") as saved, \
            safetensors.safe_open(tmp_path / "model.safetensors", "np") as written:
        assert set(written.keys()) == set(saved.keys()) - ({"lm_head.weight"} if hf.config.tie_word_embeddings else set())
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(back) is type(hf)
    tokens, mask = _batch("left")
    assert np.abs(_hf_logits(back, tokens, mask) - _hf_logits(hf, tokens, mask))[mask].max() < 1e-6
    again, again_vars = from_hf(tmp_path)
    assert again.module.config == model.module.config
    assert all(np.array_equal(np.asarray(a), np.asarray(b))
               for a, b in zip(jax.tree.leaves(again_vars), jax.tree.leaves(variables)))


@pytest.mark.parametrize("family", ["mixtral"], indirect=True)  # one compile of the generation loop is enough
def test_greedy_generation_equals_transformers(family):
    """The KV cache through the experts; Mixtral's window (5) is outgrown by the generation."""
    _, hf, _, model, variables = family
    prompt = np.random.RandomState(2).randint(0, V, (2, 5))
    with torch.no_grad():
        ref = hf.generate(torch.tensor(prompt), attention_mask=torch.ones(2, 5, dtype=torch.long),
                          do_sample=False, max_new_tokens=6, min_new_tokens=6, pad_token_id=0).numpy()
    out = sampling.generate(model.module.config, variables, prompt, rng=jax.random.PRNGKey(0), max_new_tokens=6,
                            temperature=0.0)
    np.testing.assert_array_equal(np.asarray(out.tokens), ref)


def _copy(path, tmp_path, edit):
    shutil.copytree(path, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    edit(cfg)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return tmp_path


def test_refusals(family, tmp_path):
    name, _, path, model, variables = family
    config = model.module.config
    bad = {
        "qwen3_moe": [(dict(mlp_only_layers=[1]), r"mlp_only_layers=\[1\] and decoder_sparse_step=2 leave no mixture"),
                      (dict(decoder_sparse_step=0), "decoder_sparse_step=0 is not implemented"),
                      (dict(num_experts=8), "num_experts=8 and num_local_experts=4 differ"),
                      (dict(num_local_experts=0), "num_experts=0 is not implemented"),
                      (dict(num_experts_per_tok=5), "num_experts_per_tok must be at most num_experts=4")],
        "mixtral": [(dict(hidden_act="gelu"), "hidden_act='gelu'"),
                    (dict(moe_intermediate_size=8), r"\['moe_intermediate_size'\] are not implemented")],
    }[name]
    for i, (edit, match) in enumerate(bad):
        with pytest.raises(ValueError, match=match):
            from_hf(_copy(path, tmp_path / str(i), lambda c, edit=edit: c.update(edit)))
    # a missing expert tensor is named
    with safetensors.safe_open(path / "model.safetensors", "np") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    gone = next(k for k in tensors if k.endswith(("experts.2.w3.weight", "experts.2.up_proj.weight")))  # up, expert 2
    del tensors[gone]
    shutil.copytree(path, tmp_path / "missing")
    hf_lib._write_safetensors(tmp_path / "missing" / "model.safetensors", tensors)
    with pytest.raises(ValueError, match=rf"missing tensor '{gone}' \(expected shape \(16, 32\)\)"):
        from_hf(tmp_path / "missing")
    # exports: the other MoE family, a dense family, a dense model as a MoE family
    other = {"qwen3_moe": "mixtral", "mixtral": "qwen3_moe"}[name]
    with pytest.raises(ValueError, match=f"not a '{other}' model"):
        to_hf(config, variables, tmp_path / "x", model_type=other)
    with pytest.raises(ValueError, match="not a 'qwen3' model: num_experts=4"):
        to_hf(config, variables, tmp_path / "x", model_type="qwen3")
    dense = dataclasses.replace(config, num_experts=None, num_experts_per_tok=None, moe_d_ff=None, moe_layers=None)
    with pytest.raises(ValueError, match=f"not a '{name}' model: num_experts=None"):
        to_hf(dense, variables, tmp_path / "x", model_type=name)
    if name == "mixtral":
        with pytest.raises(ValueError, match="norm_topk_prob=False"):
            to_hf(dataclasses.replace(config, norm_topk_prob=False), variables, tmp_path / "x")


def test_lmconfig_moe_errors():
    base = dict(vocab_size=16, d_model=8, num_layers=1, num_heads=2, d_ff=8, max_len=8)
    with pytest.raises(ValueError, match="num_experts=4 needs num_experts_per_tok"):
        LMConfig(**base, num_experts=4)
    with pytest.raises(ValueError, match="num_experts_per_tok=2 needs num_experts"):
        LMConfig(**base, num_experts_per_tok=2)
    with pytest.raises(ValueError, match="num_experts must be an integer >= 1"):
        LMConfig(**base, num_experts=0, num_experts_per_tok=1)
    with pytest.raises(ValueError, match="gated and bias-free: got mlp_gate=False"):
        LMConfig(**base, num_experts=2, num_experts_per_tok=1, mlp_gate=False)
    with pytest.raises(ValueError, match=r"moe_layers must be one bool per layer \(1\)"):
        LMConfig(**base, num_experts=2, num_experts_per_tok=1, moe_layers=(True, False))
    with pytest.raises(ValueError, match="has no mixture-of-experts layer"):
        LMConfig(**base, num_experts=2, num_experts_per_tok=1, moe_layers=(False,))


def _hf_router_outputs(hf, tokens, mask):
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    with torch.no_grad():
        out = hf(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask.astype(np.int64)),
                 position_ids=torch.tensor(positions), output_router_logits=True)
    return out.aux_loss.item(), [r.numpy().reshape(*tokens.shape, -1) for r in out.router_logits]


def test_load_balancing_loss_equals_transformers(family):
    """The sown router logits are transformers' (at real tokens), and load_balancing_loss of them is the
    model's ``aux_loss`` (``load_balancing_loss_func`` with the attention mask)."""
    name, hf, _, model, variables = family
    tokens, mask = _batch("left")
    aux, hf_router = _hf_router_outputs(hf, tokens, mask)
    features = jax.jit(lambda v, x: model.apply(v, x, train=False).features)
    router = np.asarray(features(variables, {"tokens": jnp.asarray(tokens), "mask": jnp.asarray(mask)})["router_logits"])
    assert router.shape == ({"qwen3_moe": 1, "mixtral": 2}[name], *tokens.shape, 4)  # the mixture layers only
    np.testing.assert_allclose(router[:, mask], np.stack(hf_router)[:, mask], atol=1e-5)
    config = model.module.config
    loss_fn = jax.jit(load_balancing_loss, static_argnums=(1, 2))
    np.testing.assert_allclose(float(loss_fn(router, config.num_experts, config.num_experts_per_tok, mask)), aux,
                               rtol=1e-5)
    # padding is excluded: the unmasked loss (every position) differs
    assert abs(float(loss_fn(router, 4, 2, None)) - aux) > 1e-4


def test_load_balancing_loss_function_equals_transformers():
    """On random logits, with and without a mask, one layer or three, top-1 and top-3."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    loss_fn = jax.jit(load_balancing_loss, static_argnums=(1, 2))  # one compile per case, not per operation
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 2, 5, 6)).astype(np.float32) * 2
    mask = np.ones((2, 5), bool)
    mask[0, :2] = False
    for layers, top_k, m in ((3, 2, mask), (3, 1, None), (1, 3, mask)):
        ref = load_balancing_loss_func(tuple(torch.tensor(x.reshape(10, 6)) for x in logits[:layers]), 6, top_k,
                                       None if m is None else torch.tensor(m.astype(np.int64)))
        ours = loss_fn(logits[:layers] if layers > 1 else logits[0], 6, top_k, m)
        np.testing.assert_allclose(float(ours), ref.item(), rtol=1e-6)
    # no real token: 0, not NaN (transformers divides by zero)
    assert float(loss_fn(logits, 6, 2, np.zeros((2, 5), bool))) == 0.0
    with pytest.raises(ValueError, match=r"num_experts=4\] or \[batch"):
        load_balancing_loss(logits, 4, 2)
    with pytest.raises(ValueError, match=r"mask must be \[batch, length\] = \(2, 5\), got shape \(5, 2\)"):
        load_balancing_loss(logits, 6, 2, mask.T)
    with pytest.raises(ValueError, match="top_k must be at most num_experts=6"):
        load_balancing_loss(logits, 6, 7)


def test_load_balancing_loss_ties_go_to_the_lowest_expert():
    """Equal probabilities are routed lowest expert index first (XLA's stable top-k): a NumPy reference of
    the formula with a stable sort. (torch.topk on CPU orders ties its own way: [0.3, 0.3, 0.3, 0.1] gives
    experts 1 and 2, so an exactly tied router may route differently from transformers.)"""
    logits = np.log(np.array([[[[3, 3, 3, 1], [1, 1, 8, 1]]]], np.float32))  # [1 layer, 1, 2 tokens, 4]
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    chosen = np.argsort(-probs, axis=-1, kind="stable")[..., :2]  # token 0 -> experts 0, 1; token 1 -> 2, 0
    routed = (chosen[..., None] == np.arange(4)).sum(-2)
    expected = 4 * np.sum(routed.reshape(-1, 4).mean(0) * probs.reshape(-1, 4).mean(0))
    np.testing.assert_allclose(float(jax.jit(load_balancing_loss, static_argnums=(1, 2))(logits, 4, 2)), expected,
                               rtol=1e-6)
    # another tie order (experts 1, 2 for token 0) would give another value: the order is what is tested
    assert abs(expected - 4 * np.sum(((routed.reshape(-1, 4) + [[-1, 0, 1, 0], [0, 0, 0, 0]]).mean(0))
                                     * probs.reshape(-1, 4).mean(0))) > 1e-3


def test_experts_sharded_over_the_mesh_give_the_same_logits():
    """lm_logical_rules on an 8-device (fsdp 4, tensor 2) mesh: each fsdp shard holds one whole expert, the
    experts' hidden units split over tensor; the sharded forward computes the single-device logits."""
    config = LMConfig(vocab_size=V, d_model=32, num_layers=1, num_heads=4, num_kv_heads=2, d_ff=48, max_len=16,
                      num_experts=4, num_experts_per_tok=2, moe_d_ff=16, qk_norm=True)
    model = lm(config)
    tokens, mask = _batch("right")
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), {"tokens": tokens})
    mesh = sharding.make_mesh({"fsdp": 4, "tensor": 2})
    params = sharding.unbox(variables)
    shardings = sharding.param_shardings(params, mesh, lm_logical_rules(),
                                         logical_specs=sharding.logical_partition_specs(variables))
    mlp = shardings["params"]["block_0"]["mlp"]
    P = jax.sharding.PartitionSpec
    assert mlp["experts_gate"].spec == P("fsdp", None, "tensor")
    assert mlp["experts_down"].spec == P("fsdp", "tensor", None)
    assert mlp["router"].spec == P(None, "fsdp")
    placed = sharding.shard_like(params, shardings)
    assert placed["params"]["block_0"]["mlp"]["experts_up"].addressable_shards[0].data.shape == (1, 32, 8)
    sharded = _logits(model, placed, tokens, mask)
    single = _logits(model, params, tokens, mask)
    assert np.abs(single).max() > 0.1  # not a degenerate model
    np.testing.assert_allclose(np.asarray(sharded), single, atol=1e-5)


def test_loaded_onto_the_mesh_expert_by_expert_equals_transformers(family):
    """``from_hf(path, mesh=)`` on a (data 2, fsdp 2, tensor 2) mesh: each fsdp shard reads its two experts'
    tensors only, the parameters equal the one-device load bitwise, the sharded logits transformers'."""
    name, hf, path, model, variables = family
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    sharded_model, sharded = from_hf(path, mesh=mesh, rules=lm_logical_rules())
    moe = sharding.unbox(sharded)["params"]["block_1"]["mlp"]["experts_up"]
    assert moe.sharding.spec == jax.sharding.PartitionSpec("fsdp", None, "tensor")
    assert moe.addressable_shards[0].data.shape[0] == 2  # of 4 experts
    for a, b in zip(jax.tree.leaves(sharding.unbox(sharded)), jax.tree.leaves(sharding.unbox(variables)), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for pad in ("right", "left"):
        tokens, mask = _batch(pad)
        got = _logits(sharded_model, sharded, tokens, mask)
        assert np.abs(got - _hf_logits(hf, tokens, mask))[mask].max() < 1e-4
