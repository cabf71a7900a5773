"""Mixed precision of trained participants (jaxkd.precision): one train step of every zoo architecture and of
an LM student under the bfloat16 policy against the float32 step from the same parameters on the same batch
(losses within bf16 rounding; parameters, optimizer state, logits and batch statistics float32), normalization
in float32, and the bad inputs (unknown names, float16, a resume under another precision)."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxkd
from jaxkd import methods, models, precision
from jaxkd.batch import TOKEN_NORMALIZER, token_normalizer
from jaxkd.models import lm as lm_models
from jaxkd.models.cifar_resnet import batch_norm

from tests.helpers import NUM_CLASSES
from tests.test_lm_experiments import corpus_dir  # noqa: F401 - the fixture: a few generated .py files

F32, BF16 = jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)
# CIFAR-sized images, the zoo's design size: on smaller ones the MobileNet/ShuffleNet last maps are 1x1 and
# BatchNorm normalizes over the batch alone (8 values), where a near-constant channel amplifies the bf16
# rounding of its input by mean/std (16x16: loss differences of 3-4% instead of 0.4%).
IMAGES = {"image": np.random.default_rng(0).normal(size=(8, 32, 32, 1)).astype(np.float32),
          "label": np.arange(8, dtype=np.int32) % NUM_CLASSES}
BF16_POLICY = precision.policy("bfloat16")

# One architecture per builder of the zoo (every resnet* is a CifarResNet and every wrn_* a WideResNet of
# another depth or width: the same modules, hence the same dtype handling), small enough to compile in
# seconds; test_every_zoo_builder_is_covered keeps this list complete. The 17-block MobileNetV2 and the
# ShuffleNets take 20-50 s to compile twice on 2 CPU cores: slow (`pytest -m slow`); their float32 parameters,
# logits and batch statistics under bf16 are also checked (traced) by tests/test_models_zoo.py.
ZOO = {
    "resnet8": {}, "wrn_16_2": {}, "mobilenetv2": {}, "shufflenetv1": {}, "shufflenetv2": {},
    "vit": dict(patch_size=8, hidden=32, depth=2, heads=4, mlp_dim=64), "mlp": {"hidden_sizes": (32,)},
    "resnet18": {}, "mobilenet_v2": {},  # torchvision's ImageNet models (one builder each for resnet18/34/50)
    "vgg8": {}, "cifar_resnet50": {},
}
SLOW = ("mobilenetv2", "shufflenetv1", "shufflenetv2", "resnet18", "mobilenet_v2", "vgg8", "cifar_resnet50")
# |loss_bf16 - loss_f32| <= LOSS_RTOL * loss_f32, from the same float32 parameters on the same batch. bfloat16
# keeps 8 significant bits: each rounding is off by at most 2^-9 relative (0.2%), and a forward pass rounds
# the activations about once per layer, so the logits of these 2-17-layer networks, and their cross-entropy,
# move by a few tenths of a percent (measured: 0.01-0.4%; the LM 0.04%). 2% leaves room; equal losses are
# refused (the policy was not applied).
LOSS_RTOL = 0.02
# The CIFAR ResNet50 rounds ~3x as many layers (50): measured 2.4%; 5% leaves room.
DEEP_LOSS_RTOL = {"cifar_resnet50": 0.05}


def _dtypes(tree):
    return {jnp.dtype(leaf.dtype) for leaf in jax.tree.leaves(tree) if jnp.issubdtype(leaf.dtype, jnp.floating)}


def _step_both(f32_model, bf16_model, batch, method, tx, variables, **create_kwargs):
    """One step of each model from the same ``variables`` on ``batch``: ``{policy name: (state, metrics)}``."""
    step = jaxkd.make_train_step()
    out = {}
    for name, model in (("float32", f32_model), ("bfloat16", bf16_model)):
        state = jaxkd.create(participants={"student": jaxkd.participants.student(model, variables, **create_kwargs)},
                             method=method, tx=tx, sample_batch=batch, rng=jax.random.PRNGKey(0))
        out[name] = step(state, batch)
    return out


def _check_float32_state(state, before):
    """Parameters and optimizer state float32 (and updated), batch statistics float32 (and updated)."""
    trained = state.trained["student"]
    assert _dtypes(trained.params) == {F32}
    assert _dtypes(state.opt_state) == {F32}
    assert _dtypes(trained.model_state) <= {F32}
    changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), trained.params, before["params"])
    assert any(jax.tree.leaves(changed))
    if "batch_stats" in before:
        stats = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), trained.model_state["batch_stats"],
                             before["batch_stats"])
        assert all(jax.tree.leaves(stats))  # every BatchNorm's running statistics moved, in float32


def _nonzero(params, seed=0):
    """``params`` with every all-zero leaf (biases, the ViT's zero-initialized head) drawn from N(0, 0.1^2):
    zero logits would give both precisions exactly log(num_classes)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda p: p if jnp.any(p != 0) else jnp.asarray(0.1 * rng.standard_normal(p.shape), p.dtype),
                        params)


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in sorted(ZOO)])
def test_a_bf16_step_of_every_zoo_architecture_matches_float32_within_bf16_rounding(name):
    batch = IMAGES
    f32 = models.get(name, num_classes=NUM_CLASSES, **ZOO[name])
    bf16 = models.get(name, num_classes=NUM_CLASSES, **precision.model_kwargs(BF16_POLICY, ZOO[name]))
    variables = f32.init(jax.random.PRNGKey(1), batch["image"])  # the float32 model's: they fit the bf16 model
    variables = {**variables, "params": _nonzero(variables["params"])}
    out = _step_both(f32, bf16, batch, methods.ce(), optax.sgd(0.05, momentum=0.9), variables)
    for state, _ in out.values():
        _check_float32_state(state, variables)
    (_, m32), (_, m16) = out["float32"], out["bfloat16"]
    loss32, loss16 = float(m32["loss"]), float(m16["loss"])
    assert loss16 != loss32  # the bf16 step did compute in bf16
    assert abs(loss16 - loss32) <= DEEP_LOSS_RTOL.get(name, LOSS_RTOL) * loss32
    # The forward pass: float32 logits, features in bfloat16.
    outputs = jax.jit(functools.partial(bf16.apply, train=False))(variables, batch["image"])
    assert outputs.logits.dtype == F32 and _dtypes(outputs.features) == {BF16}


def test_every_zoo_builder_is_covered():
    def builder(name):
        build = models._REGISTRY[name]
        return build.func if isinstance(build, functools.partial) else build

    assert {builder(n) for n in models.available()} == {builder(n) for n in ZOO}


@pytest.mark.parametrize("layer", [functools.partial(batch_norm, True, BF16, "bn"),
                                   lambda: nn.LayerNorm(epsilon=1e-6, dtype=BF16)],
                         ids=["batch_norm", "layer_norm"])
def test_normalization_under_bf16_is_computed_in_float32(layer):
    """flax's BatchNorm (the zoo's, in train mode) and LayerNorm (the ViT's) with ``dtype=bfloat16``: statistics,
    subtraction and scaling in float32, the result rounded to bfloat16 once — within one bf16 rounding of a
    float64 reference. Features far from zero make a bf16 normalization visibly worse (the mean rounded to
    bf16's 0.5 spacing near 100 shifts every output by up to 0.25 standard deviations)."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(100.0 + rng.standard_normal((16, 8)), BF16)
    module = layer()
    variables = module.init(jax.random.PRNGKey(0), x)
    y, state = module.apply(variables, x, mutable=["batch_stats"])
    assert y.dtype == BF16 and _dtypes(state) <= {F32} and _dtypes(variables["params"]) == {F32}
    x64 = np.asarray(x, np.float64)
    axis = 0 if "batch_stats" in variables else -1
    mean, var = x64.mean(axis, keepdims=True), x64.var(axis, keepdims=True)
    eps = 1e-5 if "batch_stats" in variables else 1e-6
    reference = (x64 - mean) / np.sqrt(var + eps)
    bound = 2.0**-8 * np.abs(reference) + 1e-4  # one bf16 rounding of the result (+ float32's own error)
    assert np.all(np.abs(np.asarray(y, np.float64) - reference) <= bound)
    in_bf16 = (x - jnp.mean(x, axis, keepdims=True)) * jax.lax.rsqrt(jnp.var(x, axis, keepdims=True) + eps)
    assert in_bf16.dtype == BF16 and not np.all(np.abs(np.asarray(in_bf16, np.float64) - reference) <= bound)
    if "batch_stats" in variables:  # running averages: 0.9 * 0 + 0.1 * mean, 0.9 * 1 + 0.1 * var, float32
        np.testing.assert_allclose(state["batch_stats"]["mean"], 0.1 * mean[0], rtol=1e-6)
        # flax averages the biased batch variance
        np.testing.assert_allclose(state["batch_stats"]["var"], 0.9 + 0.1 * var[0], rtol=1e-5)


def test_a_bf16_lm_student_step_matches_float32_within_bf16_rounding():
    vocab, length = 13, 8
    config = lm_models.LMConfig(vocab_size=vocab, d_model=16, num_layers=2, num_heads=2, d_ff=32, max_len=length)
    bf16_config = precision.lm_config(BF16_POLICY, config)
    assert (bf16_config.dtype, bf16_config.param_dtype) == (BF16, F32)
    assert precision.lm_config(precision.policy("float32"), bf16_config) == config
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, vocab, size=(4, length)).astype(np.int32)
    mask = np.arange(length)[None, :] < np.array([[8], [5], [8], [3]])
    batch = {"tokens": tokens, "mask": mask, TOKEN_NORMALIZER: token_normalizer(mask[:, 1:] & mask[:, :-1])}
    f32, bf16 = lm_models.lm(config), lm_models.lm(bf16_config)
    variables = jaxkd.sharding.unbox(f32.init(jax.random.PRNGKey(3), {"tokens": tokens}))
    out = _step_both(f32, bf16, batch, methods.lm_ce(), optax.adamw(1e-3), variables, input=("tokens", "mask"))
    for state, _ in out.values():
        _check_float32_state(state, variables)  # AdamW's moments included
    loss32, loss16 = float(out["float32"][1]["loss"]), float(out["bfloat16"][1]["loss"])
    assert loss16 != loss32 and abs(loss16 - loss32) <= LOSS_RTOL * loss32
    logits = jax.jit(lambda v: bf16.apply(v, {"tokens": tokens}, train=False).logits)(variables)
    assert logits.dtype == F32


# ----- bad inputs -----


def test_policies_and_their_dtypes():
    assert precision.policy("float32") == precision.Policy(F32, F32, F32)
    assert precision.policy("bfloat16") == precision.Policy(F32, BF16, F32)
    assert precision.model_kwargs(BF16_POLICY, {"hidden_sizes": (4,)}) == {"hidden_sizes": (4,), "dtype": BF16}
    tree = {"w": jnp.ones(2, F32), "n": jnp.arange(2)}
    cast = BF16_POLICY.cast_to_compute(tree)
    assert cast["w"].dtype == BF16 and cast["n"].dtype == tree["n"].dtype


def test_unknown_precision_lists_the_valid_names_and_float16_is_refused_with_the_reason():
    with pytest.raises(ValueError, match=r"unknown precision 'fp8'; valid: \['bfloat16', 'float32'\]"):
        precision.policy("fp8")
    with pytest.raises(ValueError, match="'float16' is not supported: jaxkd has no loss scaling, so float16 "
                                         "gradients underflow .* use 'bfloat16'"):
        precision.policy("float16")
    with pytest.raises(ValueError, match="set the precision only"):
        precision.model_kwargs(BF16_POLICY, {"dtype": "float32"})
    with pytest.raises(ValueError, match="takes a jaxkd.models.lm.LMConfig"):
        precision.lm_config(BF16_POLICY, {"dtype": "bfloat16"})


def test_experiment_configs_refuse_a_bad_precision():
    from experiments import config as config_lib
    from experiments.lm_distill import LMExperiment

    config = config_lib.load(None)
    assert config_lib.apply_overrides(config, ["precision=bfloat16"]).precision == "bfloat16"
    with pytest.raises(ValueError, match=r"--set precision=float16: precision: precision 'float16' is not "
                                         r"supported: jaxkd has no loss scaling"):
        config_lib.apply_overrides(config, ["precision=float16"])
    with pytest.raises(ValueError, match=r"unknown precision 'half'; valid: \['bfloat16', 'float32'\]"):
        config_lib.apply_overrides(config, ["precision=half"])
    lm = config_lib.load(None, LMExperiment)
    assert config_lib.apply_overrides(lm, ["precision=bfloat16"]).precision == "bfloat16"
    with pytest.raises(ValueError, match="student sets dtype='bfloat16': the student's dtypes come from precision"):
        config_lib.apply_overrides(lm, ["student={'d_model': 8, 'num_layers': 1, 'num_heads': 1, 'd_ff': 16, "
                                        "'dtype': 'bfloat16'}"])


def test_the_experiment_applies_the_precision_to_every_trained_participant_and_refuses_another_on_resume(
        tmp_path, monkeypatch):
    """Under ``precision=bfloat16`` the student and a peer (dml) are built in bf16, the frozen teacher (kd) in
    float32 (``frozen_dtype``); a resume in float32 is refused, naming both precisions."""
    from experiments import distill

    built = []
    real_get = distill.models.get
    monkeypatch.setattr(distill.models, "get", lambda name, **kw: built.append(kw) or real_get(name, **kw))
    args = ["--out", str(tmp_path / "run"), "--set", f"data_dir={tmp_path / 'tfds'}"] + sum((["--set", s] for s in (
        "teacher=mlp", "teacher_kwargs={'hidden_sizes': (16,)}", "teacher_steps=2", "student=mlp",
        "student_kwargs={'hidden_sizes': (8,)}", "peer=mlp", "peer_kwargs={'hidden_sizes': (4,)}", "steps=2",
        "eval_every=2", "seeds=(0,)", "batch_size=32", "eval_batch_size=500", "tensorboard=False",
        "methods={'dml': 'dml', 'kd': 'ce + kd'}")), [])
    distill.main(args + ["--set", "precision=bfloat16"])
    dtypes = {(kw["hidden_sizes"], jnp.dtype(kw.get("dtype", F32))) for kw in built}
    assert dtypes == {((16,), F32), ((8,), BF16), ((4,), BF16)}  # teacher, student, peer
    with pytest.raises(ValueError, match='precision: checkpoint has "bfloat16", given "float32"'):
        distill.main(args)


@pytest.mark.slow  # 11 s (a teacher pretrained, two students): the LM script's plumbing; `pytest -m slow`
def test_the_lm_experiment_trains_a_bf16_student_and_refuses_resuming_it_in_float32(corpus_dir, tmp_path):
    from experiments import lm_distill
    from tests.test_lm_experiments import TINY_LM, _write_config

    config = _write_config(tmp_path / "lm.py", "experiments.lm_distill.LMExperiment", name="tiny",
                           out_dir=str(tmp_path / "runs"), corpus_dir=corpus_dir, **{**TINY_LM, "seeds": (0,)})
    out = str(tmp_path / "run")
    summary = lm_distill.main(["--config", config, "--out", out, "--set", "precision=bfloat16"])
    assert all(np.isfinite(r["bpb_mean"]) for r in summary["rows"])
    with pytest.raises(ValueError, match='precision: checkpoint has "bfloat16", given "float32"'):
        lm_distill.main(["--config", config, "--out", out])
