"""jaxkd.inference, the one path every offline pass takes: outputs equal the model applied to the whole
dataset at once, the shorter last batch is padded and its padding dropped (one compile), sums exclude
padding, the participant's input is honoured, and a mesh gives the same numbers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxkd import inference, models, sharding
from jaxkd.participants import Participant

N, FEATURES, CLASSES = 13, 6, 4


@pytest.fixture(scope="module")
def teacher():
    model = models.get("mlp", num_classes=CLASSES, hidden_sizes=(8,))
    x = np.random.default_rng(0).normal(size=(N, FEATURES)).astype(np.float32)
    variables = model.init(jax.random.PRNGKey(0), x[:2])
    return model, variables, x


def test_map_rows_equals_one_pass_over_everything_with_one_compile(teacher):
    model, variables, x = teacher
    traces = []

    def logits(outputs, batch):
        traces.append(batch["features"].shape)  # runs once per trace
        return {"logits": outputs.logits, "row": batch["row"]}

    participant = Participant(model, variables, trains=False, input="features")
    out = inference.map_rows(participant, {"features": x, "row": np.arange(N)}, logits, batch_size=5)
    expected = np.asarray(model.apply(variables, x, train=False).logits)
    np.testing.assert_allclose(out["logits"], expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(out["row"], np.arange(N))  # padded rows dropped, order kept
    assert traces == [(5, FEATURES)]  # 5 + 5 + 3 rows: the last batch padded to 5, one compile


def test_reduce_batches_sums_only_real_rows(teacher):
    model, variables, x = teacher
    labels = np.arange(N) % CLASSES

    def correct(outputs, batch):
        hit = (jnp.argmax(outputs.logits, -1) == batch["label"]) & batch["mask"]
        return {"correct": jnp.sum(hit), "count": jnp.sum(batch["mask"])}

    batches = [{"image": x[i:i + 4], "label": labels[i:i + 4], "mask": np.ones(len(x[i:i + 4]), bool)}
               for i in range(0, N, 4)]  # 4, 4, 4, 1 rows
    total = inference.reduce_batches(Participant(model, variables, trains=False), batches, correct)
    predicted = np.argmax(np.asarray(model.apply(variables, x, train=False).logits), -1)
    assert int(total["count"]) == N and int(total["correct"]) == int(np.sum(predicted == labels))
    no_mask = [{"image": b["image"]} for b in batches]
    with pytest.raises(ValueError, match="carries a boolean mask"):
        inference.reduce_batches(Participant(model, variables, trains=False), no_mask,
                                 lambda o, b: jnp.sum(o.logits))


def test_variables_change_without_recompiling(teacher):
    model, variables, x = teacher
    traces = []

    def total(outputs, batch):
        traces.append(1)
        return jnp.sum(outputs.logits)

    batches = [{"image": x}]
    a = inference.reduce_batches(Participant(model, variables), batches, total)
    doubled = jax.tree.map(lambda v: 2 * v, variables)
    b = inference.reduce_batches(Participant(model, doubled), batches, total)
    assert len(traces) == 1 and not np.isclose(a, b)
    np.testing.assert_allclose(b, float(jnp.sum(model.apply(doubled, x, train=False).logits)), rtol=1e-5)


def test_a_mesh_gives_the_same_outputs(teacher):
    model, variables, x = teacher
    mesh = sharding.make_mesh({"data": 4}, devices=jax.devices()[:4])
    rows = {"image": np.concatenate([x, x[:3]])}  # 16 rows: batches of 8 split over 4 devices
    plain = inference.map_rows(Participant(model, variables), rows, lambda o, b: o.logits, batch_size=8)
    sharded = inference.map_rows(Participant(model, variables), rows, lambda o, b: o.logits, batch_size=8, mesh=mesh)
    np.testing.assert_allclose(sharded, plain, rtol=1e-6, atol=1e-6)


def test_bad_inputs_are_named(teacher):
    model, variables, x = teacher
    with pytest.raises(ValueError, match="has no variables"):
        inference.map_rows(Participant(model), {"image": x}, lambda o, b: o.logits, batch_size=4)
    with pytest.raises(ValueError, match="share their first"):
        inference.map_rows(Participant(model, variables), {"image": x, "label": np.zeros(3)}, lambda o, b: o.logits,
                           batch_size=4)
    with pytest.raises(ValueError, match="more than the first batch's"):
        list(inference.map_batches(Participant(model, variables), [{"image": x[:2]}, {"image": x[:4]}],
                                   lambda o, b: o.logits))


def test_sum_over_batches_scores_what_is_not_one_participant():
    # Two "models" scored together (a fused score): the sum over a dataset of 7 rows in batches of 3, the last
    # padded with masked rows that count nothing, equals the NumPy sum over the rows.
    rng = np.random.default_rng(0)
    x = rng.normal(size=(7, 4)).astype(np.float32)
    w1, w2 = rng.normal(size=(4,)).astype(np.float32), rng.normal(size=(4,)).astype(np.float32)

    @jax.jit
    def score(batch):
        fused = jnp.maximum(batch["x"] @ w1, batch["x"] @ w2)
        return {"total": jnp.sum(jnp.where(batch["mask"], fused, 0.0)), "count": jnp.sum(batch["mask"])}

    batches = [{"x": x[i:i + 3], "mask": np.ones(len(x[i:i + 3]), bool)} for i in range(0, 7, 3)]
    out = inference.sum_over_batches(score, batches)
    np.testing.assert_allclose(out["total"], np.maximum(x @ w1, x @ w2).sum(), rtol=1e-5)
    assert int(out["count"]) == 7
    with pytest.raises(ValueError, match="boolean mask"):
        inference.sum_over_batches(lambda b: jnp.sum(b["x"]), [{"x": x[:3]}, {"x": x[3:5]}])
    with pytest.raises(ValueError, match="no batches"):
        inference.sum_over_batches(score, [])
