"""Hugging Face checkpoints loaded onto a mesh (``from_hf(path, mesh=, rules=)``): each parameter is made
shard by shard from the HF slice it comes from, placed as the rules say (not replicated), equals the
single-device load, and on the simulated 8-device (data 2 x fsdp 2 x tensor 2) mesh of tests/conftest.py the
logits equal transformers' and greedy generation gives transformers' tokens, for llama (GQA, untied), qwen2
(biases, tied), gemma2 (soft-caps, sliding layers) and gpt2 (``Conv1D``, q/k/v inside ``c_attn``)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from hypothesis import given
from hypothesis import strategies as st
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxkd import sharding
from jaxkd.models import from_hf, sampling, to_hf
from jaxkd.models import hf as hf_lib
from jaxkd.models.lm import lm_logical_rules
from tests.test_hf_models import (
    FAMILIES,
    NEW_FAMILIES,
    TOL,
    _batch,
    _hf_logits,
    _hf_model,
)

RULES = lm_logical_rules()
ON_MESH = {"llama": FAMILIES["llama_llama3"], "mistral": FAMILIES["mistral"], "qwen2": FAMILIES["qwen2"],
           "qwen3": FAMILIES["qwen3"], "gemma2": NEW_FAMILIES["gemma2"], "gemma3_text": NEW_FAMILIES["gemma3_text"],
           "gpt2": NEW_FAMILIES["gpt2"]}  # the mixtures of experts: tests/test_hf_moe.py

# lm_logical_rules by hand: vocab, heads, kv_heads, mlp -> tensor; embed -> fsdp; head_dim, norm, position whole.
EXPECTED_SPECS = {
    "embedding": P("tensor", "fsdp"), "head": P("fsdp", "tensor"), "position_embedding": P(None, "fsdp"),
    "query": P("fsdp", "tensor", None), "key": P("fsdp", "tensor", None), "value": P("fsdp", "tensor", None),
    "out": P("tensor", None, "fsdp"), "gate": P("fsdp", "tensor"), "up": P("fsdp", "tensor"),
    "down": P("tensor", "fsdp"), "query_bias": P("tensor", None), "key_bias": P("tensor", None),
    "value_bias": P("tensor", None), "out_bias": P("fsdp"), "up_bias": P("tensor"), "down_bias": P("fsdp"),
    "scale": P(None), "bias": P(None),
}


def _mesh():
    return sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})


def _build(name):
    config_name, extra = ON_MESH[name]
    if name in ("llama", "mistral", "qwen2", "qwen3"):  # as tests/test_hf_models.py's family fixture
        return _hf_model(config_name, extra)
    torch.manual_seed(0)  # as tests/test_hf_models.py's new_family fixture
    config = getattr(transformers, config_name)(**extra)
    config._attn_implementation = "eager"
    hf = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return hf


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """name -> (transformers model, its checkpoint directory)."""
    out = {}
    for name in ON_MESH:
        hf = _build(name)
        path = tmp_path_factory.mktemp(name)
        hf.save_pretrained(path, safe_serialization=True)
        out[name] = hf, path
    return out


@pytest.fixture(scope="module", params=sorted(ON_MESH))
def loaded(request, checkpoints):
    """(name, transformers model, checkpoint dir, mesh, jaxkd model, variables on the mesh)."""
    hf, path = checkpoints[request.param]
    mesh = _mesh()
    model, variables = from_hf(path, mesh=mesh, rules=RULES)
    return request.param, hf, path, mesh, model, variables


def _leaves(variables):
    return [(sharding.path_str(p), x) for p, x in jax.tree_util.tree_leaves_with_path(sharding.unbox(variables))]


def test_each_parameter_is_placed_by_the_rules_and_equals_the_single_device_load(loaded):
    _, _, path, mesh, _, variables = loaded
    _, single = from_hf(path)
    single = dict(_leaves(single))
    split = 0
    for key, x in _leaves(variables):
        spec = EXPECTED_SPECS[key.split("/")[-1]]
        assert x.sharding == NamedSharding(mesh, spec), key
        ways = int(np.prod([mesh.shape[axis] for axis in spec if axis is not None]))
        assert x.addressable_shards[0].data.size * ways == x.size, key
        if x.ndim >= 2 and not key.endswith("_bias"):  # every matrix is split (positions: 2 ways, the rest 4)
            assert ways >= 2 and (ways == 4 or key.endswith("position_embedding")), key
            split += 1
        np.testing.assert_array_equal(np.asarray(x), np.asarray(single[key]), err_msg=key)
        assert x.dtype == single[key].dtype == jnp.float32
    assert split >= 8


def test_logits_on_the_mesh_equal_transformers(loaded):
    name, hf, _, _, model, variables = loaded
    logits = jax.jit(lambda v, t, m: model.apply(v, {"tokens": t, "mask": m}, train=False).logits)
    for pad in ("right", "left"):
        tokens, mask = _batch(pad)
        delta = np.abs(np.asarray(logits(variables, tokens, mask)) - _hf_logits(hf, tokens, mask))[mask].max()
        print(f"{name} on the mesh, {pad}-padded: max |dlogit| = {delta:.2e}")
        assert delta < TOL


def test_greedy_generation_on_the_mesh_equals_transformers(loaded):
    _, hf, _, _, model, variables = loaded
    prompt = np.random.RandomState(2).randint(0, 128, (2, 5))
    with torch.no_grad():
        ref = hf.generate(torch.tensor(prompt), attention_mask=torch.ones(2, 5, dtype=torch.long),
                          do_sample=False, max_new_tokens=6, min_new_tokens=6, pad_token_id=0).numpy()
    generate = jax.jit(sampling.generate, static_argnames=("config", "max_new_tokens", "temperature"))
    out = generate(model.module.config, sharding.unbox(variables), prompt, rng=jax.random.PRNGKey(0),
                   max_new_tokens=6, temperature=0.0)
    np.testing.assert_array_equal(np.asarray(out.tokens), ref)


def test_the_sharded_student_exports_to_what_transformers_loads(loaded, tmp_path):
    """``to_hf`` of variables that live on the mesh: transformers loads them with the checkpoint's logits."""
    name, hf, _, _, model, variables = loaded
    assert to_hf(model, variables, tmp_path) == hf.config.model_type
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    for (key, a), b in zip(sorted(hf.state_dict().items()), [v for _, v in sorted(back.state_dict().items())], strict=True):
        assert torch.equal(a, b), key  # the very weights
    tokens, mask = _batch("right")  # (transformers' sdpa and eager attention differ by ~1e-6)
    assert np.abs(_hf_logits(back, tokens, mask) - _hf_logits(hf, tokens, mask))[mask].max() < 1e-5


def _recording(monkeypatch):
    """Every ``_Tensors.read`` as ``(tensor name, HF slices, bytes copied out)``."""
    reads = []
    original = hf_lib._Tensors.read

    def read(self, name, index, view=None):
        block = original(self, name, index, view)
        reads.append((name, tuple((s.start, s.stop) for s in index), block.nbytes))
        return block

    monkeypatch.setattr(hf_lib._Tensors, "read", read)
    return reads


def test_only_the_shards_are_read(checkpoints, monkeypatch):
    """Each distinct block a device holds is read once, from its own HF rows and columns (llama: transposes
    and head reshapes): no matrix is read whole, and the bytes read are the shards' (replicas over the data
    axis share a read)."""
    hf, path = checkpoints["llama"]
    reads = _recording(monkeypatch)
    _, again = from_hf(path, mesh=_mesh(), rules=RULES)
    params = sharding.unbox(again)["params"]
    # The bytes of the distinct blocks the devices hold, from the shardings alone.
    expected = 0
    for x in jax.tree.leaves(params):
        blocks = {tuple((s.start, s.stop) for s in idx) for idx in x.sharding.devices_indices_map(x.shape).values()}
        expected += len(blocks) * x.addressable_shards[0].data.nbytes
    assert sum(n for _, _, n in reads) == expected
    checkpoint = sum(p.numel() * 4 for p in hf.parameters())
    assert expected == checkpoint  # every tensor read once in all: quarters of the matrices, the norms whole
    # q_proj [heads * head_dim, d] = [32, 32]: jaxkd's [d, heads, head_dim] block (fsdp half i of d, tensor half j
    # of the 4 heads) is HF rows j*16:(j+1)*16 (two heads of 8), columns i*16:(i+1)*16.
    q = sorted(index for n, index, _ in reads if n == "model.layers.0.self_attn.q_proj.weight")
    assert q == sorted(((j * 16, (j + 1) * 16), (i * 16, (i + 1) * 16)) for i in range(2) for j in range(2))
    sizes = {n: p.numel() * 4 for n, p in hf.named_parameters()}
    assert all(nbytes * 4 == sizes[n] for n, _, nbytes in reads if n.endswith("proj.weight"))


def test_gpt2_qkv_blocks_come_from_their_third_of_c_attn(checkpoints, monkeypatch):
    _, path = checkpoints["gpt2"]
    reads = _recording(monkeypatch)
    from_hf(path, mesh=_mesh(), rules=RULES)
    # c_attn [d, 3 * heads * head_dim] = [32, 96]; value (third 2) tensor half j: columns 64 + 16 j : 64 + 16 (j + 1)
    cols = {index[1] for n, index, _ in reads if n == "transformer.h.0.attn.c_attn.weight"}
    assert cols == {(k * 32 + j * 16, k * 32 + (j + 1) * 16) for k in range(3) for j in range(2)}


def _write(path, tensors):
    hf_lib._write_safetensors(path / "model.safetensors", tensors)
    return hf_lib._Tensors(path)


def test_stacked_experts_read_only_the_experts_and_rows_of_their_block(tmp_path, monkeypatch):
    """A weight-map entry naming a tuple of tensors is ``np.stack([to_jax(t) for t in names])``: a block of
    experts reads those experts' tensors only, and only the HF slice of each that the block needs."""
    rng = np.random.default_rng(0)
    experts, out, d, heads, head_dim = 4, 6, 4, 2, 3
    up = [rng.normal(size=(out, d)).astype(np.float32) for _ in range(experts)]  # torch Linear [out, in]
    tensors = _write(tmp_path, {f"experts.{e}.up_proj.weight": w for e, w in enumerate(up)})
    names = tuple(f"experts.{e}.up_proj.weight" for e in range(experts))
    reads = _recording(monkeypatch)
    # np.transpose: jaxkd [experts, in, out]; experts 2..3, input rows 0..1
    block = hf_lib._read_entry(tensors, names, np.transpose, (experts, d, out), (slice(2, 4), slice(0, 2), slice(None)))
    np.testing.assert_array_equal(block, np.stack([w.T for w in up])[2:4, 0:2])
    assert reads == [(names[2], ((0, 6), (0, 2)), 6 * 2 * 4), (names[3], ((0, 6), (0, 2)), 6 * 2 * 4)]
    # a head split: jaxkd [experts, in, heads, head_dim] of [heads * head_dim, in]; expert 1, head 1
    reads.clear()
    split = hf_lib._strided((d, heads, head_dim), (1, 0, 0), (1, head_dim, 1))
    block = hf_lib._read_entry(tensors, names, split, (experts, d, heads, head_dim), (slice(1, 2), slice(None),
                                                                                      slice(1, 2), slice(None)))
    np.testing.assert_array_equal(block, np.stack([w.T.reshape(d, heads, head_dim) for w in up])[1:2, :, 1:2])
    assert reads == [(names[1], ((3, 6), (0, 4)), 3 * 4 * 4)]
    # onto 8 devices, experts over fsdp: the whole array is the stack
    mesh = sharding.make_mesh({"fsdp": 4, "tensor": 2})
    reads.clear()
    x = hf_lib._sharded_entry(tensors, names, np.transpose, (experts, d, out), np.dtype(np.float32),
                              NamedSharding(mesh, P("fsdp", "tensor")))
    np.testing.assert_array_equal(np.asarray(x), np.stack([w.T for w in up]))
    assert x.addressable_shards[0].data.shape == (1, 2, out) and len(reads) == 8
    assert sum(n for _, _, n in reads) == sum(w.nbytes for w in up)


def test_bf16_on_the_mesh_stays_bf16_and_default_rules(tmp_path):
    hf = _hf_model(*FAMILIES["llama_llama3"]).to(torch.bfloat16)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    mesh = sharding.make_mesh({"fsdp": 8})
    _, variables = from_hf(tmp_path, mesh=mesh)  # default rules: big_vision's fsdp rule (as a train state's)
    embedding = sharding.unbox(variables)["params"]["embedding"]
    assert embedding.dtype == jnp.bfloat16
    assert embedding.sharding == NamedSharding(mesh, P("fsdp"))  # [128, 32]: the larger axis, 16 rows each
    np.testing.assert_array_equal(np.asarray(embedding).view(np.uint16),
                                  hf.model.embed_tokens.weight.detach().view(torch.int16).numpy().view(np.uint16))
    _, as32 = from_hf(tmp_path, dtype=jnp.float32, mesh=mesh, rules=RULES)
    q = sharding.unbox(as32)["params"]["block_0"]["attention"]["query"]
    assert q.dtype == jnp.float32 and q.sharding.spec == P("fsdp", "tensor", None)  # the tensor axis has size 1
    assert q.addressable_shards[0].data.shape == (4, 4, 8)
    ref = hf.model.layers[0].self_attn.q_proj.weight.detach().float().numpy().T.reshape(32, 4, 8)
    np.testing.assert_array_equal(np.asarray(q), ref)


def test_mesh_errors(checkpoints):
    _, path = checkpoints["qwen2"]
    mesh = _mesh()
    with pytest.raises(ValueError, match="rules given without a mesh"):
        from_hf(path, rules=RULES)
    with pytest.raises(ValueError, match="mesh must be a jax.sharding.Mesh"):
        from_hf(path, mesh={"fsdp": 8})
    with pytest.raises(ValueError, match="rules must be a jaxkd.sharding.Rules"):
        from_hf(path, mesh=mesh, rules=(("embed", "fsdp"),))
    # 2 KV heads cannot split 8 ways: named by the sharding rules, before anything is read
    with pytest.raises(ValueError, match=r"key: shape \(32, 2, 8\) cannot take spec"):
        from_hf(path, mesh=sharding.make_mesh({"tensor": 8}), rules=RULES)


def _block(draw, shape):
    index = []
    for n in shape:
        start = draw(st.integers(0, n - 1))
        index.append(slice(start, draw(st.integers(start + 1, n))))
    return tuple(index)


@given(st.data())
def test_strided_layouts_read_any_block_as_numpy_reshapes_it(data):
    """Any block, also one cutting ``head_dim`` (the bounding rows are read, then picked), equals the block
    of the whole tensor transformed the direct way (transpose and reshape, GPT-2's column thirds)."""
    d, heads, head_dim = 6, 4, 3
    w = np.arange(heads * head_dim * d, dtype=np.float32).reshape(heads * head_dim, d)  # torch [out, in]
    cases = [
        (hf_lib._strided((d, heads, head_dim), (1, 0, 0), (1, head_dim, 1)), w, w.T.reshape(d, heads, head_dim)),
        (hf_lib._strided((heads, head_dim, d), (1, 1, 0), (head_dim, 1, 1)), w.T, w.reshape(heads, head_dim, d)),
        (hf_lib._strided((d, 2, head_dim), (0, 1, 1), (1, head_dim, 1), (0, 2 * head_dim)), w.T,
         w.T[:, 2 * head_dim:4 * head_dim].reshape(d, 2, head_dim)),
    ]
    for layout, hf_tensor, reference in cases:
        index = _block(data.draw, reference.shape)
        np.testing.assert_array_equal(layout.read(hf_tensor.__getitem__, index), reference[index])
        rows = layout.hf_block(index)
        assert all(0 <= s.start < s.stop <= n for s, n in zip(rows, hf_tensor.shape))
