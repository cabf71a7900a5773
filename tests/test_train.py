"""Train state, jitted steps, bad-input errors, sharding over a simulated mesh and exact Orbax resume."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxkd
from jaxkd import methods, sharding
from jaxkd.checkpoint import Checkpointer, load_variables, save_variables
from jaxkd.steps import NonFiniteError

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
    chex.assert_trees_all_equal(teacher_before, jax.device_get(state.teacher.params))


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
    logits = STUDENT.apply(state.student.variables(), BATCH["image"], train=False).logits
    expected = np.mean(np.argmax(logits, -1)[:10] == BATCH["label"][:10])
    result = jaxkd.evaluate(state, [batch], eval_step)
    assert result["count"] == 10
    np.testing.assert_allclose(result["accuracy"], expected)
    teacher_logits = TEACHER.apply(state.teacher.variables(), BATCH["image"], train=False).logits
    np.testing.assert_allclose(result["teacher_accuracy"],
                               np.mean(np.argmax(teacher_logits, -1)[:10] == BATCH["label"][:10]))
    # Without the frozen participants: the same figures for the student, none for the teacher.
    trained_only = jaxkd.evaluate(state, [batch], jaxkd.make_eval_step(frozen=False))
    assert trained_only == {k: v for k, v in result.items() if k != "teacher_accuracy"}


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
    with pytest.raises(ValueError, match=rf"batch\['label'\]: label {NUM_CLASSES} at index \(3,\) is outside"):
        TRAIN_STEP(state, bad)


@pytest.mark.parametrize("all_bad", [False, True])
def test_device_labels_out_of_range_raise_after_the_step_and_change_nothing(all_bad):
    """Bug: device-array labels were never checked (with all labels out of range the CE was 0)."""
    state = new_state()
    labels = np.full(16, NUM_CLASSES + 2) if all_bad else np.where(np.arange(16) == 5, -1, BATCH["label"])
    with pytest.raises(ValueError, match="outside \\[0, num_classes=5\\)"):
        TRAIN_STEP(state, dict(BATCH, label=jnp.asarray(labels, jnp.int32)))
    with pytest.raises(ValueError, match="outside \\[0, num_classes=5\\)"):
        jaxkd.evaluate(new_state(), [dict(BATCH, label=jnp.asarray(labels, jnp.int32))], jaxkd.make_eval_step())


def test_nan_input_stops_the_step_and_leaves_the_state_as_it_was():
    """Bug: one NaN pixel logged a finite loss, made every parameter NaN, then logged loss 0.0."""
    state, _ = TRAIN_STEP(new_state(), BATCH)
    before = jax.device_get(state)
    image = BATCH["image"].copy()
    image[3, 1, 1, 0] = np.nan
    with pytest.raises(NonFiniteError, match="the loss is not finite") as info:
        TRAIN_STEP(state, dict(BATCH, image=image))
    after = info.value.state
    assert int(after.step) == 1 and int(after.skipped_steps) == 1
    chex.assert_trees_all_equal(before.student, jax.device_get(after.student))
    chex.assert_trees_all_equal(before.opt_state, jax.device_get(after.opt_state))


def test_skip_policy_counts_skipped_steps_and_keeps_training():
    skip_step = jaxkd.make_train_step(on_nonfinite="skip")
    image = BATCH["image"].copy()
    image[0, 0, 0, 0] = np.nan
    state = new_state()
    state, metrics = skip_step(state, dict(BATCH, image=image))
    assert float(metrics["skipped"]) == 1.0 and int(state.skipped_steps) == 1 and int(state.step) == 0
    state, metrics = skip_step(state, BATCH)
    assert float(metrics["skipped"]) == 0.0 and int(state.step) == 1 and np.isfinite(float(metrics["loss"]))
    assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(jax.device_get(state.student)))


def test_a_finite_loss_with_a_nan_gradient_is_refused():
    """The gradient is checked on its own: ``sqrt`` of a quantity that is 0 has the finite value 0 and the
    infinite slope ``1/(2·sqrt(0))``, which the chain rule multiplies by 0: a NaN gradient under a finite loss."""
    from jaxkd.methods.base import stateless_method

    sqrt_of_zero = stateless_method(
        "sqrt_of_zero", lambda inputs, rng: jnp.sqrt(jnp.sum(0.0 * inputs.output("student").logits ** 2)))
    state = new_state(method=METHOD + sqrt_of_zero)
    before = jax.device_get(state)
    with pytest.raises(NonFiniteError, match="^update 1: a gradient is not finite;") as info:
        TRAIN_STEP(state, BATCH)
    metrics = info.value.metrics
    assert np.isfinite(float(metrics["loss"])) and float(metrics["sqrt_of_zero"]) == 0.0
    assert int(metrics["status"]) == jaxkd.steps.NONFINITE_GRADS and float(metrics["skipped"]) == 1.0
    chex.assert_trees_all_equal(before.student, jax.device_get(info.value.state.student))
    chex.assert_trees_all_equal(before.opt_state, jax.device_get(info.value.state.opt_state))


def _stateful_methods():
    """Methods that carry state across steps: TAID's interpolation ``t`` and loss history, CRD's memory banks."""
    labels = np.random.default_rng(0).integers(0, NUM_CLASSES, size=32)
    labels[np.arange(16) + 4] = BATCH["label"]
    return {"taid": methods.taid(total_steps=10),
            "crd": methods.ce() + methods.crd(num_examples=32, nce_k=8, feat_dim=4, mode="exact", labels=labels)}


@pytest.mark.parametrize("name", ["taid", "crd"])
def test_a_skipped_step_leaves_the_method_state_unchanged(name):
    """A NaN step's method state (TAID's NaN loss history, CRD's NaN features in the memory bank) is dropped
    with the rest of the update; the following finite step starts from the state before the NaN one."""
    batch = dict(BATCH, index=np.arange(16, dtype=np.int32) + 4)
    skip_step = jaxkd.make_train_step(on_nonfinite="skip")
    state = jaxkd.create(student=STUDENT, teacher=TEACHER, teacher_variables=TEACHER_VARS,
                         method=_stateful_methods()[name], tx=TX, sample_batch=batch, rng=jax.random.PRNGKey(0))
    state, _ = skip_step(state, batch)  # a real step first: the state is past its initial value
    before = jax.device_get(state.method_vars)
    image = batch["image"].copy()
    image[2, 1, 1, 0] = np.nan
    state, metrics = skip_step(state, dict(batch, image=image))
    assert float(metrics["skipped"]) == 1.0 and int(state.skipped_steps) == 1
    after = jax.device_get(state.method_vars)
    assert jax.tree.leaves(after.state), "the method has state"
    chex.assert_trees_all_equal(before, after)


def test_divergence_from_a_huge_learning_rate_raises_instead_of_reaching_the_results():
    """Bug: ``--set lr=1000`` gave NaN gradients, a finite logged loss and a results-table entry."""
    state = jaxkd.create(student=STUDENT, teacher=TEACHER, teacher_variables=TEACHER_VARS, method=METHOD,
                         tx=optax.sgd(1e12), sample_batch=BATCH, rng=jax.random.PRNGKey(0))
    with pytest.raises(NonFiniteError, match="not finite"):
        for _ in range(20):
            state, _ = TRAIN_STEP(state, BATCH)


def test_evaluate_refuses_non_finite_predictions():
    state = new_state()
    state = state.replace(trained={"student": state.student.replace(
        params=jax.tree.map(lambda a: jnp.full_like(a, jnp.nan), state.student.params))})
    with pytest.raises(FloatingPointError, match="not finite for 16 of 16"):
        jaxkd.evaluate(state, [BATCH], jaxkd.make_eval_step())


def test_evaluation_needs_labels():
    with pytest.raises(ValueError, match=r"'evaluation' needs batch\['label'\]"):
        jaxkd.evaluate(new_state(), [{"image": BATCH["image"]}], jaxkd.make_eval_step())


def test_empty_batches_are_refused():
    empty = {k: v[:0] for k, v in BATCH.items()}
    with pytest.raises(ValueError, match="no examples"):
        jaxkd.create(student=STUDENT, method=methods.ce(), tx=TX, sample_batch=empty, rng=jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="no examples"):
        TRAIN_STEP(new_state(), empty)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda b: {"label": b["label"]}, r"participant 'student' reads batch entries \['image'\], but the batch has \['label'\]"),
        (lambda b: dict(b, image=(b["image"] * 50 + 100).astype(np.uint8)), r"batch\['image'\].*dtype uint8"),
        (lambda b: dict(b, image=np.repeat(b["image"], 3, axis=-1)), r"batch\['image'\].*shape \(4, 4, 3\)"),
        (lambda b: dict(b, image=b["image"][:, :, :2]), r"batch\['image'\].*shape \(4, 2, 1\)"),
        (lambda b: dict(b, label=b["label"].astype(np.float32)), r"batch\['label'\].*float32"),
        (lambda b: dict(b, label=b["label"][:8]), "disagree on the number of examples"),
    ],
    ids=["missing input", "uint8 images", "channels", "size", "float labels", "ragged"],
)
def test_step_refuses_batches_unlike_the_sample_batch(change, message):
    with pytest.raises(ValueError, match=message):
        TRAIN_STEP(new_state(), change(BATCH))


def test_teacher_variables_of_another_architecture_are_refused():
    """Bug: a teacher accepted variables of another architecture and used part of them."""
    wider = jaxkd.models.get("mlp", num_classes=NUM_CLASSES, hidden_sizes=(48,))
    deeper = jaxkd.models.get("mlp", num_classes=NUM_CLASSES, hidden_sizes=(32, 32))
    with pytest.raises(ValueError, match=r"teacher variables do not match the model at \['params'\]\['dense1'\]"):
        new_state(teacher_variables=teacher_variables(wider, BATCH))
    with pytest.raises(ValueError, match=r"teacher variables do not match the model: unexpected \['params'\]\['dense2'\]"):
        new_state(teacher_variables=teacher_variables(deeper, BATCH))
    with pytest.raises(ValueError, match=r"student variables do not match the model: missing"):
        new_state(student_variables={"params": {}})


def test_models_refuse_unnormalized_images_at_create_time():
    conv = jaxkd.models.get("resnet8", num_classes=NUM_CLASSES)
    images = {"image": np.zeros((2, 8, 8, 1), np.uint8), "label": np.zeros(2, np.int32)}
    with pytest.raises(ValueError, match="floating-point images"):
        jaxkd.create(student=conv, method=methods.ce(), tx=TX, sample_batch=images, rng=jax.random.PRNGKey(0))


def _failing_at_run_time():
    """ce plus a term whose host callback raises while the compiled step runs, as an out-of-memory error
    (XLA's RESOURCE_EXHAUSTED) does: after dispatch, when the state's buffers are already donated."""
    def oom(_):
        raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 12.00GiB (simulated)")

    def compute(inputs, rng):
        z = inputs.outputs["student"].logits
        jax.debug.callback(oom, jax.lax.stop_gradient(jnp.sum(z)))
        return jnp.sum(z) * 0.0

    return methods.ce() + methods.base.stateless_method("fails", compute)


def test_a_step_failing_at_run_time_says_the_donated_state_is_lost():
    state = new_state(method=_failing_at_run_time(), teacher=None, teacher_variables=None)
    step = jaxkd.make_train_step()
    with pytest.raises(RuntimeError, match=r"failed at run time \(INTERNAL: CpuCallback error.*\); its input "
                                           r"state was donated .* restore the state from the last checkpoint") as info:
        step(state, BATCH)
    assert type(info.value).__name__ == "StepFailedError" and "RESOURCE_EXHAUSTED" in str(info.value.__cause__)
    # Using that state again names the cause instead of JAX's "Array has been deleted".
    with pytest.raises(ValueError, match=r"^the train state was donated to an earlier step"):
        step(state, BATCH)
    # Without donation the error is JAX's own and the state survives it.
    state = new_state(method=_failing_at_run_time(), teacher=None, teacher_variables=None)
    with pytest.raises(jax.errors.JaxRuntimeError, match="CpuCallback error"):
        jaxkd.make_train_step(donate=False)(state, BATCH)
    assert not any(leaf.is_deleted() for leaf in jax.tree.leaves(state))


def test_float_images_still_in_0_255_are_refused_at_create_time_like_uint8():
    conv = jaxkd.models.get("resnet8", num_classes=NUM_CLASSES)
    pixels = np.random.default_rng(0).integers(0, 256, size=(2, 8, 8, 1)).astype(np.float32)
    raw = {"image": pixels, "label": np.zeros(2, np.int32)}
    with pytest.raises(ValueError, match=r"^participant 'student': batch\['image'\] holds float32 images with values "
                                         r"in \[0, 2\d\d\] \(raw pixels\).*divide by 255"):
        jaxkd.create(student=conv, method=methods.ce(), tx=TX, sample_batch=raw, rng=jax.random.PRNGKey(0))
    # Scaled to [0, 1], or normalized (negative values), they are accepted.
    for images in (pixels / 255, (pixels / 255 - 0.5) / 0.25):
        jaxkd.create(student=conv, method=methods.ce(), tx=TX, sample_batch=dict(raw, image=images),
                     rng=jax.random.PRNGKey(0))


def test_semi_supervised_batches_train_ce_on_labeled_examples_only():
    """DHO's unlabeled-data setting: KD on every example, CE only where ``batch["labeled"]``."""
    labeled = np.arange(16) < 6
    batch = dict(BATCH, label=np.where(labeled, BATCH["label"], -1).astype(np.int32), labeled=labeled)
    state = new_state(method=methods.dho(temperature=2.0))
    logits = np.asarray(STUDENT.apply(state.student.variables(), BATCH["image"], train=True).logits, np.float64)
    _, metrics = TRAIN_STEP(state, batch)
    log_p = logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True)) - logits.max(1, keepdims=True)
    expected_ce = -np.mean(log_p[np.arange(16), BATCH["label"]][labeled])
    np.testing.assert_allclose(metrics["dho/ce"], expected_ce, rtol=1e-5)
    accuracy = np.mean((logits.argmax(1) == BATCH["label"])[labeled])
    np.testing.assert_allclose(metrics["accuracy"], accuracy)
    with pytest.raises(ValueError, match="label -1"):  # without the flags, -1 is a bad label
        TRAIN_STEP(new_state(method=methods.dho()), dict(BATCH, label=batch["label"]))


def test_label_key_is_one_convention_for_methods_accuracy_and_checks():
    batch = {"image": BATCH["image"], "target": BATCH["label"]}
    state = jaxkd.create(student=STUDENT, teacher=TEACHER, teacher_variables=TEACHER_VARS,
                         method=methods.parse("ce + dkd + nkd + pld"), tx=TX, sample_batch=batch,
                         rng=jax.random.PRNGKey(0), label_key="target")
    state, metrics = TRAIN_STEP(state, batch)
    assert {"ce", "dkd", "nkd", "pld", "accuracy"} <= set(metrics)
    with pytest.raises(ValueError, match=r"batch\['target'\]: label 9"):
        TRAIN_STEP(state, dict(batch, target=np.full(16, 9, np.int32)))


# ----- sharding -----

def test_step_sharded_over_eight_devices_matches_single_device():
    assert jax.device_count() == 8, "tests/conftest.py sets 8 simulated CPU devices"
    mesh = sharding.make_mesh()
    sharded_step = jaxkd.make_train_step(mesh=mesh)
    single, sharded = new_state(), new_state(mesh=mesh)
    for _ in range(3):
        single, m1 = TRAIN_STEP(single, BATCH)
        sharded, m2 = sharded_step(sharded, BATCH)
    np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-5)
    chex.assert_trees_all_close(params_of(single), params_of(sharded), rtol=1e-4, atol=1e-6)
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
        ckpt.save(int(resumed.step), resumed, extra={"epoch": 0, "batch": 2})
    target = new_state(seed=123)  # different values, same structure: everything must come from disk
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        resumed, position = ckpt.restore(target)
    assert position == {"epoch": 0, "batch": 2} and int(resumed.step) == 2
    for _ in range(2):
        resumed, _ = TRAIN_STEP(resumed, BATCH)
    chex.assert_trees_all_equal(jax.device_get(straight.opt_state), jax.device_get(resumed.opt_state))
    chex.assert_trees_all_equal(params_of(straight), params_of(resumed))
    np.testing.assert_array_equal(straight.rng, resumed.rng)


def test_teacher_variables_round_trip(tmp_path):
    save_variables(tmp_path / "teacher", TEACHER_VARS)
    blank = TEACHER.init(jax.random.PRNGKey(99), BATCH["image"])
    loaded = load_variables(tmp_path / "teacher", blank)
    chex.assert_trees_all_equal(jax.device_get(TEACHER_VARS), jax.device_get(loaded))


def test_gradient_accumulation_equals_the_unsplit_batch():
    # ce + kd are means over equal-size micro-batches: the averaged gradients are the batch's gradients.
    sgd = optax.sgd(0.1)
    whole = jaxkd.create(student=STUDENT, teacher=TEACHER, teacher_variables=TEACHER_VARS, method=METHOD, tx=sgd,
                         sample_batch=BATCH, rng=jax.random.PRNGKey(0))
    split = jaxkd.create(student=STUDENT, teacher=TEACHER, teacher_variables=TEACHER_VARS, method=METHOD, tx=sgd,
                         sample_batch=BATCH, rng=jax.random.PRNGKey(0))
    whole, m1 = jaxkd.make_train_step()(whole, BATCH)
    split, m4 = jaxkd.make_train_step(microbatches=4)(split, BATCH)
    chex.assert_trees_all_close(params_of(whole), params_of(split), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(m1["loss"]), float(m4["loss"]), rtol=1e-5)
    assert int(split.step) == 1
    with pytest.raises(ValueError, match="cannot be split into 3 micro-batches"):
        jaxkd.make_train_step(microbatches=3)(split, BATCH)
    with pytest.raises(ValueError, match="microbatches"):
        jaxkd.make_train_step(microbatches=0)


def test_the_method_and_its_variables_have_their_own_names():
    """``state.method`` is the method, ``state.method_vars`` its variables; the former names point there."""
    state = new_state()
    assert state.method is METHOD or state.method.terms == METHOD.terms
    assert set(state.method_vars.params) == {"ce", "kd"}
    with pytest.warns(FutureWarning, match="use TrainState.method "):
        assert state.method_def is state.method
    with pytest.raises(AttributeError, match="state.method_vars.params"):
        state.method.params
