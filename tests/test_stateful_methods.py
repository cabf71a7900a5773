"""TAID, Fantastic Gains' KL+DP, DHO / dual-head KD and TGeo-KD: formulas, state and updates."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxkd
from jaxkd import losses, methods
from jaxkd.losses.taid import TAIDState, taid, taid_init_state, taid_update
from jaxkd.losses.fantastic_gains import data_partitioned_kd
from jaxkd.losses.tgeo import class_mean_teacher_probs, fused_kd_ce, fusion_inputs

from tests.helpers import teacher_variables, tiny_batch, tiny_models

TEACHER, STUDENT = tiny_models()
BATCH = tiny_batch()
META = dict(BATCH, meta_image=tiny_batch(seed=5, batch_size=8)["image"], meta_label=tiny_batch(seed=5, batch_size=8)["label"])
TEACHER_VARS = teacher_variables(TEACHER, BATCH)
STEP = jaxkd.make_train_step()


def np_log_softmax(z):
    z = np.asarray(z, np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_kl(p_logits, q_logits, T=1.0):
    lp, lq = np_log_softmax(np.asarray(p_logits) / T), np_log_softmax(np.asarray(q_logits) / T)
    return (np.exp(lp) * (lp - lq)).sum(-1)


def logits(seed, shape=(6, 5), scale=2.0):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32) * scale


def new_state(method, batch=BATCH):
    return jaxkd.create(student=STUDENT, teacher=TEACHER, teacher_variables=TEACHER_VARS, method=method,
                        tx=optax.sgd(0.1), sample_batch=batch, rng=jax.random.PRNGKey(0))


# ----- TAID -----

def test_taid_matches_numpy_cross_entropy_form():
    zs, zt, t = logits(0), logits(1), 0.3
    target = np.exp(np_log_softmax((1 - t) * zs + t * zt))
    expected = -(target * np_log_softmax(zs)).sum(-1).mean()
    np.testing.assert_allclose(taid(zs, zt, t=t), expected, rtol=1e-5)


def test_taid_gradient_equals_the_kl_form_gradient():
    zs, zt, t = jnp.asarray(logits(2)), jnp.asarray(logits(3)), 0.6

    def kl_form(s):
        target = jax.lax.stop_gradient(jax.nn.log_softmax((1 - t) * s + t * zt))
        return jnp.mean(jnp.sum(jnp.exp(target) * (target - jax.nn.log_softmax(s)), -1))

    np.testing.assert_allclose(jax.grad(lambda s: taid(s, zt, t=t))(zs), jax.grad(kl_form)(zs), rtol=1e-5, atol=1e-7)


def test_taid_at_t_one_is_cross_entropy_to_the_teacher_and_masks_are_finite():
    zs, zt = logits(4), logits(5)
    expected = -(np.exp(np_log_softmax(zt)) * np_log_softmax(zs)).sum(-1).mean()
    np.testing.assert_allclose(taid(zs, zt, t=1.0), expected, rtol=1e-5)
    zs[:, -1] = -np.inf
    zt[:, -1] = -np.inf
    value, grad = jax.value_and_grad(lambda s: taid(s, zt, t=0.5))(jnp.asarray(zs))
    assert np.isfinite(value) and np.all(np.isfinite(grad))
    with pytest.raises(ValueError, match="t must lie"):
        taid(zs, zt, t=1.5)


def reference_taid_updates(losses_seen, steps, total, t0=0.4, t1=1.0, a=5e-4, b=0.99):
    """FORMULAS.md §5's pseudocode, in plain Python."""
    t, prev, m, ts = t0, None, 0.0, []
    for j, step in zip(losses_seen, steps):
        if prev is not None:
            m = b * m + (1 - b) * (prev - j) / (prev + 1e-15)
            t = min(t1, max(t0 + (t1 - t0) * step / total, t + a * (1 / (1 + np.exp(-m))) * (1 - t)))
        prev = j
        ts.append(t)
    return ts


def test_taid_update_rule_matches_the_reference():
    rng = np.random.default_rng(0)
    js = list(np.cumprod(1 - 0.05 * rng.random(30)) * 3.0)  # a decreasing loss
    state = taid_init_state(0.4)
    got = []
    for step, j in enumerate(js):
        state = taid_update(state, j, step, total_steps=1000, alpha=0.05)
        got.append(float(state.t))
    np.testing.assert_allclose(got, reference_taid_updates(js, range(30), 1000, a=0.05), rtol=1e-5)
    assert got[0] == pytest.approx(0.4) and got[-1] > got[1]


def test_taid_t_is_carried_in_state_and_never_below_the_linear_schedule():
    state = new_state(methods.taid(total_steps=20) + methods.ce())
    ts = []
    for _ in range(10):
        state, metrics = STEP(state, BATCH)
        ts.append(float(metrics["taid/t"]))
    assert isinstance(state.method.state["taid"], TAIDState)
    assert all(b >= a for a, b in zip(ts, ts[1:]))
    assert float(state.method.state["taid"].t) >= 0.4 + 0.6 * 9 / 20 - 1e-6


# ----- Fantastic Gains: KL+DP -----

def test_data_partitioned_kd_picks_the_more_confident_target():
    zs, zt, z0 = logits(6), logits(7), logits(8)
    y = np.array([0, 1, 2, 3, 4, 0])
    T = 2.0
    p_t, p_0 = np.exp(np_log_softmax(zt)), np.exp(np_log_softmax(z0))
    use_t = p_t[np.arange(6), y] > p_0[np.arange(6), y]
    target = np.where(use_t[:, None], zt, z0)
    expected = T**2 * np_kl(target, zs, T).mean()
    value, chosen = data_partitioned_kd(zs, zt, z0, y, temperature=T)
    np.testing.assert_allclose(value, expected, rtol=1e-5)
    np.testing.assert_array_equal(chosen, use_t)
    _, chosen_u = data_partitioned_kd(zs, zt, z0, None)
    np.testing.assert_array_equal(chosen_u, p_t.max(-1) > p_0.max(-1))


def test_kd_dp_keeps_a_frozen_copy_of_the_initial_student():
    state = new_state(methods.kd_dp(temperature=2.0))
    initial = jax.device_get(state.student.params)
    np.testing.assert_array_equal(state.method.state["kd_dp"]["initial_student"]["params"]["fc"]["kernel"],
                                  initial["fc"]["kernel"])
    for _ in range(3):
        state, metrics = STEP(state, BATCH)
    frozen = jax.device_get(state.method.state["kd_dp"]["initial_student"]["params"])
    jax.tree.map(np.testing.assert_array_equal, frozen, initial)
    assert not np.allclose(state.student.params["fc"]["kernel"], initial["fc"]["kernel"])
    assert 0.0 <= float(metrics["kd_dp/teacher_fraction"]) <= 1.0


# ----- DHO and dual-head KD -----

def test_dho_trains_its_head_and_evaluation_mixes_the_two_heads():
    method = methods.dho(temperature=2.0, mix=0.3, kd_head_temperature=0.5)
    state = new_state(method)
    for _ in range(3):
        state, metrics = STEP(state, BATCH)
    out = STUDENT.apply(state.student_variables(), BATCH["image"], train=False)
    head = state.method.params["dho"]["kd_head"]["out"]
    z_kd = np.asarray(out.features["pooled"]) @ np.asarray(head["kernel"]) + np.asarray(head["bias"])
    p = 0.3 * np.exp(np_log_softmax(out.logits)) + 0.7 * np.exp(np_log_softmax(z_kd / 0.5))
    expected = np.mean(p.argmax(-1) == BATCH["label"])
    result = jaxkd.evaluate(state, [dict(BATCH, mask=np.ones(16, bool))], jaxkd.make_eval_step())
    np.testing.assert_allclose(result["accuracy"], expected)
    np.testing.assert_allclose(metrics["dho"], 0.5 * metrics["dho/ce"] + 0.5 * metrics["dho/kd"], rtol=1e-6)


def test_dhkd_trains_the_auxiliary_head_and_evaluates_the_model_head():
    state = new_state(methods.dhkd(temperature=2.0, hidden=8))
    state, metrics = STEP(state, BATCH)
    head = jax.device_get(state.method.params["dhkd"]["aux_head"])
    assert set(head) == {"hidden", "out"} and head["hidden"]["kernel"].shape == (16, 8)
    np.testing.assert_allclose(metrics["dhkd"], metrics["dhkd/ce"] + metrics["dhkd/bkl"], rtol=1e-6)
    out = STUDENT.apply(state.student_variables(), BATCH["image"], train=False)
    expected = np.mean(np.argmax(out.logits, -1) == BATCH["label"])
    result = jaxkd.evaluate(state, [dict(BATCH, mask=np.ones(16, bool))], jaxkd.make_eval_step())
    np.testing.assert_allclose(result["accuracy"], expected)


def test_only_one_method_in_a_chain_may_change_inference():
    with pytest.raises(ValueError, match="change inference"):
        methods.dho() + methods.dho().named("dho2")


# ----- TGeo-KD -----

def test_tgeo_geometry_inputs_match_numpy():
    zs, zt = logits(9), logits(10)
    y = np.array([0, 1, 0, 2, 1, 0])
    s, t = np.exp(np_log_softmax(zs)), np.exp(np_log_softmax(zt))
    g = np.eye(5)[y]
    t_bar = np.stack([t[y == y[i]].mean(0) for i in range(6)])
    parts = [s, t, g, t_bar, (t_bar - s) ** 2, (g - s) ** 2, (t - s) ** 2, (t - g) ** 2, (t_bar - g) ** 2]
    np.testing.assert_allclose(fusion_inputs(zs, zt, y), np.concatenate(parts, -1), rtol=1e-5, atol=1e-7)
    mask = np.array([1, 1, 0, 1, 1, 1], bool)
    t_bar_masked = np.stack([t[(y == y[i]) & mask].mean(0) for i in range(6)])
    np.testing.assert_allclose(class_mean_teacher_probs(jnp.asarray(t), y, mask), t_bar_masked, rtol=1e-5)


def test_tgeo_fused_loss_matches_numpy():
    zs, zt = logits(11), logits(12)
    y = np.array([0, 1, 2, 3, 4, 0])
    ratio = np.linspace(0, 1, 6).astype(np.float32)
    T = 1.5
    ce = -np_log_softmax(zs)[np.arange(6), y]
    expected = np.mean(ratio * T**2 * np_kl(zt, zs, T) + (1 - ratio) * ce)
    np.testing.assert_allclose(fused_kd_ce(zs, zt, y, ratio, temperature=T), expected, rtol=1e-5)
    with pytest.raises(ValueError, match="ratio"):
        fused_kd_ce(zs, zt, y, ratio + 1.0)


def test_tgeo_hypergradient_is_the_one_step_lookahead_gradient():
    """The fusion network's gradient equals d/dφ CE(f(θ − η∇θ L(θ, α(φ))); meta) by finite differences,
    and the student's gradient is that of the training loss alone."""
    method = methods.tgeo_kd(temperature=1.5, lookahead_lr=0.5, hidden=(4,))
    state = new_state(method, META)
    chain = state.method_def
    x, y = META["image"], META["label"]
    t_logits = TEACHER.apply(TEACHER_VARS, x, train=False).logits

    def total(trainable):
        variables = {"params": trainable["student"], **state.student.model_state}
        out = STUDENT.apply(variables, x, train=True)
        inputs = methods.LossInputs(student=out, teacher=jaxkd.models.Outputs(t_logits, {}, {}), batch=META,
                                    step=jnp.zeros((), jnp.int32), student_variables=variables,
                                    student_model=STUDENT)
        return chain.loss(methods.MethodVars(trainable["method"], state.method.state), inputs, jax.random.PRNGKey(0))[0]

    grads = jax.jit(jax.grad(total))(state.trainable)

    @jax.jit
    def meta_loss(fusion):
        """The lookahead written out again, by hand."""
        params = state.student.params
        s_logits = STUDENT.apply(state.student_variables(), x, train=True).logits
        ratio = methods.tgeo._fusion_apply(fusion, fusion_inputs(s_logits, t_logits, y))
        def inner(p):
            z = STUDENT.apply({"params": p, **state.student.model_state}, x, train=True).logits
            return fused_kd_ce(z, t_logits, y, ratio, temperature=1.5)
        g = jax.grad(inner)(params)
        new = jax.tree.map(lambda p, d: p - 0.5 * d, params, g)
        z_meta = STUDENT.apply({"params": new, **state.student.model_state}, META["meta_image"], train=True).logits
        return losses.cross_entropy(z_meta, META["meta_label"])

    fusion = state.method.params["tgeo_kd"]["fusion"]
    eps = 2e-3
    direction = jax.tree.map(lambda a: jnp.asarray(np.random.default_rng(0).normal(size=a.shape), jnp.float32), fusion)
    plus = jax.tree.map(lambda a, d: a + eps * d, fusion, direction)
    minus = jax.tree.map(lambda a, d: a - eps * d, fusion, direction)
    fd = (meta_loss(plus) - meta_loss(minus)) / (2 * eps)
    analytic = sum(jnp.vdot(g, d) for g, d in zip(jax.tree.leaves(grads["method"]["tgeo_kd"]["fusion"]), jax.tree.leaves(direction)))
    np.testing.assert_allclose(analytic, fd, rtol=2e-2, atol=1e-5)

    def student_only(params):
        out = STUDENT.apply({"params": params, **state.student.model_state}, x, train=True)
        ratio = methods.tgeo._fusion_apply(fusion, fusion_inputs(out.logits, t_logits, y))
        return fused_kd_ce(out.logits, t_logits, y, jax.lax.stop_gradient(ratio), temperature=1.5)

    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 grads["student"], jax.grad(student_only)(state.student.params))


def test_tgeo_without_a_meta_batch_is_a_clear_error():
    with pytest.raises(ValueError, match="meta_"):
        new_state(methods.tgeo_kd())


# ----- shared robustness checks for the losses above -----

from jax.test_util import check_grads  # noqa: E402

Y6 = np.array([0, 1, 2, 3, 4, 0])
ROBUST_LOSSES = {
    "taid": lambda s, t, **kw: taid(s, t, t=0.4, **kw),
    "kd_dp": lambda s, t, **kw: data_partitioned_kd(s, t, t[::-1], Y6, temperature=2.0, **kw)[0],
    "tgeo": lambda s, t, **kw: fused_kd_ce(s, t, Y6, jnp.linspace(0.0, 1.0, 6), temperature=1.5, **kw),
}


@pytest.mark.parametrize("name", sorted(ROBUST_LOSSES))
def test_gradients_bf16_masked_vocabulary_and_masked_batch(name):
    fn = ROBUST_LOSSES[name]
    zs, zt = jnp.asarray(logits(20, scale=1.0)), jnp.asarray(logits(21, scale=1.0))
    if name == "taid":
        # TAID's target is detached from the student, which finite differences cannot see: compare with
        # the closed form instead, d/dz_s = (softmax(z_s) − p_t) / B.
        target = np.exp(np_log_softmax(0.6 * np.asarray(zs) + 0.4 * np.asarray(zt)))
        np.testing.assert_allclose(jax.grad(lambda s: fn(s, zt))(zs), (np.exp(np_log_softmax(zs)) - target) / 6,
                                   rtol=1e-4, atol=1e-6)
    else:
        check_grads(lambda s: fn(s, zt), (zs,), order=1, modes=("rev",), atol=1e-2, rtol=1e-2)
    f32 = jax.jit(fn)(zs, zt)
    bf16 = jax.jit(fn)(zs.astype(jnp.bfloat16), zt.astype(jnp.bfloat16))
    assert bf16.dtype == jnp.float32 and np.allclose(bf16, f32, rtol=5e-2, atol=5e-2)
    masked_s, masked_t = np.asarray(zs).copy(), np.asarray(zt).copy()
    masked_s[:, -1] = masked_t[:, -1] = -np.inf  # class 4 excluded on both sides (no label uses it here)
    value, grad = jax.value_and_grad(lambda s: fn(s, jnp.asarray(masked_t)))(jnp.asarray(masked_s))
    assert np.isfinite(value) and np.all(np.isfinite(grad))
    nothing = np.zeros(6, bool)
    value, grad = jax.value_and_grad(lambda s: fn(s, zt, mask=nothing))(zs)
    assert float(value) == 0.0 and np.all(grad == 0)
    with pytest.raises(ValueError, match="number of classes"):
        fn(zs[:, :4], zt)
