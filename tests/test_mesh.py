"""Sharded training equals single-device training: for meshes 8x1x1, 2x4x1 and 2x2x2 (data x fsdp x
tensor, 8 simulated CPU devices), the losses of 3 steps and every trained array after them match the
run on one device (float32, 1e-5), for KD, a batch-coupled loss (DIST), a method with a trainable
connector (DHKD's auxiliary head) and deep mutual learning — and the parameters are really split."""

import functools

import jax
import numpy as np
import optax
import pytest

import jaxkd
from jaxkd import methods, models, sharding

NUM_CLASSES = 5
MESHES = {"8x1x1": {"data": 8}, "2x4x1": {"data": 2, "fsdp": 4}, "2x2x2": {"data": 2, "fsdp": 2, "tensor": 2}}
SPECS = {"kd": "ce + kd(temperature=4)", "dist": "ce + dist", "connector": "ce + dhkd(hidden=64)", "dml": "dml"}
# Kernels of 16x64 and 64x64 elements: at least the fsdp rule's minimum size, so they are split.
STUDENT = models.get("mlp", num_classes=NUM_CLASSES, hidden_sizes=(64,))
TEACHER = models.get("mlp", num_classes=NUM_CLASSES, hidden_sizes=(128,))
PEER = models.get("mlp", num_classes=NUM_CLASSES, hidden_sizes=(64, 64))
BATCHES = [
    {"image": np.random.default_rng(i).normal(size=(16, 4, 4, 1)).astype(np.float32),
     "label": np.random.default_rng(100 + i).integers(0, NUM_CLASSES, 16).astype(np.int32)}
    for i in range(3)
]
TEACHER_VARS = TEACHER.init(jax.random.PRNGKey(1), BATCHES[0]["image"])


def new_state(spec, mesh=None):
    method = methods.parse(spec)
    participants = {}
    if method.needs.teacher:
        participants["teacher"] = jaxkd.Participant(TEACHER, TEACHER_VARS, trains=False)
    if "peer" in method.needs.trained:
        participants["peer"] = jaxkd.Participant(PEER)
    return jaxkd.create(student=STUDENT, method=method, tx=optax.sgd(0.1, momentum=0.9), sample_batch=BATCHES[0],
                        rng=jax.random.PRNGKey(0), participants=participants, mesh=mesh)


def train(spec, mesh=None):
    state = new_state(spec, mesh)
    step = jaxkd.make_train_step(mesh=mesh)
    losses = []
    for batch in BATCHES:
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    return state, losses


@functools.cache
def single_device(spec):
    state, losses = train(spec)
    return jax.device_get(state.trainable), jax.device_get(state.opt_state), losses


@pytest.mark.parametrize("mesh_name", list(MESHES))
@pytest.mark.parametrize("method", list(SPECS))
def test_sharded_steps_equal_the_single_device_run(method, mesh_name):
    mesh = sharding.make_mesh(MESHES[mesh_name])
    state, losses = train(SPECS[method], mesh)
    trainable, opt_state, expected_losses = single_device(SPECS[method])
    np.testing.assert_allclose(losses, expected_losses, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), jax.device_get(state.trainable),
                 trainable)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), jax.device_get(state.opt_state),
                 opt_state)

    fsdp = mesh.shape["fsdp"]
    kernel = state.student.params["dense1"]["kernel"]  # [16, 64]: split on its largest dimension
    assert kernel.addressable_shards[0].data.shape == (16, 64 // fsdp)
    momentum = jax.tree.leaves(state.opt_state)[1:]  # the optimizer state is split like the parameters
    assert any(m.shape == (16, 64) and m.addressable_shards[0].data.shape == (16, 64 // fsdp) for m in momentum)
    if "teacher" in state.frozen:
        t_kernel = state.frozen["teacher"].params["dense1"]["kernel"]  # [16, 128]
        assert t_kernel.addressable_shards[0].data.shape == (16, 128 // fsdp)
    if method == "connector":
        head = jax.tree.leaves(state.method_vars.params)
        assert any(h.shape == (64, 64) and h.addressable_shards[0].data.shape[1] == 64 // fsdp for h in head)


def test_each_participant_has_its_own_rules_a_sharded_teacher_and_a_replicated_student():
    mesh = sharding.make_mesh({"data": 2, "fsdp": 4})
    state = jaxkd.create(
        method=methods.parse("ce + kd"), tx=optax.sgd(0.1), sample_batch=BATCHES[0], rng=jax.random.PRNGKey(0),
        mesh=mesh,
        participants={
            "student": jaxkd.Participant(STUDENT, rules=sharding.Rules.replicated()),
            "teacher": jaxkd.Participant(TEACHER, TEACHER_VARS, trains=False, rules=sharding.Rules.fsdp_default()),
        },
    )
    assert state.frozen["teacher"].params["dense1"]["kernel"].addressable_shards[0].data.shape == (16, 32)
    assert state.student.params["dense1"]["kernel"].sharding.is_fully_replicated
    state, _ = jaxkd.make_train_step(mesh=mesh)(state, BATCHES[0])
    assert state.student.params["dense1"]["kernel"].sharding.is_fully_replicated


def test_a_batch_not_divisible_by_data_times_fsdp_is_refused():
    mesh = sharding.make_mesh({"data": 2, "fsdp": 4})
    state = new_state("ce + kd", mesh)
    with pytest.raises(ValueError, match="not divisible"):
        jaxkd.make_train_step(mesh=mesh)(state, {k: v[:12] for k, v in BATCHES[0].items()})


def test_a_rule_naming_an_axis_the_mesh_lacks_is_refused_at_create():
    with pytest.raises(ValueError, match="model"):
        jaxkd.create(
            method=methods.ce(), tx=optax.sgd(0.1), sample_batch=BATCHES[0], rng=jax.random.PRNGKey(0),
            participants={"student": jaxkd.Participant(
                STUDENT, rules=sharding.Rules(overrides=((r"dense1/kernel", jax.sharding.PartitionSpec("model")),)))},
            mesh=sharding.make_mesh({"data": 8}),
        )


@pytest.mark.parametrize("devices", [4, 1])
def test_a_checkpoint_saved_on_eight_devices_restores_onto_fewer(tmp_path, devices):
    from jaxkd.checkpoint import Checkpointer

    saved, _ = train(SPECS["kd"], sharding.make_mesh({"data": 2, "fsdp": 4}))
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        ckpt.save(3, saved.run_tree())
    mesh = sharding.make_mesh({"fsdp": devices}, devices=jax.devices()[:devices])
    target = new_state(SPECS["kd"], mesh)
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        restored = target.with_run_tree(ckpt.restore(target.run_tree()).tree)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored.run_tree()), jax.device_get(saved.run_tree()))
    kernel = restored.student.params["dense1"]["kernel"]
    assert len(kernel.sharding.device_set) == devices
    assert kernel.addressable_shards[0].data.shape == (16, 64 // devices)
    # And it trains on, on its new mesh.
    restored, metrics = jaxkd.make_train_step(mesh=mesh)(restored, BATCHES[0])
    assert np.isfinite(float(metrics["loss"]))


def test_a_model_that_declares_logical_axes_is_sharded_by_them_end_to_end():
    import flax.linen as nn

    class Tagged(nn.Module):
        """A Linen model whose kernels carry logical axis names (as the ViT and LMs will)."""

        @nn.compact
        def __call__(self, x, train=False):
            x = x.reshape(x.shape[0], -1)
            dense = lambda n, axes: nn.Dense(n, kernel_init=nn.with_logical_partitioning(
                nn.initializers.lecun_normal(), axes))
            h = nn.relu(dense(64, ("embed", "mlp"))(x))
            return dense(NUM_CLASSES, ("mlp", "vocab"))(h)

    model = models.from_linen(Tagged())
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    rules = sharding.Rules(logical=(("embed", "fsdp"), ("mlp", "tensor"), ("vocab", None)))
    state = jaxkd.create(method=methods.ce(), tx=optax.sgd(0.1), sample_batch=BATCHES[0], rng=jax.random.PRNGKey(0),
                         participants={"student": jaxkd.Participant(model, rules=rules)}, mesh=mesh)
    single = jaxkd.create(method=methods.ce(), tx=optax.sgd(0.1), sample_batch=BATCHES[0], rng=jax.random.PRNGKey(0),
                          participants={"student": jaxkd.Participant(model)})
    kernel = state.student.params["Dense_0"]["kernel"]  # [16, 64]: embed over fsdp, mlp over tensor
    assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    assert kernel.addressable_shards[0].data.shape == (8, 32)
    state, m_sharded = jaxkd.make_train_step(mesh=mesh)(state, BATCHES[0])
    single, m_single = jaxkd.make_train_step()(single, BATCHES[0])
    np.testing.assert_allclose(float(m_sharded["loss"]), float(m_single["loss"]), rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 jax.device_get(state.student.params), jax.device_get(single.student.params))
    assert state.student.params["Dense_0"]["kernel"].sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
