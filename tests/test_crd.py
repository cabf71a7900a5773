"""CRD: the NCE loss against a NumPy transcription of RepDistiller's ContrastLoss / ContrastMemory, the bank
update in closed form, Z frozen after the first step, the negative samplers, errors, and a jitted train step."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxkd
from jaxkd import losses, methods
from jaxkd.methods.base import LossInputs, MethodVars
from jaxkd.methods.feature.crd import _class_tables, _contrast_indices
from jaxkd.models.base import Outputs
from tests.helpers import teacher_variables, tiny_batch, tiny_models

EPS = 1e-7


def nce_reference(x, n_data):
    """RepDistiller ``ContrastLoss.forward`` in NumPy loops."""
    bsz, m = x.shape[0], x.shape[1] - 1
    pn = 1.0 / n_data
    log_d1 = sum(np.log(x[b, 0] / (x[b, 0] + m * pn + EPS)) for b in range(bsz))
    log_d0 = sum(np.log(m * pn / (x[b, k] + m * pn + EPS)) for b in range(bsz) for k in range(1, m + 1))
    return -(log_d1 + log_d0) / bsz


def test_nce_matches_numpy_reference():
    x = np.random.default_rng(0).uniform(0.01, 3.0, size=(5, 9))
    np.testing.assert_allclose(losses.crd_nce(x, num_examples=50), nce_reference(x, 50), rtol=1e-5)


def test_crd_matches_numpy_contrast_memory():
    rng = np.random.default_rng(1)
    b, k, d, n, t = 4, 6, 8, 100, 0.07
    e_s, e_t = rng.normal(size=(b, d)), rng.normal(size=(b, d))
    e_s /= np.linalg.norm(e_s, axis=1, keepdims=True)
    e_t /= np.linalg.norm(e_t, axis=1, keepdims=True)
    memory_s, memory_t = rng.uniform(-0.15, 0.15, size=(n, d)), rng.uniform(-0.15, 0.15, size=(n, d))
    idx = rng.integers(0, n, size=(b, k + 1))
    # ContrastMemory: v1 = student, v2 = teacher; out_v1 uses memory_v2 (teacher bank), out_v2 memory_v1.
    out_v1 = np.exp(np.einsum("bkd,bd->bk", memory_t[idx], e_s) / t)
    out_v2 = np.exp(np.einsum("bkd,bd->bk", memory_s[idx], e_t) / t)
    z_v1, z_v2 = out_v1.mean() * n, out_v2.mean() * n
    expected = nce_reference(out_v1 / z_v1, n) + nce_reference(out_v2 / z_v2, n)
    value = losses.crd(e_s, e_t, memory_s[idx], memory_t[idx], z_student=z_v1, z_teacher=z_v2, num_examples=n,
                       temperature=t)
    np.testing.assert_allclose(value, expected, rtol=1e-4)
    np.testing.assert_allclose(losses.crd_partition_constant(losses.crd_scores(e_s, memory_t[idx], temperature=t), n), z_v1,
                               rtol=1e-5)


def test_memory_update_is_the_closed_form_momentum_update_and_skips_masked_examples():
    rng = np.random.default_rng(2)
    memory = rng.normal(size=(10, 3))
    e = rng.normal(size=(4, 3))
    y = np.array([7, 2, 5, 0])
    mask = np.array([True, True, False, True])
    new = np.asarray(methods.crd_memory_update(memory, e, y, momentum=0.5, mask=mask))
    expected = memory.copy()
    for b in range(4):
        if mask[b]:
            row = 0.5 * memory[y[b]] + 0.5 * e[b]
            expected[y[b]] = row / np.linalg.norm(row)
    np.testing.assert_allclose(new, expected, rtol=1e-5, atol=1e-6)
    assert np.array_equal(new[5], memory[5].astype(new.dtype))  # the masked example's row is untouched


def fake_inputs(seed, index, batch=6, mask=None):
    rng = np.random.default_rng(seed)
    out = lambda dim: Outputs(jnp.zeros((batch, 3)), {"pooled": jnp.asarray(rng.normal(size=(batch, dim)), jnp.float32)}, {})
    b = {"index": jnp.asarray(index, jnp.int32)}
    if mask is not None:
        b["mask"] = jnp.asarray(mask)
    return LossInputs.of(out(5), out(7), b)


def test_z_is_set_on_the_first_step_then_frozen_and_banks_written_only_at_valid_positives():
    method = methods.crd(num_examples=20, nce_k=5, feat_dim=4)
    first = fake_inputs(0, [0, 1, 2, 3, 4, 5], mask=[True] * 5 + [False])
    vars = method.init(jax.random.PRNGKey(0), first)
    assert float(vars.state["z_student"]) < 0
    _, aux = method.loss(vars, first, jax.random.PRNGKey(1))
    z_s, z_t = float(aux.state["z_student"]), float(aux.state["z_teacher"])
    assert z_s > 0 and z_t > 0
    # Z is the mean score over the valid examples' [K + 1] entries times N.
    idx = _contrast_indices(jax.random.PRNGKey(1), jnp.arange(6), num_negatives=5, num_examples=20, tables=None)
    e_s, _ = method_embed(vars, first, "student")
    scores = np.exp(np.einsum("bkd,bd->bk", np.asarray(vars.state["memory_teacher"])[np.asarray(idx)], e_s) / 0.07)
    np.testing.assert_allclose(z_s, scores[:5].mean() * 20, rtol=1e-4)
    # The masked example (index 5) wrote nothing; the valid ones did.
    for key in ("memory_student", "memory_teacher"):
        assert np.array_equal(aux.state[key][5], vars.state[key][5])
        assert not np.array_equal(aux.state[key][0], vars.state[key][0])
        np.testing.assert_allclose(np.linalg.norm(aux.state[key][:5], axis=1), 1.0, rtol=1e-5)
    # Later steps keep Z, whatever the features.
    second = fake_inputs(3, [6, 7, 8, 9, 10, 11])
    _, aux2 = method.loss(MethodVars(vars.params, aux.state), second, jax.random.PRNGKey(2))
    assert float(aux2.state["z_student"]) == z_s and float(aux2.state["z_teacher"]) == z_t


def method_embed(vars, inputs, who):
    from jaxkd.methods.feature.connectors import LinearEmbed
    from jaxkd.methods.features import module_apply
    f = inputs.outputs[who].features["pooled"]
    e, _ = module_apply(LinearEmbed(4), MethodVars(vars.params[f"embed_{who}"]), f)
    return np.asarray(e), None


def test_samplers_put_the_positive_first_and_exact_mode_draws_other_classes():
    labels = np.repeat(np.arange(4), 5)  # 20 examples, 4 classes
    index = jnp.array([0, 6, 13, 19])
    idx = np.asarray(_contrast_indices(jax.random.PRNGKey(0), index, num_negatives=200, num_examples=20, tables=None))
    assert idx.shape == (4, 201) and np.array_equal(idx[:, 0], index)
    assert idx.min() >= 0 and idx.max() < 20 and len(np.unique(idx[:, 1:])) == 20  # uniform covers the dataset
    tables = _class_tables(labels, 20)
    idx = np.asarray(_contrast_indices(jax.random.PRNGKey(0), index, num_negatives=200, num_examples=20, tables=tables))
    assert np.array_equal(idx[:, 0], index)
    for b in range(4):
        neg_labels = labels[idx[b, 1:]]
        assert not np.any(neg_labels == labels[index[b]])
        assert len(np.unique(idx[b, 1:])) == 15  # every example of the other classes is drawn


def test_errors():
    with pytest.raises(ValueError, match="nce_k"):
        methods.crd(num_examples=100, nce_k=100)
    with pytest.raises(ValueError, match="labels"):
        methods.crd(num_examples=100, nce_k=10, mode="exact")
    with pytest.raises(ValueError, match="shape"):
        methods.crd(num_examples=100, nce_k=10, mode="exact", labels=np.zeros(99, int))
    with pytest.raises(ValueError, match="temperature"):
        losses.crd_scores(np.ones((2, 3)), np.ones((2, 4, 3)), temperature=0.0)
    with pytest.raises(ValueError, match=r"\(2, 4, 3\) and teacher rows \(2, 4, 2\)"):
        losses.crd(np.ones((2, 3)), np.ones((2, 3)), np.ones((2, 4, 3)), np.ones((2, 4, 2)), z_student=1.0,
                   z_teacher=1.0, num_examples=10)
    method = methods.crd(num_examples=20, nce_k=5, feat_dim=4)
    inputs = fake_inputs(0, [0, 1, 2, 3, 4, 5])
    vars = method.init(jax.random.PRNGKey(0), inputs)
    no_index = LossInputs.of(inputs.outputs["student"], inputs.outputs["teacher"], {"label": jnp.zeros(6, jnp.int32)})
    with pytest.raises(ValueError, match=r"batch\['index'\].*\['label'\]"):
        method.loss(vars, no_index, jax.random.PRNGKey(0))


def test_crd_trains_in_the_jitted_step_with_exact_negatives():
    teacher, student = tiny_models()
    batch = tiny_batch(batch_size=8)
    batch["index"] = np.arange(8, dtype=np.int32) + 4
    labels = np.random.default_rng(0).integers(0, 5, size=32)
    labels[batch["index"]] = batch["label"]
    method = jaxkd.methods.ce() + 0.8 * methods.crd(num_examples=32, nce_k=12, mode="exact", labels=labels)
    state = jaxkd.create(student=student, teacher=teacher, teacher_variables=teacher_variables(teacher, batch),
                         method=method, tx=optax.sgd(0.05, momentum=0.9), sample_batch=batch, rng=jax.random.PRNGKey(0))
    before = jax.device_get(state.method_vars)
    step = jaxkd.make_train_step()
    state, m1 = step(state, batch)
    state, m2 = step(state, batch)
    assert np.isfinite(float(m1["crd"])) and np.isfinite(float(m2["crd"]))
    assert float(m1["crd/z_student"]) == float(m2["crd/z_student"]) > 0
    after = jax.device_get(state.method_vars)
    changed = jax.tree.leaves(jax.tree.map(lambda a, b: not np.array_equal(a, b), before.params, after.params))
    assert all(changed)  # both embeddings trained
    bank = after.state["crd"]["memory_student"]
    assert not np.array_equal(bank[4:12], before.state["crd"]["memory_student"][4:12])
    assert np.array_equal(bank[:4], before.state["crd"]["memory_student"][:4])
    assert jaxkd.methods.parse("crd(num_examples=32, nce_k=12)").needs.batch_keys == ("index",)
