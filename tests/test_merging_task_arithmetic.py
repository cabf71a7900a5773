"""The task-arithmetic family (jaxkd/merging/task_arithmetic.py, sparsify.py) against mergekit 0.1.5 (the
reference implementation of every one of these merges: ``merge_methods/generalized_task_arithmetic.py``,
``linear.py``, ``sparsify.py``), run on the very same float32 tensors, leaf by leaf; the random merges (DARE,
DELLA) get the very same masks (mergekit's ``torch.bernoulli`` is replaced by one returning jaxkd's masks,
after checking the keep probabilities mergekit asked for). The papers' ``inverse_density`` rescale, which
mergekit lacks, is checked against NumPy from the formula. Then bf16, jit, an 8-device fsdp layout, and every
refused input.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxkd import merging
from jaxkd.merging import sparsify as sp

mergekit = pytest.importorskip("mergekit")
from mergekit.merge_methods import registry  # noqa: E402
from mergekit.merge_methods.base import TensorGroup  # noqa: E402

# A kernel, a 1-D bias, a one-entry gain and a scalar (every merge but DELLA ranks the flattened tensor).
SHAPES = {"dense": {"kernel": (8, 5), "bias": (8,)}, "gain": (1,), "temperature": ()}  # fsdp splits 8 rows
# DELLA ranks along axis 1 (of a 3-D kernel too), which a scalar lacks, and mergekit divides 0 by 0 for
# one-entry rows.
DELLA_SHAPES = {"dense": {"kernel": (8, 5), "bias": (8,)}, "conv": {"kernel": (3, 4, 2)}}
WEIGHTS = [0.5, 1.0, 0.7]
# The masks the merges draw, redrawn here: compiled whole (one program per shape), not op by op.
_random_mask = jax.jit(sp.random_mask, static_argnums=(1, 2))
_della_mask = jax.jit(sp.della_mask, static_argnums=(2, 3))
_della_keep_probabilities = jax.jit(sp.della_keep_probabilities, static_argnums=(1, 2))


def _tree(shapes, rng, scale=1.0):
    return jax.tree.map(lambda s: (scale * rng.standard_normal(s)).astype(np.float32), shapes,
                        is_leaf=lambda s: isinstance(s, tuple))


def _setup(shapes=SHAPES, seed=0):
    rng = np.random.default_rng(seed)
    base = _tree(shapes, rng)
    models = [jax.tree.map(lambda b, d: b + d, base, _tree(shapes, rng, 0.1)) for _ in range(3)]
    return base, models


def _leaves(tree):
    return jax.tree_util.tree_leaves(tree)


def _mergekit(name, base_leaf, model_leaves, **parameters):
    """mergekit's merge of one tensor; ``weight`` etc. are per-model lists (ids 1..n; linear: 0..n-1)."""
    tensors = ([] if base_leaf is None else [torch.from_numpy(np.asarray(base_leaf))]) + [
        torch.from_numpy(np.asarray(m)) for m in model_leaves]
    first_id = 0 if base_leaf is None else 1
    params = {k: ({first_id + j: float(x) for j, x in enumerate(v)} if isinstance(v, (list, tuple)) else v)
              for k, v in parameters.items()}
    group = TensorGroup.from_tensors(tensors, base_index=None if base_leaf is None else 0)
    return registry.get(name)([group], parameters=params)[0].numpy()


def _mergekit_tree(name, base, models, **parameters):
    leaves = [_mergekit(name, b, [_leaves(m)[i] for m in models], **parameters)
              for i, b in enumerate(_leaves(base))]
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(base), leaves)


def _assert_trees_close(actual, expected, rtol=1e-6, atol=1e-6):
    assert jax.tree_util.tree_structure(actual) == jax.tree_util.tree_structure(expected)
    for a, e in zip(_leaves(actual), _leaves(expected)):
        assert np.shape(a) == np.shape(e)
        np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(e, np.float64), rtol=rtol, atol=atol)


# -- deterministic merges against mergekit ------------------------------------------------------------------

@pytest.mark.parametrize("normalize, weights", [(True, [1.0, 2.0, 0.5]), (False, [0.2, 0.3, 0.5])])
def test_linear_matches_mergekit(normalize, weights):
    _, models = _setup()
    merged = merging.linear(models, weights, normalize=normalize)
    leaves = [_mergekit("linear", None, [_leaves(m)[i] for m in models], weight=weights, normalize=normalize)
              for i in range(len(_leaves(models[0])))]
    _assert_trees_close(merged, jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(models[0]), leaves))


@pytest.mark.parametrize("normalize", [False, True])
def test_task_arithmetic_matches_mergekit(normalize):
    base, models = _setup()
    merged = merging.task_arithmetic(base, models, [0.5, -1.0, 0.7], normalize=normalize, scale=0.8)
    expected = _mergekit_tree("task_arithmetic", base, models, weight=[0.5, -1.0, 0.7], normalize=normalize,
                              **{"lambda": 0.8})
    _assert_trees_close(merged, expected)


@pytest.mark.parametrize("normalize", [True, False])
def test_ties_matches_mergekit(normalize):
    base, models = _setup()
    merged = merging.ties(base, models, WEIGHTS, density=[0.4, 0.3, 0.6], normalize=normalize)
    expected = _mergekit_tree("ties", base, models, weight=WEIGHTS, density=[0.4, 0.3, 0.6], normalize=normalize)
    _assert_trees_close(merged, expected)


@pytest.mark.parametrize("consensus, name", [(None, "breadcrumbs"), ("ties", "breadcrumbs_ties")])
def test_breadcrumbs_matches_mergekit(consensus, name):
    base, models = _setup()
    merged = merging.breadcrumbs(base, models, WEIGHTS, density=0.6, gamma=0.1, consensus=consensus)
    _assert_trees_close(merged, _mergekit_tree(name, base, models, weight=WEIGHTS, density=[0.6] * 3,
                                               gamma=[0.1] * 3))
    # density + gamma > 1: fewer outliers dropped, density kept (mergekit's rule).
    merged = merging.breadcrumbs(base, models, WEIGHTS, density=0.9, gamma=0.2, consensus=consensus)
    _assert_trees_close(merged, _mergekit_tree(name, base, models, weight=WEIGHTS, density=[0.9] * 3,
                                               gamma=[0.2] * 3))


def test_per_layer_weights_match_mergekit_leaf_by_leaf():
    base, models = _setup()
    rng = np.random.default_rng(1)
    per_leaf = [jax.tree.map(lambda _: float(rng.uniform(0.2, 1.5)), base) for _ in models]
    merged = merging.ties(base, models, per_leaf, density=0.5)
    soup = merging.linear(models, per_leaf)
    for i, b in enumerate(_leaves(base)):
        leaf_models = [_leaves(m)[i] for m in models]
        weights = [_leaves(w)[i] for w in per_leaf]
        np.testing.assert_allclose(_leaves(merged)[i], _mergekit("ties", b, leaf_models, weight=weights,
                                                                 density=[0.5] * 3), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(_leaves(soup)[i], _mergekit("linear", None, leaf_models, weight=weights),
                                   rtol=1e-6, atol=1e-6)


# -- random merges: the same masks fed to mergekit ----------------------------------------------------------

def _fake_bernoulli(monkeypatch, masks, expected_probabilities):
    """Replace torch.bernoulli (mergekit.sparsify calls it once per model) by one returning ``masks`` in order,
    after checking that mergekit asked for ``expected_probabilities``."""
    queue = list(zip(masks, expected_probabilities))

    def bernoulli(probabilities, *args, **kwargs):
        mask, expected = queue.pop(0)
        np.testing.assert_allclose(probabilities.numpy().reshape(np.shape(expected)), expected, rtol=1e-6,
                                   atol=1e-7)
        return torch.from_numpy(np.array(mask, np.float32)).reshape(probabilities.shape).to(probabilities.dtype)

    monkeypatch.setattr(mergekit.sparsify.torch, "bernoulli", bernoulli)
    return queue


def _deltas(base, models, i):
    return [np.asarray(_leaves(m)[i]) - np.asarray(_leaves(base)[i]) for m in models]


@pytest.mark.parametrize("consensus, name", [(None, "dare_linear"), ("ties", "dare_ties")])
def test_dare_l1_rescale_matches_mergekit_with_the_same_masks(monkeypatch, consensus, name):
    base, models = _setup()
    key = jax.random.key(3)
    merged = merging.dare(base, models, WEIGHTS, density=0.5, rng=key, consensus=consensus, rescale="l1")
    for i, b in enumerate(_leaves(base)):
        shape = np.shape(b)
        masks = [_random_mask(sp.model_key(key, i, j), shape, 0.5) for j in range(3)]
        queue = _fake_bernoulli(monkeypatch, masks, [np.full(shape, 0.5)] * 3)
        expected = _mergekit(name, b, [_leaves(m)[i] for m in models], weight=WEIGHTS, density=[0.5] * 3)
        assert not queue  # one mask per model was drawn
        np.testing.assert_allclose(_leaves(merged)[i], expected, rtol=1e-6, atol=1e-6)


def _numpy_merge(base_leaf, sparse_deltas, weights, *, consensus, normalize):
    """The generalized merge in float64 NumPy, from mergekit's formula (sign election on weighted deltas)."""
    w = np.asarray(weights, np.float64).reshape((-1,) + (1,) * np.ndim(base_leaf))
    d = np.stack(sparse_deltas).astype(np.float64) * w
    if consensus:
        elected = np.where(d.sum(0) >= 0, 1.0, -1.0)
        agree = np.sign(d) == elected
        mixed, divisor = (d * agree).sum(0), (w * agree).sum(0)
        divisor = np.where(divisor == 0, 1.0, divisor)
    else:
        mixed, divisor = d.sum(0), w.sum()
        divisor = 1.0 if abs(divisor) < 1e-8 else divisor
    return base_leaf + (mixed / divisor if normalize else mixed)


@pytest.mark.parametrize("consensus", [None, "ties"])
def test_dare_inverse_density_matches_numpy(consensus):
    base, models = _setup()
    key = jax.random.key(4)
    merged = merging.dare(base, models, WEIGHTS, density=0.3, rng=key, consensus=consensus)
    for i, b in enumerate(_leaves(base)):
        sparse = [d * np.asarray(_random_mask(sp.model_key(key, i, j), np.shape(b), 0.3)) / 0.3
                  for j, d in enumerate(_deltas(base, models, i))]
        expected = _numpy_merge(b, sparse, WEIGHTS, consensus=consensus, normalize=False)
        np.testing.assert_allclose(_leaves(merged)[i], expected, rtol=1e-5, atol=1e-5)


def _numpy_della_probabilities(delta, density, epsilon):
    rows = delta.reshape(1, -1) if delta.ndim < 2 else delta
    rank = np.argsort(np.argsort(np.abs(rows), axis=1), axis=1)  # 0 = smallest |delta| of its row
    return (density - epsilon + 2 * epsilon * rank / (rows.shape[1] - 1)).reshape(delta.shape)


@pytest.mark.parametrize("consensus, name", [("ties", "della"), (None, "della_linear")])
def test_della_l1_rescale_matches_mergekit_with_the_same_masks(monkeypatch, consensus, name):
    base, models = _setup(DELLA_SHAPES)
    key = jax.random.key(5)
    merged = merging.della(base, models, WEIGHTS, density=0.5, epsilon=0.2, rng=key, consensus=consensus,
                           rescale="l1")
    for i, b in enumerate(_leaves(base)):
        deltas = _deltas(base, models, i)
        masks = [_della_mask(sp.model_key(key, i, j), jnp.asarray(d), 0.5, 0.2) for j, d in enumerate(deltas)]
        # mergekit checks jaxkd's keep probabilities before taking jaxkd's masks.
        probabilities = [np.asarray(_della_keep_probabilities(jnp.asarray(d), 0.5, 0.2)) for d in deltas]
        queue = _fake_bernoulli(monkeypatch, masks, probabilities)
        expected = _mergekit(name, b, [_leaves(m)[i] for m in models], weight=WEIGHTS, density=[0.5] * 3,
                             epsilon=[0.2] * 3)
        assert not queue
        np.testing.assert_allclose(_leaves(merged)[i], expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("consensus", ["ties", None])
def test_della_inverse_density_matches_numpy(consensus):
    base, models = _setup(DELLA_SHAPES)
    key = jax.random.key(6)
    merged = merging.della(base, models, WEIGHTS, density=0.4, epsilon=0.1, rng=key, consensus=consensus)
    for i, b in enumerate(_leaves(base)):
        sparse = []
        for j, d in enumerate(_deltas(base, models, i)):
            mask = np.asarray(_della_mask(sp.model_key(key, i, j), jnp.asarray(d), 0.4, 0.1))
            sparse.append(d * mask / _numpy_della_probabilities(d, 0.4, 0.1))
        expected = _numpy_merge(b, sparse, WEIGHTS, consensus=consensus, normalize=consensus is not None)
        np.testing.assert_allclose(_leaves(merged)[i], expected, rtol=1e-5, atol=1e-5)


def test_della_probabilities_of_one_entry_rows_and_scalars_are_the_density():
    # mergekit divides 0 by 0 there; jaxkd gives the middle of [density - epsilon, density + epsilon].
    for shape in [(), (1,), (4, 1)]:
        np.testing.assert_allclose(sp.della_keep_probabilities(jnp.ones(shape), 0.4, 0.1), np.full(shape, 0.4),
                                   rtol=1e-6)


def test_random_masks_keep_about_density():
    mask = sp.random_mask(jax.random.key(0), (200, 50), 0.3)
    assert abs(float(mask.mean()) - 0.3) < 0.01  # 10000 draws: 4.6 standard deviations
    delta = jnp.asarray(np.random.default_rng(0).standard_normal((100, 100)), jnp.float32)
    kept = sp.della_mask(jax.random.key(1), delta, 0.5, 0.3)
    small, large = np.argsort(np.abs(np.asarray(delta)), axis=1)[:, :20], np.argsort(np.abs(np.asarray(delta)),
                                                                                       axis=1)[:, -20:]
    # The smallest fifth is kept with probability in [0.2, 0.32], the largest in [0.68, 0.8].
    assert np.take_along_axis(np.asarray(kept), small, 1).mean() < 0.35
    assert np.take_along_axis(np.asarray(kept), large, 1).mean() > 0.65


# -- dtypes, jit, sharding ----------------------------------------------------------------------------------

def test_bf16_inputs_give_bf16_equal_to_the_float32_merge_cast():
    base, models = _setup()
    to_bf16 = lambda t: jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), t)  # noqa: E731
    to_f32 = lambda t: jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), t)  # noqa: E731
    base16, models16 = to_bf16(base), [to_bf16(m) for m in models]
    key = jax.random.key(7)
    for merge in (lambda b, ms: merging.ties(b, ms, WEIGHTS, density=0.5),
                  lambda b, ms: merging.dare(b, ms, WEIGHTS, density=0.5, rng=key, consensus="ties")):
        merged = merge(base16, models16)
        reference = merge(to_f32(base16), [to_f32(m) for m in models16])
        for a, e in zip(_leaves(merged), _leaves(reference)):
            assert a.dtype == jnp.bfloat16
            np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(e.astype(jnp.bfloat16), np.float32))
    soup = merging.linear(models16, WEIGHTS)
    assert all(leaf.dtype == jnp.bfloat16 for leaf in _leaves(soup))


def test_merges_under_jit_equal_the_eager_merges():
    base, models = _setup()
    key = jax.random.key(8)

    @jax.jit
    def merge(base, models, key, weights):
        return (merging.ties(base, models, weights, density=0.5),
                merging.dare(base, models, weights, density=0.5, rng=key, consensus="ties"),
                merging.linear(models, weights))  # traced weights: the sum checks wait for concrete ones

    jitted = merge(base, models, key, WEIGHTS)  # the weights traced, the hyper-parameters static
    eager = (merging.ties(base, models, WEIGHTS, density=0.5),
             merging.dare(base, models, WEIGHTS, density=0.5, rng=key, consensus="ties"),
             merging.linear(models, WEIGHTS))
    _assert_trees_close(jitted, eager, rtol=1e-6, atol=1e-6)


def test_fsdp_sharded_merge_equals_the_single_device_merge_and_keeps_the_shardings():
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(8), ("fsdp",))
    specs = {"dense": {"kernel": P("fsdp", None), "bias": P("fsdp")}, "gain": P(), "temperature": P()}
    base, models = _setup()
    place = lambda t: jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), t, specs)  # noqa: E731
    key = jax.random.key(9)
    # The whole-tensor top-k (TIES; breadcrumbs sorts likewise), the per-row ranks (DELLA), random masks; the
    # hyper-parameters of other tests, whose single-device programs are compiled already.
    merges = {
        "linear": lambda b, ms: merging.linear(ms, WEIGHTS),
        "ties": lambda b, ms: merging.ties(b, ms, WEIGHTS, density=0.5),
        "dare": lambda b, ms: merging.dare(b, ms, WEIGHTS, density=0.3, rng=key),
        "della": lambda b, ms: merging.della(b, ms, WEIGHTS, density=0.5, epsilon=0.1, rng=key),
    }
    sharded_base, sharded_models = place(base), [place(m) for m in models]
    for name, merge in merges.items():
        merged = merge(sharded_base, sharded_models)
        _assert_trees_close(merged, merge(base, models))
        for leaf, spec in zip(_leaves(merged), jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))):
            assert leaf.sharding == NamedSharding(mesh, spec), (name, leaf.shape, leaf.sharding)


# -- refused input ------------------------------------------------------------------------------------------

def test_models_whose_trees_or_shapes_differ_are_refused():
    base, models = _setup()
    missing = {k: v for k, v in models[1].items() if k != "gain"}
    with pytest.raises(ValueError, match=r"ties: models\[1\]'s tree differs from base's.*gain"):
        merging.ties(base, [models[0], missing, models[2]], WEIGHTS, density=0.5)
    narrow = {**models[2], "dense": {**models[2]["dense"], "kernel": np.zeros((8, 4), np.float32)}}
    with pytest.raises(ValueError, match=r"models\[2\] differs from base at 'dense/kernel': shape \(8, 4\) vs "
                                         r"base's \(8, 5\)"):
        merging.task_arithmetic(base, [models[0], models[1], narrow], WEIGHTS)
    with pytest.raises(ValueError, match=r"models\[1\] differs from models\[0\] at 'dense/kernel'"):
        merging.linear([models[0], narrow], [0.5, 0.5])


def test_linear_without_normalize_needs_weights_summing_to_one():
    _, models = _setup()
    with pytest.raises(ValueError, match=r"must sum to 1.*got sum 1.5"):
        merging.linear(models, [0.5, 0.5, 0.5], normalize=False)
    with pytest.raises(ValueError, match=r"weights sum to 0"):
        merging.linear(models, [0.5, -0.5, 0.0])
    base, _ = _setup()
    merging.task_arithmetic(base, models, [0.5, 0.5, 0.5])  # no requirement on the sum elsewhere


@pytest.mark.parametrize("density", [0, -0.1, 1.5])
def test_density_outside_zero_one_is_refused(density):
    base, models = _setup()
    key = jax.random.key(0)
    for merge in (lambda: merging.ties(base, models, WEIGHTS, density=density),
                  lambda: merging.dare(base, models, WEIGHTS, density=density, rng=key),
                  lambda: merging.breadcrumbs(base, models, WEIGHTS, density=density),
                  lambda: merging.della(base, models, WEIGHTS, density=density, epsilon=0.0, rng=key)):
        with pytest.raises(ValueError, match=r"density must lie in \(0, 1\]"):
            merge()
    with pytest.raises(ValueError, match=r"density\[1\] must lie in \(0, 1\]"):
        merging.ties(base, models, WEIGHTS, density=[0.5, density, 0.5])


def test_gamma_and_epsilon_out_of_range_are_refused():
    base, models = _setup()
    key = jax.random.key(0)
    for gamma in (-0.1, 1.0):
        with pytest.raises(ValueError, match=r"gamma must lie in \[0, 1\)"):
            merging.breadcrumbs(base, models, WEIGHTS, density=0.5, gamma=gamma)
    with pytest.raises(ValueError, match=r"epsilon must lie in \[0, inf\]"):
        merging.della(base, models, WEIGHTS, density=0.5, epsilon=-0.1, rng=key)
    for density, epsilon in ((0.5, 0.5), (0.8, 0.25)):
        with pytest.raises(ValueError, match=r"density ± epsilon inside \(0, 1\)"):
            merging.della(base, models, WEIGHTS, density=density, epsilon=epsilon, rng=key)


def test_too_few_models_wrong_weight_counts_and_missing_rng_are_refused():
    base, models = _setup()
    with pytest.raises(ValueError, match=r"ties needs at least 1 model, got 0"):
        merging.ties(base, [], [], density=0.5)
    with pytest.raises(ValueError, match=r"linear needs at least 2 models, got 1"):
        merging.linear(models[:1], [1.0])
    with pytest.raises(ValueError, match=r"`weights` has 2 entries for 3 models"):
        merging.task_arithmetic(base, models, [0.5, 0.5])
    with pytest.raises(ValueError, match=r"dare: .*pass rng"):
        merging.dare(base, models, WEIGHTS, density=0.5)
    with pytest.raises(ValueError, match=r"della: .*pass rng"):
        merging.della(base, models, WEIGHTS, density=0.5, epsilon=0.1)
    with pytest.raises(ValueError, match=r"dare: rng must be a jax PRNG key"):
        merging.dare(base, models, WEIGHTS, density=0.5, rng=0)
    tiny = {"w": np.ones(3, np.float32)}
    merging.dare(tiny, [tiny], [1.0], density=0.5, rng=jax.random.PRNGKey(0))  # a raw key is a key
    with jax.default_prng_impl("rbg"):  # so is a raw key of another implementation (shape (4,))
        merging.dare(tiny, [tiny], [1.0], density=0.5, rng=jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match=r"rescale must be one of"):
        merging.dare(base, models, WEIGHTS, density=0.5, rng=jax.random.key(0), rescale="l2")
    with pytest.raises(ValueError, match=r"consensus must be one of"):
        merging.breadcrumbs(base, models, WEIGHTS, density=0.5, consensus="count")
    with pytest.raises(ValueError, match=r"density must be a Python float \(static under jit\)"):
        jax.jit(lambda d: merging.ties(base, models, WEIGHTS, density=d))(0.5)
