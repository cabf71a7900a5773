"""SLERP and FuseChat's merges (VaRM, SCE) against mergekit 0.1.5 and NumPy from the formulas.

mergekit is the reference for SLERP and SCE (``merge_methods/slerp.py``, ``merge_methods/sce.py``), called
through its registry on the same tensors; VaRM is checked against NumPy written from the paper's formula in
the official script's form (``Σᵢ wᵢ θᵢ``). Gradients of SLERP against mergekit's kernel in float64 (torch
autograd, and central finite differences for ``t``).
"""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxkd import sharding
from jaxkd.merging import sce, slerp, variation_ratio, variation_ratio_weights
from jaxkd.merging.fusechat import variance_topk_mask

torch = pytest.importorskip("torch")
pytest.importorskip("mergekit")
from mergekit.merge_methods import registry  # noqa: E402
from mergekit.merge_methods.base import TensorGroup  # noqa: E402
from mergekit.merge_methods.sce import sce_mask  # noqa: E402
from mergekit.merge_methods.slerp import slerp as mergekit_slerp_kernel  # noqa: E402

SHAPES = [(7,), (3, 4), (2, 3, 5)]


def _randn(rng, shape, scale=1.0):
    return (scale * rng.standard_normal(shape)).astype(np.float32)


def _mergekit(method, tensors, **parameters):
    group = TensorGroup.from_tensors([torch.tensor(np.asarray(x)) for x in tensors], base_index=0)
    return registry.get(method)([group], parameters=parameters)[0].numpy()


def _tree(rng, scale=1.0):
    return {"dense": {"kernel": _randn(rng, (4, 3), scale), "bias": _randn(rng, (3,), scale)},
            "embed": _randn(rng, (2, 3, 2), scale)}


# --- SLERP ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
def test_slerp_equals_mergekit(shape):
    rng = np.random.default_rng(len(shape))
    a, b = _randn(rng, shape), _randn(rng, shape)
    # t outside [0, 1] extrapolates along the arc, as mergekit does (it has no range check either).
    for t in (0.0, 0.3, 0.75, 1.0, -0.5, 1.5):
        np.testing.assert_allclose(slerp(a, b, t), _mergekit("slerp", [a, b], t=t), rtol=1e-6, atol=1e-6)


def test_slerp_per_leaf_t_and_endpoints():
    rng = np.random.default_rng(0)
    a, b = _tree(rng), _tree(rng)
    t = {"dense": {"kernel": 0.2, "bias": 0.9}, "embed": 0.5}
    jax.tree.map(lambda got, x, y, s: np.testing.assert_allclose(got, _mergekit("slerp", [x, y], t=s),
                                                                  rtol=1e-6, atol=1e-6), slerp(a, b, t), a, b, t)
    # The endpoints return the models themselves (to float32 rounding of sin(θ)/sin(θ)).
    for t, expected in ((0.0, a), (1.0, b)):
        jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6), slerp(a, b, t), expected)


def test_slerp_nearly_collinear_is_linear():
    rng = np.random.default_rng(1)
    a = _randn(rng, (3, 4))
    for b in (2.5 * a + 1e-4 * _randn(rng, (3, 4)), -3.0 * a):  # |cos| > 0.9995: parallel and antipodal
        for t in (0.25, 0.6):
            expected = (1 - t) * a + t * b
            np.testing.assert_allclose(slerp(a, b, t), expected, rtol=1e-6, atol=1e-6)
            np.testing.assert_allclose(_mergekit("slerp", [a, b], t=t), expected, rtol=1e-6, atol=1e-6)
    # A zero tensor has cosine 0 with anything (its norm counts as 1): θ = π/2, as in mergekit.
    zero = np.zeros((3, 4), np.float32)
    np.testing.assert_allclose(slerp(zero, a, 0.3), np.sin(0.3 * np.pi / 2) * a, rtol=1e-6, atol=1e-7)


def _torch_slerp64(a, b, t, requires_grad=False):
    """mergekit's kernel in float64 on a batch of one tensor (the whole flattened tensor), as its registry calls it."""
    ta, tb = (torch.tensor(np.asarray(x, np.float64)[None], requires_grad=requires_grad) for x in (a, b))
    tt = torch.tensor([float(t)], dtype=torch.float64, requires_grad=requires_grad)
    return ta, tb, tt, mergekit_slerp_kernel(tt, ta, tb)[0]


@pytest.mark.parametrize("case", ["spherical", "collinear"])
def test_slerp_gradients_equal_mergekit_float64(case):
    rng = np.random.default_rng(2)
    a = _randn(rng, (3, 4))
    b = _randn(rng, (3, 4)) if case == "spherical" else 2.0 * a
    weights = _randn(rng, (3, 4))
    t0 = 0.35

    def loss(a, b, t):
        return jnp.sum(jnp.asarray(weights) * slerp(a, b, t))

    ga, gb, gt = jax.grad(loss, argnums=(0, 1, 2))(a, b, t0)
    # d/dt by float64 central finite differences of mergekit's kernel.
    h = 1e-6
    w64 = torch.tensor(weights, dtype=torch.float64)
    value = [float((w64 * _torch_slerp64(a, b, t)[3]).sum()) for t in (t0 + h, t0 - h)]
    fd = (value[0] - value[1]) / (2 * h)
    np.testing.assert_allclose(gt, fd, rtol=1e-4, atol=1e-5)
    # d/da, d/db, d/dt by torch autograd through mergekit's kernel in float64.
    ta, tb, tt, out = _torch_slerp64(a, b, t0, requires_grad=True)
    (torch.tensor(weights, dtype=torch.float64) * out).sum().backward()
    np.testing.assert_allclose(ga, ta.grad[0].numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(gb, tb.grad[0].numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(gt, tt.grad.numpy()[0], rtol=1e-4, atol=1e-5)
    # A zero tensor (norm floored at eps) keeps finite gradients too.
    grads = jax.grad(loss, argnums=(0, 1, 2))(np.zeros_like(a), b, t0)
    assert all(np.isfinite(np.asarray(g)).all() for g in grads)


# --- FuseChat v1: VaRM ------------------------------------------------------------------------------------


def _np_variation_ratio(base, models):
    """Per leaf: wᵢ = mean((θᵢ−θ₀)²) / Σⱼ mean((θⱼ−θ₀)²) (1/M when all are 0); merged = Σᵢ wᵢ θᵢ, the
    official merge.py's form (it merges the models, not the updates)."""
    def leaf(b, *ms):
        b = np.asarray(b, np.float64)
        power = np.array([np.mean((np.asarray(m, np.float64) - b) ** 2) for m in ms])
        w = power / power.sum() if power.sum() > 0 else np.full(len(ms), 1 / len(ms))
        return w, sum(wi * np.asarray(m, np.float64) for wi, m in zip(w, ms))
    pairs = jax.tree.map(leaf, base, *models)
    weights = [jax.tree.map(lambda p, i=i: p[0][i], pairs, is_leaf=lambda x: isinstance(x, tuple))
               for i in range(len(models))]
    merged = jax.tree.map(lambda p: p[1], pairs, is_leaf=lambda x: isinstance(x, tuple))
    return weights, merged


def test_variation_ratio_equals_numpy_formula():
    rng = np.random.default_rng(3)
    base = _tree(rng)
    models = [jax.tree.map(lambda x, s=s: x + s * _randn(rng, x.shape), base) for s in (0.1, 0.3, 0.05)]
    # A leaf nobody changed: the equal split (and the base back); a leaf one model left untouched: weight 0
    # for that model (the official merge.py would split equally here: it tests "any model's statistic is 0").
    for m in models:
        m["dense"]["bias"] = base["dense"]["bias"].copy()
    models[1]["embed"] = base["embed"].copy()
    expected_weights, expected = _np_variation_ratio(base, models)
    weights = variation_ratio_weights(base, models)
    for got, want in zip(weights, expected_weights):
        jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5), got, want)
    np.testing.assert_allclose(weights[0]["dense"]["bias"], 1 / 3)
    assert float(weights[1]["embed"]) == 0.0
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6),
                 variation_ratio(base, models), expected)


# --- FuseChat v2: SCE -------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("count", [2, 3])
@pytest.mark.parametrize("select_topk", [1.0, 0.3])
def test_sce_equals_mergekit(shape, count, select_topk):
    rng = np.random.default_rng(10 * count + len(shape))
    base = _randn(rng, shape)
    models = [base + _randn(rng, shape, 0.5) for _ in range(count)]
    np.testing.assert_allclose(sce(base, models, select_topk=select_topk),
                               _mergekit("sce", [base, *models], select_topk=select_topk), rtol=1e-5, atol=1e-6)


def _official_fusechat_sce(base, models, select_topk):
    """The official SCE computation, transcribed with torch from FuseAI's FuseChat/mergekit/mergekit/merge_methods/
    sce_merging.py (commit 6bad19c0; get_sce_mask, get_sce_weight, get_erase_mask, SCETask.execute): the
    selection only enters the weights; erase and the mean use the whole updates; a zero divisor becomes 1."""
    base = torch.tensor(base)
    deltas = torch.stack([torch.tensor(m) - base for m in models])
    selected = deltas
    if select_topk < 1:
        variance = torch.var(deltas, dim=0, unbiased=False)
        k = int(select_topk * torch.count_nonzero(variance))
        mask = torch.zeros_like(variance)
        if k > 0:
            mask.view(-1)[torch.topk(variance.abs().view(-1), k=k).indices] = 1
        selected = deltas * mask
    weights = [float(torch.sum(d ** 2)) / d.numel() for d in selected]
    weights = [1 / len(weights)] * len(weights) if sum(weights) == 0 else [w / sum(weights) for w in weights]
    weights = torch.tensor(weights).reshape((-1,) + (1,) * base.ndim)
    majority = (deltas.sum(dim=0) >= 0).to(base.dtype) * 2 - 1
    erased = weights * (deltas.sign() == majority)
    divisor = erased.sum(dim=0)
    divisor[divisor == 0] = 1
    return (base + (deltas * erased).sum(dim=0) / divisor).numpy()


@pytest.mark.parametrize("select_topk", [1.0, 0.3])
def test_sce_fusechat_variant_equals_the_official_code(select_topk):
    rng = np.random.default_rng(9)
    base = _randn(rng, (3, 4))
    models = [base + _randn(rng, (3, 4), 0.5) for _ in range(3)]
    got = sce(base, models, select_topk=select_topk, variant="fusechat")
    np.testing.assert_allclose(got, _official_fusechat_sce(base, models, select_topk), rtol=1e-5, atol=1e-6)
    if select_topk < 1:  # the two variants differ once something is deselected
        assert np.abs(got - np.asarray(sce(base, models, select_topk=select_topk))).max() > 1e-2


def test_sce_selects_k_in_float32_as_mergekit():
    # 90 nonzero variances, select_topk 0.7: k = int(90 · 0.7) is 63 in float32 (mergekit's arithmetic: a
    # count tensor times a Python float is a float32 tensor) and 62 in float64 (62.99999999999999).
    rng = np.random.default_rng(4)
    deltas = _randn(rng, (3, 9, 10))
    mask = variance_topk_mask(jnp.asarray(deltas), 0.7)
    reference = sce_mask(torch.tensor(deltas), 0.7).numpy()
    assert int(90 * 0.7) == 62 and int(mask.sum()) == 63
    np.testing.assert_array_equal(mask, reference)


def test_sce_weights_do_not_depend_on_the_scale_of_the_updates():
    # Updates of 1e-4 (mean squares of 1e-8): the weights stay ∝ mean(τ²), so the merge scales with the
    # updates. (mergekit falls back to equal weights below a total mean square of 1e-6.)
    rng = np.random.default_rng(5)
    base = np.zeros((4, 6), np.float32)
    models = [_randn(rng, (4, 6), s) for s in (1.0, 3.0)]
    merged = np.asarray(sce(base, models, select_topk=0.5))
    small = np.asarray(sce(base, [1e-4 * m for m in models], select_topk=0.5))
    np.testing.assert_allclose(small, 1e-4 * merged, rtol=1e-5, atol=1e-12)


# --- dtype, jit, sharding ---------------------------------------------------------------------------------


def test_bf16_in_bf16_out():
    rng = np.random.default_rng(6)
    base = _tree(rng)
    models = [jax.tree.map(lambda x: x + 0.2 * _randn(rng, x.shape), base) for _ in range(2)]
    to16 = lambda tree: jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), tree)  # noqa: E731
    up = lambda tree: jax.tree.map(lambda x: np.asarray(jnp.asarray(x, jnp.bfloat16), np.float32), tree)  # noqa: E731
    merges = [(lambda b, ms: slerp(b, ms[0], 0.4)), variation_ratio, partial(sce, select_topk=0.5)]
    for merge in merges:
        got = merge(to16(base), [to16(m) for m in models])
        # float32 math on the bf16 values, rounded once at the end.
        want = merge(up(base), [up(m) for m in models])
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            assert g.dtype == jnp.bfloat16
            np.testing.assert_array_equal(np.asarray(g, np.float32),
                                          np.asarray(jnp.asarray(w, jnp.bfloat16), np.float32))


def test_sharded_merges_equal_single_device_and_keep_sharding():
    mesh = sharding.make_mesh({"fsdp": 8})
    rng = np.random.default_rng(7)
    specs = {"dense": {"kernel": P("fsdp"), "bias": P()}, "embed": P(None, None, None)}
    base = {"dense": {"kernel": _randn(rng, (16, 3)), "bias": _randn(rng, (3,))}, "embed": _randn(rng, (2, 3, 2))}
    models = [jax.tree.map(lambda x: x + 0.3 * _randn(rng, x.shape), base) for _ in range(3)]
    put = lambda tree: jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), tree, specs)  # noqa: E731
    sharded_base, sharded_models = put(base), [put(m) for m in models]
    merges = {
        "slerp": lambda b, ms: slerp(b, ms[0], 0.3),
        "variation_ratio": variation_ratio,
        "sce": partial(sce, select_topk=0.3),
    }
    for name, merge in merges.items():
        expected = merge(base, models)
        eager, jitted = merge(sharded_base, sharded_models), jax.jit(merge)(sharded_base, sharded_models)
        for g, j, e, b in zip(*map(jax.tree.leaves, (eager, jitted, expected, sharded_base))):
            np.testing.assert_allclose(g, e, rtol=1e-6, atol=1e-6, err_msg=name)
            np.testing.assert_allclose(j, e, rtol=1e-6, atol=1e-6, err_msg=name)
            assert g.sharding == b.sharding, name  # eager: put back exactly where the base leaf lives
            # Under jit the compiler picks the layout (P() for P(None, None, None)): the same placement.
            assert j.sharding.is_equivalent_to(b.sharding, b.ndim), name


# --- bad input --------------------------------------------------------------------------------------------


def test_errors():
    rng = np.random.default_rng(8)
    a, b = _tree(rng), _tree(rng)
    other = {"dense": {"kernel": _randn(rng, (5, 3)), "bias": a["dense"]["bias"]}, "embed": a["embed"]}
    with pytest.raises(ValueError, match=r"slerp: b differs from a at 'dense/kernel': shape \(5, 3\) vs a's \(4, 3\)"):
        slerp(a, other, 0.5)
    with pytest.raises(ValueError, match=r"slerp: b's tree differs from a's .*'dense/bias'"):
        slerp(a, {"dense": {"kernel": a["dense"]["kernel"]}, "embed": a["embed"]}, 0.5)
    with pytest.raises(ValueError, match="slerp interpolates exactly two models"):
        slerp(a, [b, b], 0.5)
    with pytest.raises(ValueError, match="slerp interpolates exactly two models"):
        slerp([a, b, b], a, 0.5)
    with pytest.raises(ValueError, match="slerp: t must be a finite number"):
        slerp(a, b, float("nan"))
    with pytest.raises(ValueError, match="slerp: t must be a finite number"):
        slerp(a, b, {"dense": {"kernel": 0.5, "bias": float("inf")}, "embed": 0.5})
    with pytest.raises(ValueError, match=r"slerp \(t\[0\]\)"):
        slerp(a, b, {"dense": 0.5, "embed": 0.5})
    with pytest.raises(ValueError, match=r"slerp: dot_threshold must lie in \[0, 1\]"):
        slerp(a, b, 0.5, dot_threshold=1.5)
    with pytest.raises(ValueError, match=r"slerp: eps must lie in \(0, inf\]"):
        slerp(a, b, 0.5, eps=0.0)

    for merge in (variation_ratio, variation_ratio_weights, sce):
        name = merge.__name__
        with pytest.raises(ValueError, match=f"{name} needs at least 2 models, got 1"):
            merge(a, [b])
        with pytest.raises(ValueError, match=rf"{name}: models\[1\] differs from base at 'dense/kernel': "
                                             r"shape \(5, 3\) vs base's \(4, 3\)"):
            merge(a, [b, other])
    # select_topk: a fraction in (0, 1]; 0 (the "trim fraction of 0" slip) would keep nothing.
    for bad in (0, 0.0, -0.2, 1.5, float("nan")):
        with pytest.raises(ValueError, match="select_topk"):
            sce(a, [b, b], select_topk=bad)
    with pytest.raises(ValueError, match=r"sce: variant must be one of \('mergekit', 'fusechat'\)"):
        sce(a, [b, b], variant="official")
    with pytest.raises(ValueError, match="select_topk must be a Python float"):
        jax.jit(lambda k: sce(a, [b, b], select_topk=k))(0.5)
