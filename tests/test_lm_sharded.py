"""Teacher and student LMs on one simulated 8-device mesh (data 2 × fsdp 2 × tensor 2): the bf16 teacher is
sharded by its logical axis names like the student (not replicated), and the sharded step computes the
single-device step's loss and update."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxkd
from jaxkd import methods, sharding
from jaxkd.batch import TOKEN_NORMALIZER as TOKEN_NORMALIZER_KEY, token_normalizer
from jaxkd.models import lm as lm_models
from jaxkd.participants import student, teacher

V, B, T = 16, 8, 8
RULES = lm_models.lm_logical_rules()
STUDENT = lm_models.lm(lm_models.LMConfig(vocab_size=V, d_model=16, num_layers=1, num_heads=2, d_ff=32, max_len=T))
TEACHER_CFG = lm_models.LMConfig(vocab_size=V, d_model=32, num_layers=1, num_heads=2, d_ff=64, max_len=T,
                                 dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
TEACHER = lm_models.lm(TEACHER_CFG)
rng = np.random.default_rng(0)
MASK = np.arange(T)[None] < rng.integers(2, T + 1, size=(B, 1))
BATCH = {"tokens": rng.integers(0, V, size=(B, T)).astype(np.int32), "mask": MASK,
         TOKEN_NORMALIZER_KEY: token_normalizer(MASK[:, 1:] & MASK[:, :-1])}
TEACHER_VARS = sharding.unbox(TEACHER.init(jax.random.PRNGKey(1), {"tokens": BATCH["tokens"]}))


def step_once(mesh):
    parts = {"student": student(STUDENT, input=("tokens", "mask"), rules=RULES),
             "teacher": teacher(TEACHER, TEACHER_VARS, input=("tokens", "mask"), rules=RULES)}
    state = jaxkd.create(participants=parts, method=methods.parse("lm_ce + token_kd(divergence='reverse_kl')"),
                         tx=optax.adam(1e-2), sample_batch=BATCH, rng=jax.random.PRNGKey(0), mesh=mesh)
    embedding = state.teacher.params["embedding"]
    layout = (embedding.dtype, getattr(embedding.sharding, "spec", None), embedding.addressable_shards[0].data.shape)
    return layout, *jaxkd.make_train_step(mesh=mesh)(state, BATCH)  # the step donates the state


def test_the_bf16_teacher_is_sharded_on_the_students_mesh_and_the_step_is_the_single_device_step():
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    (dtype, spec, shard_shape), sharded, metrics = step_once(mesh)
    assert dtype == jnp.bfloat16
    # [vocab, embed] -> (tensor, fsdp): each device holds a quarter of the teacher's embedding.
    assert spec == jax.sharding.PartitionSpec("tensor", "fsdp")
    assert shard_shape == (V // 2, TEACHER_CFG.d_model // 2)
    _, single, single_metrics = step_once(None)
    # The teacher computes in bfloat16: a sharded reduction adds its terms in another order (bf16 keeps ~3
    # significant digits), so the loss agrees to 1e-3, not float32's 1e-6.
    np.testing.assert_allclose(float(metrics["loss"]), float(single_metrics["loss"]), rtol=1e-3)
    chex.assert_trees_all_close(jax.device_get(sharded.student.params), jax.device_get(single.student.params),
                                rtol=1e-3, atol=1e-5)


def test_the_default_rules_shard_an_annotated_lm_over_fsdp():
    # The LM names every parameter's axes; without a logical table those names map nowhere, so the
    # default (fsdp) rule must still shard it (it once took the logical branch and replicated all 11).
    cfg = lm_models.LMConfig(vocab_size=32, d_model=32, num_layers=1, num_heads=2, d_ff=64, max_len=T)
    mesh = sharding.make_mesh({"fsdp": 8})
    state = jaxkd.create(participants={"student": student(lm_models.lm(cfg), input=("tokens", "mask"))},
                         method=methods.parse("lm_ce"), tx=optax.adam(1e-2), sample_batch=BATCH,
                         rng=jax.random.PRNGKey(0), mesh=mesh)
    leaves = jax.tree_util.tree_leaves_with_path(state.student.params)
    large = {sharding.path_str(p): x for p, x in leaves if x.size >= sharding.Rules().min_size}
    assert len(large) == 8  # embedding, query/key/value/out, gate/up/down (norm scales stay whole)
    split = {name: x.addressable_shards[0].data.size for name, x in large.items()}
    assert split == {name: x.size // 8 for name, x in large.items()}
    # The optimizer state follows its parameters.
    mu = state.opt_state[0].mu["student"]["embedding"]
    assert mu.addressable_shards[0].data.size == mu.size // 8
    # A logical table, when given, still decides: embed -> fsdp only (vocab unmatched here stays whole).
    rules = sharding.Rules(logical=(("embed", "fsdp"),))
    boxed = jax.eval_shape(lm_models.lm(cfg).init, jax.random.PRNGKey(0), {"tokens": BATCH["tokens"]})
    specs = sharding.param_shardings(sharding.unbox(boxed), mesh, rules,
                                     logical_specs=sharding.logical_partition_specs(boxed))
    assert specs["params"]["embedding"].spec == jax.sharding.PartitionSpec(None, "fsdp")
