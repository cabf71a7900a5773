"""Mean teacher: the consistency cost against NumPy of the official formulas (CuriousAI/mean-teacher,
pytorch/mean_teacher/losses.py), the EMA in the method state against its closed form after n jitted steps, the
consistency term against the EMA model run by hand, the EMA model's BatchNorm statistics from its own forward, and a
checkpoint round trip equal to the uninterrupted run."""

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest

import jaxkd
from jaxkd import losses, methods, models
from jaxkd.checkpoint import Checkpointer
from tests.helpers import tiny_batch, tiny_models

_, STUDENT = tiny_models()
BATCH = tiny_batch(batch_size=8)


def _softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_consistency_is_the_official_softmax_mse_and_kl():
    rng = np.random.default_rng(0)
    zs, zt = rng.normal(size=(4, 6)) * 2, rng.normal(size=(4, 6)) * 2
    p, q = _softmax(zs), _softmax(zt)
    # softmax_mse_loss: F.mse_loss(p, q, size_average=False) / num_classes, divided by the minibatch size in main.py.
    mse = ((p - q) ** 2).sum() / 6 / 4
    kl = (q * (np.log(q) - np.log(p))).sum() / 4  # softmax_kl_loss: F.kl_div(log p, q, size_average=False) / B
    np.testing.assert_allclose(float(losses.mean_teacher(zs, zt)), mse, rtol=1e-5)
    np.testing.assert_allclose(float(losses.mean_teacher(zs, zt, consistency="kl")), kl, rtol=1e-5)


def test_decay_warm_up_is_the_official_rule():
    # update_ema_variables(..., global_step) runs after global_step += 1: the k-th update uses min(1 - 1/(k+1), d).
    got = [float(methods.ema_decay(k, 0.7)) for k in range(1, 6)]
    np.testing.assert_allclose(got, [0.5, 2 / 3, 0.7, 0.7, 0.7], rtol=1e-6)
    assert float(methods.ema_decay(1, 0.7, warmup=False)) == pytest.approx(0.7)


def _state(method, seed=0):
    return jaxkd.create(student=STUDENT, method=method, tx=optax.sgd(0.5), sample_batch=BATCH,
                        rng=jax.random.PRNGKey(seed))


def _ema_params(state):
    return jax.device_get(state.method_vars.state["mean_teacher"]["params"])


def test_ema_after_n_steps_is_the_closed_form_weighted_sum_and_the_loss_reads_the_ema_model():
    decay, n = 0.6, 4
    state = _state(methods.parse(f"ce + mean_teacher(decay={decay})"))
    step = jaxkd.make_train_step()
    history = [jax.device_get(state.student.params)]  # θ_0 (the EMA starts there), then θ_k after step k
    np.testing.assert_array_equal(jax.tree.leaves(_ema_params(state))[0], jax.tree.leaves(history[0])[0])
    for _ in range(n):
        # The step donates its state: keep host copies of what the last step's loss saw.
        ema_before, vars_before = _ema_params(state), jax.device_get(state.student.variables())
        state, metrics = step(state, BATCH)
        history.append(jax.device_get(state.student.params))
    # Closed form: θ'_n = Π_k d_k θ_0 + Σ_k (1 − d_k) Π_{j>k} d_j θ_k, d_k = min(1 − 1/(k+1), decay).
    d = [min(1 - 1 / (k + 1), decay) for k in range(1, n + 1)]
    weights = [np.prod(d)] + [(1 - d[k - 1]) * np.prod(d[k:]) for k in range(1, n + 1)]
    assert sum(weights) == pytest.approx(1.0)
    expected = jax.tree.map(lambda *thetas: sum(w * t for w, t in zip(weights, thetas)), *history)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), _ema_params(state), expected)
    assert float(metrics["mean_teacher/decay"]) == pytest.approx(d[-1])
    # The last step's consistency term: the student (θ_{n−1}) against the model run with the EMA before it.
    zs = np.asarray(STUDENT.apply(vars_before, BATCH["image"], train=True).logits, np.float64)
    zt = np.asarray(STUDENT.apply({"params": ema_before}, BATCH["image"], train=True).logits, np.float64)
    expected_loss = (((_softmax(zs) - _softmax(zt)) ** 2).sum(-1) / zs.shape[-1]).mean()
    np.testing.assert_allclose(float(metrics["mean_teacher"]), expected_loss, rtol=1e-4)
    assert expected_loss > 0


def test_checkpoint_round_trip_continues_like_the_uninterrupted_run(tmp_path):
    method = methods.parse("ce + mean_teacher(decay=0.9)")
    step = jaxkd.make_train_step()
    uninterrupted = _state(method)
    for _ in range(4):
        uninterrupted, _ = step(uninterrupted, BATCH)

    state = _state(method)
    for _ in range(2):
        state, _ = step(state, BATCH)
    ckpt = Checkpointer(tmp_path / "ckpt")
    ckpt.save(2, state.run_tree())
    ckpt.wait_until_finished()
    fresh = _state(method, seed=7)  # other initial variables: everything must come from the checkpoint
    restored = fresh.with_run_tree(ckpt.restore(fresh.run_tree()).tree)
    ckpt.close()
    np.testing.assert_array_equal(jax.tree.leaves(_ema_params(restored))[0], jax.tree.leaves(_ema_params(state))[0])
    for _ in range(2):
        restored, _ = step(restored, BATCH)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored.method_vars.state),
                 jax.device_get(uninterrupted.method_vars.state))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored.student.params),
                 jax.device_get(uninterrupted.student.params))


def test_independent_start_is_a_second_initialization_averaged_in_as_theta_0():
    # The official code's ema_model = create_model(ema=True): its own random initialization, which the warm-up's
    # first update (d_1 = 1/2) averages with the student after its first step.
    state = _state(methods.parse("ce + mean_teacher(start='independent')"))
    ema_0, theta_0 = _ema_params(state), jax.device_get(state.student.params)
    assert not all(np.allclose(a, b) for a, b in zip(jax.tree.leaves(ema_0), jax.tree.leaves(theta_0)))
    state, metrics = jaxkd.make_train_step()(state, BATCH)
    assert float(metrics["mean_teacher"]) > 0  # two different networks disagree from the first step
    expected = jax.tree.map(lambda e, t: 0.5 * e + 0.5 * t, ema_0, jax.device_get(state.student.params))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), _ema_params(state), expected)


class _BatchNormMLP(nn.Module):
    """A tiny classifier with BatchNorm: the EMA model's running statistics are observable."""

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Dense(6)(x.reshape(x.shape[0], -1))
        x = nn.BatchNorm(use_running_average=not train, momentum=0.5)(x)
        return nn.Dense(5)(nn.relu(x))


def test_the_ema_models_batch_statistics_come_from_its_own_train_mode_forward():
    # As the official ema_model.train() forward: BatchNorm's running averages of the EMA model are updated by its
    # own forward on the batch (with the averaged parameters), not averaged from the student's.
    model = models.from_linen(_BatchNormMLP(), name="bn_mlp")
    state = jaxkd.create(student=model, method=methods.parse("ce + mean_teacher(decay=0.9)"), tx=optax.sgd(0.5),
                         sample_batch=BATCH, rng=jax.random.PRNGKey(0))
    step = jaxkd.make_train_step()
    state, _ = step(state, BATCH)
    ema = jax.device_get(state.method_vars.state["mean_teacher"])
    state, _ = step(state, BATCH)
    expected = model.apply({"params": ema["params"], "batch_stats": ema["batch_stats"]}, BATCH["image"],
                           train=True).model_state["batch_stats"]
    got = jax.device_get(state.method_vars.state["mean_teacher"]["batch_stats"])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), got, expected)
    student = jax.device_get(state.student.model_state["batch_stats"])
    assert not np.allclose(jax.tree.leaves(student)[0], jax.tree.leaves(got)[0])  # the student's differ


@pytest.mark.parametrize("kwargs, match", [
    ({"decay": 1.0}, "decay"), ({"decay": -0.1}, "decay"), ({"decay": float("nan")}, "decay"),
    ({"consistency": "l1"}, "consistency"), ({"warmup": "yes"}, "warmup"), ({"start": "teacher"}, "start"),
])
def test_bad_hyperparameters_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        methods.mean_teacher(**kwargs)


def test_bad_loss_arguments_raise():
    with pytest.raises(ValueError, match="consistency"):
        losses.mean_teacher(np.zeros((2, 3)), np.zeros((2, 3)), consistency="l2")
    with pytest.raises(ValueError, match="number of classes"):
        losses.mean_teacher(np.zeros((2, 3)), np.zeros((2, 4)))
