"""FitNets (jaxkd/losses/feature/fitnets.py, jaxkd/methods/feature/fitnets.py): the hint MSE against NumPy, the regressor
trained with the student, and the paper's two-stage recipe with stage weights: in the hint stage only the
layers up to the guided layer (and the regressor) receive gradients from the loss.

Finite-difference gradients, bfloat16, jit == eager, masks: tests/test_feature_contract.py.
"""

import jax
import numpy as np
import optax
import pytest

import jaxkd
from jaxkd import losses, methods

from tests.helpers import tiny_conv_models, tiny_image_batch


def test_values_match_numpy_mse():
    rng = np.random.default_rng(0)
    s, t = rng.normal(size=(5, 3, 3, 4)), rng.normal(size=(5, 3, 3, 4))
    per_example = ((s - t) ** 2).reshape(5, -1).mean(-1)
    np.testing.assert_allclose(losses.fitnets(s, t, reduction="none"), per_example, rtol=1e-6)
    np.testing.assert_allclose(losses.fitnets(s, t), ((s - t) ** 2).mean(), rtol=1e-6)  # nn.MSELoss()
    assert float(losses.fitnets(t, t)) == 0.0


def test_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"\(4, 2, 2, 3\).*\(4, 2, 2, 5\)"):
        losses.fitnets(np.zeros((4, 2, 2, 3)), np.zeros((4, 2, 2, 5)))


TEACHER, STUDENT = tiny_conv_models()
BATCH = tiny_image_batch()
TVARS = TEACHER.init(jax.random.PRNGKey(1), BATCH["image"])


def create(spec, tx=None):
    return jaxkd.create(student=STUDENT, teacher=TEACHER, teacher_variables=TVARS, method=methods.parse(spec),
                        tx=tx or optax.sgd(0.05, momentum=0.9), sample_batch=BATCH, rng=jax.random.PRNGKey(0))


# FitNets' two stages in one run: the hint alone for 3 steps, then CE + KD. (The spec language weights
# single terms, so ``after(3) * (ce + kd)`` is written term by term; Python accepts the parentheses.)
SPEC = "until(3) * fitnets + after(3) * ce + after(3) * kd(temperature=4)"


@pytest.fixture(scope="module")
def two_stage_run():
    state = create(SPEC)
    step = jaxkd.make_train_step()
    states, metrics = [jax.device_get(state)], []  # host copies: the step donates its input state
    for _ in range(4):
        state, m = step(state, BATCH)
        states.append(jax.device_get(state))
        metrics.append(jax.device_get(m))
    return states, metrics


def test_fitnets_trains_the_regressor_in_the_jitted_step(two_stage_run):
    states, metrics = two_stage_run
    before = jax.device_get(states[0].method_vars.params["fitnets"])
    after = jax.device_get(states[1].method_vars.params["fitnets"])
    assert np.isfinite(metrics[0]["fitnets"]) and metrics[0]["fitnets"] > 0
    # (The conv bias feeds BatchNorm in train mode, which removes it: it gets no gradient, as in PyTorch.)
    for a, b in ((before["0"]["conv"]["kernel"], after["0"]["conv"]["kernel"]), *zip(
            jax.tree.leaves(before["0"]["bn"]), jax.tree.leaves(after["0"]["bn"]))):
        assert not np.array_equal(a, b)
    # The regressor maps the student's stage2 map onto the teacher's (1x1 conv for equal sizes).
    assert after["0"]["conv"]["kernel"].shape == (1, 1, 32, 32)
    assert [float(m["fitnets/weight"]) for m in metrics] == [1.0, 1.0, 1.0, 0.0]
    assert [float(m["ce/weight"]) for m in metrics] == [0.0, 0.0, 0.0, 1.0]
    assert all(np.isfinite(m["loss"]) for m in metrics)


def test_an_irreconcilable_hint_pair_is_refused_at_create():
    with pytest.raises(ValueError, match=r"2x2 map to the teacher's 8x8"):
        create("fitnets(student_feature='stage3', teacher_feature='stage1')")


@jax.jit
def loss_gradients(state, step):
    """The gradient of the method's total loss (not the optimizer's update) w.r.t. what the step trains."""
    teacher_out = jax.lax.stop_gradient(TEACHER.apply(TVARS, BATCH["image"], train=False))

    def total(trainable):
        variables = {"params": trainable["student"], **state.trained["student"].model_state}
        inputs = methods.LossInputs.of(STUDENT.apply(variables, BATCH["image"], train=True), teacher_out, BATCH,
                                       step=step)
        vars = methods.MethodVars(trainable["method"], state.method_vars.state)
        return state.method.loss(vars, inputs, jax.random.PRNGKey(0))[0]

    return jax.grad(total)(state.trainable)


def nonzero(tree):
    return any(np.any(np.asarray(leaf) != 0) for leaf in jax.tree.leaves(tree))


def test_two_stage_recipe_hint_stage_reaches_only_the_layers_up_to_the_hint(two_stage_run):
    state = two_stage_run[0][0]
    # Stage 1 (steps 0..2): the hint loss alone reaches the stem, stage1, stage2 and the regressor only.
    grads = loss_gradients(state, 0)
    student = grads["student"]
    for layer in ("stage3_block0", "fc"):
        assert not nonzero(student[layer]), f"{layer} got a loss gradient in the hint stage"
    for layer in ("stage1_block0", "stage2_block0"):
        assert nonzero(student[layer]), layer
    assert nonzero(grads["method"]["fitnets"])
    # Stage 2 (step >= 3): CE + KD reach the whole student; the regressor no longer gets gradients.
    grads = loss_gradients(state, 3)
    assert nonzero(grads["student"]["fc"]) and nonzero(grads["student"]["stage3_block0"])
    assert not nonzero(grads["method"]["fitnets"])
    # The Python composition is the same schedule as the spec.
    python = methods.until(3) * methods.fitnets() + methods.after(3) * (methods.ce() + methods.kd(temperature=4))
    parsed = methods.parse(SPEC)
    assert [m.name for m in python.terms] == [m.name for m in parsed.terms]
    for a, b in zip(python.terms, parsed.terms):
        assert [float(a.weight(s)) for s in (0, 2, 3, 9)] == [float(b.weight(s)) for s in (0, 2, 3, 9)]


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="use_relu"):
        methods.fitnets(use_relu="yes")
