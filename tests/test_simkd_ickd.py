"""SimKD and ICKD: values against NumPy transcriptions of the official code (NCHW there, NHWC here), SimKD's
evaluation through the teacher's classifier, errors, and both methods in the jitted train step."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxkd
from jaxkd import losses, methods
from jaxkd.methods.base import LossInputs
from jaxkd.methods.feature.simkd import SimKDProjector, adaptive_average_pool
from jaxkd.models.base import Outputs
from jaxkd import models
from tests.helpers import NUM_CLASSES, tiny_image_batch


def nchw(x):
    return np.transpose(x, (0, 3, 1, 2))


def ickd_reference(f_s, f_t):
    """ADLab-AutoDrive/ICKD ``ICKDLoss.batch_loss`` (after the embed) in NumPy, on NCHW maps."""
    bsz, ch = f_s.shape[0], f_s.shape[1]
    f_s, f_t = f_s.reshape(bsz, ch, -1), f_t.reshape(bsz, ch, -1)
    emd_s = f_s @ f_s.transpose(0, 2, 1)
    emd_s = emd_s / np.maximum(np.linalg.norm(emd_s, axis=2, keepdims=True), 1e-12)
    emd_t = f_t @ f_t.transpose(0, 2, 1)
    emd_t = emd_t / np.maximum(np.linalg.norm(emd_t, axis=2, keepdims=True), 1e-12)
    diff = emd_s - emd_t
    return (diff * diff).sum() / (ch * bsz)


def test_ickd_matches_official_formula():
    rng = np.random.default_rng(0)
    s, t = rng.normal(size=(4, 3, 5, 6)), rng.normal(size=(4, 3, 5, 6))
    np.testing.assert_allclose(losses.ickd(s, t), ickd_reference(nchw(s), nchw(t)), rtol=1e-5)


def test_ickd_ignores_where_the_activations_are():
    # The channel Gram sums over positions: permuting them (the same way for every channel) changes nothing.
    rng = np.random.default_rng(1)
    s, t = rng.normal(size=(3, 4, 4, 5)), rng.normal(size=(3, 4, 4, 5))
    perm = rng.permutation(16)
    shuffled = s.reshape(3, 16, 5)[:, perm].reshape(3, 4, 4, 5)
    np.testing.assert_allclose(losses.ickd(shuffled, t), losses.ickd(s, t), rtol=1e-5)


def test_simkd_is_the_mse_and_pooling_is_adaptive_average_pooling():
    rng = np.random.default_rng(2)
    s, t = rng.normal(size=(4, 2, 2, 3)), rng.normal(size=(4, 2, 2, 3))
    np.testing.assert_allclose(losses.simkd(s, t), np.mean((s - t) ** 2), rtol=1e-6)
    x = rng.normal(size=(2, 4, 6, 3))
    pooled = np.asarray(adaptive_average_pool(jnp.asarray(x), (2, 3)))
    np.testing.assert_allclose(pooled[:, 1, 2], x[:, 2:4, 4:6].mean(axis=(1, 2)), rtol=1e-6)
    with pytest.raises(ValueError, match="4x6 map to 3x3"):
        adaptive_average_pool(jnp.asarray(x), (3, 3))


def test_errors():
    with pytest.raises(ValueError, match=r"\(4, 2, 2, 3\) and \(4, 2, 2, 5\)"):
        losses.simkd(np.ones((4, 2, 2, 3)), np.ones((4, 2, 2, 5)))
    with pytest.raises(ValueError, match=r"\(4, 2, 2, 3\) and \(4, 2, 2, 5\)"):
        losses.ickd(np.ones((4, 2, 2, 3)), np.ones((4, 2, 2, 5)))
    # SimKD projects maps: an embedding is refused, naming the features.
    out = Outputs(jnp.zeros((2, 3)), {"pooled": jnp.zeros((2, 4)), "stage3": jnp.zeros((2, 2, 2, 4))}, {})
    inputs = LossInputs(outputs={"student": out, "teacher": out}, batch={}, step=jnp.zeros((), jnp.int32),
                        variables={"teacher": {"params": {"head": {"kernel": jnp.zeros((4, 3))}}}})
    with pytest.raises(ValueError, match="'pooled' \\(2, 4\\)"):
        methods.simkd(student_feature_name="pooled").init(jax.random.PRNGKey(0), inputs)
    with pytest.raises(ValueError, match="no parameters at 'fc'.*'head'"):
        methods.simkd().init(jax.random.PRNGKey(0), inputs)
    no_vars = LossInputs.of(out, out)
    with pytest.raises(ValueError, match="parameters"):
        methods.simkd().init(jax.random.PRNGKey(0), no_vars)
    with pytest.raises(ValueError, match="factor"):
        methods.simkd(factor=0)


def test_simkd_and_ickd_train_and_evaluation_uses_the_teachers_classifier():
    # Two resnet8s (the smallest conv models: the test compiles a train and an eval step).
    teacher = student = models.get("resnet8", num_classes=NUM_CLASSES)
    batch = tiny_image_batch()
    tvars = teacher.init(jax.random.PRNGKey(1), batch["image"])
    state = jaxkd.create(student=student, teacher=teacher, teacher_variables=tvars,
                         method=methods.parse("simkd + 2.5 * ickd"), tx=optax.sgd(0.05, momentum=0.9),
                         sample_batch=batch, rng=jax.random.PRNGKey(0))
    before = jax.device_get(state.method_vars.params)
    state, metrics = jaxkd.make_train_step()(state, batch)
    assert np.isfinite(float(metrics["simkd"])) and np.isfinite(float(metrics["ickd"]))
    changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), before, jax.device_get(state.method_vars.params))
    assert all(jax.tree.leaves(changed["simkd"])) and all(jax.tree.leaves(changed["ickd"]))
    # The classifier copied into the method state is the teacher's.
    fc = state.method_vars.state["simkd"]["classifier"]
    np.testing.assert_array_equal(fc["kernel"], tvars["params"]["fc"]["kernel"])
    np.testing.assert_array_equal(fc["bias"], tvars["params"]["fc"]["bias"])
    # Evaluation: the teacher's classifier on the pooled projected student map (eval-mode BatchNorm).
    out = student.apply(state.student.variables(), batch["image"], train=False)
    projector = SimKDProjector(64, 2)
    simkd_vars = {"params": state.method_vars.params["simkd"]["projector"], **state.method_vars.state["simkd"]["projector"]}
    projected = projector.apply(simkd_vars, out.features["stage3"], train=False)
    expected = np.asarray(jnp.mean(projected, axis=(1, 2)) @ tvars["params"]["fc"]["kernel"] + tvars["params"]["fc"]["bias"])
    np.testing.assert_allclose(state.method.predict(state.method_vars, out), expected, rtol=1e-5, atol=1e-6)
    result = jaxkd.make_eval_step()(state, batch)
    assert float(result["accuracy:num"]) == float(np.sum(expected.argmax(-1) == batch["label"]))
    assert not np.allclose(expected, out.logits)  # not the student's own head
