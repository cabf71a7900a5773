"""Tests of experiments.config: typed ``--set`` overrides and the validation of every config."""

import dataclasses
import glob
import os
import re

import pytest

from experiments import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(ROOT, "experiments", "configs")
SHIPPED = sorted(p for p in glob.glob(os.path.join(CONFIG_DIR, "*.py"))
                 if not os.path.basename(p).startswith(("_", "lm_", "hf_"))
                 # experiments/merging.py's own config class (tests/test_experiment_merging.py loads it)
                 and os.path.basename(p) != "digits_merging.py")
# Language-model experiments have their own config classes (experiments/lm_*.py, experiments/hf_distill.py).
LM_SHIPPED = sorted(glob.glob(os.path.join(CONFIG_DIR, "lm_*.py")) + glob.glob(os.path.join(CONFIG_DIR, "hf_*.py")))


@pytest.mark.parametrize(
    "override, message",
    [
        ("steps=abc", "steps must be an integer, got steps='abc'"),
        ("steps=1.5", "steps must be an integer, got steps=1.5"),
        ("steps=0", "steps must be an integer >= 1, got steps=0"),
        ("teacher_steps=-5", "teacher_steps must be an integer >= 1, got teacher_steps=-5"),
        ("batch_size=True", "batch_size must be an integer, got batch_size=True"),
        ("eval_every=0", "eval_every must be an integer >= 1, got eval_every=0"),
        ("eval_batch_size=0", "eval_batch_size must be an integer >= 1, got eval_batch_size=0"),
        ("lr=nan", "lr must be a finite number, got lr=nan"),
        ("lr=-1", "lr must lie in (0, inf], got lr=-1"),
        ("teacher_lr=inf", "teacher_lr must be a finite number, got teacher_lr=inf"),
        ("lr=fast", "lr must be a number, got lr='fast'"),
        ("momentum=1.5", "momentum must lie in [0, 1), got momentum=1.5"),
        ("momentum=1", "momentum must lie in [0, 1), got momentum=1"),
        ("weight_decay=-1e-4", "weight_decay must lie in [0, inf], got weight_decay=-0.0001"),
        ("seeds=0", "seeds must be a non-empty tuple of distinct integers >= 0 ... got seeds=0"),
        ("seeds=()", "seeds must be a non-empty tuple of distinct integers >= 0 ... got seeds=()"),
        ("seeds=(0, -1)", "seeds[1] must be an integer >= 0, got seeds[1]=-1"),
        ("seeds=(0, 0)", "seeds must be distinct"),
        ("seeds=(0.5,)", "seeds[0] must be an integer, got seeds[0]=0.5"),
        ("data_seed=-1", "data_seed must be an integer >= 0, got data_seed=-1"),
        ("labels_per_class=0", "labels_per_class must be an integer >= 1, got labels_per_class=0"),
        ("labels_per_class=ten", "labels_per_class must be an integer or None, got labels_per_class='ten'"),
        ("meta_per_class=0", "meta_per_class must be an integer >= 1, got meta_per_class=0"),
        ("schedule=linear", "schedule must be one of ('cosine', 'multistep'), got schedule='linear'"),
        ("milestones=0.5", "milestones must be a tuple of increasing fractions ... got milestones=0.5"),
        ("milestones=(0.5, 1.0)", "milestones[1] must lie in (0, 1), got milestones[1]=1.0"),
        ("milestones=(0.75, 0.5)", "milestones must be strictly increasing"),
        ("augment=rotate", "augment must be one of ('none', 'shift', 'crop_flip'), got augment='rotate'"),
        ("methods={}", "methods must be a non-empty dict of run name -> method spec"),
        ("methods.kd=4", "methods['kd'] must be a non-empty method spec string"),
        ("methods.kd=", "methods['kd'] must be a non-empty method spec string"),
        ("methods=ce", "methods must be a non-empty dict of run name -> method spec ... got methods='ce'"),
        ("student_kwargs=(1,)", "student_kwargs must be a dict of model keyword ... got student_kwargs=(1,)"),
        ("tensorboard=yes", "tensorboard must be True or False, got tensorboard='yes'"),
        ("steps.x=3", "steps is not a dict field"),
    ],
)
def test_bad_override_names_key_and_value(override, message):
    """The error quotes the override as typed, then names the field, what it must be and the value
    (`` ... `` in ``message`` skips text)."""
    match = ".*".join(re.escape(part) for part in f"--set {override}: {message}".split(" ... "))
    with pytest.raises(ValueError, match=match):
        config_lib.apply_overrides(config_lib.Config(), [override])


def test_overrides_are_typed():
    """Overrides are adapted to the field types: integral floats for ints, raw text for strings."""
    cfg = config_lib.apply_overrides(
        config_lib.Config(),
        ["steps=1e3", "lr=1", "name=123", "data_dir=None", "teacher_checkpoint=runs/seed{seed}",
         "seeds=[3, 4]", "milestones=[0.5, 0.75]", "methods.kd_t8=ce + kd(temperature=8)",
         "labels_per_class=None", "student_kwargs={'hidden_sizes': (8,)}"],
    )
    assert cfg.steps == 1000 and isinstance(cfg.steps, int)
    assert cfg.lr == 1 and cfg.name == "123" and cfg.data_dir is None
    assert cfg.teacher_checkpoint == "runs/seed{seed}"
    assert cfg.seeds == (3, 4) and cfg.milestones == (0.5, 0.75)
    assert cfg.methods["kd_t8"] == "ce + kd(temperature=8)" and "kd" in cfg.methods
    assert cfg.labels_per_class is None and cfg.student_kwargs == {"hidden_sizes": (8,)}
    with pytest.raises(ValueError, match="unknown config key 'stpes'"):
        config_lib.apply_overrides(cfg, ["stpes=3"])


@pytest.mark.parametrize("path", SHIPPED, ids=os.path.basename)
def test_shipped_configs_validate(path):
    """Every config in experiments/configs loads (``load`` validates it)."""
    cfg = config_lib.load(path)
    config_lib.validate(cfg)
    assert cfg.methods
    from experiments.distill import parse_methods

    parsed = parse_methods(cfg, num_examples=50_000)  # CIFAR's size; every spec names registered methods with valid arguments
    assert set(parsed) == set(cfg.methods)


def lm_config_type(path):
    """The config class of a shipped LM config file (each script has its own)."""
    from experiments import hf_distill, lm_cross_tokenizer, lm_distill, lm_fusion, lm_merging

    name = os.path.basename(path)
    if name == "hf_distill.py":
        return hf_distill.HFDistillExperiment
    if name == "lm_cross_tokenizer.py":
        return lm_cross_tokenizer.CrossTokenizerExperiment
    if name == "lm_fusion.py":
        return lm_fusion.LMFusionExperiment
    if name == "lm_merging.py":
        return lm_merging.LMMergingExperiment
    return lm_distill.LMExperiment


@pytest.mark.parametrize("path", LM_SHIPPED, ids=os.path.basename)
def test_shipped_lm_configs_load_and_their_specs_parse(path):
    from jaxkd import methods

    cfg = config_lib.load(path, lm_config_type(path))  # validated
    constants = {k: getattr(cfg, k) for k in ("steps", "batch_size", "lr", "seq_len") if hasattr(cfg, k)}
    for spec in getattr(cfg, "methods", {}).values():
        methods.parse(spec, constants)
    if hasattr(cfg, "method"):  # one method (experiments/hf_distill.py)
        methods.parse(cfg.method, constants)


def test_defaults_validate():
    """The dataclass defaults are a valid config."""
    config_lib.validate(config_lib.load(None))


def test_validate_checks_configs_built_in_code(tmp_path):
    """``validate`` covers configs built in code, and ``load`` names the file of a bad one."""
    with pytest.raises(ValueError, match=r"eval_every must be an integer >= 1, got eval_every=0"):
        config_lib.validate(config_lib.Config(eval_every=0))
    with pytest.raises(ValueError, match=r"steps must be an integer, got steps=100\.0"):
        config_lib.validate(dataclasses.replace(config_lib.Config(), steps=100.0))
    path = tmp_path / "bad_config.py"
    path.write_text(
        "from experiments.config import Config\n\n\ndef get_config():\n    return Config(momentum=-0.1)\n"
    )
    message = f"{path}: momentum must lie in [0, 1), got momentum=-0.1"
    with pytest.raises(ValueError, match=re.escape(message)):
        config_lib.load(str(path))
