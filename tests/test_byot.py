"""BYOT: the loss against NumPy of the paper's formula, the head against NumPy, the method's value against the
formula on its heads' outputs in one jitted step of a tiny CIFAR ResNet, the deepest classifier taught by the labels
alone (no gradient from the self-distillation terms), bad hyper-parameters."""

import jax
import numpy as np
import optax
import pytest

import jaxkd
from jaxkd import losses, methods, models
from jaxkd.methods.feature.byot import ByotHead
from jaxkd.models.cifar_resnet import CifarResNet
from tests.helpers import NUM_CLASSES, tiny_image_batch

STUDENT = models.from_linen(CifarResNet(depth=8, num_filters=(4, 4, 8, 8), num_classes=NUM_CLASSES), name="s")
BATCH = tiny_image_batch(batch_size=8)


def _log_softmax(z, t=1.0):
    z = z / t
    return z - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)) - z.max(-1, keepdims=True)


def numpy_byot(aux, h, z, f, y, t, alpha, lam):
    """Σ_i (1 − α) CE(z_i, y) + α KL(softmax(z/T) ‖ softmax(z_i/T)) + λ ‖h_i − f‖², per example."""
    b, num_aux, _ = aux.shape
    ce = -_log_softmax(aux)[np.arange(b)[:, None], np.arange(num_aux)[None], y[:, None]].sum(-1)
    log_p = _log_softmax(z, t)[:, None]
    kd = (np.exp(log_p) * (log_p - _log_softmax(aux, t))).sum((-2, -1))
    hint = ((h - f[:, None]) ** 2).sum((-2, -1))
    return (1 - alpha) * ce + alpha * kd + lam * hint


def test_loss_against_numpy_of_the_formula():
    rng = np.random.default_rng(0)
    aux, h, z, f = rng.normal(size=(4, 3, 5)) * 2, rng.normal(size=(4, 3, 6)), rng.normal(size=(4, 5)) * 2, rng.normal(size=(4, 6))
    y = np.array([0, 4, 2, 1])
    got = losses.byot(aux, h, z, f, y, temperature=2.5, alpha=0.4, feature_weight=0.2, reduction="none")
    np.testing.assert_allclose(np.asarray(got), numpy_byot(aux, h, z, f, y, 2.5, 0.4, 0.2), rtol=1e-5)
    got = losses.byot(aux, h, z, f, y, reduction="none")  # the authors' defaults T = 3, α = 0.3, λ = 0.03
    np.testing.assert_allclose(np.asarray(got), numpy_byot(aux, h, z, f, y, 3.0, 0.3, 0.03), rtol=1e-5)


def test_head_on_an_embedding_is_two_linear_maps():
    x = np.random.default_rng(1).normal(size=(3, 4)).astype(np.float32)
    head = ByotHead(num_classes=5, width=6)
    variables = head.init(jax.random.PRNGKey(0), x, train=False)
    (h, logits) = head.apply(variables, x, train=False)
    p = variables["params"]
    expected_h = x @ np.asarray(p["Dense_0"]["kernel"]) + np.asarray(p["Dense_0"]["bias"])
    np.testing.assert_allclose(np.asarray(h), expected_h, rtol=1e-5, atol=1e-6)
    expected = expected_h @ np.asarray(p["Dense_1"]["kernel"]) + np.asarray(p["Dense_1"]["bias"])
    np.testing.assert_allclose(np.asarray(logits), expected, rtol=1e-5, atol=1e-5)


def test_one_jitted_step_matches_the_formula_on_the_heads_outputs_and_leaves_the_deepest_classifier_alone():
    method = methods.parse("byot(temperature=2, alpha=0.5, feature_weight=0.1, deepest=None)")
    state = jaxkd.create(student=STUDENT, method=method, tx=optax.sgd(0.1), sample_batch=BATCH,
                         rng=jax.random.PRNGKey(0))
    student_vars = jax.device_get(state.student.variables())
    head_vars = jax.device_get(state.method_vars)
    out = STUDENT.apply(student_vars, BATCH["image"], train=True)
    aux, h = [], []
    # deepest=None: the 8x8 stage1 map is brought down to stage2's 4x4 (one SepConv), stage2 gets a 1x1 convolution
    # (fewer SepConvs than the default's, to keep the compile small; test_default_heads_downsample_to_the_deepest_map).
    for stage, downsamples in (("stage1", 1), ("stage2", 0)):
        head = ByotHead(NUM_CLASSES, out.features["pooled"].shape[-1], downsamples)
        variables = {"params": head_vars.params["byot"][stage], **head_vars.state["byot"][stage]}
        (e, z), _ = head.apply(variables, out.features[stage], train=True, mutable=["batch_stats"])
        aux.append(np.asarray(z))
        h.append(np.asarray(e))
    expected = numpy_byot(np.stack(aux, 1), np.stack(h, 1), np.asarray(out.logits), np.asarray(out.features["pooled"]),
                          BATCH["label"], 2.0, 0.5, 0.1).mean()
    fc_before = jax.device_get(state.student.params["fc"])
    state, metrics = jaxkd.make_train_step()(state, BATCH)
    np.testing.assert_allclose(float(metrics["byot"]), expected, rtol=1e-4)
    # The deepest classifier is a target: byot alone never moves the student's own classifier layer.
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.student.params["fc"]), fc_before)
    assert float(metrics["grad_norm"]) > 0


def test_default_heads_downsample_to_the_deepest_map():
    state = jaxkd.create(student=STUDENT, method=methods.parse("ce + byot"), tx=optax.sgd(0.1), sample_batch=BATCH,
                         rng=jax.random.PRNGKey(0))
    params = state.method_vars.params["byot"]
    assert sorted(params["stage1"]) == ["Dense_0", "sepconv0", "sepconv1"]  # 8x8 -> 2x2: two stride-2 blocks
    assert sorted(params["stage2"]) == ["Dense_0", "sepconv0"]  # 4x4 -> 2x2
    assert params["stage1"]["Dense_0"]["kernel"].shape == (8, NUM_CLASSES)  # the width of the student's "pooled"


@pytest.mark.parametrize("kwargs, match", [
    ({"alpha": 1.5}, "alpha"), ({"feature_weight": -1.0}, "feature_weight"), ({"temperature": 0.0}, "temperature"),
    ({"stages": ("stage1", "stage1")}, "distinct"), ({"deepest": 3}, "deepest"), ({"width": 0}, "width"),
])
def test_bad_hyperparameters_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        methods.byot(**kwargs)


def test_bad_loss_shapes_raise():
    a, h, z, f, y = np.zeros((2, 3, 5)), np.zeros((2, 3, 4)), np.zeros((2, 5)), np.zeros((2, 4)), np.array([0, 1])
    with pytest.raises(ValueError, match="aux_logits"):
        losses.byot(a[..., :4], h, z, f, y)
    with pytest.raises(ValueError, match="aux_features"):
        losses.byot(a, h[:, :2], z, f, y)
    with pytest.raises(ValueError, match="alpha"):
        losses.byot(a, h, z, f, y, alpha=-0.1)
