"""IW-OPD (jaxkd/losses/lm/iw_opd.py) against a float64 NumPy transcription of TRL's
``IWOPDTrainer._compute_iw_opd_loss`` (trl/experimental/iw_opd/iw_opd_trainer.py): the exclusive prefix sums
of |advantage|, the clamped total, the detached weights and advantages, the token mean or
``num_items_in_batch``; with and without rollout log-probs. Also: γ = 0 is the sampled-token reverse KL's
policy-gradient value, the gradient against float64 finite differences with the detached parts held fixed,
-inf tokens, argument checks and a derandomized property of the weights.
"""

from functools import partial

import jax
import jaxkd
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxkd import losses as S
from tests.numpy_reference import np_log_softmax, rand_logits
from tests.test_loss_contract import central_differences

T = 1.3
B, L, V = 3, 5, 6
logits = partial(rand_logits, shape=(B, L, V), scale=2.0)
MASK = np.array([[0, 1, 1, 1, 1], [0, 0, 1, 1, 0], [1, 1, 1, 1, 1]], bool)


def tokens_of(seed):
    return np.random.default_rng(seed).integers(0, V, size=(B, L)).astype(np.int32)


def np_trl_iw_opd(zs, zt, x, valid, temperature, gamma=0.5, eps=1e-8, rollout=None, num_items=None,
                  per_token=False):
    lq = np.take_along_axis(np_log_softmax(zs, temperature), x[..., None], -1)[..., 0]
    lt = np.take_along_axis(np_log_softmax(zt, temperature), x[..., None], -1)[..., 0]
    safe_t = np.where(valid, lt, 0.0)
    if rollout is None:
        rollout = lq
    safe_r = np.where(valid, rollout, 0.0)
    a = np.where(valid, safe_t - safe_r, 0.0)
    ab = np.abs(a)
    prefix = np.cumsum(ab, axis=1) - ab
    total = np.maximum(ab.sum(1, keepdims=True), eps)
    w = 1.0 + gamma * (1.0 - prefix / total)
    loss = np.where(valid, -lq * (w * a), 0.0)
    if per_token:
        return loss, w * a
    if num_items is not None:
        return loss.sum() / num_items
    return loss.sum() / max(valid.sum(), 1)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
def test_matches_the_numpy_transcription_of_trl(gamma):
    zs, zt, x = logits(1), logits(2), tokens_of(3)
    got = S.iw_opd(zs, zt, x, MASK, temperature=T, gamma=gamma)
    np.testing.assert_allclose(got, np_trl_iw_opd(zs, zt, x, MASK, T, gamma), rtol=1e-5)
    rollout = np.random.default_rng(4).normal(-2.0, 0.5, size=(B, L)).astype(np.float32)
    rollout[~MASK] = np.nan  # padding may hold anything
    got = S.iw_opd(zs, zt, x, MASK, temperature=T, gamma=gamma, rollout_log_probs=rollout, normalizer=17.0)
    want = np_trl_iw_opd(zs, zt, x, MASK, T, gamma, rollout=rollout, num_items=17.0)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    per_token = S.iw_opd(zs, zt, x, MASK, temperature=T, gamma=gamma, reduction="none")
    np.testing.assert_allclose(per_token, np_trl_iw_opd(zs, zt, x, MASK, T, gamma, per_token=True)[0], rtol=1e-5,
                               atol=1e-6)


def test_gamma_zero_is_the_sampled_token_reverse_kl():
    zs, zt, x = logits(5), logits(6), tokens_of(7)
    np.testing.assert_allclose(S.iw_opd(zs, zt, x, MASK, temperature=T, gamma=0.0, reduction="none"),
                               S.sampled_token_reverse_kl(zs, zt, x, temperature=T, mask=MASK, reduction="none"),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("with_rollout", [False, True])
def test_gradient_against_float64_finite_differences_with_the_detached_parts_fixed(with_rollout):
    x = tokens_of(10)
    with jax.enable_x64(True):
        zs, zt = logits(8).astype(np.float64), logits(9).astype(np.float64)
        rollout = np.random.default_rng(11).normal(-2.0, 0.5, size=(B, L)) if with_rollout else None
        f = lambda s, t: S.iw_opd(s, t, x, MASK, temperature=T, gamma=0.7, rollout_log_probs=rollout)  # noqa: E731
        grad_s, grad_t = jax.grad(f, argnums=(0, 1))(zs, zt)
        assert grad_s.dtype == np.float64
        np.testing.assert_array_equal(grad_t, 0.0)
        _, coef = np_trl_iw_opd(zs, zt, x, MASK, T, 0.7, rollout=rollout, per_token=True)
        coef = np.where(MASK, coef, 0.0) / MASK.sum()

        def frozen(s):
            lq = jnp.take_along_axis(jax.nn.log_softmax(s / T), jnp.asarray(x)[..., None], -1)[..., 0]
            return -jnp.sum(coef * lq)

        fd = central_differences(frozen, zs)
    np.testing.assert_allclose(grad_s, fd, rtol=1e-6, atol=1e-8)


@settings(max_examples=25, derandomize=True, deadline=None)
@given(seed=st.integers(0, 2**16), gamma=st.floats(0.0, 3.0))
def test_weights_run_from_one_plus_gamma_down_to_one(seed, gamma):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(4, 7)) * (rng.random((4, 7)) < 0.7)
    mask = rng.random((4, 7)) < 0.8
    w = np.asarray(S.iw_opd_weights(a, mask, gamma=gamma))
    assert np.all(w <= 1 + gamma + 1e-6) and np.all(w >= 1 - 1e-6)
    assert np.all(np.diff(w, axis=1) <= 1e-6)  # non-increasing along the sequence
    first = np.argmax(mask, axis=1)
    np.testing.assert_allclose(w[np.arange(4), first], 1 + gamma, rtol=1e-6)  # nothing before the first token


def test_zero_probability_tokens_are_left_out_with_zero_gradients():
    zs, zt, x = logits(12), logits(13), tokens_of(14)
    zt[2, 1, x[2, 1]] = -np.inf
    value = S.iw_opd(zs, zt, x, MASK, reduction="none")
    assert np.all(np.isfinite(value)) and float(value[2, 1]) == 0
    g = jax.grad(lambda s: S.iw_opd(s, zt, x, MASK))(zs)
    assert np.all(np.isfinite(g)) and np.all(np.asarray(g)[2, 1] == 0) and np.all(np.asarray(g)[~MASK] == 0)
    masked = MASK.copy()
    masked[2, 1] = False
    np.testing.assert_allclose(value, S.iw_opd(zs, zt, x, masked, reduction="none"), rtol=1e-6, atol=1e-7)


def test_bad_input_raises():
    zs, zt, x = logits(15), logits(16), tokens_of(17)
    for call, match in [
        (lambda: S.iw_opd(zs, zt[..., :5], x), "number of classes"),
        (lambda: S.iw_opd(zs[0], zt[0], x[0]), r"\[batch, length, vocab\]"),
        (lambda: S.iw_opd(zs, zt, x[:, :2]), "tokens must have shape"),
        (lambda: S.iw_opd(zs, zt, x, MASK[:, :2]), "mask must have"),
        (lambda: S.iw_opd(zs, zt, x, rollout_log_probs=np.zeros((B, 2))), "rollout_log_probs must have"),
        (lambda: S.iw_opd(zs, zt, x, gamma=-0.1), "gamma"),
        (lambda: S.iw_opd(zs, zt, x, epsilon=0.0), "epsilon"),
        (lambda: S.iw_opd(zs, zt, x, temperature=0.0), "temperature"),
        (lambda: S.iw_opd(zs, zt, x, reduction="max"), "reduction"),
        (lambda: S.iw_opd_weights(np.zeros(3)), r"\[batch, length\]"),
    ]:
        with pytest.raises(ValueError, match=match):
            call()


# ----- the iw_opd method (student sampling inside the step) -----

@pytest.mark.slow  # 10 s: the loss's own tests (this file) and the method's roles on its rollout (tests/test_logit_roles.py) stay in the suite; `pytest -m slow`
def test_the_method_is_the_loss_on_the_students_own_rollout_and_trains_the_student():
    from jaxkd import methods
    from jaxkd.methods.base import LossInputs
    from jaxkd.methods.features import apply_participant
    from jaxkd.methods.lm.rollout import learner_rollout
    from jaxkd.losses.lm.tokens import shift_logits
    from tests.test_lm_train import BATCH, new_state

    method = methods.iw_opd(prompt_length=3, gamma=0.7, temperature=1.2)
    state = new_state(method)
    s, t = state.participant("student"), state.participant("teacher")
    x = {"tokens": BATCH["tokens"], "mask": BATCH["mask"]}
    outputs = {"student": s.model.apply({"params": state.student.params}, x, train=True),
               "teacher": t.model.apply(state.teacher.variables(), x, train=False)}
    variables = {"student": {"params": state.student.params}, "teacher": state.teacher.variables()}
    inputs = LossInputs(outputs=outputs, batch=BATCH, step=state.step, variables=variables,
                        participants=state.participants, label_key="label")
    rng = jax.random.PRNGKey(3)
    value, _ = method.loss(state.method_vars, inputs, rng)
    rolled, target_mask = learner_rollout(inputs, rng, prompt_length=3, temperature=1.2, top_k=None, top_p=None,
                                          eos_id=None, method="iw_opd")
    assert np.any(np.asarray(rolled["tokens"]) != BATCH["tokens"])  # the student's own continuations
    zs = apply_participant(inputs, "student", rolled, train=True, method="iw_opd").logits
    zt = apply_participant(inputs, "teacher", rolled, train=False, method="iw_opd").logits
    targets = np.asarray(rolled["tokens"])[:, 1:]
    want = np_trl_iw_opd(np.asarray(shift_logits(zs)), np.asarray(shift_logits(zt)), targets,
                         np.asarray(target_mask), 1.2, 0.7)
    np.testing.assert_allclose(float(value), want, rtol=1e-4)
    before = jax.device_get(state.student.params)
    new, metrics = jaxkd.make_train_step()(state, BATCH)
    assert np.isfinite(float(metrics["loss"]))
    moved = jax.tree_util.tree_map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))),
                                   before, jax.device_get(new.student.params))
    assert any(jax.tree_util.tree_leaves(moved))
    for bad, match in [(lambda: methods.iw_opd(gamma=-1.0), "gamma"), (lambda: methods.iw_opd(prompt_length=0),
                                                                       "prompt_length"),
                       (lambda: methods.iw_opd(epsilon=0.0), "epsilon"),
                       (lambda: methods.iw_opd(student="a", teacher="a"), "must be different participants")]:
        with pytest.raises(ValueError, match=match):
            bad()
