"""The experiment runner's guards: every script's config validated (LM ones included), one-line CLI errors,
one process per run folder, metrics logs that survive stray lines, pretrained-model keys that change with
every setting and the data, and a batch never silently cut to the training split."""

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from experiments import config as config_lib
from experiments import distill, lm_cross_tokenizer, lm_distill, lm_fusion, lm_training, report, runner
from experiments.run_log import MetricsLog, read_records
from jaxkd.data import PackedText
from jaxkd.models import lm as lm_models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize(
    "override, message",
    [
        ("lr=-1.0", "lr must lie in (0, inf], got lr=-1.0"),
        ("steps=0", "steps must be an integer >= 1, got steps=0"),
        ("steps=abc", "steps must be an integer, got steps='abc'"),
        ("seeds=0", "seeds must be a non-empty tuple of distinct integers"),
        ("eval_every=0", "eval_every must be an integer >= 1, got eval_every=0"),
        ("max_eval_rows=0", "max_eval_rows must be an integer >= 1, got max_eval_rows=0"),
        ("microbatches=3", "microbatches must divide batch_size, got batch_size=32, microbatches=3"),
        ("student={'d_modle': 8}", "unknown student field 'd_modle' (did you mean 'd_model'?)"),
        ("stpes=3", "unknown config key 'stpes' (did you mean 'steps'?)"),
        ("weight_decay=-1", "weight_decay must lie in [0, inf], got weight_decay=-1"),
    ],
)
def test_lm_config_is_validated(override, message):
    with pytest.raises(ValueError) as error:
        config_lib.apply_overrides(lm_distill.LMExperiment(), [override])
    assert message in str(error.value)
    if "divide" not in message:  # a check across fields names both instead
        assert str(error.value).startswith(f"--set {override}")


@pytest.mark.parametrize("config_type", [lm_distill.LMExperiment, lm_cross_tokenizer.CrossTokenizerExperiment,
                                         lm_fusion.LMFusionExperiment, config_lib.Config])
def test_every_script_config_refuses_a_nonpositive_step_budget(config_type):
    field = "base_steps" if config_type is lm_fusion.LMFusionExperiment else "steps"
    config_lib.validate(config_type())
    with pytest.raises(ValueError, match=f"{field} must be an integer >= 1, got {field}=0"):
        config_lib.validate(dataclasses.replace(config_type(), **{field: 0}))


def test_a_config_file_of_another_script_is_refused_by_name(tmp_path):
    path = tmp_path / "c.py"
    path.write_text("from experiments.lm_distill import LMExperiment\n\ndef get_config():\n    return LMExperiment()\n")
    with pytest.raises(ValueError, match="get_config\\(\\) must return experiments.config.Config, got LMExperiment"):
        config_lib.load(str(path))
    assert isinstance(config_lib.load(str(path), lm_distill.LMExperiment), lm_distill.LMExperiment)
    with pytest.raises(FileNotFoundError, match="no config file at"):
        config_lib.load(str(tmp_path / "missing.py"), lm_distill.LMExperiment)


def _script(module, *args):
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": ROOT})


@pytest.mark.parametrize("module", ["experiments.distill", "experiments.lm_distill",
                                    "experiments.lm_cross_tokenizer", "experiments.lm_fusion"])
def test_cli_errors_are_one_line_naming_the_field(module, tmp_path):
    done = _script(module, "--set", "stpes=3", "--out", str(tmp_path / "run"))
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert lines == [lines[-1]] and lines[0].startswith("error: --set stpes=3: unknown config key 'stpes'")
    assert "(did you mean '" in lines[0] and "steps'?)" in lines[0]


def test_debug_shows_the_traceback(tmp_path):
    done = _script("experiments.lm_distill", "--set", "lr=-1.0", "--debug", "--out", str(tmp_path / "run"))
    assert done.returncode != 0 and "Traceback" in done.stderr and "lr must lie in (0, inf]" in done.stderr
    done = _script("experiments.lm_distill", "--config", str(tmp_path / "nope.py"))
    assert done.returncode == 2 and done.stderr.strip() == f"error: no config file at {tmp_path / 'nope.py'}"


def test_entry_point_names_unexpected_errors_and_points_at_debug(capsys):
    def main(argv):
        raise KeyError("boom")

    with pytest.raises(SystemExit) as exit_:
        runner.entry_point(main, [])
    assert exit_.value.code == 1
    assert capsys.readouterr().err.strip() == "error: KeyError: 'boom' (re-run with --debug for the traceback)"


def test_a_run_folder_is_held_by_one_process(tmp_path):
    with runner.folder_lock(str(tmp_path), "run folder"):
        with pytest.raises(runner.RunFolderBusy, match=f"run folder {tmp_path} is in use by another process "
                                                       f"\\(pid {os.getpid()}\\)"):
            with runner.folder_lock(str(tmp_path), "run folder"):
                pass
        # Another process is refused too (flock, not a pid file).
        code = ("import sys; from experiments import runner\n"
                f"with runner.folder_lock({str(tmp_path)!r}, 'run folder'): pass")
        done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                              env={**os.environ, "PYTHONPATH": ROOT})
        assert done.returncode != 0 and "RunFolderBusy" in done.stderr
    with runner.folder_lock(str(tmp_path), "run folder"):  # released when the holder is done
        pass


def test_stray_lines_in_metrics_never_block_a_rerun(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    good = [{"run": "kd", "seed": 0, "step": s, "loss": 1.0 / s, "test_accuracy": 0.5} for s in (1, 2, 3)]
    path.write_text(json.dumps(good[0]) + "\n42\n[1, 2]\n{\"note\": \"by hand\"}\n" + json.dumps(good[1]) + "\n"
                    + json.dumps(good[2]) + "\n{\"run\": \"kd\", \"se")
    assert read_records(str(path)) == good
    assert "skipped 4 line(s) that are not metrics records (first: line 2)" in caplog.text
    log = MetricsLog(str(tmp_path), tensorboard=False)
    log.resume("kd", 0, 2)
    log.write({"run": "kd", "seed": 0, "step": 3, "loss": 0.25})
    log.close()
    assert [json.loads(line) for line in path.read_text().splitlines()] == good[:2] + [
        {"run": "kd", "seed": 0, "step": 3, "loss": 0.25}]
    path.write_text(path.read_text() + "not json\n")
    report.plot_curves(str(path), str(tmp_path / "curves.png"), [("loss", "loss"), ("test_accuracy", "acc")])
    assert os.path.getsize(tmp_path / "curves.png") > 0


def _rows(seed: int) -> PackedText:
    tokens = np.random.default_rng(seed).integers(3, 259, (8, 16)).astype(np.int32)
    return PackedText(tokens=tokens, mask=np.ones_like(tokens, bool), num_byte_targets=8 * 15, num_documents=8,
                           num_text_bytes=8 * 16, paths=("a.py",))


def test_pretrained_model_key_changes_with_every_setting_and_the_data():
    config = lm_models.LMConfig(vocab_size=259, max_len=16, d_model=8, num_layers=1, num_heads=1, d_ff=16)
    base = dict(steps=10, lr=1e-3, warmup_steps=2, weight_decay=0.01, batch_size=4, microbatches=1, seed=0,
                init_key=None)
    key = lm_training.model_key(config, _rows(0), **base)
    assert lm_training.model_key(config, _rows(0), **base) == key  # deterministic
    changed = {"steps": 11, "lr": 2e-3, "warmup_steps": 3, "weight_decay": 0.0, "batch_size": 8, "microbatches": 2,
               "seed": 1, "init_key": "abc"}
    for name, value in changed.items():
        assert lm_training.model_key(config, _rows(0), **{**base, name: value}) != key, name
    assert lm_training.model_key(config, _rows(1), **base) != key  # a rewritten corpus
    wider = dataclasses.replace(config, d_ff=32)
    assert lm_training.model_key(wider, _rows(0), **base) != key


def test_a_batch_larger_than_the_student_split_is_refused():
    labels = np.repeat(np.arange(10), 10)
    split = distill.data.Split(np.zeros((100, 8, 8, 1), np.uint8), labels.astype(np.int32), 10, "digits", "train")
    dataset = distill.Data(split, split, [], (0.0,), (1.0,))
    cfg = config_lib.Config(batch_size=256, labels_per_class=10)
    with pytest.raises(ValueError, match=r"batch_size=256 is larger than the student's training split: 100 examples "
                                         r"\(labels_per_class=10\); set batch_size <= 100"):
        distill.check_batch_size(cfg, dataset, distill.parse_methods(cfg))
    cfg = config_lib.Config(batch_size=90, methods={"tgeo": "tgeo_kd"}, meta_per_class=2)
    with pytest.raises(ValueError, match="80 examples after the meta set of 'tgeo' is held out"):
        distill.check_batch_size(cfg, dataset, distill.parse_methods(cfg))
    distill.check_batch_size(dataclasses.replace(cfg, batch_size=80), dataset, distill.parse_methods(cfg))


@pytest.mark.slow  # 12 s: resuming from the newest intact checkpoint stays in the suite (tests/test_resume.py); `pytest -m slow`
def test_a_failed_step_names_the_checkpoint_the_rerun_resumes_from(tmp_path, monkeypatch):
    """A step that fails after its state was donated (out of memory) cannot go on in-process: the error says
    which checkpoint the re-run resumes from, and the re-run finishes."""
    import jaxkd
    from jaxkd.steps import StepFailedError
    from tests.test_resume import SETTINGS

    real = jaxkd.make_train_step

    def failing(**kwargs):
        step = real(**kwargs)

        def train_step(state, batch):
            if int(state.step) == 7 and any(name == "teacher" for name, _ in state.participants):
                raise StepFailedError("RESOURCE_EXHAUSTED: out of memory (simulated); the state was donated.")
            return step(state, batch)

        return train_step

    args = ["--out", str(tmp_path / "run"), "--set", f"data_dir={tmp_path / 'tfds'}", "--set", "compilation_cache=None"]
    args += sum((["--set", s] for s in SETTINGS), [])
    monkeypatch.setattr(jaxkd, "make_train_step", failing)
    with pytest.raises(StepFailedError, match="run 'kd' seed 0 at step 8: RESOURCE_EXHAUSTED.*Re-running the same "
                                              "command resumes the run from its checkpoint at step 7"):
        distill.main(args)
    monkeypatch.setattr(jaxkd, "make_train_step", real)
    summary = distill.main(args)
    assert [r["run"] for r in summary["rows"]] == ["teacher", "kd"]
