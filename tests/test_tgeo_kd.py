"""TGeo-KD (jaxkd/losses/logit/tgeo_kd.py, jaxkd/methods/logit/tgeo_kd.py): the official fusion-network inputs and the
fused KD/CE loss against NumPy, labels on an excluded class (+inf inside jit, an error eagerly) and
labels avoiding it (finite), and the method's hypergradient against finite differences of the one-step
lookahead written out by hand.

Gradients, bfloat16, jit == eager, classes excluded on both sides, NaN/+inf propagation, nonnegativity
and shift invariance are checked in tests/test_loss_contract.py.
"""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxkd
from jaxkd import losses, methods
from jaxkd.methods.logit.tgeo_kd import _fusion_apply

from tests.helpers import NUM_CLASSES, teacher_variables, tiny_batch, tiny_models
from tests.numpy_reference import np_kl_logits, np_log_softmax, rand_logits

logits = partial(rand_logits, scale=2.0)


def test_fusion_inputs_match_the_official_option_3():
    zs, zt = logits(9), logits(10)
    y = np.array([0, 1, 0, 2, 1, 0])
    s, t = np.exp(np_log_softmax(zs)), np.exp(np_log_softmax(zt))
    g = np.eye(5)[y]
    t_bar = np.stack([t[y == y[i]].mean(0) for i in range(6)])
    parts = [s, t, g, t_bar, (t_bar - s) ** 2, (g - s) ** 2, (t - s) ** 2, (t - g) ** 2, (t_bar - g) ** 2]
    np.testing.assert_allclose(losses.fusion_inputs(zs, zt, y), np.concatenate(parts, -1), rtol=1e-5, atol=1e-7)
    mask = np.array([1, 1, 0, 1, 1, 1], bool)
    t_bar_masked = np.stack([t[(y == y[i]) & mask].mean(0) for i in range(6)])
    np.testing.assert_allclose(losses.class_mean_teacher_probs(jnp.asarray(t), y, mask), t_bar_masked, rtol=1e-5)


def test_fused_loss_matches_numpy():
    zs, zt = logits(11), logits(12)
    y = np.array([0, 1, 2, 3, 4, 0])
    ratio = np.linspace(0, 1, 6).astype(np.float32)
    ce = -np_log_softmax(zs)[np.arange(6), y]
    expected = ratio * 1.5**2 * np_kl_logits(zt / 1.5, zs / 1.5) + (1 - ratio) * ce
    np.testing.assert_allclose(losses.tgeo_kd(zs, zt, y, ratio, temperature=1.5, reduction="none"), expected,
                               rtol=1e-5)
    with pytest.raises(ValueError, match="ratio"):
        losses.tgeo_kd(zs, zt, y, ratio + 1.0)


def test_labels_avoiding_an_excluded_class_give_finite_values_and_gradients():
    zs, zt = logits(20), logits(21)
    zs[:, -1] = zt[:, -1] = -np.inf  # class 4 excluded on both sides
    y = np.array([0, 1, 2, 3, 0, 1])  # and no label uses it
    value, (gs, gt) = jax.value_and_grad(lambda s, t: losses.tgeo_kd(s, t, y, np.full(6, 0.3)), (0, 1))(zs, zt)
    assert np.isfinite(value) and np.all(np.isfinite(gs)) and np.all(np.isfinite(gt))


@pytest.mark.parametrize("loss", ["cross_entropy", "tgeo_kd"])
def test_a_label_on_an_excluded_class_is_inf_inside_jit_and_an_error_eagerly(loss):
    zs, zt = logits(22), logits(23)
    zs[:, -1] = zt[:, -1] = -np.inf
    y = np.array([0, 1, 2, 4, 0, 1])  # example 3's label is the excluded class
    fn = {"cross_entropy": lambda s, t, y, **kw: losses.cross_entropy(s, y, **kw),
          "tgeo_kd": lambda s, t, y, **kw: losses.tgeo_kd(s, t, y, np.full(6, 0.3), **kw)}[loss]
    values = np.asarray(jax.jit(lambda s, t, y: fn(s, t, y, reduction="none"))(zs, zt, y))
    assert values[3] == np.inf and np.all(np.isfinite(np.delete(values, 3)))
    with pytest.raises(ValueError, match=r"label 4 at index \(3,\) is a class whose logit is -inf"):
        fn(zs, zt, y)


def test_hypergradient_is_the_one_step_lookahead_gradient():
    """The fusion network's gradient equals d/dφ CE(f(θ − η∇θ L(θ, α(φ))); meta) by finite differences,
    and the student's gradient is that of the training loss alone."""
    # A linear student and a linear fusion net: the lookahead is smooth, so finite differences are exact to
    # O(eps²) wherever the initialization puts the parameters (ReLU kinks made a 3e-3 step cross one for
    # some keys).
    teacher, _ = tiny_models()
    student = jaxkd.models.get("mlp", num_classes=NUM_CLASSES, hidden_sizes=())
    batch = tiny_batch()
    meta = tiny_batch(seed=5, batch_size=8)
    batch = dict(batch, meta_image=meta["image"], meta_label=meta["label"])
    t_vars = teacher_variables(teacher, batch)
    state = jaxkd.create(student=student, teacher=teacher, teacher_variables=t_vars,
                         method=methods.tgeo_kd(temperature=1.5, lookahead_lr=0.5, hidden=()), tx=optax.sgd(0.1),
                         sample_batch=batch, rng=jax.random.PRNGKey(0))
    chain = state.method
    x, y = batch["image"], batch["label"]
    t_logits = teacher.apply(t_vars, x, train=False).logits

    def total(trainable):
        variables = {"params": trainable["student"], **state.student.model_state}
        out = student.apply(variables, x, train=True)
        inputs = methods.LossInputs.of(student=out, teacher=jaxkd.models.Outputs(t_logits, {}, {}), batch=batch,
                                    step=jnp.zeros((), jnp.int32), student_variables=variables, student_model=student)
        return chain.loss(methods.MethodVars(trainable["method"], state.method_vars.state), inputs, jax.random.PRNGKey(0))[0]

    grads = jax.jit(jax.grad(total))(state.trainable)
    fusion = state.method_vars.params["tgeo_kd"]["fusion"]

    def apply(params, images):
        return student.apply({"params": params, **state.student.model_state}, images, train=True).logits

    @jax.jit
    def meta_loss(fusion):
        """The lookahead written out again, by hand."""
        params = state.student.params
        ratio = _fusion_apply(fusion, losses.fusion_inputs(apply(params, x), t_logits, y))
        g = jax.grad(lambda p: losses.tgeo_kd(apply(p, x), t_logits, y, ratio, temperature=1.5))(params)
        new = jax.tree.map(lambda p, d: p - 0.5 * d, params, g)
        return losses.cross_entropy(apply(new, batch["meta_image"]), batch["meta_label"])

    # The method's hypergradient equals the gradient of the hand-written lookahead (autodiff of
    # independent code) ...
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7),
                 grads["method"]["tgeo_kd"]["fusion"], jax.jit(jax.grad(meta_loss))(fusion))
    # ... and the finite differences of that lookahead along a random direction (the model computes in
    # float32: a step of 3e-3 keeps its ~1e-7 relative rounding well under the 2% tolerance).
    eps = 3e-3
    direction = jax.tree.map(lambda a: jnp.asarray(np.random.default_rng(0).normal(size=a.shape), jnp.float32), fusion)
    plus = jax.tree.map(lambda a, d: a + eps * d, fusion, direction)
    minus = jax.tree.map(lambda a, d: a - eps * d, fusion, direction)
    fd = (meta_loss(plus) - meta_loss(minus)) / (2 * eps)
    analytic = sum(jnp.vdot(g, d) for g, d in zip(jax.tree.leaves(grads["method"]["tgeo_kd"]["fusion"]),
                                                  jax.tree.leaves(direction)))
    np.testing.assert_allclose(analytic, fd, rtol=2e-2, atol=1e-5)

    def student_only(params):
        z = apply(params, x)
        ratio = _fusion_apply(fusion, losses.fusion_inputs(z, t_logits, y))
        return losses.tgeo_kd(z, t_logits, y, jax.lax.stop_gradient(ratio), temperature=1.5)

    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 grads["student"], jax.grad(student_only)(state.student.params))


def test_method_without_a_meta_batch_is_a_clear_error():
    teacher, student = tiny_models()
    batch = tiny_batch()
    with pytest.raises(ValueError, match="meta_"):
        jaxkd.create(student=student, teacher=teacher, teacher_variables=teacher_variables(teacher, batch),
                     method=methods.tgeo_kd(), tx=optax.sgd(0.1), sample_batch=batch, rng=jax.random.PRNGKey(0))
