"""Batch transforms in the jitted step (``Method.prepare``): mixup, CutMix, the inception crop, function matching.

The mixing formulas are checked in NumPy against the draws recomputed from the same key with jax.random;
CutMix's box against a NumPy transcription of the official ``rand_bbox`` (clovaai/CutMix-PyTorch ``train.py``,
commit 9dc8245); the mixed cross-entropy against NumPy; that the teacher sees the transformed batch through the
KD value of one train step recomputed by hand (and evaluation scoring the batch as given); padding never mixed
into real rows; a resumed run equal to the uninterrupted one bit for bit; an 8-device step equal to the
single-device one.
"""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxkd
from jaxkd import batch_transforms as bt
from jaxkd import methods
from jaxkd.batch import MIX_LAMBDA, MIX_PARTNER
from jaxkd.checkpoint import Checkpointer
from jaxkd.methods.base import LossInputs, MethodVars
from jaxkd.models.base import Outputs
from jaxkd.steps import prepare_key
from tests.helpers import NUM_CLASSES, teacher_variables, tiny_batch, tiny_models

TEACHER, STUDENT = tiny_models()
BATCH = tiny_batch(batch_size=8)
TEACHER_VARS = teacher_variables(TEACHER, BATCH)
IMAGES = np.random.default_rng(3).normal(size=(6, 5, 7, 2)).astype(np.float32)  # H != W: axes not swapped


@functools.cache
def transform(spec):
    """The batch transform of the method ``spec`` parses to (the member's own for a one-member chain, so its
    key is the one given), jitted once (one compile per spec and shapes)."""
    method = methods.parse(spec)
    if len(method.terms) == 1:
        method, vars = method.terms[0], MethodVars()
    else:
        names = [m.name for m in method.terms]
        vars = MethodVars({n: {} for n in names}, {n: {} for n in names})
    return jax.jit(lambda batch, key: method.prepare(vars, batch, key))


def prepare(spec, batch, key):
    return transform(spec)(batch, key)


def new_state(spec, **kwargs):
    method = methods.parse(spec)
    participants = {"teacher": jaxkd.Participant(TEACHER, TEACHER_VARS, trains=False)} if method.needs.teacher else {}
    return jaxkd.create(student=STUDENT, method=method, tx=optax.sgd(0.1, momentum=0.9), sample_batch=BATCH,
                        rng=jax.random.PRNGKey(0), participants=participants, **kwargs)


@pytest.mark.parametrize("per_example", [False, True])
def test_mixup_is_the_numpy_mix_of_the_drawn_lambda_and_permutation(per_example):
    key = jax.random.PRNGKey(7)
    out = prepare(f"mixup(alpha=0.4, per_example={per_example})", {"image": IMAGES}, key)
    k_partner, k_lambda = jax.random.split(key)
    partner = np.asarray(jax.random.permutation(k_partner, len(IMAGES)))
    lam = np.asarray(jax.random.beta(k_lambda, 0.4, 0.4, (len(IMAGES),) if per_example else ()))
    lam_b = np.broadcast_to(lam, (len(IMAGES),))[:, None, None, None]
    np.testing.assert_allclose(out["image"], lam_b * IMAGES + (1 - lam_b) * IMAGES[partner], rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(out[MIX_PARTNER], partner)
    np.testing.assert_allclose(out[MIX_LAMBDA], np.broadcast_to(lam, (len(IMAGES),)), rtol=1e-6)
    assert sorted(partner) == list(range(len(IMAGES))) and len(set(np.broadcast_to(lam, 6))) == (6 if per_example else 1)


@pytest.mark.parametrize("alpha", [0.4, 2.0])
def test_lambda_follows_the_symmetric_beta(alpha):
    draws = np.asarray(bt.sample_mix_lambda(jax.random.PRNGKey(0), alpha, (40_000,)))
    assert abs(draws.mean() - 0.5) < 0.01
    assert abs(draws.var() - 1 / (4 * (2 * alpha + 1))) < 0.01 * 1 / (4 * (2 * alpha + 1)) * 5


def rand_bbox_official(height, width, lam, cy, cx):
    """clovaai/CutMix-PyTorch train.py ``rand_bbox`` (commit 9dc8245), its random centre passed in: the box
    ``[y0, y1) x [x0, x1)`` for a target ``lam``."""
    cut_rat = np.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * cut_rat), int(width * cut_rat)
    y0, y1 = np.clip(cy - cut_h // 2, 0, height), np.clip(cy + cut_h // 2, 0, height)
    x0, x1 = np.clip(cx - cut_w // 2, 0, width), np.clip(cx + cut_w // 2, 0, width)
    return y0, y1, x0, x1


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_cutmix_pastes_the_official_box_and_corrects_lambda_to_its_area(seed):
    key = jax.random.PRNGKey(seed)
    out = prepare("cutmix(alpha=1.0)", {"image": IMAGES}, key)
    k_partner, k_lambda, k_box = jax.random.split(key, 3)
    lam0 = float(jax.random.beta(k_lambda, 1.0, 1.0, (), jnp.float32))
    ky, kx = jax.random.split(k_box)
    h, w = IMAGES.shape[1:3]
    y0, y1, x0, x1 = rand_bbox_official(h, w, lam0, int(jax.random.randint(ky, (), 0, h)),
                                        int(jax.random.randint(kx, (), 0, w)))
    partner = np.asarray(out[MIX_PARTNER])
    expected = IMAGES.copy()
    expected[:, y0:y1, x0:x1] = IMAGES[partner][:, y0:y1, x0:x1]
    np.testing.assert_array_equal(out["image"], expected)
    area = (y1 - y0) * (x1 - x0)
    np.testing.assert_allclose(out[MIX_LAMBDA], 1 - area / (h * w), rtol=1e-6)  # the exact pasted area
    inside = np.zeros((h, w), bool)
    inside[y0:y1, x0:x1] = True
    mask, lam = bt.cutmix_box_mask(k_box, lam0, h, w)
    np.testing.assert_array_equal(mask, inside)
    assert float(lam) * h * w == pytest.approx(h * w - inside.sum())


def np_cross_entropy(logits, labels, eps=0.0):
    log_q = logits - logits.max(-1, keepdims=True)
    log_q = log_q - np.log(np.exp(log_q).sum(-1, keepdims=True))
    target = (1 - eps) * np.eye(logits.shape[-1])[labels] + eps / logits.shape[-1]
    return -(target * log_q).sum(-1)


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_ce_on_a_mixed_batch_is_lambda_ce_own_plus_rest_ce_partner(eps):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, NUM_CLASSES)).astype(np.float32) * 3
    labels = rng.integers(0, NUM_CLASSES, 6).astype(np.int32)
    partner = np.array([3, 2, 1, 0, 5, 4], np.int32)
    lam = rng.uniform(size=6).astype(np.float32)
    labeled = np.array([True, True, True, True, True, False])
    batch = {"label": labels, MIX_PARTNER: partner, MIX_LAMBDA: lam}
    per_example = lam * np_cross_entropy(logits, labels, eps) + (1 - lam) * np_cross_entropy(logits, labels[partner], eps)
    ce = methods.ce(label_smoothing=eps)
    value, _ = ce.loss(MethodVars(), LossInputs.of(Outputs(jnp.asarray(logits), {}, {}), batch=batch), None)
    np.testing.assert_allclose(value, per_example.mean(), rtol=1e-5)
    # Example 5 is unlabeled, and example 4's partner is example 5: both leave the mean.
    value, _ = ce.loss(MethodVars(), LossInputs.of(Outputs(jnp.asarray(logits), {}, {}),
                                                   batch={**batch, "labeled": labeled}), None)
    np.testing.assert_allclose(value, per_example[:4].mean(), rtol=1e-5)
    # The gradient is the closed form of a cross-entropy with the mixed (smoothed) target t: (softmax(z) − t) / B.
    target = (lam[:, None] * np.eye(NUM_CLASSES)[labels] + (1 - lam[:, None]) * np.eye(NUM_CLASSES)[labels[partner]])
    target = (1 - eps) * target + eps / NUM_CLASSES
    grad = jax.grad(lambda z: ce.loss(MethodVars(), LossInputs.of(Outputs(z, {}, {}), batch=batch), None)[0])(
        jnp.asarray(logits))
    softmax = np.exp(logits - logits.max(-1, keepdims=True))
    softmax /= softmax.sum(-1, keepdims=True)
    np.testing.assert_allclose(grad, (softmax - target) / 6, rtol=1e-4, atol=1e-6)


def test_the_crop_of_the_whole_image_is_the_image_and_a_pixel_box_is_the_slice():
    crop = jax.jit(bt.crop_and_resize, static_argnums=(2, 3))
    boxes = np.tile(np.array([[0, 0, 5, 7]], np.float32), (6, 1))
    np.testing.assert_array_equal(crop(IMAGES, boxes, None, None), IMAGES)
    boxes = np.tile(np.array([[1, 2, 3, 4]], np.float32), (6, 1))
    np.testing.assert_allclose(crop(IMAGES, boxes, 3, 4), IMAGES[:, 1:4, 2:6], atol=1e-6)
    np.testing.assert_array_equal(bt.flip_left_right(jax.random.PRNGKey(0), IMAGES, 1.0), IMAGES[:, :, ::-1])


def test_inception_crop_boxes_fit_and_fall_back_to_the_whole_image():
    boxes = np.asarray(jax.jit(bt.inception_crop_boxes, static_argnums=(1, 2, 3))(jax.random.PRNGKey(0), 500, 5, 7))
    top, left, h, w = boxes.T
    assert np.all(top >= 0) and np.all(left >= 0) and np.all(top + h <= 5 + 1e-5) and np.all(left + w <= 7 + 1e-5)
    fell_back = (h == 5) & (w == 7)
    assert np.all(h * w >= 0.05 * 35 - 1e-4) and np.all((np.abs(np.log(w / h)) <= np.log(4 / 3) + 1e-5) | fell_back)
    # Area fractions that never fit a 1-pixel-high strip at ratio <= 4/3 (h = sqrt(A·s/r) > 1): the whole image.
    whole = np.asarray(jax.jit(lambda k: bt.inception_crop_boxes(k, 4, 1, 8, area_range=(0.9, 1.0)))(jax.random.PRNGKey(1)))
    np.testing.assert_array_equal(whole, np.tile([[0, 0, 1, 8]], (4, 1)))


def test_the_teacher_and_the_student_see_the_mixed_batch_and_evaluation_does_not():
    state = new_state("mixup(alpha=1) + kd(temperature=4)")
    student_vars = jax.device_get(state.student.variables())
    method_rng = jax.random.split(state.rng, 3)[2]
    trained, metrics = jaxkd.make_train_step(donate=False)(state, BATCH)
    # The chain's transform key, then member 0's (the mixup).
    mixed = prepare("mixup(alpha=1)", BATCH, jax.random.fold_in(prepare_key(method_rng), 0))["image"]
    assert not np.allclose(mixed, BATCH["image"])
    t = np.asarray(jax.jit(lambda x: TEACHER.apply(TEACHER_VARS, x, train=False).logits)(mixed), np.float64) / 4
    s = np.asarray(jax.jit(lambda x: STUDENT.apply(student_vars, x, train=True).logits)(mixed), np.float64) / 4
    log_p, log_q = (z - np.log(np.exp(z).sum(-1, keepdims=True)) for z in (t, s))
    expected = 16 * (np.exp(log_p) * (log_p - log_q)).sum(-1).mean()
    np.testing.assert_allclose(float(metrics["kd"]), expected, rtol=1e-5)
    assert float(metrics["mixup"]) == 0.0 and 0.0 < float(metrics["mixup/lambda"]) < 1.0

    # Evaluation never transforms: the teacher-student KL it reports is that of the batch as given.
    result = jaxkd.evaluate(trained, [BATCH], jaxkd.make_eval_step(metrics=(jaxkd.eval_metrics.teacher_student_kl(),)))
    t = np.asarray(jax.jit(lambda x: TEACHER.apply(TEACHER_VARS, x, train=False).logits)(BATCH["image"]), np.float64)
    s = np.asarray(jax.jit(lambda v, x: STUDENT.apply(v, x, train=False).logits)(
        jax.device_get(trained.student.variables()), BATCH["image"]), np.float64)
    log_p, log_q = (z - np.log(np.exp(z).sum(-1, keepdims=True)) for z in (t, s))
    np.testing.assert_allclose(result["kl"], (np.exp(log_p) * (log_p - log_q)).sum(-1).mean(), rtol=1e-5)


@pytest.mark.parametrize("spec", ["mixup(alpha=1)", "cutmix(alpha=1)"])
def test_padding_is_never_mixed_into_real_examples(spec):
    mask = np.array([1, 0, 1, 1, 0, 1], bool)
    images = np.where(mask[:, None, None, None], IMAGES, np.nan)  # padding rows hold NaN
    for seed in range(5):
        out = prepare(spec, {"image": images, "mask": mask}, jax.random.PRNGKey(seed))
        partner, lam = np.asarray(out[MIX_PARTNER]), np.asarray(out[MIX_LAMBDA])
        assert np.all(np.isfinite(np.asarray(out["image"])[mask]))
        assert np.all(mask[partner[mask]]) and np.all(partner[~mask] == np.flatnonzero(~mask)) and np.all(lam[~mask] == 1)


def test_bad_settings_and_a_second_mix_are_refused():
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match="alpha"):
            methods.mixup(alpha=bad)
        with pytest.raises(ValueError, match="alpha"):
            methods.cutmix(alpha=bad)
        with pytest.raises(ValueError, match="alpha"):
            methods.function_matching(alpha=bad)
    for bad, match in (({"area_range": (0.5, 0.2)}, "area_range"), ({"area_range": 0.5}, "pair"),
                       ({"ratio_range": (0, 1)}, "ratio_range"), ({"flip": 2}, "flip")):
        with pytest.raises(ValueError, match=match):
            methods.inception_crop(**bad)
    with pytest.raises(TypeError, match="prepare"):
        methods.Method("m", lambda vars, inputs, rng: (0.0, None), prepare="mixup")
    with pytest.raises(ValueError, match="already mixed"):
        prepare("mixup + cutmix", {"image": IMAGES}, jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="float images"):
        prepare("mixup", {"image": IMAGES.astype(np.int32)}, jax.random.PRNGKey(0))
    assert methods.parse("ce + kd").prepare is None  # nothing transforms: the step's keys are split as before


def test_a_resumed_mixup_run_replays_the_draws_bit_for_bit(tmp_path):
    spec = "mixup(alpha=1) + ce + kd(temperature=4)"
    batches = [tiny_batch(seed=i, batch_size=8) for i in range(4)]
    step = jaxkd.make_train_step()
    state = new_state(spec)
    for batch in batches:
        state, _ = step(state, batch)
    half = new_state(spec)
    for batch in batches[:2]:
        half, _ = step(half, batch)
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        ckpt.save(2, half.run_tree())
    fresh = new_state(spec)
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        resumed = fresh.with_run_tree(ckpt.restore(fresh.run_tree()).tree)
    for batch in batches[2:]:
        resumed, _ = step(resumed, batch)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed.run_tree()), jax.device_get(state.run_tree()))


def test_an_eight_device_step_equals_the_single_device_step():
    spec = "mixup(alpha=1) + ce + kd(temperature=4)"
    mesh = jaxkd.sharding.make_mesh({"data": 8})
    single, single_metrics = jaxkd.make_train_step()(new_state(spec), BATCH)
    sharded, metrics = jaxkd.make_train_step(mesh=mesh)(new_state(spec, mesh=mesh), BATCH)
    np.testing.assert_allclose(float(metrics["loss"]), float(single_metrics["loss"]), rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 jax.device_get(sharded.trainable), jax.device_get(single.trainable))


# Slow (the suite's time): the transform inside the micro-batch scan; the fast tests cover the hook and the mix.
@pytest.mark.slow
def test_function_matching_trains_in_micro_batches():
    # The transform runs per micro-batch inside the scan; the crop and the mix change what the student sees.
    state = new_state("function_matching()")
    before = jax.device_get(state.student.params)
    state, metrics = jaxkd.make_train_step(microbatches=2)(state, BATCH)
    assert [m.name for m in state.method.terms] == ["inception_crop", "mixup", "kd"]
    assert float(metrics["kd"]) > 0 and any(jax.tree.leaves(jax.tree.map(
        lambda a, b: not np.array_equal(a, b), before, jax.device_get(state.student.params))))


def test_distance_columns_are_left_empty_for_runs_without_a_teacher_and_eval_metrics_are_checked():
    from experiments import config as config_lib, report

    rows = [report.Row("scratch", {"method": "ce"}, [{"accuracy": 0.9}, {"accuracy": 0.8}]),
            report.Row("fm", {"method": "function_matching()"}, [{"accuracy": 0.95, "agreement": 0.97},
                                                                  {"accuracy": 0.85, "agreement": 0.93}])]
    metrics = [report.Metric("accuracy", "top1", "top-1 (%)", 100.0, 2),
               report.Metric("agreement", "agreement", "agreement (%)", 100.0, 2)]
    summary = report.summarize(rows, metrics, baseline="scratch", caption="", seconds=0.0)
    lines = summary["table"].splitlines()
    assert lines[0] == "| run | method | top-1 (%) | Δ vs scratch | agreement (%) |"  # scratch has no agreement: no Δ
    assert lines[2] == "| scratch | `ce` | 85.00 ± 7.07 |  |  |"
    assert lines[3] == "| fm | `function_matching()` | 90.00 ± 7.07 | +5.00 | 95.00 ± 2.83 |"
    assert summary["rows"][1]["agreement_mean"] == pytest.approx(95.0) and "agreement_mean" not in summary["rows"][0]
    with pytest.raises(ValueError, match="eval_metrics"):
        config_lib.validate(config_lib.Config(eval_metrics=("top5",)))


# About as long as tests/test_experiment.py's tiny pipeline (a teacher and two student runs compiled); the fast
# suite covers its pieces: the transforms above, the table's distance columns above, the metrics in
# tests/test_eval_metrics.py.
@pytest.mark.slow
def test_the_function_matching_experiment_reports_agreement_and_kl(tmp_path):
    from experiments import distill
    from tests.test_experiment import TINY

    settings = [*TINY, "seeds=(0,)", "eval_metrics=('agreement', 'teacher_student_kl')",
                "methods={'scratch': 'ce', 'fm': 'function_matching()'}"]
    summary = distill.main(["--out", str(tmp_path / "run"), "--set", f"data_dir={tmp_path / 'tfds'}"]
                           + sum((["--set", s] for s in settings), []))
    rows = {r["run"]: r for r in summary["rows"]}
    assert 0.0 <= rows["fm"]["agreement_mean"] <= 100.0 and rows["fm"]["kl_mean"] >= 0.0
    assert "agreement_mean" not in rows["scratch"] and "agreement (%)" in summary["table"]
    records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    final = [r for r in records if r["run"] == "fm" and "test_agreement" in r]
    assert final and round(100 * final[-1]["test_agreement"], 6) == round(rows["fm"]["agreement_mean"], 6)
