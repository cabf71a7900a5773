"""The ImageNet ResNet-34 -> ResNet-18 config: its models and methods train in the jitted step, and the
experiment streams imagenet2012 (TFDS mock data) end to end."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxkd
from experiments import config as config_lib
from experiments import distill
from jaxkd import models

CONFIG = "experiments/configs/imagenet_resnet34_resnet18.py"
NUM_CLASSES = 10


def _log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


@pytest.mark.slow  # ~100 s on 2 shared CPU cores (resnet34 + resnet18 steps compiled twice). The fast suite covers
# its pieces: test_reviewkd_features_of_the_config_exist_in_both_models below, the models' logits against
# torchvision (test_imagenet_models.py), reviewkd and kd in the jitted step (test_ofd_reviewkd.py, test_methods.py)
# and the config's specs parsing (test_config.py::test_shipped_configs_validate).
def test_config_models_and_methods_take_one_jitted_step():
    """torchdistill's two rows on 2 images at 32x32 (the stage maps 8, 4, 2, 1 wide); KD's loss equals
    ``0.5 CE + 0.5 KL(teacher || student)`` at T = 1, computed from the two models' logits in NumPy."""
    cfg = config_lib.load(CONFIG)
    assert (cfg.dataset, cfg.teacher, cfg.student, cfg.batch_size, cfg.lr) == ("imagenet2012", "resnet34", "resnet18",
                                                                                256, 0.1)
    parsed = distill.parse_methods(cfg)
    teacher = models.get(cfg.teacher, num_classes=NUM_CLASSES)
    student = models.get(cfg.student, num_classes=NUM_CLASSES)
    rng = np.random.default_rng(0)
    batch = {"image": jnp.asarray(rng.standard_normal((2, 32, 32, 3)), jnp.float32), "label": jnp.array([3, 7])}
    tvars = teacher.init(jax.random.PRNGKey(1), batch["image"])
    for name in ("kd", "reviewkd"):
        state = jaxkd.create(student=student, teacher=teacher, teacher_variables=tvars, method=parsed[name],
                             tx=optax.sgd(0.1, momentum=0.9), sample_batch=batch, rng=jax.random.PRNGKey(0))
        svars = jax.device_get(state.student.variables())
        state, metrics = jaxkd.make_train_step()(state, batch)
        assert np.isfinite(float(metrics["loss"])) and float(metrics["loss"]) > 0
        if name == "kd":
            zs = np.asarray(student.apply(svars, batch["image"], train=True).logits, np.float64)
            zt = np.asarray(teacher.apply(tvars, batch["image"], train=False).logits, np.float64)
            ce = -_log_softmax(zs)[np.arange(2), np.asarray(batch["label"])].mean()
            pt = np.exp(_log_softmax(zt))
            kl = (pt * (_log_softmax(zt) - _log_softmax(zs))).sum(-1).mean()
            np.testing.assert_allclose(float(metrics["loss"]), 0.5 * ce + 0.5 * kl, rtol=1e-4)
        else:
            assert float(metrics["reviewkd"]) > 0


def test_reviewkd_features_of_the_config_exist_in_both_models():
    """The features the ReviewKD spec names, in the config's teacher and student at 224x224 (shapes only)."""
    cfg = config_lib.load(CONFIG)
    method = distill.parse_methods(cfg)["reviewkd"]
    assert method.needs.participants == ("teacher",)
    x = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
    names = ("stage1_preact", "stage2_preact", "stage3_preact", "stage4_preact", "pooled")
    assert all(name in cfg.methods["reviewkd"] for name in names)
    for arch in (cfg.teacher, cfg.student):
        model = models.get(arch, num_classes=1000)
        out = jax.eval_shape(lambda x: model.apply(model.init(jax.random.PRNGKey(0), x), x, train=False), x)
        assert [out.features[n].shape for n in names] == [(1, 56, 56, 64), (1, 28, 28, 128), (1, 14, 14, 256),
                                                          (1, 7, 7, 512), (1, 512)]


# Slow (the suite's time): the loader on mock imagenet2012 is in tests/test_imagenet_data.py.
@pytest.mark.slow
def test_experiment_streams_imagenet2012_from_tfds_mock_data(tmp_path):
    """The experiment on a streamed data set (tiny MLPs at 8x8 for speed): teacher, student, evaluation."""
    import tensorflow_datasets.testing as tfds_testing

    settings = ["teacher=mlp", "teacher_kwargs={'hidden_sizes': (16,)}", "student=mlp",
                "student_kwargs={'hidden_sizes': (8,)}", "teacher_steps=2", "steps=2", "eval_every=2", "batch_size=4",
                "eval_batch_size=4", "seeds=(0,)", "checkpoint_every=0", "tensorboard=False", "image_size=8",
                "resize_size=10", "methods={'kd': '0.5 * ce + 0.5 * kd(temperature=1)'}"]
    with tfds_testing.mock_data(policy=tfds_testing.MockPolicy.USE_CODE, num_examples=8):
        summary = distill.main(["--config", CONFIG, "--out", str(tmp_path / "run"), "--set", "data_dir=/nonexistent"]
                               + sum((["--set", s] for s in settings), []))
    rows = {r["run"]: r for r in summary["rows"]}
    assert set(rows) == {"teacher", "kd"} and summary["config"]["dataset"] == "imagenet2012"
    caption = (tmp_path / "run" / "results.md").read_text()
    assert "student on all 8 images for 2 steps; test top-1 on 8 images" in caption


def test_streamed_data_refuses_labels_per_class(tmp_path):
    import tensorflow_datasets.testing as tfds_testing

    with tfds_testing.mock_data(policy=tfds_testing.MockPolicy.USE_CODE, num_examples=8):
        with pytest.raises(ValueError, match="labels_per_class=2 is not supported on the streamed data set"):
            distill.main(["--config", CONFIG, "--out", str(tmp_path / "run"), "--set", "labels_per_class=2",
                          "--set", "data_dir=/nonexistent"])


def test_streamed_data_refuses_methods_with_a_meta_set():
    from experiments import streamed_data

    cfg = config_lib.apply_overrides(config_lib.load(CONFIG), ["methods={'tgeo': 'tgeo_kd(temperature=1.5)', 'kd': 'kd'}"])
    with pytest.raises(ValueError, match=r"methods \['tgeo'\] hold out a meta set"):
        streamed_data.check_supported(cfg, distill.parse_methods(cfg))
    streamed_data.check_supported(cfg, {"kd": distill.parse_methods(cfg)["kd"]})  # no meta set: accepted
