"""Deep mutual learning (jaxkd/losses/logit/dml.py, jaxkd/methods/logit/dml.py): the objective against NumPy, its
logit gradients against the closed form with gradient-stopped targets, and two students that teach each
other, both trained and both evaluated.

Finite-difference gradients (targets held fixed), bfloat16, jit == eager: tests/test_loss_contract.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxkd
from jaxkd import losses, methods, models

from tests.helpers import NUM_CLASSES, tiny_batch
from tests.numpy_reference import np_ce, np_kl, np_softmax, rand_logits


def np_dml(z, y, T):
    """Σ_k CE(z_k) + T²/(K−1) Σ_{l≠k} KL(p_l ‖ p_k) per example, z: [B, K, C]."""
    k = z.shape[1]
    total = sum(np_ce(z[:, i], y) for i in range(k))
    for i in range(k):
        for j in range(k):
            if i != j:
                total = total + T**2 / (k - 1) * np_kl(np_softmax(z[:, j], T), np_softmax(z[:, i], T))
    return total


LABELS = np.array([0, 1, 2, 3, 4, 1])


@pytest.mark.parametrize("k, T", [(2, 1.0), (3, 2.0)])
def test_values_match_numpy(k, T):
    z = np.stack([rand_logits(i) for i in range(k)], axis=1)
    got = losses.dml(z, z, LABELS, temperature=T, reduction="none")
    np.testing.assert_allclose(got, np_dml(z, LABELS, T), rtol=1e-5)


def test_each_network_is_pulled_towards_the_others_and_not_the_others_towards_it():
    # With targets gradient-stopped and T = 1, K = 2: dL/dz_k = (p_k − onehot(y)) + (p_k − p_other) per example.
    z = np.stack([rand_logits(1), rand_logits(2)], axis=1).astype(np.float64)
    with jax.enable_x64(True):
        grad = jax.grad(lambda z: losses.dml(z, jax.lax.stop_gradient(z), LABELS, reduction="sum"))(jnp.asarray(z))
    p0, p1 = np_softmax(z[:, 0]), np_softmax(z[:, 1])
    onehot = np.eye(5)[LABELS]
    np.testing.assert_allclose(grad[:, 0], (p0 - onehot) + (p0 - p1), atol=1e-10)
    np.testing.assert_allclose(grad[:, 1], (p1 - onehot) + (p1 - p0), atol=1e-10)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="at least 2 networks"):
        losses.dml(rand_logits(1)[:, None], rand_logits(1)[:, None], LABELS)
    with pytest.raises(ValueError, match="peers must be distinct"):
        methods.dml(peers=())


BATCH = tiny_batch()
STUDENT = models.get("mlp", num_classes=NUM_CLASSES, hidden_sizes=(16,))
PEER = models.get("mlp", num_classes=NUM_CLASSES, hidden_sizes=(24,))


def dml_state(trains=True):
    return jaxkd.create(
        student=STUDENT, method=methods.parse("dml"), tx=optax.sgd(0.1), sample_batch=BATCH,
        rng=jax.random.PRNGKey(0),
        participants={"peer": jaxkd.Participant(PEER, None if trains else PEER.init(jax.random.PRNGKey(3), BATCH["image"]),
                                                trains=trains)},
    )


def test_two_students_teach_each_other_both_trained_both_evaluated():
    state = dml_state()
    zs = np.asarray(STUDENT.apply(state.student.variables(), BATCH["image"], train=True).logits)
    zp = np.asarray(PEER.apply(state.trained["peer"].variables(), BATCH["image"], train=True).logits)
    before = jax.device_get(state.trained)
    step = jaxkd.make_train_step()
    state, metrics = step(state, BATCH)
    np.testing.assert_allclose(float(metrics["loss"]), np_dml(np.stack([zs, zp], 1), BATCH["label"], 1.0).mean(),
                               rtol=1e-5)
    assert {"accuracy", "peer/accuracy", "dml/student/ce", "dml/peer/ce"} <= set(metrics)
    after = jax.device_get(state.trained)
    for name in ("student", "peer"):
        changed = jax.tree.leaves(jax.tree.map(lambda a, b: not np.array_equal(a, b), before[name].params,
                                               after[name].params))
        assert all(changed), name
    losses_seen = [float(metrics["loss"])]
    for _ in range(30):
        state, metrics = step(state, BATCH)
        losses_seen.append(float(metrics["loss"]))
    assert losses_seen[-1] < 0.5 * losses_seen[0]
    result = jaxkd.evaluate(state, [BATCH], jaxkd.make_eval_step())
    assert result["accuracy"] > 0.5 and result["peer_accuracy"] > 0.5


def test_a_frozen_peer_is_refused():
    with pytest.raises(ValueError, match="trains participant 'peer'.*frozen"):
        dml_state(trains=False)


def test_a_peer_with_its_own_optimizer_is_stepped_by_it():
    # The peer's tx has learning rate 0: it must not move while the student, on the state's tx, does.
    state = jaxkd.create(
        student=STUDENT, method=methods.parse("dml"), tx=optax.sgd(0.1), sample_batch=BATCH, rng=jax.random.PRNGKey(0),
        participants={"peer": jaxkd.Participant(PEER, tx=optax.sgd(0.0))},
    )
    before = jax.device_get(state.trained)
    state, _ = jaxkd.make_train_step()(state, BATCH)
    after = jax.device_get(state.trained)
    jax.tree.map(np.testing.assert_array_equal, before["peer"].params, after["peer"].params)
    assert not np.array_equal(before["student"].params["dense1"]["kernel"], after["student"].params["dense1"]["kernel"])
