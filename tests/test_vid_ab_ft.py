"""VID, AB (``activation_boundary``) and FT: values against NumPy references written from RepDistiller's and the
authors' code, their modules, bad inputs, the two-stage recipes, and the methods in the jitted train step."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxkd
from jaxkd import losses, methods
from jaxkd.methods import LossInputs, MethodVars, StepInfo
from jaxkd.methods.feature.activation_boundary import activation_boundary_connector
from jaxkd.methods.feature.factor_transfer import Paraphraser, Translator
from jaxkd.methods.feature.vid import VIDRegressor, match_spatial
from jaxkd.models.base import Outputs
from tests.helpers import tiny_conv_models, tiny_image_batch


def rand(seed, shape, scale=1.0):
    return (scale * np.random.default_rng(seed).normal(size=shape)).astype(np.float32)


# ----- NumPy references -----


def np_vid(mu, t, log_scale, eps=1e-5):
    """RepDistiller VIDLoss.forward after the regressor: mean(0.5·((μ − t)²/σ² + log σ²)), σ² = log(1 + e^α) + ε."""
    var = np.log1p(np.exp(np.asarray(log_scale, np.float64))) + eps  # per channel (last axis, NHWC)
    return np.mean(0.5 * ((np.float64(mu) - t) ** 2 / var + np.log(var)))


def np_ab_layer(s, t, margin=1.0):
    """criterion_alternative_l2 (a sum over the batch) divided by the batch size, as ABLoss does."""
    s, t = np.float64(s), np.float64(t)
    loss = (s + margin) ** 2 * ((s > -margin) & (t <= 0)) + (s - margin) ** 2 * ((s <= margin) & (t > 0))
    return np.abs(loss).sum() / s.shape[0]


def np_normalize(x):
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def np_ft_repdistiller(fs, ft, p1=2):
    """RepDistiller FactorTransfer: |normalize(mean_c f^p1)_s − normalize(mean_c f^p1)_t|, mean (NHWC here)."""
    b = fs.shape[0]
    a = lambda f: np_normalize((np.float64(f) ** p1).mean(-1).reshape(b, -1))  # noqa: E731
    return np.mean(np.abs(a(fs) - a(ft)))


def np_ft_official(fs, ft):
    """Authors' code: F.l1_loss(FT(factor_s), FT(factor_t)), FT(x) = F.normalize(x.view(B, −1))."""
    b = fs.shape[0]
    return np.mean(np.abs(np_normalize(np.float64(fs).reshape(b, -1)) - np_normalize(np.float64(ft).reshape(b, -1))))


# ----- values -----


def test_vid_matches_numpy():
    mu, t, a = rand(0, (5, 3, 3, 4)), rand(1, (5, 3, 3, 4)), rand(2, (4,))
    np.testing.assert_allclose(losses.vid(mu, t, a), np_vid(mu, t, a), rtol=1e-5)
    np.testing.assert_allclose(losses.vid(mu, t, a, eps=0.1), np_vid(mu, t, a, eps=0.1), rtol=1e-5)


def test_vid_variance_starts_at_init_pred_var():
    variables = VIDRegressor(6, 4, init_pred_var=5.0).init(jax.random.PRNGKey(0), jnp.zeros((2, 3, 3, 5)), train=False)
    alpha = variables["params"]["log_scale"]
    np.testing.assert_allclose(jax.nn.softplus(alpha) + 1e-5, np.full(6, 5.0), rtol=1e-6)
    prediction, log_scale = VIDRegressor(6, 4).apply(variables, rand(3, (2, 3, 3, 5)), train=True)
    np.testing.assert_array_equal(log_scale, alpha)
    assert prediction.shape == (2, 3, 3, 6)
    assert set(variables["params"]) == {"conv0", "conv1", "conv2", "log_scale"}
    assert all("bias" not in variables["params"][f"conv{i}"] for i in range(3))  # bias-free 1x1 convolutions


def test_activation_boundary_matches_numpy():
    s, t = rand(4, (6, 3, 3, 4), 2.0), rand(5, (6, 3, 3, 4))
    for margin in (1.0, 0.3):
        np.testing.assert_allclose(losses.activation_boundary(s, t, margin=margin), np_ab_layer(s, t, margin),
                                   rtol=1e-5)
    # Matching activation patterns beyond the margin give 0.
    assert float(losses.activation_boundary(np.sign(t) * 2.0, t)) == 0.0


def test_abound_weights_and_connectors_are_repdistillers():
    # Layer weights 2^(i−n+1) · 3/1000, as ABLoss scales the three pre-ReLU stages.
    s = [rand(10 + i, (4, 4 // 2**i, 4 // 2**i, 8 * 2**i)) for i in range(3)]
    t = [rand(20 + i, (4, 4 // 2**i, 4 // 2**i, 8 * 2**i)) for i in range(3)]
    names = ("stage1_preact", "stage2_preact", "stage3_preact")
    inputs = LossInputs.of(Outputs(jnp.zeros((4, 5)), dict(zip(names, s)), {}),
                           Outputs(jnp.zeros((4, 5)), dict(zip(names, t)), {}))
    method = methods.activation_boundary()
    vars = method.init(jax.random.PRNGKey(0), inputs)
    assert jax.tree.leaves(vars.params) == []  # equal shapes: identity connectors
    value, aux = method.loss(vars, inputs, jax.random.PRNGKey(1))
    expected = sum(2.0 ** (i - 2) * np_ab_layer(s[i], t[i]) / 1000 * 3 for i in range(3))
    np.testing.assert_allclose(value, expected, rtol=1e-5)
    np.testing.assert_allclose(aux.metrics["stage3_preact"], np_ab_layer(s[2], t[2]), rtol=1e-5)
    # Different channels: a convolution + BatchNorm without ReLU (a pre-activation can be negative).
    connector = activation_boundary_connector((4, 8, 8, 16), (4, 8, 8, 32))
    assert connector.channels == 32 and not connector.use_relu


def test_factor_transfer_matches_repdistiller_and_the_authors_code():
    fs, ft = rand(6, (5, 4, 4, 3)), rand(7, (5, 4, 4, 3))
    np.testing.assert_allclose(losses.factor_transfer(fs, ft), np_ft_repdistiller(fs, ft), rtol=1e-5)
    np.testing.assert_allclose(losses.factor_transfer(fs, ft, power=1), np_ft_repdistiller(fs, ft, 1), rtol=1e-5)
    np.testing.assert_allclose(losses.factor_transfer(fs, ft, power=None), np_ft_official(fs, ft), rtol=1e-5)
    # Only directions count: scaling a factor changes nothing.
    np.testing.assert_allclose(losses.factor_transfer(3.0 * fs, ft, power=None), np_ft_official(fs, ft), rtol=1e-5)


def test_paraphraser_reconstruction_is_the_mean_squared_error():
    r, x = rand(8, (4, 2, 2, 3)), rand(9, (4, 2, 2, 3))
    np.testing.assert_allclose(losses.paraphraser_reconstruction(r, x), np.mean((np.float64(r) - x) ** 2), rtol=1e-6)


def test_paraphraser_and_translator_shapes_and_layers():
    x = rand(10, (2, 4, 4, 8))
    p = Paraphraser(8, 0.5)
    variables = jax.jit(p.init)(jax.random.PRNGKey(0), x)
    factor, rec = jax.jit(p.apply)(variables, x)
    assert factor.shape == (2, 4, 4, 4) and rec.shape == x.shape
    np.testing.assert_allclose(jax.jit(lambda v, x: p.apply(v, x, method=Paraphraser.encode))(variables, x), factor)
    assert sorted(variables["params"]) == ["dec0", "dec1", "dec2", "enc0", "enc1", "enc2"]
    assert "batch_stats" not in variables  # RepDistiller's paraphraser has no BatchNorm (use_bn=False)
    tr = Translator(8, 0.5)
    tv = jax.jit(lambda r, x: tr.init(r, x, train=False))(jax.random.PRNGKey(1), rand(11, (2, 4, 4, 6)))
    out, _ = jax.jit(lambda v, x: tr.apply(v, x, train=True, mutable=["batch_stats"]))(tv, rand(11, (2, 4, 4, 6)))
    assert out.shape == (2, 4, 4, 4) and "batch_stats" in tv


def test_match_spatial_average_pools_the_larger_map():
    s, t = rand(12, (2, 4, 4, 3)), rand(13, (2, 2, 2, 5))
    ps, pt = match_spatial(s, t, method="vid")
    np.testing.assert_allclose(ps, s.reshape(2, 2, 2, 2, 2, 3).mean(axis=(2, 4)), rtol=1e-6)
    assert pt is t
    ps, pt = match_spatial(t, s, method="vid")
    assert ps is t and pt.shape == (2, 2, 2, 3)
    with pytest.raises(ValueError, match=r"\(2, 3, 3, 3\).*\(2, 2, 2, 5\)"):
        match_spatial(rand(14, (2, 3, 3, 3)), t, method="vid")
    with pytest.raises(ValueError, match="maps"):
        match_spatial(rand(14, (2, 3)), t, method="vid")


# ----- bad inputs -----


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="log_scale"):
        losses.vid(np.zeros((2, 2, 2, 3)), np.zeros((2, 2, 2, 3)), np.zeros(4))
    with pytest.raises(ValueError, match=r"\(2, 2, 2, 3\).*\(2, 2, 2, 4\)"):
        losses.vid(np.zeros((2, 2, 2, 3)), np.zeros((2, 2, 2, 4)), np.zeros(3))
    with pytest.raises(ValueError, match="eps"):
        losses.vid(np.zeros((2, 2, 2, 3)), np.zeros((2, 2, 2, 3)), np.zeros(3), eps=0.0)
    with pytest.raises(ValueError, match="margin"):
        losses.activation_boundary(np.zeros((2, 3)), np.zeros((2, 3)), margin=-1.0)
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(2, 4\)"):
        losses.activation_boundary(np.zeros((2, 3)), np.zeros((2, 4)))
    with pytest.raises(ValueError, match="power"):
        losses.factor_transfer(np.zeros((2, 2, 2, 3)), np.zeros((2, 2, 2, 3)), power=0)
    with pytest.raises(ValueError, match=r"\(2, 2, 2, 3\).*\(2, 2, 2, 4\)"):
        losses.factor_transfer(np.zeros((2, 2, 2, 3)), np.zeros((2, 2, 2, 4)))
    with pytest.raises(ValueError, match="paraphraser_steps"):
        methods.factor_transfer(paraphraser_steps=-1)
    with pytest.raises(ValueError, match="rate"):
        methods.factor_transfer(paraphraser_steps=1, rate=0.0)
    with pytest.raises(ValueError, match="reconstruction_weight"):
        methods.factor_transfer(paraphraser_steps=1, reconstruction_weight=-1.0)
    with pytest.raises(ValueError, match="init_pred_var"):
        methods.vid(init_pred_var=0.0)
    with pytest.raises(ValueError, match="mid_channels"):
        methods.vid(mid_channels=0)
    with pytest.raises(ValueError, match="margin"):
        methods.activation_boundary(margin=-0.5)
    with pytest.raises(ValueError, match="teacher feature"):
        methods.vid(student_features=("stage1", "stage2"), teacher_features=("stage1",))


# ----- FT's two stages, through the method's own functions -----


def test_ft_trains_the_paraphraser_first_then_freezes_it_and_trains_the_translator():
    s, t = rand(15, (4, 2, 2, 6)), rand(16, (4, 4, 4, 8))  # the teacher's map is larger: pooled
    n = 3
    method = methods.factor_transfer(paraphraser_steps=n, weight=200.0, reconstruction_weight=0.2)

    def inputs(step, s=s):
        return LossInputs.of(Outputs(jnp.zeros((4, 5)), {"stage3": s}, {}),
                             Outputs(jnp.zeros((4, 5)), {"stage3": t}, {}), step=step)

    vars = jax.jit(method.init)(jax.random.PRNGKey(0), inputs(0))
    jax.tree.map(np.testing.assert_array_equal, vars.state["paraphraser"], vars.params["paraphraser"])

    @jax.jit
    def loss(vars, step, s=jnp.asarray(s)):
        return method.loss(vars, inputs(step, s), jax.random.PRNGKey(0))

    @jax.jit
    def grads(step):
        def f(params, s):
            return loss(MethodVars(params, vars.state), step, s)[0]

        return jax.grad(f, argnums=(0, 1))(vars.params, jnp.asarray(s))

    def norm(tree):
        return sum(float(jnp.sum(jnp.abs(x))) for x in jax.tree.leaves(tree))

    (g, g_s) = grads(n - 1)  # first stage: only the paraphraser learns (reconstruction)
    assert norm(g["paraphraser"]) > 0 and norm(g["translator"]) == 0 and norm(g_s) == 0
    value, aux = loss(vars, n - 1)
    np.testing.assert_allclose(value, aux.metrics["reconstruction"])
    jax.tree.map(np.testing.assert_array_equal, aux.state["translator"], vars.state["translator"])  # BN kept
    (g, g_s) = grads(n)  # second stage: the student and the translator learn; the paraphraser does not
    assert norm(g["paraphraser"]) == 0 and norm(g["translator"]) > 0 and norm(g_s) > 0
    value, aux = loss(vars, n)
    np.testing.assert_allclose(value, aux.metrics["factor"])
    assert not all(jax.tree.leaves(jax.tree.map(np.array_equal, aux.state["translator"], vars.state["translator"])))
    # The stage weights: reconstruction_weight, then weight.
    assert float(method.weight(jnp.int32(n - 1))) == pytest.approx(0.2)
    assert float(method.weight(jnp.int32(n))) == 200.0
    # update copies the trained paraphraser after steps 1..n and never after.
    moved = jax.tree.map(lambda x: x + 1.0, vars.params)
    info = lambda step: StepInfo(step=jnp.int32(step), student_params={}, metrics={})  # noqa: E731
    kept = method.update(moved, vars.state, info(n))
    jax.tree.map(np.testing.assert_array_equal, kept["paraphraser"], moved["paraphraser"])
    frozen = method.update(moved, vars.state, info(n + 1))
    jax.tree.map(np.testing.assert_array_equal, frozen["paraphraser"], vars.state["paraphraser"])


# ----- the methods in the jitted train step -----


def test_vid_abound_ft_train_in_the_jitted_step():
    """One chain with both two-stage recipes (stage boundary after 2 steps) and VID: 4 steps."""
    teacher, student = tiny_conv_models()
    batch = tiny_image_batch()
    tvars = teacher.init(jax.random.PRNGKey(1), batch["image"])
    n = 2
    spec = f"until({n}) * activation_boundary + after({n}) * ce + factor_transfer(paraphraser_steps={n}, weight=200) + vid"
    state = jaxkd.create(student=student, teacher=teacher, teacher_variables=tvars, method=methods.parse(spec),
                         tx=optax.sgd(0.01, momentum=0.9), sample_batch=batch, rng=jax.random.PRNGKey(0))
    params = jax.device_get(state.method_vars.params)
    # resnet8's and resnet14's stages have equal shapes: AB's connectors are identities.
    assert jax.tree.leaves(params["activation_boundary"]) == []
    assert params["vid"]["2"]["conv2"]["kernel"].shape == (1, 1, 64, 64)
    step = jaxkd.make_train_step()
    history = [params]
    for i in range(4):
        state, metrics = step(state, batch)
        history.append(jax.device_get(state.method_vars.params))
        for name in ("loss", "activation_boundary", "factor_transfer", "factor_transfer/reconstruction", "factor_transfer/factor", "vid"):
            assert np.isfinite(float(metrics[name])), name
        assert float(metrics["activation_boundary/weight"]) == (1.0 if i < n else 0.0)
        assert float(metrics["factor_transfer/weight"]) == (1.0 if i < n else 200.0)
        snapshot = jax.device_get(state.method_vars.state["factor_transfer"]["paraphraser"])
        trained = history[min(i + 1, n)]["factor_transfer"]["paraphraser"]  # the paraphraser as trained at step min(i+1, n)
        # Equal up to float rounding: XLA may compute the updated parameters twice in the step (once for the
        # state, once for the copy) with different fusion, so the last bit can differ.
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9), snapshot, trained)

    def changed(a, b):
        return any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))

    assert changed(history[0]["factor_transfer"]["paraphraser"], history[n]["factor_transfer"]["paraphraser"])
    assert not changed(history[0]["factor_transfer"]["translator"], history[n]["factor_transfer"]["translator"])
    assert changed(history[n]["factor_transfer"]["translator"], history[4]["factor_transfer"]["translator"])
    assert changed(history[0]["vid"], history[4]["vid"])
