"""LoRA participants (jaxkd.models.lora, Participant(trainable=...)) and int8 weight-only teachers
(jaxkd.models.quantize), both through qwix: values against NumPy formulas and float64 finite differences."""

import functools

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxkd
from jaxkd import methods
from jaxkd.batch import TOKEN_NORMALIZER, token_normalizer
from jaxkd.checkpoint import Checkpointer
from jaxkd.models import from_hf, from_linen, to_hf
from jaxkd.models import lm as lm_models
from jaxkd.models.lora import ADAPTERS, init_lora, lora, merge_lora
from jaxkd.models.quantize import quantize_int8
from tests.test_loss_contract import central_differences

# qwix 0.1.8 checks for flax's removed nnx.VariableState alias on every weight it looks up.
pytestmark = pytest.mark.filterwarnings("ignore:'VariableState' was removed:DeprecationWarning")

V, B, T = 16, 2, 8
KEYS = ("tokens", "mask")
# Untied head, so that every projection kind (attention, MLP, head) is adapted / quantized.
CFG = lm_models.LMConfig(vocab_size=V, d_model=16, num_layers=1, num_heads=2, d_ff=32, max_len=T,
                         tie_embeddings=False)
TARGETS = ".*attention/(query|value)|.*mlp/down|head"


def lm_batch(seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, V, size=(B, T)).astype(np.int32)
    mask = np.arange(T)[None, :] < np.array([[T], [5]])
    return {"tokens": tokens, "mask": mask, TOKEN_NORMALIZER: token_normalizer(mask[:, 1:] & mask[:, :-1])}


BATCH = lm_batch()
X = {k: BATCH[k] for k in KEYS}
BASE = lm_models.lm(CFG)
BASE_VARS = jaxkd.sharding.unbox(BASE.init(jax.random.PRNGKey(3), X))
LORA = lora(BASE, targets=TARGETS, rank=2, alpha=6.0)


@functools.cache
def _jitted_logits(model):
    return jax.jit(lambda v, x: model.apply(v, x, train=False).logits)


def logits(model, variables, x=X):
    """One compiled forward pass per model (the tests call several models on several variables)."""
    return np.asarray(_jitted_logits(model)(variables, x))


def with_random_adapters(variables, seed=1):
    """Adapters with B != 0 (init_lora's B = 0 would make every adapter a no-op)."""
    flat = jax.tree_util.tree_flatten_with_path(variables)[0]
    rng = np.random.default_rng(seed)
    leaves = [jnp.asarray(rng.normal(scale=0.3, size=v.shape), v.dtype) if "_lora_" in jax.tree_util.keystr(p) else v
              for p, v in flat]
    return jax.tree.unflatten(jax.tree.structure(variables), leaves)


@pytest.fixture(scope="module")
def lora_vars():
    return init_lora(LORA, BASE_VARS, jax.random.PRNGKey(5), X)


# ----- LoRA: the adapted matmul, its start, its merge and export -----


def test_adapters_sit_on_the_targeted_weights_only_and_start_as_the_base_model(lora_vars):
    paths = {jax.tree_util.keystr(p, simple=True, separator="/") for p, _ in
             jax.tree_util.tree_flatten_with_path(lora_vars["params"])[0]}
    assert {p for p in paths if "_lora_" in p} == {
        f"{w}_lora_{ab}" for w in ("block_0/attention/query", "block_0/attention/value", "block_0/mlp/down", "head")
        for ab in "ab"}
    p = lora_vars["params"]
    assert p["block_0"]["attention"]["query_lora_a"].shape == (16, 2)       # A over the contracted axis d
    assert p["block_0"]["attention"]["query_lora_b"].shape == (2, 2, 8)     # B over the heads and head_dim
    assert not np.any(np.asarray(p["head_lora_b"]))                         # B = 0
    np.testing.assert_array_equal(logits(LORA, lora_vars), logits(BASE, BASE_VARS))


def test_lora_matmul_and_gradients_against_numpy_and_float64_finite_differences():
    # One Dense-like einsum: y = x W + (alpha / r) x A B (Hu et al., 2021), in float64.
    class Linear(nn.Module):
        @nn.compact
        def __call__(self, x, train=False):
            w = self.param("kernel", nn.initializers.normal(1.0), (4, 3), jnp.float64)
            return jnp.einsum("bi,io->bo", x, w)

    rank, alpha = 2, 3.0
    with jax.enable_x64(True):
        x = np.random.default_rng(0).normal(size=(5, 4))
        model = lora(from_linen(Linear()), targets="kernel", rank=rank, alpha=alpha)
        base = jaxkd.sharding.unbox(Linear().init(jax.random.PRNGKey(0), x))
        variables = with_random_adapters(init_lora(model, base, jax.random.PRNGKey(1), x))
        p = jax.tree.map(np.asarray, variables["params"])
        assert p["kernel_lora_a"].dtype == np.float64
        expected = x @ p["kernel"] + alpha / rank * (x @ p["kernel_lora_a"]) @ p["kernel_lora_b"]
        np.testing.assert_allclose(model.apply(variables, x, train=False).logits, expected, rtol=1e-12)

        def loss(a, b):
            params = {**variables["params"], "kernel_lora_a": a, "kernel_lora_b": b}
            return jnp.sum(jnp.sin(model.apply({"params": params}, x, train=False).logits))

        ga, gb = jax.jit(jax.grad(loss, argnums=(0, 1)))(p["kernel_lora_a"], p["kernel_lora_b"])
        np.testing.assert_allclose(ga, central_differences(lambda a: loss(a, p["kernel_lora_b"]), p["kernel_lora_a"]),
                                   rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(gb, central_differences(lambda b: loss(p["kernel_lora_a"], b), p["kernel_lora_b"]),
                                   rtol=1e-6, atol=1e-9)


def test_merge_folds_the_adapters_in_and_exports_a_plain_model(lora_vars, tmp_path):
    trained = with_random_adapters(lora_vars)
    adapted = logits(LORA, trained)
    assert np.abs(adapted - logits(BASE, BASE_VARS)).max() > 1e-2  # the adapters do something
    model, merged = merge_lora(LORA, trained)
    assert model is BASE
    assert jax.tree.structure(merged) == jax.tree.structure(BASE_VARS)
    # The merged query, from the formula in NumPy: W + alpha / r · A B, A [d, r], B [r, H, hd].
    p = jax.tree.map(np.asarray, trained["params"]["block_0"]["attention"])
    np.testing.assert_allclose(merged["params"]["block_0"]["attention"]["query"],
                               p["query"] + 3.0 * np.einsum("dr,rhk->dhk", p["query_lora_a"], p["query_lora_b"]),
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(logits(BASE, merged), adapted, atol=1e-5)
    with pytest.raises(ValueError, match="merge_lora"):
        to_hf(LORA, trained, tmp_path / "unmerged")
    to_hf(model, merged, tmp_path / "hf")
    loaded, loaded_vars = from_hf(tmp_path / "hf")
    np.testing.assert_allclose(logits(loaded, jaxkd.sharding.unbox(loaded_vars)), adapted, atol=1e-5)


def test_targets_and_trainable_that_match_nothing_list_the_parameter_paths(lora_vars):
    with pytest.raises(ValueError, match=r"match no weight.*'block_0/attention/query', .*'head'"):
        lora(BASE, targets=".*attention/qurey", rank=2, alpha=1.0).init(jax.random.PRNGKey(0), X)
    with pytest.raises(ValueError, match="only weights whose contracted axes come first"):
        # A weight [d, v] read as "bv,dv->bd" contracts its last axis: merge_lora could not fold A·B back.
        class Transposed(nn.Module):
            @nn.compact
            def __call__(self, x, train=False):
                return jnp.einsum("bv,dv->bd", x, self.param("w", nn.initializers.ones, (3, 4)))
        lora(from_linen(Transposed()), targets="w", rank=1, alpha=1.0).init(jax.random.PRNGKey(0), jnp.ones((2, 4)))
    with pytest.raises(ValueError, match="rank must be an integer >= 1"):
        lora(BASE, targets="head", rank=0, alpha=1.0)
    with pytest.raises(ValueError, match=r"missing parameter 'head'"):
        init_lora(LORA, {"params": {k: v for k, v in BASE_VARS["params"].items() if k != "head"}},
                  jax.random.PRNGKey(0), X)
    student = jaxkd.Participant(LORA, lora_vars, input=KEYS, trainable=".*_lora_c")
    with pytest.raises(ValueError, match=r"trainable='\.\*_lora_c' matches none.*'head_lora_b'"):
        jaxkd.create(participants={"student": student}, method=methods.lm_ce(), tx=optax.sgd(0.1),
                     sample_batch=BATCH, rng=jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="frozen"):
        jaxkd.Participant(LORA, lora_vars, trains=False, trainable=ADAPTERS)


# ----- training the adapters only, with an int8 teacher -----


# d_model 64: each weight's float32 scales (one per output channel) add 4 / fan_in bytes per weight to its one.
TEACHER_CFG = lm_models.LMConfig(vocab_size=V, d_model=64, num_layers=1, num_heads=2, d_ff=128, max_len=T,
                                 tie_embeddings=False)


@pytest.fixture(scope="module")
def int8_teacher():
    model = lm_models.lm(TEACHER_CFG)
    variables = jaxkd.sharding.unbox(model.init(jax.random.PRNGKey(11), X))
    return model, variables, quantize_int8(model, variables, X)


def adapter_state(lora_vars, int8_teacher, tx):
    _, _, (teacher_model, teacher_vars) = int8_teacher
    parts = {"student": jaxkd.Participant(LORA, lora_vars, input=KEYS, trainable=ADAPTERS),
             "teacher": jaxkd.participants.teacher(teacher_model, teacher_vars, input=KEYS)}
    return jaxkd.create(participants=parts, method=methods.lm_ce() + methods.token_kd(), tx=tx, sample_batch=BATCH,
                        rng=jax.random.PRNGKey(0))


def test_only_the_adapters_train_by_their_gradient_and_the_state_checkpoints(lora_vars, int8_teacher, tmp_path):
    lr = 0.1
    start = with_random_adapters(lora_vars)  # B != 0, so that A has a gradient too
    state = adapter_state(start, int8_teacher, optax.sgd(lr, momentum=0.9))
    # A momentum buffer for the adapters only, nothing for the 9x larger base.
    adapters = {tuple(k.key for k in p): v for p, v in jax.tree_util.tree_flatten_with_path(start["params"])[0]
                if "_lora_" in jax.tree_util.keystr(p)}
    assert sum(int(np.size(x)) for x in jax.tree.leaves(state.opt_state)) == sum(
        int(np.size(v)) for v in adapters.values())

    # The gradient by another route: the loss as a function of the adapters alone, the base a constant.
    teacher_model, teacher_vars = int8_teacher[2]
    teacher_out = teacher_model.apply(teacher_vars, X, train=False)
    method = state.method

    def loss_in_adapters(adapters):
        params = flax.traverse_util.flatten_dict(start["params"])
        params.update(adapters)
        out = LORA.apply({"params": flax.traverse_util.unflatten_dict(params)}, X, train=True)
        inputs = jaxkd.methods.base.LossInputs(
            outputs={"student": out, "teacher": teacher_out}, batch=BATCH, step=jnp.zeros((), jnp.int32),
            variables={}, participants=state.participants, label_key=state.label_key)
        return method.loss(state.method_vars, inputs, jax.random.PRNGKey(0))[0]

    grads = jax.jit(jax.grad(loss_in_adapters))(adapters)
    before = jax.tree.map(np.asarray, state.student.params)
    state, _ = jaxkd.make_train_step()(state, BATCH)
    after = flax.traverse_util.flatten_dict(jax.tree.map(np.asarray, state.student.params))
    for key, old in flax.traverse_util.flatten_dict(before).items():
        if key in adapters:  # the first momentum step is plain SGD: -lr · g
            np.testing.assert_allclose(after[key], old - lr * np.asarray(grads[key]), rtol=1e-5, atol=1e-6,
                                       err_msg=str(key))
        else:
            assert after[key].tobytes() == old.tobytes(), f"base weight {key} changed"
    # The run's checkpoint holds the reshaped optimizer state (moments for the adapters only) and gives it back.
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, state.run_tree())
        restored = ckpt.restore(jax.tree.map(jnp.zeros_like, state.run_tree())).tree
    assert jax.tree.structure(restored) == jax.tree.structure(state.run_tree())
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state.run_tree())):
        np.testing.assert_array_equal(a, b)


def test_on_a_mesh_adapters_and_their_optimizer_state_shard_like_their_weights(lora_vars, int8_teacher):
    # The conftest gives 8 host devices. B [r, H, hd] carries the query's (heads, head_dim) axes: heads over tensor.
    mesh = jaxkd.sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    rules = lm_models.lm_logical_rules()
    _, _, (teacher_model, teacher_vars) = int8_teacher
    parts = {"student": jaxkd.Participant(LORA, lora_vars, input=KEYS, trainable=ADAPTERS, rules=rules),
             "teacher": jaxkd.participants.teacher(teacher_model, teacher_vars, input=KEYS, rules=rules)}
    batch = {k: np.concatenate([v] * 2) for k, v in BATCH.items()}  # 4 rows: the data axes split them
    state = jaxkd.create(participants=parts, method=methods.lm_ce() + methods.token_kd(),
                         tx=optax.sgd(0.1, momentum=0.9), sample_batch=batch, rng=jax.random.PRNGKey(0), mesh=mesh)
    spec = lambda x: tuple(x.sharding.spec)
    attention = state.student.params["block_0"]["attention"]
    assert spec(attention["query"]) == ("fsdp", "tensor", None)
    assert spec(attention["query_lora_a"]) == ("fsdp", None)
    assert spec(attention["query_lora_b"]) == (None, "tensor", None)
    momentum = [x for x in jax.tree.leaves(state.opt_state) if x.shape == attention["query_lora_b"].shape]
    assert momentum and all(spec(x) == (None, "tensor", None) for x in momentum)
    assert spec(state.frozen["teacher"].params["block_0"]["mlp"]["up"].array.qvalue) == ("fsdp", "tensor")


# ----- int8 weight-only teacher -----


# Each projection's contracted (input) axes: qwix's scales are per output channel, over these; WRONG reduces over
# the output axes instead (one scale per input row), the mistake the KL bound below must catch.
CONTRACTED = {"query": (0,), "key": (0,), "value": (0,), "out": (0, 1), "gate": (0,), "up": (0,), "down": (0,),
              "head": (0,)}
WRONG = {"query": (1, 2), "key": (1, 2), "value": (1, 2), "out": (2,), "gate": (1,), "up": (1,), "down": (1,),
         "head": (1,)}


def dequantized(variables, axes):
    """``variables`` with each matmul weight replaced by its symmetric absmax int8 round trip in NumPy, one
    scale per slice over ``axes[name]``: ``s = max |W| / 127.5`` (qwix's bound: the top bucket is
    ``[126.5, 127.5]``), ``W -> clip(round(W / s), -127, 127) · s``."""
    def visit(tree):
        out = {}
        for k, v in tree.items():
            if isinstance(v, dict):
                out[k] = visit(v)
            elif k in axes:
                w = np.asarray(v, np.float64)
                scale = np.max(np.abs(w), axis=axes[k], keepdims=True) / 127.5
                out[k] = (np.clip(np.round(w / scale), -127, 127) * scale).astype(np.float32)
            else:
                out[k] = v
        return out
    return {"params": visit(variables["params"])}


def mean_kl(p_logits, q_logits):
    lp, lq = (jax.nn.log_softmax(jnp.asarray(z, jnp.float32)) for z in (p_logits, q_logits))
    return float(jnp.mean(jnp.sum(jnp.exp(lp) * (lp - lq), axis=-1)))


def skewed(variables, low=1e-3):
    """The teacher with residual-stream feature ``j`` scaled by ``c_j`` (``geomspace(low, 1)``: embedding columns
    and the output channels of ``out`` and ``down``) and the norm gains by ``1 / c_j``: output channels of very
    different sizes, as trained LMs have, that a per-output-channel scale keeps and a per-input-row one loses."""
    v = jax.tree.map(np.array, variables)
    p, block = v["params"], v["params"]["block_0"]
    c = np.geomspace(low, 1.0, TEACHER_CFG.d_model).astype(np.float32)
    p["embedding"] *= c
    block["attention"]["out"] *= c
    block["mlp"]["down"] *= c
    for norm in (block["attention_norm"], block["mlp_norm"], p["final_norm"]):
        norm["scale"] /= c
    return v


def test_int8_weights_are_per_channel_absmax_and_the_model_runs_on_them(int8_teacher):
    model, variables, (qmodel, qvars) = int8_teacher
    flat = flax.traverse_util.flatten_dict(variables["params"])
    quantized = flax.traverse_util.flatten_dict(qvars["params"])
    dequant = {}
    for key, w in flat.items():
        if key[-1] not in CONTRACTED:
            np.testing.assert_array_equal(quantized[key], w)  # embedding and norms untouched
            dequant[key] = w
            continue
        q = quantized[key].array
        w = np.asarray(w)
        expected_scale = np.max(np.abs(w), axis=CONTRACTED[key[-1]], keepdims=True) / 127.5
        assert q.qvalue.dtype == jnp.int8 and q.scale.shape == expected_scale.shape, key
        np.testing.assert_allclose(q.scale, expected_scale, rtol=1e-6)
        # Rounded to the nearest step (a value at exactly ±127.5 steps may go either way).
        assert np.all(np.abs(np.asarray(q.qvalue, np.float64) - w / np.asarray(q.scale)) <= 0.5 + 1e-4), key
        dequant[key] = np.asarray(q.qvalue, np.float32) * np.asarray(q.scale)
    np.testing.assert_allclose(logits(qmodel, qvars),
                               logits(model, {"params": flax.traverse_util.unflatten_dict(dequant)}), atol=1e-5)
    # A tied output projection reads embedding.T, here of the embedding's own shape [16, 16]: qwix alone would
    # take it for the embedding and quantize the table transposed; it stays float32, used as it is.
    tied = lm_models.lm(lm_models.LMConfig(vocab_size=16, d_model=16, num_layers=1, num_heads=2, d_ff=32, max_len=T))
    tied_vars = jaxkd.sharding.unbox(tied.init(jax.random.PRNGKey(2), X))
    tied_q, tied_qvars = quantize_int8(tied, tied_vars, X)
    np.testing.assert_array_equal(tied_qvars["params"]["embedding"], tied_vars["params"]["embedding"])
    assert mean_kl(logits(tied, tied_vars), logits(tied_q, tied_qvars)) < 1e-3


def test_int8_teacher_stays_close_and_halves_bfloat16_bytes(int8_teacher):
    model, variables, (qmodel, qvars) = int8_teacher
    full = logits(model, variables)
    quant = logits(qmodel, qvars)
    assert mean_kl(full, quant) < 1e-3 and np.abs(full - quant).max() < 0.1
    np.testing.assert_allclose(quant, logits(model, dequantized(variables, CONTRACTED)), atol=0.05)
    # Skewed output channels: still within the bound per output channel, 10x past it per input row.
    teacher = skewed(variables)
    full = logits(model, teacher)
    assert mean_kl(full, logits(*quantize_int8(model, teacher, X))) < 1e-3
    assert mean_kl(full, logits(model, dequantized(teacher, WRONG))) > 1e-2
    nbytes = lambda tree: sum(x.nbytes for x in jax.tree.leaves(tree))
    bf16 = jaxkd.participants.cast_params(variables, jnp.bfloat16)
    weights = lambda tree: [v for k, v in flax.traverse_util.flatten_dict(tree["params"]).items() if k[-1] in CONTRACTED]
    # The matmul weights: int8 plus a float32 scale per output channel, against bfloat16.
    assert nbytes(weights(qvars)) <= 0.55 * nbytes(weights(bf16)), (nbytes(weights(qvars)), nbytes(weights(bf16)))
    # The whole tree: the embedding and norm gains stay float32.
    assert nbytes(qvars) <= 0.6 * nbytes(bf16) and nbytes(qvars) <= 0.3 * nbytes(variables)


def test_lm_experiment_keys_are_checked():
    from experiments import config as config_lib
    from experiments.lm_distill import LMExperiment

    config_lib.validate(LMExperiment(teacher_int8=True, student_init_steps=5,
                                     student_lora={"targets": ".*attention/query", "rank": 2, "alpha": 4.0}))
    with pytest.raises(ValueError, match="set student_init_steps > 0"):
        config_lib.validate(LMExperiment(student_lora={"targets": "head", "rank": 2, "alpha": 4.0}))
    with pytest.raises(ValueError, match=r"exactly the keys \['alpha', 'rank', 'targets'\], got \['targets'\]"):
        config_lib.validate(LMExperiment(student_init_steps=5, student_lora={"targets": "head"}))
    with pytest.raises(ValueError, match="teacher_int8 must be True or False"):
        config_lib.validate(LMExperiment(teacher_int8=1))
