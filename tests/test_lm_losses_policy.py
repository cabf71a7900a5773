"""MiniLLM's policy-gradient pieces (jaxkd/losses/lm/minillm.py) and DistiLLM's adaptive off-policy schedule
(its schedule, in jaxkd/methods/lm/distillm.py).

MiniLLM: values against a NumPy transcription of the paper's formulas with the official code's
conventions (microsoft/LMOps minillm/: rewards, discounted length-normalized returns, whitening, the PPO
clip, teacher-mixed importance weights, the single-step reverse KL), closed forms for the returns, the
surrogate's gradient against float64 finite differences (rollout constants given) and against the
analytic policy gradient (on-policy), masks, an all-masked batch, and argument errors.

DistiLLM: the schedule update and the per-step data-source decision against a plain-Python
transcription of jongwooko/distillm finetune.py.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxkd import losses, methods
from tests.numpy_reference import np_log_softmax
from tests.test_loss_contract import central_differences


B, T, V = 3, 6, 7
MASK = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]], bool)


def rollout(seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    s = (1.5 * rng.normal(size=(B, T, V))).astype(dtype)
    t = (1.5 * rng.normal(size=(B, T, V))).astype(dtype)
    y = rng.integers(0, V, size=(B, T)).astype(np.int32)
    return s, t, y


def gather(log_p, y):
    return np.take_along_axis(log_p, y[..., None], -1)[..., 0]


# ----- NumPy reference, written from the paper's formulas with the official code's conventions -----


def np_minillm(s, t, y, m, *, old=None, alpha=None, gamma=0.95, length_norm=True, include_current=True,
               scaling=0.5, clip=100.0, whiten="tokens", eps=0.2, iw_single=False):
    """(pg, single) of MiniLLM: r_t = log p − log q_old (÷ scaling, clipped), R_t = Σ γ^k r / #tokens,
    whitening, ρ = w·q/q_old, max(−Aρ, −A·clip(ρ)); single step Σ_v q (log q − log p)."""
    ls, lt = np_log_softmax(s.astype(np.float64)), np_log_softmax(t.astype(np.float64))
    lq, lp = gather(ls, y), gather(lt, y)
    old = lq if old is None else np.asarray(old, np.float64)
    r = lp - old
    if scaling is not None:
        r = r / scaling
    if clip is not None:
        r = np.clip(r, -clip, clip)
    r = np.where(m, r, 0.0)
    big_r = np.zeros((B, T))
    for b, i in itertools.product(range(B), range(T)):
        if not m[b, i]:
            continue
        start = i if include_current else i + 1
        total = sum(gamma ** (j - start) * r[b, j] for j in range(start, T))
        count = sum(m[b, j] for j in range(start, T))
        big_r[b, i] = total / max(count, 1) if length_norm else total
    if whiten is None:
        adv = big_r
    else:
        sel = np.ones_like(m) if whiten == "batch" else m
        vals = big_r[sel]
        adv = (big_r - vals.mean()) / np.sqrt(vals.var(ddof=1) + 1e-8)
    adv = np.where(m, adv, 0.0)
    if alpha is None:
        w = np.ones((B, T))
    else:
        q, p = np.exp(old), np.exp(lp)
        w = q / ((1 - alpha) * q + alpha * p)
    rho = np.exp(np.where(m, lq - old, 0.0)) * w
    pg_tok = np.maximum(-adv * rho, -adv * np.clip(rho, 1 - eps, 1 + eps))
    kl_tok = np.sum(np.exp(ls) * (ls - lt), -1)
    if iw_single:
        kl_tok = kl_tok * w
    return pg_tok[m].mean(), kl_tok[m].mean()


OFFICIAL = dict(gamma=0.95, length_norm=True, include_current_reward=True, reward_scaling=0.5, clip_reward=100.0)
PAPER = dict(gamma=1.0, length_norm=True, include_current_reward=False, reward_scaling=None, clip_reward=None,
             whiten=None, importance_weight_single_step=True)


@pytest.mark.parametrize("config", ["official_batch", "official_tokens", "paper", "unnormalized"])
def test_minillm_terms_match_the_numpy_reference(config):
    s, t, y = rollout(1)
    old = gather(np_log_softmax(s.astype(np.float64)), y) + np.random.default_rng(2).normal(scale=0.3, size=(B, T))
    if config.startswith("official"):
        whiten = config.split("_")[1]
        kwargs, ref = dict(OFFICIAL, whiten=whiten), dict(whiten=whiten)
    elif config == "paper":
        kwargs = PAPER
        ref = dict(gamma=1.0, include_current=False, scaling=None, clip=None, whiten=None, iw_single=True)
    else:
        kwargs = dict(gamma=0.8, length_norm=False, reward_scaling=None, clip_reward=1.0, whiten="tokens", clip_range=0.1)
        ref = dict(gamma=0.8, length_norm=False, scaling=None, clip=1.0, whiten="tokens", eps=0.1)
    # One compiled program per configuration: both the terms and their sum.
    both = jax.jit(lambda *a, old: (losses.minillm_terms(*a, behaviour_log_probs=old, teacher_mix_alpha=0.2, **kwargs),
                                    losses.minillm(*a, behaviour_log_probs=old, teacher_mix_alpha=0.2, **kwargs)))
    (pg, single), total = both(s, t, y, MASK, old=old.astype(np.float32))
    want_pg, want_single = np_minillm(s, t, y, MASK, old=old, alpha=0.2, **ref)
    np.testing.assert_allclose([pg, single], [want_pg, want_single], rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(total, want_pg + want_single, rtol=2e-5, atol=1e-6)


def test_returns_closed_forms():
    r = np.array([[1.0, 2.0, 3.0, 4.0]], np.float32)
    m = np.ones_like(r, bool)
    # Official: Σ_{t'≥t} r / #tokens from t; the paper's R_{t+1}: Σ_{t'>t} r / #tokens after t (0 at the end).
    np.testing.assert_allclose(losses.minillm_returns(r, m, gamma=1.0), [[10 / 4, 9 / 3, 7 / 2, 4 / 1]])
    np.testing.assert_allclose(losses.minillm_returns(r, m, gamma=1.0, include_current_reward=False), [[3, 3.5, 4, 0]])
    g = 0.5
    discounted = [1 + g * 2 + g**2 * 3 + g**3 * 4, 2 + g * 3 + g**2 * 4, 3 + g * 4, 4]
    np.testing.assert_allclose(losses.minillm_returns(r, m, gamma=g, length_norm=False), [discounted], rtol=1e-6)
    np.testing.assert_allclose(losses.minillm_returns(r, m, gamma=g), [np.array(discounted) / [4, 3, 2, 1]], rtol=1e-6)
    # Padding after the end: its rewards (garbage) do not count and its returns are 0.
    padded = np.array([[1.0, 2.0, 99.0, -99.0]], np.float32)
    np.testing.assert_allclose(losses.minillm_returns(padded, np.array([[1, 1, 0, 0]], bool), gamma=1.0), [[1.5, 2, 0, 0]])


# gamma traced: one compiled program for every example.
_unnormalized_returns = jax.jit(lambda r, m, g: losses.minillm_returns(r, m, gamma=g, length_norm=False))


@settings(deadline=None, max_examples=15, derandomize=True)
@given(st.integers(0, 10_000), st.floats(0.0, 1.0))
def test_returns_are_masked_discounted_future_sums(seed, gamma):
    rng = np.random.default_rng(seed)
    r = rng.normal(size=(2, 5)).astype(np.float32)
    m = rng.random((2, 5)) < 0.7
    got = np.asarray(_unnormalized_returns(r, m, np.float32(gamma)))
    for b, i in itertools.product(range(2), range(5)):
        want = sum(gamma ** (j - i) * r[b, j] for j in range(i, 5) if m[b, j]) if m[b, i] else 0.0
        np.testing.assert_allclose(got[b, i], want, rtol=1e-5, atol=1e-5)


def test_rewards_scaling_clipping_and_masking():
    lt = np.array([[-1.0, -5.0, -2.0]], np.float32)
    lq = np.array([[-2.0, -0.5, 7.0]], np.float32)
    m = np.array([[True, True, False]])
    np.testing.assert_allclose(losses.minillm_rewards(lt, lq, m), [[1.0, -4.5, 0.0]])
    np.testing.assert_allclose(losses.minillm_rewards(lt, lq, m, reward_scaling=0.5, clip_reward=5.0), [[2.0, -5.0, 0.0]])


def test_whitening_batch_includes_padding_tokens_does_not():
    rng = np.random.default_rng(3)
    r = rng.normal(size=(B, T)).astype(np.float32)
    full = np.ones((B, T), bool)
    a_batch = losses.minillm_advantages(r, full, whiten="batch")
    np.testing.assert_allclose(a_batch, losses.minillm_advantages(r, full, whiten="tokens"), rtol=1e-6)
    a_tok = np.asarray(losses.minillm_advantages(r, MASK, whiten="tokens"))
    assert abs(a_tok[MASK].mean()) < 1e-6 and abs(a_tok[MASK].std(ddof=1) - 1) < 1e-4
    a_bat = np.asarray(losses.minillm_advantages(r, MASK, whiten="batch"))
    ret = np.where(MASK, np.asarray(losses.minillm_returns(r, MASK)), 0.0)  # the official: padded zeros counted
    np.testing.assert_allclose(a_bat[MASK], ((ret - ret.mean()) / np.sqrt(ret.var(ddof=1) + 1e-8))[MASK], rtol=1e-5)
    assert np.all(a_bat[~MASK] == 0) and np.all(a_tok[~MASK] == 0)


def test_importance_weights_and_mixture():
    s, t, y = rollout(4)
    ls, lt = np_log_softmax(s), np_log_softmax(t)
    lq, lp = gather(ls, y), gather(lt, y)

    @jax.jit
    def compute(lq, lp, s, t):
        return (losses.minillm_importance_weights(lq, lp, MASK, alpha=0.2),
                losses.minillm_importance_weights(lq, lp, alpha=0.0),
                losses.minillm_mixture_log_probs(s, t, alpha=0.2),
                jax.grad(lambda z: jnp.sum(losses.minillm_mixture_log_probs(z, t)))(s))

    w, w0, mix, mix_grad = compute(lq, lp, s, t)
    want = np.where(MASK, np.exp(lq) / (0.8 * np.exp(lq) + 0.2 * np.exp(lp)), 1.0)
    np.testing.assert_allclose(w, want, rtol=1e-5)
    assert np.all(np.asarray(w) <= 1 / 0.8 + 1e-6)
    np.testing.assert_allclose(w0, np.ones((B, T)), rtol=1e-6)
    np.testing.assert_allclose(np.exp(mix), 0.8 * np.exp(ls) + 0.2 * np.exp(lt), rtol=1e-5)
    assert np.all(np.asarray(mix_grad) == 0)


def test_single_step_kl_is_the_reverse_kl_and_detaches_the_teacher():
    s, t, _ = rollout(5)
    ls, lt = np_log_softmax(s), np_log_softmax(t)
    want = np.sum(np.exp(ls) * (ls - lt), -1)
    np.testing.assert_allclose(losses.minillm_single_step_kl(s, t, reduction="none"), want, rtol=1e-5)
    np.testing.assert_allclose(losses.minillm_single_step_kl(s, t, mask=MASK), want[MASK].mean(), rtol=1e-5)
    assert jnp.all(jax.grad(lambda z: losses.minillm_single_step_kl(s, z))(t) == 0)


def test_surrogate_gradient_matches_float64_finite_differences():
    """With the rollout's constants given (behaviour log-probs, so rewards, advantages and weights are
    fixed), the loss is a function of the student logits alone: its gradient is checked exactly."""
    with jax.enable_x64(True):
        s, t, y = rollout(6, np.float64)
        rng = np.random.default_rng(7)
        old = gather(np_log_softmax(s), y) + rng.normal(scale=0.25, size=(B, T))  # some ratios clipped, some not
        rho_minus_1 = np.abs(np.exp(gather(np_log_softmax(s), y) - old) - 1)
        assert np.all(np.abs(rho_minus_1 - 0.2) > 1e-3)  # away from the clip's kinks
        f = lambda z: losses.minillm(z, t, y, MASK, behaviour_log_probs=old, teacher_mix_alpha=None, whiten="tokens")
        grad = np.asarray(jax.jit(jax.grad(f))(s))
        assert grad.dtype == np.float64
        np.testing.assert_allclose(grad, central_differences(f, s), rtol=1e-6, atol=1e-9)
        assert np.all(grad[~MASK] == 0)


def test_on_policy_gradient_is_the_policy_gradient_plus_the_single_step_gradient():
    """behaviour_log_probs=None: the surrogate's gradient is −(1/N) Σ_t A_t·w_t·∇ log q(y_t) (0 where the
    clip is active) plus ∇ of the mean single-step KL — computed here in closed form."""
    with jax.enable_x64(True):
        s, t, y = rollout(8, np.float64)
        ls, lt = np_log_softmax(s), np_log_softmax(t)
        lq, lp = gather(ls, y), gather(lt, y)
        n = MASK.sum()
        r = np.where(MASK, np.clip((lp - lq) / 0.5, -100, 100), 0.0)
        ret = np.asarray(losses.minillm_returns(r, MASK))  # checked against NumPy above; whitened here
        adv = np.where(MASK, (ret - ret[MASK].mean()) / np.sqrt(ret[MASK].var(ddof=1) + 1e-8), 0.0)
        w = np.exp(lq) / (0.8 * np.exp(lq) + 0.2 * np.exp(lp))
        active = np.where(adv >= 0, w <= 1.2, w >= 0.8)  # the unclipped side is the max
        coef = np.where(MASK & active, -adv * w, 0.0) / n  # d L_pg / d log q(y_t)
        q = np.exp(ls)
        onehot = np.eye(V)[y]
        expected = coef[..., None] * (onehot - q)
        kl = np.sum(q * (ls - lt), -1, keepdims=True)
        expected += np.where(MASK[..., None], q * (ls - lt - kl), 0.0) / n
        grad = jax.jit(jax.grad(lambda z: losses.minillm(z, t, y, MASK, teacher_mix_alpha=0.2)))(s)
        np.testing.assert_allclose(grad, expected, rtol=1e-7, atol=1e-12)


def test_masked_positions_do_not_matter_and_all_masked_is_zero():
    s, t, y = rollout(9)
    rng = np.random.default_rng(10)
    s2, t2, y2 = s.copy(), t.copy(), y.copy()
    s2[~MASK] = rng.normal(scale=20, size=s2[~MASK].shape)
    t2[~MASK] = rng.normal(scale=20, size=t2[~MASK].shape)
    y2[~MASK] = 12345  # out of the vocabulary: padding may hold anything
    old = gather(np_log_softmax(s), y)
    old2 = np.where(MASK, old, 1e4).astype(np.float32)

    @jax.jit
    def value_and_grad(s_, t_, y_, old_, mask):
        f = lambda z: losses.minillm(z, t_, y_, mask, behaviour_log_probs=old_, teacher_mix_alpha=0.2, whiten="batch")
        return jax.value_and_grad(f)(s_)

    (v1, g1), (v2, g2) = value_and_grad(s, t, y, old, MASK), value_and_grad(s2, t2, y2, old2, MASK)
    np.testing.assert_allclose(v1, v2, rtol=1e-6)
    np.testing.assert_allclose(g1, g2, rtol=1e-6, atol=1e-9)
    v, g = value_and_grad(s, t, y, old, np.zeros((B, T), bool))
    assert float(v) == 0.0 and np.all(np.asarray(g) == 0)


def test_jit_equals_eager():
    s, t, y = rollout(11)
    f = lambda a, b: losses.minillm(a, b, y, MASK, teacher_mix_alpha=0.2)
    np.testing.assert_allclose(jax.jit(f)(s, t), f(s, t), rtol=1e-6)


def test_bad_arguments_raise():
    s, t, y = rollout(12)
    lq = np.zeros((B, T), np.float32)
    for bad, match in [
        (lambda: losses.minillm(s, t[..., :5], y, MASK), "number of classes"),
        (lambda: losses.minillm(s, t, y[:, :4], MASK), "sampled_tokens must have shape"),
        (lambda: losses.minillm(s, t, y, MASK[:, :4]), "mask must have"),
        (lambda: losses.minillm(s, t, y + V, MASK), "targets: label"),
        (lambda: losses.minillm(s, t, y, MASK, behaviour_log_probs=lq[:2]), "behaviour_log_probs"),
        (lambda: losses.minillm(s, t, y, MASK, whiten="global"), "whiten must be one of"),
        (lambda: losses.minillm(s, t, y, MASK, gamma=1.5), "gamma must lie"),
        (lambda: losses.minillm(s, t, y, MASK, teacher_mix_alpha=-0.1), "teacher_mix_alpha must lie"),
        (lambda: losses.minillm(s, t, y, MASK, reward_scaling=0.0), "reward_scaling"),
        (lambda: losses.minillm(s, t, y, MASK, clip_range=0.0), "clip_range"),
        (lambda: losses.minillm(s, t, y, MASK, importance_weight_single_step=True), "needs teacher_mix_alpha"),
        (lambda: losses.minillm_returns(lq[0], None), r"\[batch, length\]"),
        (lambda: losses.minillm_importance_weights(lq, lq, alpha=2.0), "alpha must lie"),
    ]:
        with pytest.raises(ValueError, match=match):
            bad()


# ----- DistiLLM: the official rule (jongwooko/distillm finetune.py), in plain Python -----


class OfficialAdaptive:
    """finetune.py's adaptive-SGO bookkeeping: ``adaptive_threshold``, ``prev_avg_loss`` and the branch
    taken per step (``len(replay_buffer)`` as a number)."""

    def __init__(self, init_threshold, dev_loss_before_training, loss_eps=0.1):
        self.adaptive_threshold = init_threshold
        self.prev_avg_loss = dev_loss_before_training
        self.loss_eps = loss_eps

    def after_evaluation(self, curr_avg_loss):
        if curr_avg_loss >= self.prev_avg_loss + self.loss_eps:
            self.adaptive_threshold += 0.1
            self.adaptive_threshold = min(self.adaptive_threshold, 1.0)
            self.prev_avg_loss = curr_avg_loss

    def branch(self, r, global_step, total_iters, buffer_len, capacity=1000, replay_ratio="decreasing"):
        if replay_ratio == "constant":
            samp_threshold = self.adaptive_threshold * 0.5
        elif replay_ratio == "increasing":
            samp_threshold = self.adaptive_threshold * global_step / total_iters
        else:
            samp_threshold = self.adaptive_threshold * (1 - global_step / total_iters)
        if r < samp_threshold or (r < self.adaptive_threshold and buffer_len < capacity):
            return methods.DISTILLM_GENERATE
        elif r < self.adaptive_threshold:
            return methods.DISTILLM_REPLAY
        return methods.DISTILLM_DATASET


def test_schedule_update_matches_the_official_rule():
    # A validation loss that falls, drifts up slowly (accumulating past eps), jumps, and falls again.
    dev = [2.0, 1.9, 1.95, 2.0, 2.06, 2.3, 2.35, 2.2, 2.45, 2.6, 2.75, 2.9, 3.05, 3.2, 3.4, 3.6, 3.8, 4.0]
    ref = OfficialAdaptive(0.0, 2.05)
    state = methods.distillm_schedule_init(0.0, 2.05)
    update = jax.jit(methods.distillm_schedule_update)
    thresholds = []
    for loss in dev:
        ref.after_evaluation(loss)
        state = update(state, loss)
        thresholds.append(float(state.threshold))
        assert float(state.threshold) == pytest.approx(ref.adaptive_threshold, abs=1e-6)
        assert float(state.prev_loss) == pytest.approx(ref.prev_avg_loss, abs=1e-6)
    assert thresholds[-1] == pytest.approx(1.0) and 0 < thresholds[5] < 1  # capped at 1


def test_schedule_without_an_initial_loss_records_the_first():
    state = methods.distillm_schedule_init(0.2)
    state = methods.distillm_schedule_update(state, 5.0)  # recorded, no raise
    assert float(state.threshold) == pytest.approx(0.2) and float(state.prev_loss) == 5.0
    state = methods.distillm_schedule_update(state, 5.2, loss_eps=0.1)
    assert float(state.threshold) == pytest.approx(0.3)


def test_data_source_matches_the_official_branches():
    # Typed threefry keys: the test must not depend on the default PRNG (experiments/distill.py runs under
    # rbg, whose vmapped draws differ from unbatched ones).
    keys = jax.random.split(jax.random.key(0, impl="threefry2x32"), 12)
    uniforms = np.asarray(jax.vmap(lambda k: jax.random.uniform(k, (), jnp.float32))(keys))  # the r of each key
    cases = [(p, step, buf, ratio) for p in (0.0, 0.3, 0.7, 1.0) for step in (1, 40, 99) for buf in (0, 999, 1000)
             for ratio in ("decreasing", "constant", "increasing")]
    for ratio in ("decreasing", "constant", "increasing"):
        fn = jax.jit(jax.vmap(
            lambda th, key, step, buf: methods.distillm_data_source(
                methods.DistiLLMSchedule(th, jnp.float32(0), jnp.bool_(True)), key, step, buf,
                total_steps=100, replay_ratio=ratio),
        ))
        sub = [c for c in cases if c[3] == ratio]
        rows = [(p, k, step, buf) for (p, step, buf, _) in sub for k in range(len(keys))]
        got = np.asarray(fn(jnp.array([r[0] for r in rows], jnp.float32), keys[jnp.array([r[1] for r in rows])],
                            jnp.array([r[2] for r in rows]), jnp.array([r[3] for r in rows])))
        use = np.asarray(jax.vmap(lambda th, key: methods.distillm_use_student_output(
            methods.DistiLLMSchedule(th, jnp.float32(0), jnp.bool_(True)), key, 50, 1000, total_steps=100,
            replay_ratio=ratio))(jnp.array([r[0] for r in rows], jnp.float32), keys[jnp.array([r[1] for r in rows])]))
        for (p, k, step, buf), source, student in zip(rows, got, use):
            r = float(uniforms[k])
            official = OfficialAdaptive(p, 0.0)
            assert source == official.branch(r, step, 100, buf, replay_ratio=ratio), (p, step, buf, ratio)
            assert student == (official.branch(r, 50, 100, 1000, replay_ratio=ratio) != methods.DISTILLM_DATASET)
    fresh, p = methods.distillm_sampling_thresholds(methods.distillm_schedule_init(0.5), 25, total_steps=100)
    assert float(fresh) == pytest.approx(0.375) and float(p) == pytest.approx(0.5)


def test_distillm_bad_arguments_raise():
    state = methods.distillm_schedule_init(0.1, 1.0)
    key = jax.random.PRNGKey(0)
    for bad, match in [
        (lambda: methods.distillm_schedule_init(1.5), "init_threshold must lie"),
        (lambda: methods.distillm_schedule_init(0.0, "2.0"), "initial_validation_loss must be a number"),
        (lambda: methods.distillm_schedule_update(state, 1.0, step_size=0.0), "step_size"),
        (lambda: methods.distillm_data_source(state, key, 1, 0, total_steps=0), "total_steps"),
        (lambda: methods.distillm_data_source(state, key, 1, 0, total_steps=10, capacity=0), "capacity"),
        (lambda: methods.distillm_data_source(state, key, 1, 0, total_steps=10, replay_ratio="random"), "replay_ratio"),
    ]:
        with pytest.raises(ValueError, match=match):
            bad()
