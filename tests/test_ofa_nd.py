"""OFA-KD and ND: values against NumPy references of the official formulas, errors, and the train step
(including a heterogeneous pair: a token-sequence teacher and a convolutional student)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxkd
from jaxkd import losses, methods, models
from jaxkd.methods.base import LossInputs
from tests.helpers import NUM_CLASSES, tiny_conv_models, tiny_image_batch


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_ofa_loss_matches_the_official_formula():
    rng = np.random.default_rng(0)
    s, t = rng.normal(size=(7, 6)), rng.normal(size=(7, 6))
    y = rng.integers(0, 6, size=7)
    for eps, temp in ((1.0, 1.0), (1.5, 2.0), (0.7, 0.5)):
        mask = np.eye(6)[y]
        prod = (_softmax(t / temp) + mask) ** eps
        ref = np.mean(np.sum(-(prod - mask) * np.log(_softmax(s / temp)), -1))
        np.testing.assert_allclose(losses.ofa(s, t, y, eps=eps, temperature=temp), ref, rtol=1e-5)


def test_ofa_loss_at_eps_one_is_soft_cross_entropy():
    rng = np.random.default_rng(1)
    s, t = rng.normal(size=(4, 5)), rng.normal(size=(4, 5))
    p_t = _softmax(t)
    ref = -np.sum(p_t * np.log(_softmax(s)), -1)
    np.testing.assert_allclose(losses.ofa(s, t, np.array([0, 1, 2, 3]), reduction="none"), ref, rtol=1e-5)


def test_ofa_loss_errors():
    z, y = np.zeros((2, 3)), np.array([0, 1])
    with pytest.raises(ValueError, match="eps"):
        losses.ofa(z, z, y, eps=0.0)
    with pytest.raises(ValueError, match="temperature"):
        losses.ofa(z, z, y, temperature=0.0)
    with pytest.raises(ValueError, match="classes"):
        losses.ofa(z, np.zeros((2, 4)), y)
    with pytest.raises(ValueError, match="eps"):
        methods.ofa(stages=("stage1",), eps=(1.0, 1.0, 1.0))


def test_nd_loss_matches_the_official_loop():
    rng = np.random.default_rng(2)
    s, t, c = rng.normal(size=(5, 4)), rng.normal(size=(5, 4)), rng.normal(size=(3, 4))
    y = np.array([0, 2, 1, 1, 0])
    ref = 0.0
    for si, ti, yi in zip(s, t, y):  # CIFAR/utils.py: DirectNormLoss.project_center
        e_c = c[yi] / np.linalg.norm(c[yi])
        ref += 1 - np.dot(si, e_c) / max(np.linalg.norm(si), np.linalg.norm(ti))
    np.testing.assert_allclose(losses.nd(s, t, y, c), ref / len(y), rtol=1e-5)
    # Minimized (0) by a student along the class mean with a norm at least the teacher's.
    big = 3.0 * c[y] / np.linalg.norm(c[y], axis=1, keepdims=True) * np.linalg.norm(t, axis=1, keepdims=True)
    np.testing.assert_allclose(losses.nd(big, t, y, c), 0.0, atol=1e-6)


def test_class_means_and_teacher_class_means():
    rng = np.random.default_rng(3)
    f, y = rng.normal(size=(9, 3)), np.array([0, 1, 1, 2, 0, 0, 2, 1, 1])
    ref = np.stack([f[y == k].mean(0) for k in range(3)] + [np.zeros(3)])
    np.testing.assert_allclose(methods.class_means(f, y, 4), ref, rtol=1e-5, atol=1e-7)
    teacher, _ = tiny_conv_models()
    b1, b2 = tiny_image_batch(seed=0), tiny_image_batch(seed=1)
    tvars = teacher.init(jax.random.PRNGKey(1), b1["image"])
    means = methods.teacher_class_means(teacher, tvars, [b1, {**b2, "mask": np.arange(8) < 5}], num_classes=NUM_CLASSES)
    feats = [teacher.apply(tvars, b["image"], train=False).features["pooled"] for b in (b1, b2)]
    all_f = np.concatenate([feats[0], np.asarray(feats[1])[:5]])
    all_y = np.concatenate([b1["label"], b2["label"][:5]])
    np.testing.assert_allclose(means, methods.class_means(all_f, all_y, NUM_CLASSES), rtol=1e-4, atol=1e-5)


def test_nd_errors():
    with pytest.raises(ValueError, match="same shape|one shape"):
        losses.nd(np.zeros((2, 3)), np.zeros((2, 4)), np.array([0, 1]), np.ones((2, 3)))
    with pytest.raises(ValueError, match="class_means"):
        losses.nd(np.zeros((2, 3)), np.zeros((2, 3)), np.array([0, 1]), np.ones((2, 4)))
    with pytest.raises(ValueError, match="label"):
        losses.nd(np.zeros((2, 3)), np.zeros((2, 3)), np.array([0, 5]), np.ones((2, 3)))
    with pytest.raises(ValueError, match="class_means"):
        methods.nd(class_means=np.ones(3))


class TokenNet(nn.Module):
    """A tiny ViT-like model: 2x2 patches -> tokens [B, N, D] (sown as 'tokens1', 'tokens2'), mean-pooled."""

    dim: int = 24

    @nn.compact
    def __call__(self, x, train: bool = False):
        b, h, w, c = x.shape
        x = x.reshape(b, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, (h // 2) * (w // 2), 4 * c)
        x = nn.Dense(self.dim)(x)
        self.sow("intermediates", "tokens1", x)
        x = x + nn.Dense(self.dim)(nn.gelu(nn.LayerNorm()(x)))
        self.sow("intermediates", "tokens2", x)
        pooled = jnp.mean(x, axis=1)
        self.sow("intermediates", "pooled", pooled)
        return nn.Dense(NUM_CLASSES)(pooled)


def test_ofa_and_nd_train_a_cnn_student_from_a_token_teacher():
    _, student = tiny_conv_models()
    teacher = models.from_linen(TokenNet())
    batch = tiny_image_batch()
    tvars = teacher.init(jax.random.PRNGKey(1), batch["image"])
    t_pooled = teacher.apply(tvars, batch["image"], train=False).features["pooled"]
    means = methods.class_means(t_pooled, batch["label"], NUM_CLASSES)
    method = methods.ce() + methods.ofa() + 2.0 * methods.nd(class_means=means)
    state = jaxkd.create(student=student, teacher=teacher, teacher_variables=tvars, method=method,
                         tx=optax.sgd(0.05, momentum=0.9), sample_batch=batch, rng=jax.random.PRNGKey(0))
    old_leaves = [np.array(x) for x in jax.tree_util.tree_leaves(_method_params(state))]  # the step donates
    step = jaxkd.make_train_step()
    new, metrics = step(state, batch)
    for key in ("ofa", "ofa/stage1", "ofa/stage2", "ofa/stage3", "ofa/logits", "nd"):
        assert np.isfinite(float(metrics[key])), key
    new_leaves = jax.tree_util.tree_leaves(_method_params(new))
    assert any(not np.allclose(a, b) for a, b in zip(old_leaves, new_leaves)), "branch heads/projector did not train"
    # 64-dim student embedding, 24-dim teacher: ND trains a projector.
    assert "projector" in _method_params(new)["nd"]


def _method_params(state):
    return state.method_vars.params


@pytest.mark.slow  # 8 s: OFA with a token student; OFA and ND with a CNN student stay in the suite; `pytest -m slow`
def test_ofa_branch_heads_read_tokens_for_a_token_student():
    teacher, _ = tiny_conv_models()
    student = models.from_linen(TokenNet())
    batch = tiny_image_batch()
    s_out = student.apply(student.init(jax.random.PRNGKey(0), batch["image"]), batch["image"], train=False)
    t_out = teacher.apply(teacher.init(jax.random.PRNGKey(1), batch["image"]), batch["image"], train=False)
    inputs = LossInputs.of(s_out, t_out, batch)
    method = methods.ofa(stages=("tokens1", "tokens2"), eps=(1.5, 1.5, 1.0))
    vars = method.init(jax.random.PRNGKey(2), inputs)
    value, aux = method.loss(vars, inputs, jax.random.PRNGKey(3))
    assert np.isfinite(float(value)) and set(aux.metrics) == {"tokens1", "tokens2", "logits"}
    grads = jax.grad(lambda p: method.loss(methods.MethodVars(p, vars.state), inputs, jax.random.PRNGKey(3))[0])(vars.params)
    assert all(np.all(np.isfinite(g)) for g in jax.tree_util.tree_leaves(grads))


def test_nd_without_class_means_accumulates_the_teachers_class_means_in_the_step():
    """``nd()``: the state's running class means are the teacher's embedding means over every example seen,
    and each step's loss uses them (this batch included)."""
    from tests.helpers import teacher_variables, tiny_batch, tiny_models

    _, student = tiny_models()
    teacher = models.get("mlp", num_classes=NUM_CLASSES, hidden_sizes=(16,))  # same width: no projector
    batches = [tiny_batch(seed=s) for s in (0, 1)]
    tvars = teacher_variables(teacher, batches[0])
    state = jaxkd.create(student=student, teacher=teacher, teacher_variables=tvars, method=methods.parse("nd"),
                         tx=optax.sgd(0.0), sample_batch=batches[0], rng=jax.random.PRNGKey(0))
    step = jaxkd.make_train_step()
    pooled = [np.asarray(teacher.apply(tvars, b["image"], train=False).features["pooled"]) for b in batches]
    labels = [b["label"] for b in batches]
    for k in range(2):
        student_pooled = np.asarray(student.apply(state.student.variables(), batches[k]["image"], train=True).features["pooled"])
        state, metrics = step(state, batches[k])
        f, y = np.concatenate(pooled[: k + 1]), np.concatenate(labels[: k + 1])
        means = np.stack([f[y == c].mean(0) if np.any(y == c) else np.zeros(f.shape[1]) for c in range(NUM_CLASSES)])
        st = state.method_vars.state["nd"]
        np.testing.assert_allclose(st["sums"] / np.maximum(st["counts"], 1)[:, None], means, rtol=1e-5, atol=1e-6)
        # ND from the formula: 1 − <s, c_y/|c_y|> / max(|s|, |t|), with the running means.
        c = means[labels[k]] / np.linalg.norm(means[labels[k]], axis=1, keepdims=True)
        s, t = student_pooled, pooled[k]
        expected = np.mean(1 - np.sum(s * c, 1) / np.maximum(np.linalg.norm(s, axis=1), np.linalg.norm(t, axis=1)))
        np.testing.assert_allclose(float(metrics["nd"]), expected, rtol=1e-4)
