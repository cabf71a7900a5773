"""Multi-teacher KD (jaxkd/losses/logit/multi_teacher_kd.py, jaxkd/methods/logit/multi_teacher_kd.py): both targets
against NumPy from the formulas, the weights' checks, and the method distilling two teachers of different
architectures held as named participants.

Gradients, bfloat16, jit == eager, excluded classes and NaN propagation: tests/test_loss_contract.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxkd
from jaxkd import losses, methods, models

from tests.helpers import NUM_CLASSES, tiny_batch
from tests.numpy_reference import np_kl, np_softmax, rand_logits


def np_multi_kd(zs, teachers, w, T, target):
    ps = np_softmax(zs, T)
    if target == "losses":
        return T**2 * sum(wk * np_kl(np_softmax(zt, T), ps) for wk, zt in zip(w, teachers))
    mixture = sum(wk * np_softmax(zt, T) for wk, zt in zip(w, teachers))
    return T**2 * np_kl(mixture, ps)


@pytest.mark.parametrize("target, w", [("losses", (0.7, 0.2, 0.5)), ("losses", None), ("mixture", (0.6, 0.3, 0.1))])
def test_values_match_numpy(target, w):
    zs, teachers = rand_logits(1), [rand_logits(2), rand_logits(3), rand_logits(4)]
    got = losses.multi_teacher_kd(zs, np.stack(teachers, axis=-2), teacher_weights=w, temperature=2.5,
                                  target=target, reduction="none")
    expected = np_multi_kd(zs, teachers, (1 / 3,) * 3 if w is None else w, 2.5, target)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_mixture_is_at_most_the_averaged_losses_and_equal_for_identical_teachers():
    zs, t1, t2 = rand_logits(5), rand_logits(6), rand_logits(7)
    stacked = np.stack([t1, t2], axis=-2)
    mix = losses.multi_teacher_kd(zs, stacked, target="mixture", reduction="none")
    avg = losses.multi_teacher_kd(zs, stacked, target="losses", reduction="none")
    assert np.all(np.asarray(mix) <= np.asarray(avg) + 1e-6) and np.any(np.asarray(mix) < np.asarray(avg) - 1e-3)
    same = np.stack([t1, t1], axis=-2)
    np.testing.assert_allclose(losses.multi_teacher_kd(zs, same, target="mixture"), losses.kd(zs, t1), rtol=1e-5)
    np.testing.assert_allclose(losses.multi_teacher_kd(zs, same), losses.kd(zs, t1), rtol=1e-5)


def test_a_zero_weight_teacher_does_not_count_even_when_it_excludes_classes():
    zs, t1 = rand_logits(8), rand_logits(9)
    t2 = np.full_like(t1, -np.inf)
    t2[:, 0] = 0.0
    got = losses.multi_teacher_kd(zs, np.stack([t1, t2], axis=-2), teacher_weights=(1.0, 0.0), target="mixture")
    np.testing.assert_allclose(got, losses.kd(zs, t1), rtol=1e-5)


@pytest.mark.parametrize("kwargs, message", [
    ({"teacher_weights": (1.0,)}, "1 entries for 2 teachers"),
    ({"teacher_weights": (0.0, 0.0)}, "at least one teacher weight must be positive"),
    ({"teacher_weights": (-1.0, 2.0)}, r"weights\[0\]"),
    ({"teacher_weights": (0.5, 0.7), "target": "mixture"}, "sum to 1"),
    ({"target": "median"}, "target"),
])
def test_bad_arguments_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        losses.multi_teacher_kd(rand_logits(1), np.stack([rand_logits(2)] * 2, axis=-2), **kwargs)


def test_teachers_must_be_stacked_next_to_the_student():
    with pytest.raises(ValueError, match=r"\[\.\.\., K, C\]"):
        losses.multi_teacher_kd(rand_logits(1), rand_logits(2))


# ----- the method: two teachers of different architectures -----

BATCH = tiny_batch()
TEACHER_A = models.get("mlp", num_classes=NUM_CLASSES, hidden_sizes=(32,))
TEACHER_B = models.get("mlp", num_classes=NUM_CLASSES, hidden_sizes=(24, 12))
STUDENT = models.get("mlp", num_classes=NUM_CLASSES, hidden_sizes=(16,))
VARS_A = TEACHER_A.init(jax.random.PRNGKey(1), BATCH["image"])
VARS_B = TEACHER_B.init(jax.random.PRNGKey(2), BATCH["image"])


def two_teacher_state(method):
    return jaxkd.create(
        student=STUDENT, teacher=TEACHER_A, teacher_variables=VARS_A, method=method, tx=optax.sgd(0.1),
        sample_batch=BATCH, rng=jax.random.PRNGKey(0),
        participants={"teacher2": jaxkd.Participant(TEACHER_B, VARS_B, trains=False)},
    )


@pytest.mark.parametrize("spec, w", [("multi_teacher_kd", (0.5, 0.5)),
                                     ("multi_teacher_kd(teacher_weights=(0.8, 0.2), temperature=2)", (0.8, 0.2))])
def test_method_distills_two_architectures_with_the_formula(spec, w):
    method = methods.parse(spec)
    state = two_teacher_state(method)
    T = 2.0 if "temperature=2" in spec else 4.0
    zs = np.asarray(STUDENT.apply(state.student.variables(), BATCH["image"], train=True).logits)
    za = np.asarray(TEACHER_A.apply(VARS_A, BATCH["image"], train=False).logits)
    zb = np.asarray(TEACHER_B.apply(VARS_B, BATCH["image"], train=False).logits)
    teachers_before = jax.device_get(state.frozen)
    state, metrics = jaxkd.make_train_step()(state, BATCH)
    expected = np_multi_kd(zs, [za, zb], w, T, "losses").mean()
    np.testing.assert_allclose(float(metrics["loss"]), expected, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["multi_teacher_kd/teacher2"]), T**2 * np_kl(
        np_softmax(zb, T), np_softmax(zs, T)).mean(), rtol=1e-5)
    jax.tree.map(np.testing.assert_array_equal, teachers_before, jax.device_get(state.frozen))
    result = jaxkd.evaluate(state, [BATCH], jaxkd.make_eval_step())
    assert {"accuracy", "teacher_accuracy", "teacher2_accuracy"} <= set(result)


def test_a_teacher_the_state_lacks_is_named_with_the_participants_it_has():
    method = methods.parse("multi_teacher_kd(teachers=('teacher', 'teacher3'))")
    with pytest.raises(ValueError, match=r"participant 'teacher3'.*\['student', 'teacher', 'teacher2'\]"):
        two_teacher_state(method)
