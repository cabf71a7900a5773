"""Train state, jitted steps, bad-input errors, sharding over a simulated mesh and exact Orbax resume."""

import jax
import numpy as np
import optax
import pytest

import jaxkd
from jaxkd import methods, sharding
from jaxkd.checkpoint import Checkpointer, load_variables, save_variables

from tests.helpers import NUM_CLASSES, teacher_variables, tiny_batch, tiny_models

TX = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.1, momentum=0.9))
METHOD = methods.ce() + methods.kd(temperature=4.0)
TEACHER, STUDENT = tiny_models()
BATCH = tiny_batch()
TEACHER_VARS = teacher_variables(TEACHER, BATCH)
TRAIN_STEP = jaxkd.make_train_step()


def new_state(seed=0, method=METHOD, **kwargs):
    kwargs.setdefault("teacher", TEACHER)
    kwargs.setdefault("teacher_variables", TEACHER_VARS)
    return jaxkd.create(student=STUDENT, method=method, tx=TX, sample_batch=BATCH,
                        rng=jax.random.PRNGKey(seed), **kwargs)


def params_of(state):
    return jax.device_get(state.student.params)


def test_distillation_lowers_the_loss_and_leaves_the_teacher_alone():
    state = new_state()
    teacher_before = jax.device_get(state.teacher.params)
    losses = []
    for _ in range(30):
        state, metrics = TRAIN_STEP(state, BATCH)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < 0.5 * losses[0]
    assert int(state.step) == 30
    assert set(metrics) >= {"loss", "ce", "kd", "grad_norm", "accuracy"}
    jax.tree.map(np.testing.assert_array_equal, teacher_before, jax.device_get(state.teacher.params))


def test_student_batch_stats_are_updated_in_train_mode():
    teacher, _ = tiny_models()
    bn_student = jaxkd.models.get("resnet8", num_classes=NUM_CLASSES)
    batch = {"image": np.random.default_rng(0).normal(size=(4, 8, 8, 3)).astype(np.float32),
             "label": np.arange(4, dtype=np.int32) % NUM_CLASSES}
    state = jaxkd.create(student=bn_student, method=methods.ce(), tx=TX, sample_batch=batch,
                         rng=jax.random.PRNGKey(0))
    before = jax.device_get(state.student.model_state["batch_stats"])
    state, _ = jaxkd.make_train_step()(state, batch)
    after = jax.device_get(state.student.model_state["batch_stats"])
    changed = jax.tree.leaves(jax.tree.map(lambda a, b: not np.allclose(a, b), before, after))
    assert any(changed)


def test_eval_step_counts_only_unpadded_examples():
    state = new_state()
    eval_step = jaxkd.make_eval_step()
    batch = dict(BATCH, mask=np.arange(16) < 10)
    logits = STUDENT.apply(state.student_variables(), BATCH["image"], train=False).logits
    expected = np.mean(np.argmax(logits, -1)[:10] == BATCH["label"][:10])
    result = jaxkd.evaluate(state, [batch], eval_step)
    assert result["count"] == 10
    np.testing.assert_allclose(result["accuracy"], expected)
    assert "teacher_accuracy" in result


# ----- bad input: clear errors at create time or before dispatch -----

def test_teacher_student_class_mismatch_raises():
    other_teacher = jaxkd.models.get("mlp", num_classes=NUM_CLASSES + 1, hidden_sizes=(8,))
    with pytest.raises(ValueError, match="same classes"):
        new_state(teacher=other_teacher, teacher_variables=teacher_variables(other_teacher, BATCH))


def test_missing_batch_key_raises():
    with pytest.raises(ValueError, match=r"needs batch keys \['label'\]"):
        jaxkd.create(student=STUDENT, teacher=TEACHER, teacher_variables=TEACHER_VARS, method=METHOD,
                     tx=TX, sample_batch={"image": BATCH["image"]}, rng=jax.random.PRNGKey(0))


def test_method_that_needs_a_teacher_without_one_raises():
    with pytest.raises(ValueError, match="needs a teacher"):
        new_state(teacher=None, teacher_variables=None)


def test_label_out_of_range_raises_before_the_step():
    state = new_state()
    bad = dict(BATCH, label=np.where(np.arange(16) == 3, NUM_CLASSES, BATCH["label"]).astype(np.int32))
    with pytest.raises(ValueError, match=f"label {NUM_CLASSES}, outside"):
        TRAIN_STEP(state, bad)


# ----- sharding -----

def test_step_sharded_over_eight_devices_matches_single_device():
    assert jax.device_count() == 8, "tests/conftest.py sets 8 simulated CPU devices"
    mesh = sharding.make_mesh()
    sharded_step = jaxkd.make_train_step(mesh=mesh)
    single, sharded = new_state(), new_state()
    for _ in range(3):
        single, m1 = TRAIN_STEP(single, BATCH)
        sharded, m2 = sharded_step(sharded, BATCH)
    np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 params_of(single), params_of(sharded))
    leaf = jax.tree.leaves(sharded.student.params)[0]
    assert leaf.sharding.is_fully_replicated and len(leaf.sharding.device_set) == 8


def test_batch_not_divisible_by_mesh_raises():
    mesh = sharding.make_mesh()
    with pytest.raises(ValueError, match="not divisible"):
        sharding.shard_batch({"image": np.zeros((6, 2))}, mesh)


# ----- checkpoints -----

def test_orbax_resume_is_exact(tmp_path):
    straight = new_state()
    for _ in range(4):
        straight, _ = TRAIN_STEP(straight, BATCH)

    resumed = new_state()
    for _ in range(2):
        resumed, _ = TRAIN_STEP(resumed, BATCH)
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        ckpt.save(int(resumed.step), resumed, data_position={"epoch": 0, "batch": 2})
    target = new_state(seed=123)  # different values, same structure: everything must come from disk
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        resumed, position = ckpt.restore(target)
    assert position == {"epoch": 0, "batch": 2} and int(resumed.step) == 2
    for _ in range(2):
        resumed, _ = TRAIN_STEP(resumed, BATCH)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(straight.opt_state), jax.device_get(resumed.opt_state))
    jax.tree.map(np.testing.assert_array_equal, params_of(straight), params_of(resumed))
    np.testing.assert_array_equal(straight.rng, resumed.rng)


def test_teacher_variables_round_trip(tmp_path):
    save_variables(tmp_path / "teacher", TEACHER_VARS)
    blank = TEACHER.init(jax.random.PRNGKey(99), BATCH["image"])
    loaded = load_variables(tmp_path / "teacher", blank)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(TEACHER_VARS), jax.device_get(loaded))
