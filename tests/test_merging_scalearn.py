"""ScaLearn (jaxkd.merging.scalearn): the forward pass against NumPy, the gradient wrt ω against float64 central
finite differences, training in the ordinary jitted step with `ce`, and the refused inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxkd
from jaxkd import methods, sharding
from jaxkd.merging.scalearn import scalearn_model, scalearn_omega
from jaxkd.models.base import Model, Outputs


def _linear_source(d_in, d_out, name="h"):
    """A source expert publishing ``x @ w`` as feature ``name`` (its own logits are irrelevant here)."""
    def init(rng, x):
        return {"params": {"w": jax.random.normal(rng, (d_in, d_out))}}

    def apply(variables, x, *, train, rngs=None):
        h = x @ variables["params"]["w"]
        return Outputs(logits=h, features={name: h}, model_state={})

    return Model(init=init, apply=apply, name="linear_source")


def _sources(rng, count=3, d_in=4, d=5):
    models = [_linear_source(d_in, d) for _ in range(count)]
    variables = [{"params": {"w": rng.normal(size=(d_in, d)).astype(np.float32)}} for _ in range(count)]
    return models, variables


@pytest.mark.parametrize("omega", ["vector", "scalar"])
def test_forward_is_the_scaled_sum_then_the_head(omega):
    rng = np.random.default_rng(0)
    models, source_vars = _sources(rng)
    model = scalearn_model(models, source_vars, feature="h", num_classes=2, omega=omega)
    x = rng.normal(size=(6, 4)).astype(np.float32)
    variables = model.init(jax.random.PRNGKey(0), x)
    width = 5 if omega == "vector" else 1
    assert variables["params"]["omega"].shape == (3, width)
    # The official "avg" init: ω ~ N(2 / N, 0.001²).
    np.testing.assert_allclose(scalearn_omega(variables), 2 / 3, atol=0.01)
    params = {"omega": rng.normal(size=(3, width)).astype(np.float32),
              "head": {"kernel": rng.normal(size=(5, 2)).astype(np.float32),
                       "bias": rng.normal(size=2).astype(np.float32)}}
    out = model.apply({**variables, "params": params}, x, train=False)
    hs = [x @ v["params"]["w"] for v in source_vars]
    combined = sum(params["omega"][i] * hs[i] for i in range(3))
    np.testing.assert_allclose(out.features["combined"], combined, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out.logits, combined @ params["head"]["kernel"] + params["head"]["bias"],
                               rtol=1e-5, atol=1e-5)
    # Dropout on ω acts in training only: the train-mode logits differ, eval's do not change with the key.
    train_out = model.apply({**variables, "params": params}, x, train=True, rngs={"dropout": jax.random.PRNGKey(1)})
    assert not np.allclose(train_out.logits, out.logits)
    eval_with_key = model.apply({**variables, "params": params}, x, train=False, rngs={"dropout": jax.random.PRNGKey(1)})
    np.testing.assert_array_equal(eval_with_key.logits, out.logits)


def test_omega_gradient_matches_float64_central_differences():
    rng = np.random.default_rng(1)
    with jax.enable_x64(True):
        models, source_vars = _sources(rng)
        source_vars = jax.tree.map(np.float64, source_vars)
        model = scalearn_model(models, source_vars, feature="h", num_classes=3, dropout=0.0)
        x = rng.normal(size=(4, 4))
        labels = jnp.array([0, 2, 1, 2])
        variables = model.init(jax.random.PRNGKey(0), x)
        variables = {**variables, "params": jax.tree.map(lambda a: jnp.asarray(a, jnp.float64)
                                                         + 0.3 * rng.normal(size=a.shape), variables["params"])}

        @jax.jit
        def loss(omega):
            out = model.apply({**variables, "params": {**variables["params"], "omega": omega}}, x, train=False)
            return optax.softmax_cross_entropy_with_integer_labels(out.logits, labels).mean()

        omega = np.asarray(variables["params"]["omega"])
        assert loss(omega).dtype == jnp.float64
        grad = np.asarray(jax.grad(loss)(jnp.asarray(omega)))
        eps = 1e-6
        fd = np.zeros_like(omega)
        for idx in np.ndindex(omega.shape):
            step = np.zeros_like(omega)
            step[idx] = eps
            fd[idx] = (float(loss(omega + step)) - float(loss(omega - step))) / (2 * eps)
    np.testing.assert_allclose(grad, fd, rtol=1e-6, atol=1e-8)


def test_trains_omega_and_head_in_the_ordinary_step_and_keeps_the_sources():
    rng = np.random.default_rng(2)
    models, source_vars = _sources(rng, count=2, d_in=4, d=6)
    model = scalearn_model(models, source_vars, feature="h", num_classes=3)
    x = rng.normal(size=(16, 4)).astype(np.float32)
    batch = {"image": x, "label": rng.integers(0, 3, 16)}
    state = jaxkd.create(student=model, method=methods.ce(), tx=optax.adam(0.05), sample_batch=batch,
                         rng=jax.random.PRNGKey(0))
    assert set(state.student.params) == {"omega", "head"}
    omega_before = np.asarray(state.student.params["omega"])
    step = jaxkd.make_train_step()
    losses = []
    for _ in range(8):
        state, metrics = step(state, batch)
        losses.append(float(metrics["ce"]))
    assert losses[-1] < 0.7 * losses[0]
    assert not np.allclose(state.student.params["omega"], omega_before)
    for i, v in enumerate(source_vars):  # the experts ride along unchanged
        np.testing.assert_array_equal(state.student.model_state["sources"][f"source_{i}"]["params"]["w"],
                                      v["params"]["w"])


def test_bad_input_is_refused():
    rng = np.random.default_rng(3)
    models, source_vars = _sources(rng)
    x = np.zeros((2, 4), np.float32)
    with pytest.raises(ValueError, match="at least one source"):
        scalearn_model([], [], feature="h", num_classes=2)
    with pytest.raises(ValueError, match="one variables tree per source"):
        scalearn_model(models, source_vars[:2], feature="h", num_classes=2)
    with pytest.raises(ValueError, match="omega must be one of"):
        scalearn_model(models, source_vars, feature="h", num_classes=2, omega="matrix")
    wide = [*models[:2], _linear_source(4, 7)]
    wide_vars = [*source_vars[:2], {"params": {"w": np.zeros((4, 7), np.float32)}}]
    with pytest.raises(ValueError, match=r"must have one shape.*\(2, 5\).*\(2, 7\)"):
        scalearn_model(wide, wide_vars, feature="h", num_classes=2).init(jax.random.PRNGKey(0), x)
    with pytest.raises(ValueError, match="does not sow a feature named 'pooled'; it sows: \\['h'\\]"):
        scalearn_model(models, source_vars, feature="pooled", num_classes=2).init(jax.random.PRNGKey(0), x)


def test_on_an_fsdp_mesh_the_step_equals_one_device_and_the_sources_are_sharded():
    """The experts are variables of the participant, so the train state shards them like parameters (fsdp
    over 8 simulated devices), and the sharded steps give the single-device ω, head and losses."""
    rng = np.random.default_rng(4)
    models, source_vars = _sources(rng, count=2, d_in=16, d=64)  # each expert's [16, 64] kernel can be split
    model = scalearn_model(models, source_vars, feature="h", num_classes=3)
    batch = {"image": rng.normal(size=(8, 16)).astype(np.float32), "label": rng.integers(0, 3, 8)}

    def run(mesh):
        state = jaxkd.create(student=model, method=methods.ce(), tx=optax.adam(0.05), sample_batch=batch,
                             rng=jax.random.PRNGKey(0), mesh=mesh)
        step, losses = jaxkd.make_train_step(mesh=mesh), []
        for _ in range(2):
            state, metrics = step(state, batch)
            losses.append(float(metrics["ce"]))
        return state, losses

    single, single_losses = run(None)
    sharded, sharded_losses = run(sharding.make_mesh({"fsdp": 8}))
    np.testing.assert_allclose(sharded_losses, single_losses, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6),
                 sharded.student.params, single.student.params)
    for i in range(2):
        w = sharded.student.model_state["sources"][f"source_{i}"]["params"]["w"]
        assert w.addressable_shards[0].data.shape == (16, 8)
