"""The feature-method infrastructure (jaxkd/methods/features.py, jaxkd/methods/feature/connectors.py,
jaxkd.losses.core.relational_loss): features by name with errors that list what exists, connectors sized
from abstract shapes (RepDistiller's ConvReg rule) with errors naming both shapes, BatchNorm statistics as
method state, and `feature_method` trained in the jitted step."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxkd
from jaxkd import losses, methods
from jaxkd.losses.core import relational_loss
from jaxkd.methods import LossInputs, MethodVars
from jaxkd.models import Outputs
from tests.helpers import tiny_batch, tiny_conv_models, tiny_image_batch, tiny_models


def abstract(shape):
    return jax.ShapeDtypeStruct(shape, jnp.float32)


@pytest.mark.parametrize(
    "student, teacher, kind, expected_kernel",
    [
        ((2, 8, 8, 4), (2, 4, 4, 6), "down2", (3, 3)),  # twice the teacher's size: 3x3 stride 2
        ((2, 4, 4, 4), (2, 8, 8, 6), "up2", (4, 4)),  # half: 4x4 transposed, stride 2
        ((2, 8, 8, 4), (2, 8, 8, 6), "valid", (1, 1)),  # equal: 1x1
        ((2, 8, 8, 4), (2, 6, 6, 6), "valid", (3, 3)),  # larger: a (1 + 8 - 6)^2 = 3x3 valid convolution
        # Non-square maps: height and width are sized separately, (1 + 8 - 6) x (1 + 6 - 2).
        ((2, 8, 6, 4), (2, 6, 2, 6), "valid", (3, 5)),
        ((2, 8, 6, 4), (2, 4, 3, 6), "down2", (3, 3)),
        ((2, 3, 5, 4), (2, 6, 10, 6), "up2", (4, 4)),
    ],
)
def test_conv_regressor_maps_the_student_map_onto_the_teachers_shape(student, teacher, kind, expected_kernel):
    module = methods.connector_between(student, teacher)
    assert isinstance(module, methods.ConvRegressor) and module.mode == kind
    vars = methods.module_init(module, jax.random.PRNGKey(0), abstract(student))  # from shapes alone
    kernel = vars.params["conv"]["kernel"]
    assert kernel.shape[:2] == expected_kernel and kernel.shape[-1] == teacher[-1]
    y, state = methods.module_apply(module, vars, jnp.ones(student))
    assert y.shape == teacher and bool(jnp.all(y >= 0))  # BN + ReLU
    # Train mode updates the BatchNorm running statistics, which are method state.
    assert set(state) == {"batch_stats"}
    assert not np.allclose(state["batch_stats"]["bn"]["var"], vars.state["batch_stats"]["bn"]["var"])


def test_linear_connectors_for_embeddings_and_tokens():
    for student, teacher in [((3, 5), (3, 7)), ((3, 4, 5), (3, 4, 7))]:
        module = methods.connector_between(student, teacher)
        vars = methods.module_init(module, jax.random.PRNGKey(0), abstract(student))
        x = np.random.default_rng(0).normal(size=student).astype(np.float32)
        y, _ = methods.module_apply(module, vars, x)
        k, b = vars.params["Dense_0"]["kernel"], vars.params["Dense_0"]["bias"]
        np.testing.assert_allclose(y, x @ np.asarray(k) + np.asarray(b), rtol=1e-5, atol=1e-6)  # x W + b


def test_crd_embed_is_a_normalized_linear_map():
    module = methods.LinearEmbed(dim=4)
    x = np.random.default_rng(1).normal(size=(3, 2, 2, 5)).astype(np.float32)
    vars = methods.module_init(module, jax.random.PRNGKey(0), x)
    y, _ = methods.module_apply(module, vars, x)
    z = x.reshape(3, -1) @ np.asarray(vars.params["Dense_0"]["kernel"]) + np.asarray(vars.params["Dense_0"]["bias"])
    np.testing.assert_allclose(y, z / np.linalg.norm(z, axis=1, keepdims=True), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "student, teacher, message",
    [
        ((2, 4, 4, 3), (2, 9, 9, 3), r"4x4 map to the teacher's 9x9 map.*\(2, 4, 4, 3\).*\(2, 9, 9, 3\)"),
        ((2, 4, 4, 3), (2, 9), r"rank-4 student feature \(2, 4, 4, 3\).*rank-2 teacher feature \(2, 9\)"),
        ((2, 3, 5), (2, 4, 7), r"differ in the token axis"),
    ],
)
def test_features_no_connector_can_reconcile_are_refused_naming_both_shapes(student, teacher, message):
    with pytest.raises(ValueError, match=message):
        methods.connector_between(student, teacher)


def test_a_feature_a_participant_does_not_produce_is_an_error_listing_what_it_does():
    inputs = LossInputs.of(
        Outputs(jnp.zeros((2, 3)), {"pooled": jnp.zeros((2, 4)), "stage1": jnp.zeros((2, 2, 2, 4))}, {}),
        Outputs(jnp.zeros((2, 3)), {"pooled": jnp.zeros((2, 4))}, {}),
    )
    with pytest.raises(ValueError, match=r"'at'.*'student' does not sow a feature named 'stage9'.*\['pooled', 'stage1'\]"):
        methods.student_feature(inputs, "stage9", method="at")
    with pytest.raises(ValueError, match=r"needs the outputs of participant 'peer'.*\['student', 'teacher'\]"):
        methods.feature_of(inputs, "peer", "pooled", method="at")
    # The teacher's feature is a target: no gradient flows into it.
    g = jax.grad(lambda t: jnp.sum(methods.teacher_feature(
        LossInputs.of(Outputs(jnp.zeros((2, 3)), {}, {}), Outputs(jnp.zeros((2, 3)), {"pooled": t}, {})),
        "pooled", method="x")))(jnp.ones((2, 4)))
    assert not np.any(np.asarray(g))


def test_an_unknown_feature_is_refused_when_the_train_state_is_created():
    teacher, student = tiny_models()
    batch = tiny_batch()
    with pytest.raises(ValueError, match=r"does not sow a feature named 'stage7'.*\['hidden1', 'pooled'\]"):
        jaxkd.create(student=student, teacher=teacher, teacher_variables=teacher.init(jax.random.PRNGKey(1), batch["image"]),
                     method=methods.parse("ce + fitnets(student_feature='stage7')"), tx=optax.sgd(0.1),
                     sample_batch=batch, rng=jax.random.PRNGKey(0))


def test_feature_method_sums_pairs_through_their_own_connectors_and_trains_them():
    """``feature_method``: Σ_j w_j · MSE(connector_j(f_s^j), f_t^j), one connector per pair, in the jitted step."""
    teacher, student = tiny_conv_models()
    batch = tiny_image_batch()
    tvars = teacher.init(jax.random.PRNGKey(1), batch["image"])
    mse = losses.per_example_loss(lambda s, t: jnp.mean((s - t) ** 2, axis=(1, 2, 3)))
    method = methods.feature_method(
        "hints", mse, student_features=("stage1", "stage2"), teacher_features=("stage2", "stage2"),
        connector=methods.connector_between, pair_weights=(0.5, 2.0),
    )
    state = jaxkd.create(student=student, teacher=teacher, teacher_variables=tvars, method=methods.ce() + method,
                         tx=optax.sgd(0.1), sample_batch=batch, rng=jax.random.PRNGKey(0))
    connectors = jax.device_get(state.method_vars.params["hints"])  # the step donates the state
    assert connectors["0"]["conv"]["kernel"].shape == (3, 3, 16, 32)  # 8x8 -> 4x4: stride 2
    assert connectors["1"]["conv"]["kernel"].shape == (1, 1, 32, 32)  # equal sizes: 1x1

    # The value from the formula, with the connectors' initial parameters and the batch's BN statistics.
    bn_state = jax.device_get(state.method_vars.state["hints"])
    s_out = student.apply(state.student.variables(), batch["image"], train=True)
    t_out = teacher.apply(tvars, batch["image"], train=False)
    expected = 0.0
    for j, (s_name, w) in enumerate([("stage1", 0.5), ("stage2", 2.0)]):
        module = methods.connector_between(s_out.features[s_name].shape, t_out.features["stage2"].shape)
        y, _ = methods.module_apply(module, MethodVars(connectors[str(j)], bn_state[str(j)]), s_out.features[s_name])
        expected += w * float(np.mean((np.asarray(y) - np.asarray(t_out.features["stage2"])) ** 2))
    new_state, metrics = jaxkd.make_train_step()(state, batch)
    np.testing.assert_allclose(float(metrics["hints"]), expected, rtol=1e-4)
    assert {"hints/stage1", "hints/stage2"} <= set(metrics)
    assert not np.allclose(new_state.method_vars.params["hints"]["0"]["conv"]["kernel"], connectors["0"]["conv"]["kernel"])
    bn_before = bn_state["1"]["batch_stats"]["bn"]["mean"]
    assert not np.allclose(new_state.method_vars.state["hints"]["1"]["batch_stats"]["bn"]["mean"], bn_before)


def test_relational_loss_passes_the_mask_as_weights_and_has_only_a_mean():
    @relational_loss
    def mean_pairwise(x, *, example_weights, scale=1.0):
        """doc"""
        w = example_weights
        d = losses.core.squared_distances(x)
        pair = w[:, None] * w[None, :] * (1 - jnp.eye(x.shape[0]))
        return scale * jnp.sum(pair * d) / jnp.sum(pair)

    x = np.random.default_rng(0).normal(size=(5, 3))
    mask = np.array([1, 0, 1, 1, 0], bool)
    np.testing.assert_allclose(mean_pairwise(x, mask=mask, scale=2.0), mean_pairwise(x[mask], scale=2.0), rtol=1e-6)
    with pytest.raises(ValueError, match="only reduction='mean'"):
        mean_pairwise(x, reduction="sum")
    import inspect

    assert list(inspect.signature(mean_pairwise).parameters) == ["x", "scale", "mask", "reduction"]
