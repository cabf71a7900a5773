"""The three LM experiment scripts end to end on tiny settings: a folder of a few generated ``.py`` files
(``corpus_dir``) instead of the standard library, models of a few hundred parameters, a few steps. What is
checked is the plumbing a researcher relies on: configs read from a file by the command line, every run's
row in the table with finite figures, the curves drawn, the teacher pretrained once and reused by the next
experiment that needs it, the cross-tokenizer cache and the fusion scoring and sampling."""

import json
import math
import os

import pytest

from experiments import lm_cross_tokenizer, lm_distill, lm_fusion
from jaxkd.data.text.stdlib_corpus import split_of

TINY_LM = dict(
    seq_len=32, max_train_files=None, max_eval_files=None, max_eval_rows=8,
    teacher=dict(d_model=16, num_layers=1, num_heads=2, d_ff=32), student=dict(d_model=8, num_layers=1, num_heads=1, d_ff=16),
    teacher_steps=3, steps=3, warmup_steps=1, batch_size=4, eval_every=2,
)


def _source(package: str, i: int) -> str:
    """A small, distinct Python module."""
    body = "".join(f"    total = total * {j + 2} + x{j % 3}  # step {j}\n" for j in range(i % 5 + 3))
    return (f'"""Module {i} of {package or "the top level"}."""\n\n\ndef f{i}(x0, x1, x2):\n    total = {i}\n'
            f"{body}    return total\n\n\nclass C{i}:\n    value = {i * 7}\n")


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    """Files at the top level and in two packages, each group with files in all three splits."""
    root = tmp_path_factory.mktemp("corpus")
    for package in ("", "alpha", "beta"):
        counts, i = {"train": 0, "validation": 0, "test": 0}, 0
        while min(counts.values()) < 1 or counts["train"] < 4:
            relative = f"{package}/m{i}.py" if package else f"m{i}.py"
            split = split_of(relative)
            if counts[split] < (6 if split == "train" else 2):
                os.makedirs(os.path.dirname(root / relative), exist_ok=True)
                (root / relative).write_text(_source(package, i))
                counts[split] += 1
            i += 1
    return str(root)


def _write_config(path, experiment: str, **fields) -> str:
    module, cls = experiment.rsplit(".", 1)
    path.write_text(f"from {module} import {cls}\n\n\ndef get_config():\n    return {cls}(**{fields!r})\n")
    return str(path)


def _finite(x: float) -> bool:
    return isinstance(x, float) and math.isfinite(x)


@pytest.mark.slow  # 33 s end to end: ALM's rows, method and step are in tests/test_cross_tokenizer.py; `pytest -m slow`
def test_lm_experiment_then_cross_tokenizer_reuses_its_teacher(corpus_dir, tmp_path, capsys):
    runs = str(tmp_path / "runs")
    config = _write_config(tmp_path / "lm.py", "experiments.lm_distill.LMExperiment", name="tiny", out_dir=runs,
                           corpus_dir=corpus_dir, seeds=(0, 1),
                           methods={"scratch": "lm_ce", "token_kd": "lm_ce + token_kd(divergence='forward_kl')"},
                           **TINY_LM)
    out = str(tmp_path / "lm_run")
    summary = lm_distill.main(["--config", config, "--set", "steps=4", "--out", out])
    assert summary["config"]["steps"] == 4  # --set overrides the file
    assert [r["run"] for r in summary["rows"]] == ["scratch", "token_kd"]
    for row in summary["rows"]:
        assert len(row["bpb_per_seed"]) == 2 and all(_finite(v) for v in row["bpb_per_seed"])
    assert _finite(summary["teacher_bpb"]["teacher"])
    assert f"the .py files of {corpus_dir}" in summary["table"]
    for name in ("results.json", "results.md", "curves.png", "metrics.jsonl"):
        assert os.path.getsize(os.path.join(out, name)) > 0
    evaluated = {(r["run"], r["seed"], r["step"]) for r in map(json.loads, open(os.path.join(out, "metrics.jsonl")))
                 if "val_bpb" in r}
    assert {("token_kd", 1, 2), ("token_kd", 1, 4), ("teacher", lm_distill.TEACHER_SEED, 3)} <= evaluated
    (teacher_dir,) = os.listdir(os.path.join(runs, "teachers"))
    capsys.readouterr()

    config = _write_config(tmp_path / "xtok.py", "experiments.lm_cross_tokenizer.CrossTokenizerExperiment",
                           name="tiny_xtok", out_dir=runs, corpus_dir=corpus_dir, seeds=(0,), bpe_vocab_size=270,
                           student_len=24, **{k: v for k, v in TINY_LM.items() if k != "max_eval_rows"},
                           max_eval_rows=6, precision="bfloat16",  # bf16 students (the f32 teacher reused)
                           methods={"bpe_scratch": lm_cross_tokenizer.BPE_SCRATCH,
                                    "bpe_alm": lm_cross_tokenizer.BPE_SCRATCH + " + alm(cached=True)"})
    out = str(tmp_path / "xtok_run")
    summary = lm_cross_tokenizer.main(["--config", config, "--out", out])
    err = capsys.readouterr().err
    assert f"teacher: reusing {os.path.join(runs, 'teachers', teacher_dir)}" in err  # not pretrained again
    assert os.listdir(os.path.join(runs, "teachers")) == [teacher_dir]
    assert [r["run"] for r in summary["rows"]] == ["bpe_scratch", "bpe_alm"]
    for row in summary["rows"]:
        assert row["tokenizer"] == "bpe" and row["vocab_size"] == 270
        assert _finite(row["validation_bpb_mean"]) and _finite(row["test_bpb_mean"])
    assert any(name.startswith("alm_log_probs-") for name in os.listdir(os.path.join(runs, "teachers", teacher_dir)))
    assert os.path.getsize(os.path.join(out, "curves.png")) > 0


@pytest.mark.slow  # 15 s end to end: the fused distributions and their sampling are in tests/test_fusion_decoding.py; `pytest -m slow`
def test_lm_fusion_scores_and_samples_every_fused_model(corpus_dir, tmp_path):
    config = _write_config(
        tmp_path / "fusion.py", "experiments.lm_fusion.LMFusionExperiment", name="tiny_fusion",
        out_dir=str(tmp_path / "runs"), corpus_dir=corpus_dir, seq_len=32, domains=("alpha", "beta"),
        max_general_files=None, max_eval_rows=4, large=dict(d_model=16, num_layers=1, num_heads=2, d_ff=32),
        small=dict(d_model=8, num_layers=1, num_heads=1, d_ff=16), base_steps=2, tune_steps=2, warmup_steps=1,
        batch_size=4, alpha_grid=(0.0, 0.5, 1.0), prompt_bytes=8, new_tokens=4)
    summary = lm_fusion.main(["--config", config, "--out", str(tmp_path / "run")])
    names = set(summary["bpb"])
    assert {"large base", "small base", "small tuned on alpha", "small tuned on beta",
            "dynamic fusion: large + 2 experts"} <= names
    assert sum(name.startswith("proxy tuning") for name in names) == 2
    for by_column in summary["bpb"].values():
        assert set(by_column) == {"alpha", "beta", "general"} and all(_finite(v) for v in by_column.values())
    # Dynamic fusion's mean weight per expert, inside the searched grid's range.
    for name, by_column in summary["dlf_mean_alpha"].items():
        experts = 2 if name.endswith("2 experts") else 1
        for weights in by_column.values():
            assert len(weights) == experts and all(0.0 <= w <= 1.0 for w in weights)
    # One greedy sample block per domain, each continued by the three decoders.
    assert len(summary["samples"]) == 2
    for block in summary["samples"]:
        assert all(f"{name}:" in block for name in ("large base", "proxy-tuned", "dynamic fusion (2 experts)"))
    assert os.path.getsize(tmp_path / "run" / "results.md") > 0


@pytest.mark.parametrize("experiment", [lm_cross_tokenizer.CrossTokenizerExperiment, lm_fusion.LMFusionExperiment])
def test_every_lm_experiment_takes_a_precision(experiment):
    from experiments.config import validate

    validate(experiment(precision="bfloat16"))
    with pytest.raises(ValueError, match="no loss scaling"):
        validate(experiment(precision="float16"))
    with pytest.raises(ValueError, match=r"unknown precision 'bf16'; valid: \['bfloat16', 'float32'\]"):
        validate(experiment(precision="bf16"))


def test_cross_tokenizer_students_take_their_dtypes_from_precision():
    from experiments.config import validate

    with pytest.raises(ValueError, match="student sets dtype='bfloat16': the student's dtypes come from precision"):
        validate(lm_cross_tokenizer.CrossTokenizerExperiment(student={**TINY_LM["student"], "dtype": "bfloat16"}))
