"""Relational losses under a sharded batch are the global batch's: ``ce + sp`` and ``ce + rkd`` trained on
a simulated 8-device data mesh (2 examples per device) give the single-device run's losses and parameters
(float32, 1e-5), and their terms equal the loss of the whole batch's features — not the mean of the
per-device losses, which differs (what a per-shard implementation would compute)."""

import functools

import jax
import numpy as np
import optax
import pytest

import jaxkd
from jaxkd import losses, methods, models, sharding

NUM_CLASSES = 5
STUDENT = models.get("mlp", num_classes=NUM_CLASSES, hidden_sizes=(32,))
TEACHER = models.get("mlp", num_classes=NUM_CLASSES, hidden_sizes=(64,))
BATCHES = [
    {"image": np.random.default_rng(i).normal(size=(16, 4, 4, 1)).astype(np.float32),
     "label": np.random.default_rng(100 + i).integers(0, NUM_CLASSES, 16).astype(np.int32)}
    for i in range(3)
]
TEACHER_VARS = TEACHER.init(jax.random.PRNGKey(1), BATCHES[0]["image"])
DEVICES = 8
# name: (spec, the method's metric, its loss, the student and teacher feature it reads)
SPECS = {
    "sp": ("ce + 3000 * sp(student_features='hidden1')", "sp", losses.sp, "hidden1"),
    "rkd": ("ce + rkd", "rkd", losses.rkd, "pooled"),
}


def train(spec, mesh=None):
    state = jaxkd.create(student=STUDENT, teacher=TEACHER, teacher_variables=TEACHER_VARS, method=methods.parse(spec),
                         tx=optax.sgd(0.1, momentum=0.9), sample_batch=BATCHES[0], rng=jax.random.PRNGKey(0), mesh=mesh)
    initial = jax.device_get(state.student.variables())
    step = jaxkd.make_train_step(mesh=mesh)
    history = []
    for batch in BATCHES:
        state, metrics = step(state, batch)
        history.append({k: float(v) for k, v in metrics.items() if np.ndim(v) == 0})
    return initial, jax.device_get(state.trainable), history


@functools.cache
def single_device(spec):
    return train(spec)


@pytest.mark.parametrize("name", list(SPECS))
def test_a_relational_loss_on_a_sharded_batch_is_the_global_batch_loss(name):
    spec, metric, loss_fn, feature = SPECS[name]
    mesh = sharding.make_mesh({"data": DEVICES})
    initial, trainable, history = train(spec, mesh)
    initial_1, trainable_1, history_1 = single_device(spec)

    # The sharded run is the single-device run.
    np.testing.assert_allclose([h["loss"] for h in history], [h["loss"] for h in history_1], rtol=1e-5)
    np.testing.assert_allclose([h[metric] for h in history], [h[metric] for h in history_1], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), trainable, trainable_1)

    # Its first term is the loss of the whole batch's features ...
    batch = BATCHES[0]
    f_s = jax.jit(lambda v, x: STUDENT.apply(v, x, train=True).features[feature])(initial, batch["image"])
    f_t = jax.jit(lambda v, x: TEACHER.apply(v, x, train=False).features[feature])(TEACHER_VARS, batch["image"])
    global_loss = float(loss_fn(f_s, f_t))
    np.testing.assert_allclose(history[0][metric], global_loss, rtol=1e-5)
    # ... which the mean of the per-device losses is not: the test would catch a per-shard loss.
    per_shard = np.mean([float(loss_fn(s, t)) for s, t in zip(np.split(np.asarray(f_s), DEVICES),
                                                                 np.split(np.asarray(f_t), DEVICES))])
    assert abs(per_shard - global_loss) > 0.05 * abs(global_loss), (per_shard, global_loss)

