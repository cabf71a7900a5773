"""Meshes, sharding rules (fsdp, logical names, overrides), batch placement and reporting (8 CPU devices)."""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from jaxkd import sharding as shd
from jaxkd.sharding import Rules


@pytest.fixture(scope="module", autouse=True)
def eight_devices():
    assert jax.device_count() == 8, "tests/conftest.py sets 8 simulated CPU devices"


def shard_shape(x):
    return x.addressable_shards[0].data.shape


def placed(tree, mesh, rules=None, **kwargs):
    return shd.shard_like(tree, shd.param_shardings(tree, mesh, rules, **kwargs))


# ----- meshes -----

@pytest.mark.parametrize("axes, shape", [
    (None, (8, 1, 1)),
    ({"data": -1}, (8, 1, 1)),
    ({"data": 2, "fsdp": 4}, (2, 4, 1)),
    ({"data": 2, "fsdp": 2, "tensor": 2}, (2, 2, 2)),
    ({"fsdp": -1, "tensor": 2}, (1, 4, 2)),
])
def test_make_mesh_shapes(axes, shape):
    mesh = shd.make_mesh(axes)
    assert mesh.axis_names == ("data", "fsdp", "tensor") == shd.AXES
    assert tuple(mesh.shape.values()) == shape
    assert mesh.devices.size == 8
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


def test_make_mesh_on_a_device_subset():
    mesh = shd.make_mesh({"fsdp": 2}, devices=jax.devices()[:2])
    assert tuple(mesh.shape.values()) == (1, 2, 1)
    assert set(mesh.devices.flat) == set(jax.devices()[:2])


@pytest.mark.parametrize("axes, message", [
    ({"data": 3}, r"multiply to 3, but there are 8 devices"),
    ({"data": 3, "fsdp": -1}, r"fixed axis sizes multiply to 3, which does not divide 8"),
    ({"data": -1, "fsdp": -1}, r"only one mesh axis may be -1"),
    ({"model": 8}, r"unknown mesh axis \['model'\]; the allowed axes are \['data', 'fsdp', 'tensor'\]"),
    ({"data": 0}, r"'data' has size 0"),
    ({"data": 2.0, "fsdp": 4}, r"'data' has size 2.0"),
])
def test_make_mesh_errors(axes, message):
    with pytest.raises(ValueError, match=message):
        shd.make_mesh(axes)


# ----- the fsdp rule -----

def test_fsdp_shards_the_largest_divisible_dimension():
    mesh = shd.make_mesh({"data": 2, "fsdp": 4})
    tree = {
        "conv": {"kernel": jnp.ones((3, 3, 64, 128)), "bias": jnp.ones((10,))},
        "small": jnp.ones((3, 3, 3, 16)),            # 432 elements < min_size
        "odd": jnp.ones((33, 45)),                   # no dimension divisible by 4
        "tie": jnp.ones((64, 3, 3, 64)),             # tie: the trailing dimension wins
        "first": jnp.ones((1024, 12)),               # 12 divides too, but 1024 is larger
        "step": jnp.zeros((), jnp.int32),
    }
    out = placed(tree, mesh, Rules.fsdp_default())
    assert out["conv"]["kernel"].sharding.spec == P(None, None, None, "fsdp")
    assert shard_shape(out["conv"]["kernel"]) == (3, 3, 64, 32)
    assert shard_shape(out["conv"]["bias"]) == (10,) and out["conv"]["bias"].sharding.is_fully_replicated
    assert shard_shape(out["small"]) == (3, 3, 3, 16)
    assert shard_shape(out["odd"]) == (33, 45)
    assert shard_shape(out["tie"]) == (64, 3, 3, 16)
    assert shard_shape(out["first"]) == (256, 12)
    assert out["step"].sharding.is_fully_replicated
    # Values survive the placement.
    np.testing.assert_array_equal(np.asarray(out["conv"]["kernel"]), np.ones((3, 3, 64, 128)))
    # Lowering min_size shards the small kernel's only divisible dimension.
    small = placed(tree["small"], mesh, Rules(fsdp=True, min_size=0))
    assert shard_shape(small) == (3, 3, 3, 4)


def test_default_rules_follow_the_fsdp_axis():
    assert shd.default_rules(shd.make_mesh({"data": 2, "fsdp": 4})) == Rules.fsdp_default()
    assert shd.default_rules(shd.make_mesh()) == Rules.replicated()
    kernel = jnp.ones((64, 128))
    assert shard_shape(placed(kernel, shd.make_mesh())) == (64, 128)
    assert shard_shape(placed(kernel, shd.make_mesh({"fsdp": 8}))) == (64, 16)


def test_fsdp_applies_to_optimizer_state_and_shape_structs():
    mesh = shd.make_mesh({"data": 2, "fsdp": 4})
    params = {"dense": {"kernel": jnp.ones((256, 64)), "bias": jnp.zeros((64,))}}
    opt_state = optax.adam(1e-3).init(params)
    shardings = shd.param_shardings(opt_state, mesh, Rules.fsdp_default())
    adam = shardings[0]
    assert adam.mu["dense"]["kernel"].spec == P("fsdp") == adam.nu["dense"]["kernel"].spec
    assert adam.mu["dense"]["bias"].spec == P() and adam.count.spec == P()
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    assert shd.param_shardings(abstract, mesh, Rules.fsdp_default())["dense"]["kernel"].spec == P("fsdp")


def test_sharded_matmul_matches_unsharded():
    mesh = shd.make_mesh({"data": 2, "fsdp": 4})
    rng = np.random.default_rng(0)
    w, x = rng.normal(size=(64, 32)).astype(np.float32), rng.normal(size=(16, 64)).astype(np.float32)
    ws = placed(w, mesh, Rules.fsdp_default())
    xs = shd.shard_batch({"x": x}, mesh)["x"]
    assert shard_shape(ws) == (16, 32)
    np.testing.assert_allclose(np.asarray(jax.jit(jnp.dot)(xs, ws)), x @ w, rtol=1e-5, atol=1e-5)


# ----- logical names and overrides -----

class Tiny(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Dense(16, kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "mlp")),
                     name="up")(x)
        return nn.Dense(4, name="head")(x)   # unannotated: falls back to the fsdp rule


def test_logical_rules_on_a_2x2x2_mesh():
    mesh = shd.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    boxed = Tiny().init(jax.random.PRNGKey(0), jnp.ones((1, 8)))
    specs = shd.logical_partition_specs(boxed)
    assert specs["params"]["up"]["kernel"] == P("embed", "mlp")
    assert specs["params"]["head"]["kernel"] is None
    variables = shd.unbox(boxed)
    assert isinstance(variables["params"]["up"]["kernel"], jax.Array)
    rules = Rules(logical=(("embed", "fsdp"), ("mlp", "tensor")), fsdp=True, min_size=0)
    out = placed(variables, mesh, rules, logical_specs=specs)
    up, head = out["params"]["up"], out["params"]["head"]
    assert up["kernel"].sharding.spec == P("fsdp", "tensor") and shard_shape(up["kernel"]) == (4, 8)
    assert up["bias"].sharding.spec == P("fsdp") and shard_shape(up["bias"]) == (8,)  # bias unannotated
    assert head["kernel"].sharding.spec == P("fsdp") and shard_shape(head["kernel"]) == (8, 4)
    np.testing.assert_array_equal(np.asarray(up["kernel"]), np.asarray(variables["params"]["up"]["kernel"]))
    # Unmatched logical names leave their dimension unsharded (flax's logical_to_mesh_axes).
    only_mlp = shd.param_shardings(variables, mesh, Rules(logical=(("mlp", "tensor"),)), logical_specs=specs)
    assert only_mlp["params"]["up"]["kernel"].spec == P(None, "tensor")
    # flax's own nn.get_partition_spec gives unannotated leaves P(): treated as "no annotation" too.
    flax_specs = nn.get_partition_spec(boxed)
    same = shd.param_shardings(variables, mesh, rules, logical_specs=flax_specs)
    assert same["params"]["head"]["kernel"].spec == P("fsdp")


def test_overrides_first_match_wins_and_beat_logical_names():
    mesh = shd.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    tree = {"conv1": {"kernel": jnp.ones((3, 3, 8, 16))}, "conv2": {"kernel": jnp.ones((3, 3, 16, 16))},
            "fc": {"kernel": jnp.ones((16, 10))}}
    rules = Rules(fsdp=True, min_size=0, overrides=(
        (r"conv1/kernel$", P(None, None, "tensor", ("data", "fsdp"))),
        (r"conv", P(None, None, None, "tensor")),
        (r"^fc/", P()),
    ))
    out = placed(tree, mesh, rules)
    assert shard_shape(out["conv1"]["kernel"]) == (3, 3, 4, 4)
    assert shard_shape(out["conv2"]["kernel"]) == (3, 3, 16, 8)
    assert out["fc"]["kernel"].sharding.is_fully_replicated
    logical = {"conv1": {"kernel": P(None, None, None, "mlp")}, "conv2": {"kernel": None}, "fc": {"kernel": None}}
    with_names = shd.param_shardings(tree, mesh, Rules(logical=(("mlp", "fsdp"),), overrides=rules.overrides[:1]),
                                     logical_specs=logical)
    assert with_names["conv1"]["kernel"].spec == P(None, None, "tensor", ("data", "fsdp"))
    # Lists from a config file are accepted and normalised.
    assert Rules(overrides=[["conv", [None, "tensor"]]]).overrides == (("conv", P(None, "tensor")),)


def test_rule_naming_a_missing_mesh_axis_raises():
    mesh = shd.make_mesh({"data": 2, "fsdp": 4})
    tree = {"w": jnp.ones((8, 8))}
    with pytest.raises(ValueError, match=r"logical rule 'mlp' -> 'model' names mesh axis \['model'\]; "
                                         r"the mesh's axes are \['data', 'fsdp', 'tensor'\]"):
        shd.param_shardings(tree, mesh, Rules(logical=(("mlp", "model"),)))
    with pytest.raises(ValueError, match=r"override 'w' .* names mesh axis \['expert'\]"):
        shd.param_shardings(tree, mesh, Rules(overrides=(("w", P(("fsdp", "expert"))),)))


def test_non_divisible_explicit_spec_raises():
    mesh = shd.make_mesh({"data": 2, "fsdp": 4})
    tree = {"layer": {"kernel": jnp.ones((6, 8))}}
    with pytest.raises(ValueError, match=r"layer/kernel: shape \(6, 8\) .* dimension 6 is not divisible by "
                                         r"mesh axis 'fsdp' of size 4"):
        shd.param_shardings(tree, mesh, Rules(overrides=(("kernel", P("fsdp")),)))
    with pytest.raises(ValueError, match=r"layer/kernel: spec .* has 3 entries for an array of shape \(6, 8\)"):
        shd.param_shardings(tree, mesh, Rules(overrides=(("kernel", P(None, None, "fsdp")),)))
    with pytest.raises(ValueError, match=r"layer/kernel: .* mesh axis 'fsdp' of size 4"):
        shd.param_shardings(tree, mesh, Rules(logical=(("rows", "fsdp"),)),
                            logical_specs={"layer": {"kernel": P("rows", None)}})


# ----- batches -----

def test_batch_split_over_data_and_fsdp():
    mesh = shd.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    assert shd.batch_shards(mesh) == 4 and shd.check_batch_size(16, mesh) == 4
    image = np.arange(16 * 3, dtype=np.float32).reshape(16, 3)
    out = shd.shard_batch({"image": image, "label": np.arange(16)}, mesh)
    assert out["image"].sharding.spec == P(("data", "fsdp"))
    assert shard_shape(out["image"]) == (4, 3) and shard_shape(out["label"]) == (4,)
    # Each quarter of the batch lives on the two devices of one (data, fsdp) cell (replicated over tensor).
    rows = {d: np.asarray(s.data)[:, 0].tolist() for d, s in ((s.device, s) for s in out["image"].addressable_shards)}
    assert sorted(map(tuple, rows.values())) == sorted([tuple(image[i * 4:(i + 1) * 4, 0]) for i in range(4)] * 2)
    np.testing.assert_array_equal(np.asarray(out["image"]), image)


def test_batch_size_errors_name_the_key_and_the_split():
    mesh = shd.make_mesh({"data": 2, "fsdp": 4})
    with pytest.raises(ValueError, match=r"batch\['label'\] has 6 examples, not divisible by data x fsdp = 2 x 4 = 8"):
        shd.shard_batch({"image": np.zeros((8, 2)), "label": np.zeros(6)}, mesh)
    with pytest.raises(ValueError, match=r"global batch size 12 is not divisible by data x fsdp = 2 x 4 = 8"):
        shd.check_batch_size(12, mesh)
    with pytest.raises(ValueError, match=r"batch\['step'\] is a scalar"):
        shd.shard_batch({"step": np.int32(3)}, mesh)


# ----- multi-host, reporting -----

def test_initialize_distributed_is_a_no_op_without_configuration(monkeypatch):
    for name in ("JAXKD_COORDINATOR", "JAXKD_NUM_PROCESSES", "JAXKD_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    assert shd.initialize_distributed() is False
    assert jax.process_count() == 1 and not jax.distributed.is_initialized()
    monkeypatch.setenv("JAXKD_NUM_PROCESSES", "two")
    with pytest.raises(ValueError, match=r"JAXKD_NUM_PROCESSES='two' is not an integer"):
        shd.initialize_distributed()


def test_initialize_distributed_names_the_missing_variables(monkeypatch):
    for name in ("JAXKD_COORDINATOR", "JAXKD_NUM_PROCESSES", "JAXKD_PROCESS_ID", "JAXKD_INIT_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)
    # Asked for (the experiment's distributed=True), nothing set: an error, not a silent single-host run.
    with pytest.raises(ValueError, match=r"^a multi-host run needs JAXKD_COORDINATOR, JAXKD_NUM_PROCESSES, "
                                         r"JAXKD_PROCESS_ID"):
        shd.initialize_distributed(required=True)
    monkeypatch.setenv("JAXKD_COORDINATOR", "10.0.0.1:1234")
    with pytest.raises(ValueError, match=r"needs JAXKD_NUM_PROCESSES, JAXKD_PROCESS_ID \(not set"):
        shd.initialize_distributed()  # a partial configuration is always a mistake
    monkeypatch.setenv("JAXKD_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAXKD_PROCESS_ID", "2")
    with pytest.raises(ValueError, match=r"process_id \(JAXKD_PROCESS_ID\) must lie in \[0, 2\), got 2"):
        shd.initialize_distributed()
    monkeypatch.setenv("JAXKD_PROCESS_ID", "1")
    monkeypatch.setenv("JAXKD_INIT_TIMEOUT", "0")
    with pytest.raises(ValueError, match=r"initialization_timeout .*JAXKD_INIT_TIMEOUT.* got 0"):
        shd.initialize_distributed()
    assert not jax.distributed.is_initialized()


def _join_alone(process_id: int, timeout_s: int):
    """A process of a 2-process run whose peer never starts, in a subprocess: (seconds, returncode, output)."""
    import subprocess
    import sys
    import time

    from tests.test_multihost import free_port
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", JAXKD_COORDINATOR=f"127.0.0.1:{free_port()}", JAXKD_NUM_PROCESSES="2",
               JAXKD_PROCESS_ID=str(process_id), JAXKD_INIT_TIMEOUT=str(timeout_s))
    start = time.monotonic()
    try:
        out = subprocess.run([sys.executable, "-c", "from jaxkd import sharding; sharding.initialize_distributed()"],
                             capture_output=True, text=True, timeout=90, env=env)
    except subprocess.TimeoutExpired:
        pytest.fail("joining a run whose peer never starts was still waiting after 90 s")
    return time.monotonic() - start, out.returncode, out.stdout + out.stderr


def test_a_coordinator_that_never_starts_is_a_clear_error_within_the_timeout():
    seconds, rc, output = _join_alone(process_id=1, timeout_s=2)
    assert rc == 1 and seconds < 60, output
    last = output.strip().splitlines()[-1]
    assert last.startswith("TimeoutError: process 1 of 2: the coordinator 127.0.0.1:"), output
    assert "JAXKD_INIT_TIMEOUT=2" in last and "Check failure" not in output


@pytest.mark.slow  # 9 s: a subprocess left to time out; `pytest -m slow`
def test_a_peer_that_never_starts_is_announced_before_jax_aborts():
    # Process 0 hosts the coordinator and waits for process 1 inside JAX's C++ client, which aborts the
    # process on its deadline (uncatchable): the timeout bounds the wait and a warning names who is awaited.
    seconds, rc, output = _join_alone(process_id=0, timeout_s=2)
    assert rc != 0 and seconds < 60, output
    assert "process 0 of 2: still waiting for the other processes to join via coordinator 127.0.0.1:" in output
    assert "JAXKD_INIT_TIMEOUT=2" in output


def test_describe_and_per_device_bytes():
    mesh = shd.make_mesh({"data": 2, "fsdp": 4})
    tree = placed({"conv": {"kernel": jnp.ones((3, 3, 64, 128)), "bias": jnp.ones((10,))}}, mesh)
    table = shd.describe(tree).splitlines()
    assert table[0].split() == ["path", "shape", "shard", "spec"]
    kernel_row = next(line for line in table if line.startswith("conv/kernel"))
    assert "(3, 3, 64, 128)" in kernel_row and "(3, 3, 64, 32)" in kernel_row
    bias_row = next(line for line in table if line.startswith("conv/bias"))
    assert bias_row.count("(10,)") == 2
    per_device = shd.per_device_bytes(tree)
    assert set(per_device) == set(jax.devices())
    assert set(per_device.values()) == {3 * 3 * 64 * 32 * 4 + 10 * 4}
    assert shd.shardings_of(tree)["conv"]["kernel"] == tree["conv"]["kernel"].sharding
