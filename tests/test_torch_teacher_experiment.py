"""The experiment with a published-style PyTorch teacher (``--set teacher_checkpoint=...pth``), and the RepDistiller
configs that the CIFAR VGGs and ResNet50 make possible."""

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from experiments import config as config_lib  # noqa: E402
from experiments import distill  # noqa: E402
from jaxkd import models  # noqa: E402
from tests.torch_reference import repdistiller as official  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _digits_resnet8(seed: int) -> "torch.nn.Module":
    """RepDistiller's ``resnet8`` for 1-channel 8x8 digits: the official definition with a 1-channel stem and
    global pooling (its ``AvgPool2d(8)`` is global on 32x32 CIFAR images, as jaxkd's is on any size)."""
    torch.manual_seed(seed)
    model = official.build("resnet8", 10)
    model.conv1 = torch.nn.Conv2d(1, 16, kernel_size=3, padding=1, bias=False)
    model.avgpool = torch.nn.AdaptiveAvgPool2d(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def _save_teachers(tmp_path):
    """Two RepDistiller-style ``{"model": state_dict}`` checkpoints, ``a/seed0`` and ``b/seed0``."""
    teachers = {}
    for tag, seed in (("a", 0), ("b", 1)):
        teachers[tag] = _digits_resnet8(seed)
        os.makedirs(tmp_path / tag / "seed0")
        torch.save({"epoch": 240, "model": teachers[tag].state_dict()}, tmp_path / tag / "seed0" / "ckpt_epoch_240.pth")
    return teachers


def _args(tmp_path, tag):
    return ["--out", str(tmp_path / "run"), "--set", f"data_dir={tmp_path / 'tfds'}", "--set", "teacher=resnet8",
            "--set", "student=mlp", "--set", "student_kwargs={'hidden_sizes': (8,)}", "--set", "steps=2",
            "--set", "eval_every=2", "--set", "seeds=(0,)", "--set", "batch_size=32", "--set", "eval_batch_size=512",
            "--set", "methods={'kd': 'ce + kd'}",
            "--set", f"teacher_checkpoint={tmp_path / tag / 'seed{seed}' / 'ckpt_epoch_240.pth'}"]


# Slow (the suite's time): load_torch and the experiment's teacher_checkpoint branch are tested apart.
@pytest.mark.slow
def test_a_pth_teacher_replaces_the_teacher_phase(tmp_path):
    """A ``.pth`` per seed (``{seed}`` in the path) is the teacher: no teacher is trained, and its reported test
    accuracy is the PyTorch model's own on the same normalized images."""
    teachers = _save_teachers(tmp_path)
    summary = distill.main(_args(tmp_path, "a"))
    assert not os.path.exists(tmp_path / "run" / "teachers")  # nothing trained in the teacher phase
    rows = {r["run"]: r for r in summary["rows"]}
    assert set(rows) == {"teacher", "kd"}

    cfg = config_lib.apply_overrides(config_lib.Config(), [f"data_dir={tmp_path / 'tfds'}", "eval_batch_size=512"])
    correct = total = 0
    for batch in distill.load_data(cfg).test_batches:
        keep = np.asarray(batch["mask"]) > 0
        with torch.no_grad():
            logits = teachers["a"](torch.from_numpy(np.asarray(batch["image"])[keep]).permute(0, 3, 1, 2)).numpy()
        correct += int((logits.argmax(-1) == np.asarray(batch["label"])[keep]).sum())
        total += int(keep.sum())
    assert rows["teacher"]["top1_mean"] == pytest.approx(100.0 * correct / total, abs=1e-6)


@pytest.mark.slow  # 20 s; the fingerprint that refuses it is the Orbax teacher's (tests/test_resume.py), fed by load_torch here
def test_a_resume_with_another_pth_teacher_is_refused(tmp_path):
    _save_teachers(tmp_path)
    distill.main(_args(tmp_path, "a"))
    with pytest.raises(ValueError, match=r"teachers\.teacher\.values: checkpoint has"):
        distill.main(_args(tmp_path, "b"))


def test_teacher_checkpoint_kinds():
    assert config_lib.is_torch_checkpoint("runs/seed{seed}/ckpt_epoch_240.pth")
    assert config_lib.is_torch_checkpoint("t.PT") and config_lib.is_torch_checkpoint("/x/teacher.safetensors")
    assert not config_lib.is_torch_checkpoint("runs/teachers/seed{seed}/teacher")


@pytest.mark.parametrize("config", ["cifar100_vgg13_vgg8", "cifar100_resnet50_mobilenetv2", "cifar100_resnet50_vgg8"])
def test_repdistiller_configs_build_their_models(config):
    """The configs parse (every method spec, tests/test_config.py validates them too) and name registered models
    whose official parameter counts at 100 classes are RepDistiller's (tests/test_torch_load.py)."""
    cfg = config_lib.load(os.path.join(ROOT, "experiments", "configs", f"{config}.py"))
    assert set(distill.parse_methods(cfg, num_examples=50_000)) == set(cfg.methods)
    for name in (cfg.teacher, cfg.student):
        assert models.get(name, num_classes=100).name == name
    assert cfg.lr == (0.01 if cfg.student == "MobileNetV2" else 0.05)  # RepDistiller's train_student.py
    cross = cfg.teacher == "ResNet50"
    assert ("fsp" in cfg.methods) != cross and ("kdsvd" in cfg.methods) != cross


@pytest.mark.slow  # ~2 minutes (90 method states); the fast suite parses every spec (above) and checks the models
@pytest.mark.parametrize("config", ["cifar100_vgg13_vgg8", "cifar100_resnet50_mobilenetv2", "cifar100_resnet50_vgg8"])
def test_every_method_of_the_repdistiller_configs_creates_a_state_on_its_pair(config):
    """Each method's features exist on the pair and fit (channels, resolutions, the BatchNorms OFD reads): the
    train state is created abstractly (``jax.eval_shape``) on a CIFAR-shaped batch."""
    import jax
    import jax.numpy as jnp
    import optax

    import jaxkd

    cfg = config_lib.load(os.path.join(ROOT, "experiments", "configs", f"{config}.py"))
    teacher, student = models.get(cfg.teacher, num_classes=100), models.get(cfg.student, num_classes=100)
    batch = {"image": np.zeros((4, 32, 32, 3), np.float32), "label": np.arange(4, dtype=np.int32),
             "index": np.arange(4, dtype=np.int32)}
    abstract = jax.eval_shape(teacher.init, jax.random.key(0), batch["image"])
    teacher_vars = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), abstract)
    for run, method in distill.parse_methods(cfg, num_examples=50_000).items():
        participants = {p: jaxkd.Participant(teacher, teacher_vars, trains=False)
                        for p in method.needs.participants if p not in method.needs.trained}
        jax.eval_shape(lambda: jaxkd.create(student=student, method=method, tx=optax.sgd(0.1), rng=jax.random.key(0),
                                            participants=participants, sample_batch=batch))
