"""torchdistill's remaining losses (CC's kernel form, PAD-L2, KTA, affinity, SRD, DIST+'s feature terms,
SSKD) against torchdistill's own computation transcribed into PyTorch (tests/torch_reference/
torchdistill_losses.py, torchdistill at 3e4373c), on equal random inputs; masks against the unmasked
subset; each bad hyper-parameter refused. Gradients: the float64 finite-difference contract
(tests/feature_cases_torchdistill.py)."""

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")  # dev extra: the reference computations only

from jaxkd import losses  # noqa: E402
from tests.torch_reference import torchdistill_losses as ref  # noqa: E402

RNG = np.random.default_rng(0)


def t64(x):
    return torch.from_numpy(np.asarray(x, np.float64))


def nchw(x):
    """jaxkd's NHWC map as torchdistill's NCHW."""
    return t64(np.transpose(x, (0, 3, 1, 2)))


def close(a, b, rtol=1e-5, atol=1e-7):
    b = b.detach() if isinstance(b, torch.Tensor) else b
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=rtol, atol=atol)


@pytest.fixture(autouse=True)
def float64():
    with jax.enable_x64(True):
        yield


@pytest.mark.parametrize("kernel, gamma, order", [("gaussian", 0.4, 2), ("gaussian", 0.7, 3), ("bilinear", 0.4, 2)])
def test_cc_kernel_is_torchdistills_cckd(kernel, gamma, order):
    es, et = 0.5 * RNG.normal(size=(6, 5)), 0.5 * RNG.normal(size=(6, 7))
    expected = ref.cckd(t64(es), t64(et), kernel=kernel, gamma=gamma, max_p=order)
    close(losses.cc_kernel(es, et, kernel=kernel, gamma=gamma, order=order), expected)
    mask = np.array([1, 0, 1, 1, 0, 1], bool)
    close(losses.cc_kernel(es, et, kernel=kernel, gamma=gamma, order=order, mask=mask),
          ref.cckd(t64(es[mask]), t64(et[mask]), kernel=kernel, gamma=gamma, max_p=order))


def test_pad_l2_is_torchdistills_padl2():
    s, t, v = RNG.normal(size=(5, 8)), RNG.normal(size=(5, 8)), 0.5 * RNG.normal(size=(5, 8))
    close(losses.pad_l2(s, t, v), ref.pad_l2(t64(s), t64(t), t64(v)))
    close(losses.pad_l2(s, t, v, eps=0.1, reduction="sum"), ref.pad_l2(t64(s), t64(t), t64(v), eps=0.1, reduction="sum"))


@pytest.mark.parametrize("p, q", [(1, 2), (2, 2), (3, 1)])
def test_kta_is_torchdistills_kta(p, q):
    s, t = RNG.normal(size=(4, 3, 3, 5)), RNG.normal(size=(4, 3, 3, 5))
    close(losses.kta(s, t, p=p, q=q), ref.kta(nchw(s), nchw(t), p=p, q=q))


def test_affinity_is_torchdistills_affinity():
    s, t = RNG.normal(size=(3, 4, 5, 6)), RNG.normal(size=(3, 4, 5, 6))
    close(losses.affinity(s, t), ref.affinity(nchw(s), nchw(t)))
    # Equal maps give 0; one channel negated costs nothing (a aᵀ = (−a)(−a)ᵀ).
    flipped = t.copy()
    flipped[..., 2] *= -1
    close(losses.affinity(t, flipped), 0.0, atol=1e-12)


@pytest.mark.parametrize("exponent", [4.0, 1.0, 2.5])
def test_srd_is_torchdistills_feature_term(exponent):
    s, t = RNG.normal(size=(6, 8)), RNG.normal(size=(6, 8))
    zs, zt = RNG.normal(size=(6, 5)), RNG.normal(size=(6, 5))
    _, feature = ref.srd(t64(s), t64(t), t64(zs), t64(zt), exponent=exponent)
    close(losses.srd(s, t, exponent=exponent), feature)


def test_dist_plus_feature_terms_against_torchdistill():
    fs, ft = RNG.normal(size=(5, 3, 3, 6)), RNG.normal(size=(5, 3, 3, 6))
    channel, spatial = losses.dist_plus_feature_terms(fs, ft)
    # torchdistill's channel_relation is the mean correlation itself; jaxkd's term is 1 minus it.
    close(channel, 1.0 - ref.dist_plus_channel_relation(nchw(fs), nchw(ft)))
    close(spatial, ref.dist_plus_spatial_relation(nchw(fs), nchw(ft)))


def _rotation_batch(rng, n, k, d):
    """``[N, 4, ...]`` inputs whose teacher ranks some labels and images wrongly."""
    return (rng.normal(size=(n, 4, k)), 2.0 * rng.normal(size=(n, 4, k)), rng.normal(size=(n, 4, d)),
            rng.normal(size=(n, 4, d)), rng.integers(0, k, n))


def _cut_is_unambiguous(scores, target, ratio):
    """Whether the kept set does not depend on how equal ranks are ordered (torchdistill's argsort is not
    stable): the last kept wrong rank differs from the first dropped one."""
    rank = np.sum(scores > np.take_along_axis(scores, target[:, None], 1), axis=1)
    wrong = np.sort(rank[rank > 0])
    keep = int(len(wrong) * ratio)
    return keep == 0 or keep == len(wrong) or wrong[keep - 1] != wrong[keep]


@pytest.mark.parametrize("ss_ratio, tf_ratio", [(0.75, 1.0), (0.5, 0.25)])
def test_sskd_terms_are_torchdistills(ss_ratio, tf_ratio):
    temps = dict(kl_temp=4.0, ss_temp=0.5, tf_temp=3.0)
    for seed in range(50):  # inputs whose kept rows do not hinge on a tie (see _cut_is_unambiguous)
        zs, zt, ss, st, y = _rotation_batch(np.random.default_rng(seed), n=6, k=5, d=4)
        unit = st / np.linalg.norm(st, axis=-1, keepdims=True)
        sims_t = unit[:, 1:].reshape(-1, 4) @ unit[:, 0].T
        aug_t = zt[:, 1:].reshape(-1, 5)
        if (_cut_is_unambiguous(sims_t, np.repeat(np.arange(6), 3), ss_ratio)
                and _cut_is_unambiguous(aug_t, np.repeat(y, 3), tf_ratio)):
            break
    flat = lambda x: t64(x.reshape(-1, x.shape[-1]))  # noqa: E731  (the official image-major 4N rows)
    _, (ce, kl, ss_term, tf) = ref.sskd(flat(zs), flat(zt), flat(ss), flat(st), torch.from_numpy(y),
                                        ss_ratio=ss_ratio, tf_ratio=tf_ratio, **temps)
    terms = jax.jit(lambda *a, mask=None: losses.sskd_terms(
        *a, kl_temperature=4.0, ss_temperature=0.5, tf_temperature=3.0, ss_ratio=ss_ratio, tf_ratio=tf_ratio,
        mask=mask))
    close(terms(zs, zt, ss, st, y), [kl, ss_term, tf])
    # A mask is the loss of the unmasked images alone.
    mask = np.array([1, 1, 0, 1, 0, 1], bool)
    close(terms(zs, zt, ss, st, y, mask=mask), terms(zs[mask], zt[mask], ss[mask], st[mask], y[mask]))


def test_sskd_contrastive_ce_is_torchdistills_aux_loss():
    ss = RNG.normal(size=(5, 4, 6))
    close(losses.sskd_contrastive_ce(ss), ref.aux_sskd(t64(ss.reshape(20, 6))))


BAD = [
    (lambda: losses.cc_kernel(np.ones((3, 2)), np.ones((3, 2)), kernel="laplace"), "kernel"),
    (lambda: losses.cc_kernel(np.ones((3, 2)), np.ones((3, 2)), gamma=0.0), "gamma"),
    (lambda: losses.cc_kernel(np.ones((3, 2)), np.ones((3, 2)), order=0), "order"),
    (lambda: losses.cc_kernel(np.ones((3, 2)), np.ones((4, 2))), "batch size"),
    (lambda: losses.pad_l2(np.ones((3, 2)), np.ones((3, 2)), np.ones((3, 2)), eps=0.0), "eps"),
    (lambda: losses.pad_l2(np.ones((3, 2)), np.ones((3, 2)), np.ones((3, 3))), "one shape"),
    (lambda: losses.kta(np.ones((3, 2)), np.ones((3, 2)), p=0.5), "p must"),
    (lambda: losses.kta(np.ones((3, 2)), np.ones((3, 2)), q=-1), "q must"),
    (lambda: losses.kta(np.ones((3, 2)), np.ones((3, 2)), eps=0), "eps"),
    (lambda: losses.kta(np.ones((3, 2)), np.ones((3, 4))), "one shape"),
    (lambda: losses.affinity(np.ones((3, 2, 2, 2)), np.ones((3, 2, 2, 3))), "one shape"),
    (lambda: losses.srd(np.ones((3, 2)), np.ones((3, 2)), exponent=0.0), "exponent"),
    (lambda: losses.srd(np.ones((3, 2)), np.ones((3, 3))), "one shape"),
    (lambda: losses.dist_plus_feature_terms(np.ones((3, 2, 2, 2)), np.ones((3, 2, 2, 2)), eps=0.0), "eps"),
    (lambda: losses.dist_plus_feature_terms(np.ones((3, 2)), np.ones((3, 2))), "one shape"),
    (lambda: losses.sskd_terms(*_rotation_batch(RNG, 3, 4, 2), ss_ratio=1.5), "ss_ratio"),
    (lambda: losses.sskd_terms(*_rotation_batch(RNG, 3, 4, 2), tf_ratio=-0.1), "tf_ratio"),
    (lambda: losses.sskd_terms(*_rotation_batch(RNG, 3, 4, 2), kl_temperature=0.0), "kl_temperature"),
    (lambda: losses.sskd_terms(*_rotation_batch(RNG, 3, 4, 2), ss_temperature=-1.0), "ss_temperature"),
    (lambda: losses.sskd_terms(*_rotation_batch(RNG, 3, 4, 2), tf_temperature=0.0), "tf_temperature"),
    (lambda: losses.sskd_terms(np.ones((3, 3, 4)), *_rotation_batch(RNG, 3, 4, 2)[1:]), r"\[N, 4"),
    (lambda: losses.sskd_terms(*_rotation_batch(RNG, 3, 4, 2)[:4], np.zeros(2, int)), "number of images"),
    (lambda: losses.sskd_contrastive_ce(np.ones((3, 2))), r"\[N, 4"),
]


@pytest.mark.parametrize("call, message", BAD, ids=[m for _, m in BAD])
def test_bad_hyperparameters_and_shapes_are_refused(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# ----- the methods -----

from jaxkd import methods  # noqa: E402
from jaxkd.methods import LossInputs, MethodVars  # noqa: E402
from jaxkd.models.base import Outputs  # noqa: E402


def _outputs(logits, **feats):
    return Outputs(logits=logits, features=feats, model_state={})


def test_dist_plus_method_is_torchdistills_dist_plus_loss_with_the_channel_term_as_one_minus_rho():
    zs, zt = RNG.normal(size=(6, 5)), RNG.normal(size=(6, 5))
    fs, ft = RNG.normal(size=(6, 2, 2, 4)), RNG.normal(size=(6, 2, 2, 4))
    hyper = dict(beta=2.0, gamma=0.5, iota=0.7, kappa=1.3)
    method = methods.dist_plus(**hyper, temperature=2.0)
    inputs = LossInputs.of(_outputs(zs, stage3=fs), _outputs(zt, stage3=ft))
    value, _ = jax.jit(lambda inputs: method.loss(MethodVars(), inputs, None))(inputs)
    expected = ref.dist_plus(t64(zs), t64(zt), nchw(fs), nchw(ft), tau=2.0, **hyper)
    rho = ref.dist_plus_channel_relation(nchw(fs), nchw(ft))
    close(value, expected - hyper["iota"] * rho + hyper["iota"] * (1 - rho))


def test_srd_method_is_the_official_distillation_loss():
    """roymiles/Simple-Recipe-Distillation ``OurDistillationLoss.forward_loss`` and ``forward`` (commit
    31e8477, imagenet/torchdistill/losses/single.py): linear projector, BatchNorm1d(eps=1e-4, affine=False)
    in training mode on both sides, ``2·log Σ|Δ|⁴`` + KL with ``T = 1``."""
    es, et = RNG.normal(size=(8, 6)), RNG.normal(size=(8, 4))
    zs, zt = RNG.normal(size=(8, 5)), RNG.normal(size=(8, 5))
    method = methods.srd()
    inputs = LossInputs.of(_outputs(zs, pooled=es), _outputs(zt, pooled=et))
    vars = method.init(jax.random.PRNGKey(0), inputs)
    value, _ = jax.jit(lambda vars, inputs: method.loss(vars, inputs, None))(vars, inputs)
    embed = nn_linear(vars.params["Dense_0"])
    bn = torch.nn.BatchNorm1d(4, eps=1e-4, affine=False).double().train()
    diff = torch.abs(bn(embed(t64(es))) - torch.nn.BatchNorm1d(4, eps=1e-4, affine=False).double().train()(t64(et)))
    l_rep = 2.0 * torch.log(diff.pow(4.0).sum())
    l_logit = torch.nn.functional.kl_div(torch.log_softmax(t64(zs), 1), torch.softmax(t64(zt), 1),
                                         reduction="sum") / 8
    close(value, l_rep + l_logit)


def nn_linear(params):
    """A torch Linear with a flax Dense's parameters (kernel [in, out] = weight transposed)."""
    kernel = np.asarray(params["kernel"], np.float64)
    layer = torch.nn.Linear(*kernel.shape).double()
    with torch.no_grad():
        layer.weight.copy_(t64(kernel.T))
        layer.bias.copy_(t64(params["bias"]))
    return layer


@pytest.mark.parametrize("normalize", [False, True])
def test_cc_paper_form_is_torchdistills_cckd_on_the_linear_embeddings(normalize):
    es, et = RNG.normal(size=(6, 5)), RNG.normal(size=(6, 7))
    method = methods.cc(form="paper", embed_dim=3, gamma=0.5, order=3, normalize=normalize)
    inputs = LossInputs.of(_outputs(None, pooled=es), _outputs(None, pooled=et))
    vars = method.init(jax.random.PRNGKey(0), inputs)
    value, _ = method.loss(vars, inputs, None)
    embed_s, embed_t = nn_linear(vars.params["embed_s"]["Dense_0"]), nn_linear(vars.params["embed_t"]["Dense_0"])
    unit = torch.nn.functional.normalize if normalize else (lambda x: x)
    close(value, ref.cckd(unit(embed_s(t64(es))), unit(embed_t(t64(et))), gamma=0.5, max_p=3))


def test_rotation_views_are_the_official_image_major_layout():
    images = RNG.normal(size=(3, 4, 4, 2))
    views = np.asarray(methods.feature.sskd.rotation_views(images))
    for n in range(3):
        for k in range(4):
            np.testing.assert_array_equal(views[4 * n + k], np.rot90(images[n], k, axes=(0, 1)))


@pytest.mark.parametrize("call, message", [
    (lambda: methods.cc(form="code"), "form"),
    (lambda: methods.cc(form="paper", gamma=-1.0), "gamma"),
    (lambda: methods.cc(normalize="yes"), "normalize"),
    (lambda: methods.pad_l2(eps=0.0), "eps"),
    (lambda: methods.kta(p=0.5), "p must"),
    (lambda: methods.srd(exponent=0.0), "exponent"),
    (lambda: methods.srd(bn_eps=-1.0), "bn_eps"),
    (lambda: methods.dist_plus(iota=-1.0), "iota"),
    (lambda: methods.sskd(ss_ratio=2.0), "ss_ratio"),
    (lambda: methods.sskd(aux_weight=-1.0), "aux_weight"),
    (lambda: methods.sskd(tf_temperature=0.0), "tf_temperature"),
], ids=["cc_form", "cc_gamma", "cc_normalize", "pad_eps", "kta_p", "srd_exponent", "srd_bn_eps", "dist_plus_iota", "sskd_ratio",
        "sskd_aux_weight", "sskd_temperature"])
def test_methods_refuse_bad_hyperparameters(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_feature_map_methods_train_in_the_jitted_step():
    """KTA, affinity, DIST+ and SSKD (which reruns both models on the rotated batch) in one chain, one
    jitted step on two tiny CIFAR ResNets (the registry-wide test runs them only with -m slow)."""
    import optax

    import jaxkd
    from tests.helpers import teacher_variables, tiny_conv_models, tiny_image_batch

    teacher, student = tiny_conv_models()
    batch = tiny_image_batch(batch_size=4)
    method = methods.parse("0.1 * ce + 50 * kta + affinity + dist_plus(beta=2, gamma=2) + sskd")
    with jax.enable_x64(False):
        state = jaxkd.create(student=student, teacher=teacher, teacher_variables=teacher_variables(teacher, batch),
                             method=method, tx=optax.sgd(0.05), sample_batch=batch, rng=jax.random.PRNGKey(0))
        before = jax.device_get(state.method_vars.params)
        state, metrics = jaxkd.make_train_step()(state, batch)
    for key in ("kta", "affinity", "dist_plus", "sskd", "sskd/ss", "sskd/tf", "sskd/aux", "dist_plus/channel"):
        assert np.isfinite(float(metrics[key])), key
    after = jax.device_get(state.method_vars.params)
    # The teacher's self-supervision head learns (from the auxiliary task), as do the adapters.
    assert not np.array_equal(before["sskd"]["teacher_head"]["fc1"]["kernel"], after["sskd"]["teacher_head"]["fc1"]["kernel"])
    assert not np.array_equal(before["kta"]["0"]["conv"]["kernel"], after["kta"]["0"]["conv"]["kernel"])
