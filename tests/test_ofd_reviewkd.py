"""OFD (and ReviewKD): values against NumPy transcriptions of the official code, the teacher margins read from
the frozen teacher's BatchNorm parameters, errors, and the methods in the jitted train step."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxkd
from jaxkd import losses, methods, models
from jaxkd.methods.base import LossInputs
from jaxkd.methods.feature.ofd import OFDConnector, _default_bn
from jaxkd.models.base import Outputs
from tests.helpers import NUM_CLASSES, tiny_image_batch


def margin_reference(weight, bias):
    """clovaai/overhaul-distillation ``get_margin_from_BN``, with the normal CDF from math.erf."""
    cdf = lambda x: 0.5 * (1 + math.erf(x / math.sqrt(2)))
    out = []
    for s, m in zip(weight, bias):
        s = abs(s)
        if cdf(-m / s) > 0.001:
            out.append(-s * math.exp(-(m / s) ** 2 / 2) / math.sqrt(2 * math.pi) / cdf(-m / s) + m)
        else:
            out.append(-3 * s)
    return np.array(out)


def distillation_loss_reference(source, target, margin):
    """``distillation_loss`` of the official code (elementwise, any layout), summed over everything."""
    target = np.maximum(target, margin)
    loss = (source - target) ** 2
    return (loss * ((source > target) | (target > 0))).sum()


def test_margin_matches_official_formula_including_the_far_tail():
    weight = np.array([1.0, -0.5, 2.0, 0.1, 1.0])
    bias = np.array([0.0, 0.3, -1.0, 1.0, 5.0])  # the last two have Φ(−m/s) < 0.001: −3s
    np.testing.assert_allclose(losses.ofd_margin(weight, bias), margin_reference(weight, bias), rtol=1e-5)
    assert np.all(np.asarray(losses.ofd_margin(weight, bias)) < 0)


def test_ofd_matches_official_distillation_loss():
    rng = np.random.default_rng(0)
    s, t = rng.normal(size=(4, 3, 3, 5)), rng.normal(size=(4, 3, 3, 5))
    margin = -np.abs(rng.normal(size=5))
    # The official loop divides the batch sum by the batch size (and by 1000: the method's weight).
    expected = distillation_loss_reference(s, t, margin) / 4
    np.testing.assert_allclose(losses.ofd(s, t, margin), expected, rtol=1e-5)
    # No loss where the teacher is at its margin and the student below it.
    below = np.full((1, 1, 1, 5), -10.0)
    assert float(losses.ofd(below, np.full((1, 1, 1, 5), -1.0), margin)) == 0.0


def test_default_teacher_batchnorm_is_the_last_blocks_bn2():
    params = {"stage1_block0": {}, "stage1_block2": {}, "stage1_block10": {}, "stage2_block0": {}, "fc": {}}
    assert _default_bn(params, "stage1_preact", "ofd") == "stage1_block10/bn2"
    assert _default_bn(params, "stage2_preact", "ofd") == "stage2_block0/bn2"
    with pytest.raises(ValueError, match="teacher_bns"):
        _default_bn(params, "pooled", "ofd")


def test_errors():
    with pytest.raises(ValueError, match=r"\(2, 2, 2, 3\) and \(2, 2, 2, 4\)"):
        losses.ofd(np.ones((2, 2, 2, 3)), np.ones((2, 2, 2, 4)), np.zeros(4))
    with pytest.raises(ValueError, match="margin"):
        losses.ofd(np.ones((2, 2, 2, 3)), np.ones((2, 2, 2, 3)), np.zeros(4))
    with pytest.raises(ValueError, match="teacher_bns has 1 entries for 3"):
        methods.ofd(teacher_bns=("a/bn2",))
    out = Outputs(jnp.zeros((2, 3)), {"stage1_preact": jnp.zeros((2, 2, 2, 4))}, {})
    inputs = LossInputs.of(out, out)
    with pytest.raises(ValueError, match="parameters"):
        methods.ofd(student_features=("stage1_preact",)).init(jax.random.PRNGKey(0), inputs)


def test_ofd_and_reviewkd_train_in_the_jitted_step_with_the_teachers_margins():
    teacher = student = models.get("resnet8", num_classes=NUM_CLASSES)
    batch = tiny_image_batch()
    tvars = teacher.init(jax.random.PRNGKey(1), batch["image"])
    # Give the teacher's BNs non-trivial affine parameters, so the margins differ per channel.
    rng = np.random.default_rng(0)
    tvars = jax.tree_util.tree_map_with_path(
        lambda path, x: x + 0.3 * rng.normal(size=x.shape) if "params" in jax.tree_util.keystr(path)
        and "bn" in jax.tree_util.keystr(path) else x, tvars)
    state = jaxkd.create(student=student, teacher=teacher, teacher_variables=tvars,
                         method=methods.parse("ce + 0.001 * ofd + 0.6 * reviewkd"), tx=optax.sgd(0.05, momentum=0.9),
                         sample_batch=batch, rng=jax.random.PRNGKey(0))
    before = jax.device_get(state.method_vars.params)
    start = jax.device_get((state.student.variables(), state.method_vars.params["ofd"]["2"], state.method_vars.state["ofd"]["2"]))
    state, metrics = jaxkd.make_train_step()(state, batch)
    terms = [float(metrics[f"ofd/stage{k}_preact"]) for k in (1, 2, 3)]
    np.testing.assert_allclose(float(metrics["ofd"]), terms[0] / 4 + terms[1] / 2 + terms[2], rtol=1e-5)
    assert np.isfinite(float(metrics["reviewkd"])) and float(metrics["reviewkd"]) > 0
    changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), before, jax.device_get(state.method_vars.params))
    assert all(jax.tree.leaves(changed["ofd"])) and all(jax.tree.leaves(changed["reviewkd"]))
    # The stage-3 term by hand: the connector (train-mode BN) at the step's start, the margin from bn2's scale/bias.
    bn = tvars["params"]["stage3_block0"]["bn2"]
    margin = margin_reference(np.asarray(bn["scale"]), np.asarray(bn["bias"]))
    student_vars, conn_params, conn_state = start
    s3 = student.apply(student_vars, batch["image"], train=True).features["stage3_preact"]
    s3, _ = OFDConnector(64).apply({"params": conn_params, **conn_state}, s3, train=True, mutable=["batch_stats"])
    t3 = teacher.apply(tvars, batch["image"], train=False).features["stage3_preact"]
    expected = distillation_loss_reference(np.asarray(s3, np.float64), np.asarray(t3, np.float64), margin) / 8
    np.testing.assert_allclose(terms[2], expected, rtol=1e-4)


def adaptive_pool_reference(x, l):
    """PyTorch ``adaptive_avg_pool2d`` on an NCHW array, by its window definition."""
    n, c, h, w = x.shape
    out = np.zeros((n, c, l, l))
    for i in range(l):
        for j in range(l):
            h0, h1 = (i * h) // l, -((-(i + 1) * h) // l)
            w0, w1 = (j * w) // l, -((-(j + 1) * w) // l)
            out[:, :, i, j] = x[:, :, h0:h1, w0:w1].mean(axis=(2, 3))
    return out


def hcl_reference(fstudent, fteacher):
    """dvlab-research/ReviewKD ``hcl`` in NumPy (NCHW)."""
    loss_all = 0.0
    for fs, ft in zip(fstudent, fteacher):
        h = fs.shape[2]
        loss = np.mean((fs - ft) ** 2)
        cnt, tot = 1.0, 1.0
        for l in [4, 2, 1]:
            if l >= h:
                continue
            cnt /= 2.0
            loss += np.mean((adaptive_pool_reference(fs, l) - adaptive_pool_reference(ft, l)) ** 2) * cnt
            tot += cnt
        loss_all += loss / tot
    return loss_all


def test_hcl_matches_official_formula_including_overlapping_windows():
    rng = np.random.default_rng(3)
    shapes = [(4, 8, 8, 3), (4, 7, 7, 2), (4, 3, 3, 5), (4, 1, 1, 6)]
    s = [rng.normal(size=shape) for shape in shapes]
    t = [rng.normal(size=shape) for shape in shapes]
    np.testing.assert_allclose(losses.reviewkd(s, t), hcl_reference([nchw(x) for x in s], [nchw(x) for x in t]),
                               rtol=1e-5)


def nchw(x):
    return np.transpose(x, (0, 3, 1, 2))


def test_reviewkd_fusion_shapes_warmup_and_errors():
    rng = np.random.default_rng(4)
    feats = lambda chans: {"stage1": rng.normal(size=(3, 4, 4, chans[0])), "stage2": rng.normal(size=(3, 2, 2, chans[1])),
                           "pooled": rng.normal(size=(3, chans[2]))}
    student = Outputs(jnp.zeros((3, 2)), {k: jnp.asarray(v, jnp.float32) for k, v in feats((2, 3, 4)).items()}, {})
    teacher = Outputs(jnp.zeros((3, 2)), {k: jnp.asarray(v, jnp.float32) for k, v in feats((5, 6, 7)).items()}, {})
    method = methods.reviewkd(student_features=("stage1", "stage2", "pooled"),
                              teacher_features=("stage1", "stage2", "pooled"), warmup_steps=6)
    vars = jax.jit(method.init)(jax.random.PRNGKey(0), LossInputs.of(student, teacher))
    # The deepest level has nothing to fuse; the others have attention convolutions.
    assert "att_conv" not in vars.params["abf2"] and "att_conv" in vars.params["abf0"]
    assert vars.params["abf0"]["conv2"]["kernel"].shape == (3, 3, 4, 5)  # mid = deepest student width (4)
    loss_at = jax.jit(lambda step: method.loss(vars, LossInputs.of(student, teacher, step=step), jax.random.PRNGKey(0)))
    value, aux = loss_at(3)
    full, _ = loss_at(6)
    assert float(aux.metrics["warmup"]) == 0.5
    np.testing.assert_allclose(float(value), 0.5 * float(full), rtol=1e-6)
    with pytest.raises(ValueError, match="2 student features"):
        methods.reviewkd(student_features=("stage1", "stage2"), teacher_features=("stage1",))
    with pytest.raises(ValueError, match=r"\(3, 4, 4, 2\) and teacher \(3, 4, 4, 3\)"):
        losses.reviewkd([np.ones((3, 4, 4, 2))], [np.ones((3, 4, 4, 3))])
