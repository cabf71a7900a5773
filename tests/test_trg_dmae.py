"""TRG and DMAE: NumPy references, properties, errors, and both methods in the jitted train step."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxkd
from jaxkd import losses, methods
from jaxkd.methods.feature.dmae import random_patch_mask
from tests.helpers import tiny_conv_models, tiny_image_batch


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _np_graph(x, k, sigma):
    x = x / np.linalg.norm(x, axis=-1, keepdims=True)
    m = len(x)
    d = ((x[:, None] - x[None]) ** 2).sum(-1)
    p = np.zeros((m, m))
    for i in range(m):
        others = [j for j in range(m) if j != i]
        near = sorted(others, key=lambda j: d[i, j])[:k]
        a = np.array([np.exp(-d[i, j] / (2 * sigma)) if j in near else 0.0 for j in others])
        p[i, others] = _softmax(a)
    return p


def _np_trg_local(s, t, k, sigma):
    ps, pt = _np_graph(s.reshape(-1, s.shape[-1]), k, sigma), _np_graph(t.reshape(-1, t.shape[-1]), k, sigma)
    off = ~np.eye(len(ps), dtype=bool)
    kl = np.where(off, pt * (np.log(np.where(off, pt, 1)) - np.log(np.where(off, ps, 1))), 0).sum(-1)
    return kl.mean()


def test_trg_local_matches_reference():
    rng = np.random.default_rng(0)
    s, t = rng.normal(size=(3, 4, 5)), rng.normal(size=(3, 4, 7))
    np.testing.assert_allclose(losses.trg_local(s, t, k=3, sigma=0.3), _np_trg_local(s, t, 3, 0.3), rtol=1e-5)
    # k at least the number of other tokens: every token is a neighbour
    np.testing.assert_allclose(losses.trg_local(s, t, k=50), _np_trg_local(s, t, 11, 1.0), rtol=1e-5)


def test_trg_global_matches_reference():
    rng = np.random.default_rng(1)
    s, t = rng.normal(size=(3, 4, 6)), rng.normal(size=(3, 4, 6))
    a = s.reshape(12, 6) / np.linalg.norm(s.reshape(12, 6), axis=-1, keepdims=True)
    b = t.reshape(12, 6) / np.linalg.norm(t.reshape(12, 6), axis=-1, keepdims=True)
    logits = a @ b.T / 0.2
    ref = -np.mean(np.diag(logits) - np.log(np.exp(logits).sum(-1)))
    np.testing.assert_allclose(losses.trg_global(s, t, temperature=0.2), ref, rtol=1e-5)


def test_trg_contextual_matches_reference():
    rng = np.random.default_rng(2)
    s, t = rng.normal(size=(3, 4, 5)), rng.normal(size=(3, 4, 8))
    cs = _softmax(np.einsum("bnd,bmd->bnm", s, s) / np.sqrt(5))
    ct = _softmax(np.einsum("bnd,bmd->bnm", t, t) / np.sqrt(8))
    np.testing.assert_allclose(
        losses.trg_contextual(s, t, reduction="none"), ((ct - cs) ** 2).mean((-2, -1)), rtol=1e-5, atol=1e-8
    )


def test_trg_properties():
    """The local graph is invariant to rotating and scaling the tokens; identical relations give 0."""
    rng = np.random.default_rng(3)
    t = rng.normal(size=(3, 4, 5))
    q, _ = np.linalg.qr(rng.normal(size=(5, 5)))
    s = 3.0 * t @ q
    assert float(losses.trg_local(s, t, k=4)) == pytest.approx(0.0, abs=1e-6)
    assert float(losses.trg_contextual(t, t)) == 0.0
    # the global InfoNCE is lowest when every student token points at its own teacher token
    assert float(losses.trg_global(t, t, temperature=0.05)) < float(losses.trg_global(t[:, ::-1], t, temperature=0.05))


def test_patch_tokens():
    x = np.arange(2 * 4 * 4 * 3).reshape(2, 4, 4, 3)
    tok = np.asarray(losses.patch_tokens(x, 2))
    assert tok.shape == (2, 4, 12)
    np.testing.assert_array_equal(tok[1, 1], x[1, 0:2, 2:4].reshape(-1))  # second patch of the first row
    assert losses.patch_tokens(np.zeros((2, 5)), 1).shape == (2, 1, 5)
    with pytest.raises(ValueError, match="divide"):
        losses.patch_tokens(x, 3)


def test_dmae_matches_reference():
    rng = np.random.default_rng(4)
    s, t = rng.normal(size=(3, 2, 2, 5)), rng.normal(size=(3, 2, 2, 5))
    v = rng.random((3, 2, 2)) < 0.6
    v[:, 0, 0] = True
    ns = s / np.linalg.norm(s, axis=-1, keepdims=True)
    nt = t / np.linalg.norm(t, axis=-1, keepdims=True)
    per_pos = np.abs(ns - nt).mean(-1)
    ref = (per_pos * v).sum((1, 2)) / v.sum((1, 2))
    np.testing.assert_allclose(losses.dmae(s, t, v, reduction="none"), ref, rtol=1e-5)
    # all positions, L2 on raw features = mean squared error (nn.MSELoss)
    np.testing.assert_allclose(losses.dmae(s, t, distance="l2", normalize=False), np.mean((s - t) ** 2), rtol=1e-5)


def test_random_patch_mask_keeps_the_official_count():
    visible = random_patch_mask(jax.random.PRNGKey(0), 5, (4, 4), 0.75)
    assert visible.shape == (5, 4, 4)
    np.testing.assert_array_equal(np.asarray(visible).sum((1, 2)), 4)  # int(16 * 0.25)
    other = random_patch_mask(jax.random.PRNGKey(1), 5, (4, 4), 0.75)
    assert not np.array_equal(np.asarray(visible), np.asarray(other))


def test_bad_inputs():
    a, b = np.zeros((2, 3, 4)), np.zeros((2, 5, 4))
    with pytest.raises(ValueError, match=r"\(2, 3, 4\).*\(2, 5, 4\)"):
        losses.trg_local(a, b)
    with pytest.raises(ValueError, match="k must"):
        losses.trg_local(a, a, k=0)
    with pytest.raises(ValueError, match="sigma"):
        losses.trg_local(a, a, sigma=0.0)
    with pytest.raises(ValueError, match="temperature"):
        losses.trg_global(a, a, temperature=0.0)
    with pytest.raises(ValueError, match="same shape"):
        losses.trg_global(a, np.zeros((2, 3, 5)))
    with pytest.raises(ValueError, match="distance"):
        losses.dmae(a, a, distance="cos")
    with pytest.raises(ValueError, match="visible"):
        losses.dmae(a, a, np.ones((2, 4)))
    with pytest.raises(ValueError, match=r"\(2, 3, 4\).*\(2, 5, 4\)"):
        losses.dmae(a, b)
    with pytest.raises(ValueError, match="mask_ratio"):
        methods.dmae(mask_ratio=1.0)
    with pytest.raises(ValueError, match="patch_size"):
        methods.trg(patch_size=0)


def _run(spec, steps=2):
    teacher, student = tiny_conv_models()
    batch = tiny_image_batch()
    tvars = teacher.init(jax.random.PRNGKey(1), batch["image"])
    state = jaxkd.create(student=student, teacher=teacher, teacher_variables=tvars, method=methods.parse(spec),
                         tx=optax.sgd(0.05, momentum=0.9), sample_batch=batch, rng=jax.random.PRNGKey(0))
    before = jax.device_get((state.method_vars.params, state.trained["student"]))
    step = jaxkd.make_train_step()
    for _ in range(steps):
        state, metrics = step(state, batch)
    return before, jax.device_get((state.method_vars.params, state.trained["student"])), metrics


def _changed(a, b):
    return any(not np.allclose(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_trg_and_dmae_in_the_train_step():
    before, after, metrics = _run(
        "ce + trg(tokens_per_example=3, temperature=0.5) + dmae(patch_size=2, mask_ratio=0.5)"
        " + dmae(patch_size=2, teacher_sees='full', name='dmae_full')"
    )
    for key in ("trg", "trg/local", "trg/global", "trg/contextual", "dmae", "dmae_full"):
        assert np.isfinite(float(metrics[key]))
    assert float(metrics["dmae/visible_fraction"]) == pytest.approx(0.5)
    assert _changed(before[0]["trg"], after[0]["trg"])  # TRG's projection is trained
    assert _changed(before[0]["dmae"], after[0]["dmae"])  # DMAE's projection is trained


def _dmae_inputs(student, teacher, svars, tvars, batch):
    """LossInputs as the train step builds them: the student differentiated (its own forward detached, so
    every gradient comes from the method's re-runs), the frozen teacher's variables gradient-stopped."""
    from jaxkd.participants import Participant

    x = batch["image"]
    return methods.LossInputs(
        outputs={"student": student.apply(jax.lax.stop_gradient(svars), x, train=True),
                 "teacher": jax.lax.stop_gradient(teacher.apply(tvars, x, train=False))},
        batch=batch, step=jnp.asarray(0, jnp.int32),
        variables={"student": svars, "teacher": jax.lax.stop_gradient(tvars)},
        participants=(("student", Participant(student)),
                      ("teacher", Participant(teacher, variables=tvars, trains=False))),
    )


def _np_dmae(s, t, visible):
    """NumPy: mean over the visible positions of mean_c |n(s) − n(t)|, then over the batch."""
    ns = s / np.linalg.norm(s, axis=-1, keepdims=True)
    nt = t / np.linalg.norm(t, axis=-1, keepdims=True)
    per_pos = np.abs(ns - nt).mean(-1)
    return np.mean((per_pos * visible).sum((1, 2)) / visible.sum((1, 2)))


def test_dmae_teacher_sees_the_masked_input():
    """teacher_sees="masked": the teacher's features are the teacher model applied (eval mode) to the batch
    with the student's masked patches zeroed (masked here in NumPy); "full": its features of the full batch."""
    from jaxkd.methods.feature.connectors import LinearConnector
    from jaxkd.methods.features import module_apply

    teacher, student = tiny_conv_models()
    batch = tiny_image_batch(batch_size=4)
    x = np.asarray(batch["image"])
    svars, tvars = student.init(jax.random.PRNGKey(2), x), teacher.init(jax.random.PRNGKey(1), x)
    inputs = _dmae_inputs(student, teacher, svars, tvars, batch)
    rng = jax.random.PRNGKey(7)
    # patch 4 on 8x8 images: a 2x2 patch grid, the resolution of stage3's maps
    visible = np.asarray(random_patch_mask(rng, 4, (2, 2), 0.5))
    assert visible.sum() == 4 * 2
    pixels = np.repeat(np.repeat(visible, 4, axis=1), 4, axis=2)[..., None]
    masked = np.where(pixels, x, 0.0).astype(np.float32)
    assert np.all(masked[~np.broadcast_to(pixels, x.shape)] == 0) and np.any(masked != x)
    s_feat = student.apply(svars, masked, train=True).features["stage3"]
    values = {}
    for sees in ("masked", "full"):
        method = methods.dmae(patch_size=4, mask_ratio=0.5, teacher_sees=sees)
        mvars = method.init(jax.random.PRNGKey(3), inputs)
        value, _ = method.loss(mvars, inputs, rng)
        t_input = masked if sees == "masked" else x
        t_feat = np.asarray(teacher.apply(tvars, t_input, train=False).features["stage3"], np.float64)
        s_proj, _ = module_apply(LinearConnector(t_feat.shape[-1]), mvars, s_feat)
        np.testing.assert_allclose(float(value), _np_dmae(np.asarray(s_proj, np.float64), t_feat, visible), rtol=1e-5)
        values[sees] = float(value)
    assert values["masked"] != pytest.approx(values["full"], rel=1e-4)


@pytest.mark.slow  # 8 s: DMAE's loss and train step stay in the suite; `pytest -m slow`
def test_dmae_gradients_reach_the_student_through_the_masked_forward():
    """The student's outputs on the full input are gradient-stopped here: every gradient comes from the
    method's re-run of the student on the masked input; the teacher's re-run carries none."""
    teacher, student = tiny_conv_models()
    batch = tiny_image_batch()
    x = batch["image"]
    tvars = teacher.init(jax.random.PRNGKey(1), x)
    svars = student.init(jax.random.PRNGKey(2), x)
    method = methods.dmae(patch_size=2)
    mvars = method.init(jax.random.PRNGKey(3), _dmae_inputs(student, teacher, svars, tvars, batch))
    loss = lambda sv, tv: method.loss(mvars, _dmae_inputs(student, teacher, sv, tv, batch), jax.random.PRNGKey(4))[0]
    s_grads, t_grads = jax.grad(loss, argnums=(0, 1))(svars, tvars)
    s_total = sum(float(jnp.sum(jnp.abs(g))) for g in jax.tree.leaves(s_grads["params"]))
    assert np.isfinite(s_total) and s_total > 0
    assert all(float(jnp.max(jnp.abs(g))) == 0.0 for g in jax.tree.leaves(t_grads))


def test_dmae_teacher_sees_errors():
    with pytest.raises(ValueError, match="teacher_sees"):
        methods.dmae(teacher_sees="both")
    teacher, student = tiny_conv_models()
    batch = tiny_image_batch(batch_size=2)
    x = batch["image"]
    svars, tvars = student.init(jax.random.PRNGKey(2), x), teacher.init(jax.random.PRNGKey(1), x)
    inputs = _dmae_inputs(student, teacher, svars, tvars, batch)
    method = methods.dmae(patch_size=2)
    mvars = method.init(jax.random.PRNGKey(3), inputs)
    without = inputs.replace(variables={"student": svars})
    with pytest.raises(ValueError, match="variables of participant 'teacher'"):
        method.loss(mvars, without, jax.random.PRNGKey(4))
