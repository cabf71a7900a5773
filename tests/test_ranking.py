"""Margin-MSE and listwise ranking distillation: NumPy references, properties, errors, the train step."""

import jax
import numpy as np
import optax
import pytest

import jaxkd
from jaxkd import losses, methods
from tests.helpers import tiny_models


def _np_margin_mse(s, t, cand=None):
    out = []
    for i in range(s.shape[0]):
        errs = [((s[i, 0] - s[i, j]) - (t[i, 0] - t[i, j])) ** 2 for j in range(1, s.shape[1])
                if cand is None or cand[i, j]]
        out.append(np.mean(errs) if errs else 0.0)
    return np.array(out)


def _np_listwise(s, t, tau, tau_t, cand=None):
    out = []
    for i in range(s.shape[0]):
        keep = np.ones(s.shape[1], bool) if cand is None else cand[i]
        a, b = s[i, keep] / tau, t[i, keep] / tau_t
        p = np.exp(b - b.max()); p /= p.sum()
        log_q = a - a.max() - np.log(np.exp(a - a.max()).sum())
        out.append(np.sum(p * (np.log(p) - log_q)))
    return np.array(out)


def test_margin_mse_triples_is_mse_of_margins():
    rng = np.random.default_rng(0)
    s, t = rng.normal(size=(7, 2)), 3 * rng.normal(size=(7, 2))
    expected = np.mean(((s[:, 0] - s[:, 1]) - (t[:, 0] - t[:, 1])) ** 2)  # torch.nn.MSELoss on margins
    np.testing.assert_allclose(losses.margin_mse(s, t), expected, rtol=1e-5)


def test_margin_mse_many_negatives_with_ragged_lists():
    rng = np.random.default_rng(1)
    s, t = rng.normal(size=(5, 6)), rng.normal(size=(5, 6))
    cand = rng.random((5, 6)) < 0.6
    cand[:, 0] = True
    cand[2, 1:] = False  # no negative: 0
    got = losses.margin_mse(s, t, candidate_mask=cand, reduction="none")
    np.testing.assert_allclose(got, _np_margin_mse(s, t, cand), rtol=1e-5, atol=1e-7)
    assert float(got[2]) == 0.0


def test_listwise_matches_reference_with_ragged_lists():
    rng = np.random.default_rng(2)
    s, t = rng.normal(size=(5, 6)), 2 * rng.normal(size=(5, 6))
    cand = rng.random((5, 6)) < 0.7
    cand[:, 0] = True
    got = losses.listwise_kd(s, t, temperature=2.0, teacher_temperature=0.5, candidate_mask=cand, reduction="none")
    np.testing.assert_allclose(got, _np_listwise(s, t, 2.0, 0.5, cand), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(
        losses.listwise_kd(s, t, temperature=3.0, reduction="none"), _np_listwise(s, t, 3.0, 3.0), rtol=1e-5
    )


def test_padding_does_not_move_the_values_or_get_gradients():
    rng = np.random.default_rng(3)
    s, t = rng.normal(size=(4, 5)), rng.normal(size=(4, 5))
    cand = np.ones((4, 5), bool)
    cand[:, 3:] = False
    moved = s.copy()
    moved[:, 3:] = 100.0
    for fn in (losses.margin_mse, losses.listwise_kd):
        np.testing.assert_allclose(fn(moved, t, candidate_mask=cand), fn(s, t, candidate_mask=cand), rtol=1e-6)
        np.testing.assert_allclose(fn(s, t, candidate_mask=cand), fn(s[:, :3], t[:, :3]), rtol=1e-6)
        g = jax.grad(lambda x: fn(x, t, candidate_mask=cand))(s)
        assert not np.any(np.asarray(g)[:, 3:])


def test_shift_invariance_per_query():
    """Both losses ignore a per-query offset of the scores (what lets architectures on other scales learn)."""
    rng = np.random.default_rng(4)
    s, t = rng.normal(size=(4, 5)), rng.normal(size=(4, 5))
    shift = rng.normal(size=(4, 1)) * 10
    for fn in (losses.margin_mse, losses.listwise_kd):
        np.testing.assert_allclose(fn(s + shift, t - shift), fn(s, t), rtol=1e-5, atol=1e-6)
    assert float(losses.margin_mse(t + 3.0, t)) == pytest.approx(0.0, abs=1e-6)
    assert float(losses.listwise_kd(t, t)) == pytest.approx(0.0, abs=1e-6)


def test_bad_inputs():
    s = np.zeros((3, 4))
    with pytest.raises(ValueError, match=r"\(3, 4\).*\(3, 5\)"):
        losses.margin_mse(s, np.zeros((3, 5)))
    with pytest.raises(ValueError, match="at least 2 candidates"):
        losses.margin_mse(np.zeros((3, 1)), np.zeros((3, 1)))
    with pytest.raises(ValueError, match="candidate_mask"):
        losses.listwise_kd(s, s, candidate_mask=np.ones((3, 3), bool))
    with pytest.raises(ValueError, match="temperature"):
        losses.listwise_kd(s, s, temperature=0.0)
    with pytest.raises(ValueError, match="teacher_temperature"):
        losses.listwise_kd(s, s, teacher_temperature=-1.0)
    with pytest.raises(ValueError, match="scores must be"):
        losses.listwise_kd(np.zeros(3), np.zeros(3))
    with pytest.raises(ValueError, match="temperature"):
        methods.listwise_kd(temperature=1e9)
    with pytest.raises(ValueError, match="different participants"):
        methods.margin_mse(student="teacher")


@pytest.mark.parametrize("spec", ["margin_mse(candidate_mask='candidates')", "listwise_kd(temperature=2.0, candidate_mask='candidates')"])
def test_methods_in_the_train_step(spec):
    teacher, student = tiny_models(num_classes=4)  # logits = scores of 4 candidates per query
    rng = np.random.default_rng(0)
    batch = {"image": rng.normal(size=(8, 4, 4, 1)).astype(np.float32), "label": np.zeros(8, np.int32),
             "candidates": rng.random((8, 4)) < 0.8}
    batch["candidates"][:, 0] = True
    tvars = teacher.init(jax.random.PRNGKey(1), batch["image"])
    state = jaxkd.create(student=student, teacher=teacher, teacher_variables=tvars, method=methods.parse(spec),
                         tx=optax.sgd(0.1), sample_batch=batch, rng=jax.random.PRNGKey(0))
    before = jax.device_get(jax.tree.leaves(state.trained["student"]))
    step = jaxkd.make_train_step()
    for _ in range(2):
        state, metrics = step(state, batch)
    name = spec.split("(")[0]
    assert np.isfinite(float(metrics[name])) and float(metrics[name]) > 0
    assert any(not np.allclose(a, b) for a, b in zip(before, jax.device_get(jax.tree.leaves(state.trained["student"]))))


def test_margin_mse_with_the_label_as_positive_matches_class_margins():
    """``positive="label"``: the mean over j ≠ y of ((z_y − z_j) − (t_y − t_j))², per example."""
    from jaxkd.methods.base import LossInputs
    from jaxkd.models.base import Outputs

    rng = np.random.default_rng(0)
    zs, zt = rng.normal(size=(6, 5)), rng.normal(size=(6, 5))
    y = np.array([0, 4, 2, 1, 3, 2])
    inputs = LossInputs.of(Outputs(zs, {}, {}), Outputs(zt, {}, {}), {"label": y})
    value, _ = methods.margin_mse(positive="label").loss(methods.MethodVars(), inputs, jax.random.PRNGKey(0))
    expected = np.mean([
        np.mean([((zs[b, y[b]] - zs[b, j]) - (zt[b, y[b]] - zt[b, j])) ** 2 for j in range(5) if j != y[b]])
        for b in range(6)
    ])
    np.testing.assert_allclose(float(value), expected, rtol=1e-5)
    with pytest.raises(ValueError, match="positive"):
        methods.margin_mse(positive="second")
