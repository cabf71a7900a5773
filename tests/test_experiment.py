"""The experiment script end to end on tiny settings (digits, and CIFAR-100 through TFDS mock data)."""

import json
import os

import jax
import numpy as np
import pytest

from experiments import distill
from jaxkd.steps import NonFiniteError

TINY = [
    "teacher=mlp", "teacher_kwargs={'hidden_sizes': (32,)}", "student=mlp",
    "student_kwargs={'hidden_sizes': (8,)}", "teacher_steps=30", "steps=20", "eval_every=10",
    "seeds=(0, 1)", "batch_size=32", "eval_batch_size=128",
]


def test_default_experiment_pipeline_on_tiny_settings(tmp_path):
    summary = distill.main(["--out", str(tmp_path / "run"), "--set", f"data_dir={tmp_path / 'tfds'}"]
                           + sum((["--set", s] for s in TINY), []))
    run = tmp_path / "run"
    # The run's rbg keys stay inside it: importing or running the script leaves the process's default PRNG.
    assert jax.config.jax_default_prng_impl == "threefry2x32"
    assert {"config.json", "metrics.jsonl", "results.json", "results.md", "learning_curves.png"} <= set(os.listdir(run))
    events = os.listdir(run / "tensorboard" / "seed1" / "kd")
    assert events and all(e.startswith("events.out.tfevents") for e in events)
    assert sorted(os.listdir(run / "teachers")) == ["seed0", "seed1"]
    rows = {r["run"]: r for r in summary["rows"]}
    assert set(rows) == {"teacher", "scratch", "kd"}
    # The teacher, trained on the whole split, must have learned something (10 classes: chance 10%).
    assert rows["teacher"]["top1_mean"] > 50.0
    records = [json.loads(line) for line in open(run / "metrics.jsonl")]
    # The table reports each student run's test accuracy after its last step, as logged.
    for name in ("scratch", "kd"):
        final = [r["test_accuracy"] for r in records if r["run"] == name and r.get("step") == 20 and "test_accuracy" in r]
        assert [round(100 * a, 6) for a in final] == [round(a, 6) for a in rows[name]["top1_per_seed"]]
    train = [r for r in records if r["run"] == "kd" and r["seed"] == 1 and "loss" in r]
    assert [r["step"] for r in train] == list(range(1, 21))  # every step logged
    assert {"ce", "kd", "loss", "lr", "grad_norm"} <= set(train[0])
    assert "| kd | mlp | `ce + kd(temperature=4)` |" in summary["table"]


@pytest.mark.slow  # 11 s: tests/test_registry.py trains every method by name in the jitted step; `pytest -m slow`
def test_stateful_and_meta_batch_methods_run_by_name(tmp_path):
    summary = distill.main(
        ["--out", str(tmp_path / "run"), "--set", f"data_dir={tmp_path / 'tfds'}"]
        + sum((["--set", s] for s in TINY), [])
        + ["--set", "seeds=(0,)", "--set", "labels_per_class=5", "--set", "batch_size=16",
           "--set", "methods={'taid': 'ce + taid(total_steps=steps)', 'tgeo': 'tgeo_kd', 'dho': 'dho', 'kd_dp': 'kd_dp'}"]
    )
    assert {r["run"] for r in summary["rows"]} == {"teacher", "taid", "tgeo", "dho", "kd_dp"}
    records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    tgeo = [r for r in records if r["run"] == "tgeo" and "loss" in r]
    assert len(tgeo) == 20 and "tgeo_kd/meta_ce" in tgeo[0]
    taid_t = [r["taid/t"] for r in records if r["run"] == "taid" and "loss" in r]
    assert taid_t[-1] > taid_t[0]


def test_cifar100_through_tfds_mock_data(tmp_path):
    import tensorflow_datasets.testing as tfds_testing

    with tfds_testing.mock_data(policy=tfds_testing.MockPolicy.USE_CODE, num_examples=64):
        summary = distill.main(
            ["--config", "experiments/configs/cifar100_resnet32x4_resnet8x4.py", "--out", str(tmp_path / "run")]
            + sum((["--set", s] for s in TINY), [])
            + ["--set", "seeds=(0,)", "--set", "labels_per_class=None", "--set", "eval_batch_size=32",
               "--set", "methods={'scratch': 'ce', 'kd': '0.1 * ce + 0.9 * kd(temperature=4)'}"]
        )
    assert summary["config"]["dataset"] == "cifar100"
    assert {r["run"] for r in summary["rows"]} == {"teacher", "scratch", "kd"}


def test_bad_method_specs_and_divergence_stop_the_run_before_any_table(tmp_path):
    with pytest.raises(ValueError, match=r"config methods\['kd'\]: .*temperature must be a number"):
        distill.main(["--out", str(tmp_path / "a"), "--set", "methods.kd=ce + kd(temperature='4')"])
    with pytest.raises(NonFiniteError):
        distill.main(["--out", str(tmp_path / "b"), "--set", f"data_dir={tmp_path / 'tfds'}", "--set", "teacher_lr=1e9"]
                     + sum((["--set", s] for s in TINY), []))
    assert not (tmp_path / "b" / "results.md").exists()


def test_kd_beats_scratch_on_every_seed_with_three_labels_per_class(tmp_path):
    """The learning outcome, cheaply (about 30 s): an MLP teacher trained on the whole digits train split,
    then the same small MLP student trained on 3 labeled images per class, from scratch and with KD. KD
    wins on every seed by at least 3 points (measured on seeds 0-5: margins 5.6 to 11.2 points, KD 79-82 %,
    scratch 70-74 %, teacher 93-95 %); the README's default run is the slow test below."""
    settings = ["teacher=mlp", "teacher_kwargs={'hidden_sizes': (128,)}", "teacher_steps=300", "student=mlp",
                "student_kwargs={'hidden_sizes': (32,)}", "labels_per_class=3", "steps=150", "eval_every=150",
                "batch_size=30", "seeds=(0, 1, 2)", "checkpoint_every=0", "tensorboard=False"]
    summary = distill.main(["--out", str(tmp_path / "run"), "--set", f"data_dir={tmp_path / 'tfds'}"]
                           + sum((["--set", s] for s in settings), []))
    rows = {r["run"]: r for r in summary["rows"]}
    assert rows["kd"]["method"] == "ce + kd(temperature=4)" and rows["scratch"]["method"] == "ce"
    assert rows["teacher"]["top1_mean"] > 90.0
    kd, scratch = rows["kd"]["top1_per_seed"], rows["scratch"]["top1_per_seed"]
    assert len(kd) == len(scratch) == 3
    assert all(k > s + 3.0 for k, s in zip(kd, scratch)), f"KD {kd} vs scratch {scratch}"


@pytest.mark.slow  # 2 minutes: `pytest -m slow`
def test_default_experiment_distills(tmp_path):
    """The README's default run, as printed there: on the default setting with the default seeds, the KD
    student beats the same student trained from scratch, and the teacher is far above both."""
    summary = distill.main(["--out", str(tmp_path / "run"), "--set", f"data_dir={tmp_path / 'tfds'}"])
    rows = {r["run"]: r for r in summary["rows"]}
    assert rows["teacher"]["seeds"] == rows["kd"]["seeds"] == rows["scratch"]["seeds"] == 3
    assert rows["teacher"]["top1_mean"] > 95.0
    assert rows["kd"]["top1_mean"] > rows["scratch"]["top1_mean"] + 1.0


def test_methods_with_several_participants_run_by_name(tmp_path):
    """Two teachers of different architectures (averaged and with fixed weights), deep mutual learning
    (student and peer both trained and evaluated) and online BD-KD (the teacher trained with the student)."""
    summary = distill.main(
        ["--out", str(tmp_path / "run"), "--set", f"data_dir={tmp_path / 'tfds'}"]
        + sum((["--set", s] for s in TINY), [])
        + ["--set", "seeds=(0,)", "--set", "teachers={'teacher2': {'model': 'mlp', 'kwargs': {'hidden_sizes': (24, 12)}}}",
           "--set", "methods={'avg': 'ce + multi_teacher_kd', "
                    "'fixed': 'ce + multi_teacher_kd(teacher_weights=(0.8, 0.2))', 'dml': 'dml', "
                    "'online': 'bdkd_online'}"]
    )
    rows = {r["run"]: r for r in summary["rows"]}
    assert set(rows) == {"teacher", "teacher:teacher2", "avg", "fixed", "dml", "dml/peer", "online", "online/teacher"}
    assert rows["teacher:teacher2"]["top1_mean"] > 20.0 and rows["dml/peer"]["model"] == "mlp"
    records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    avg = [r for r in records if r["run"] == "avg" and "loss" in r]
    assert {"multi_teacher_kd/teacher", "multi_teacher_kd/teacher2"} <= set(avg[0])
    dml_eval = [r for r in records if r["run"] == "dml" and r.get("step") == 20 and "test_accuracy" in r]
    assert dml_eval[0]["test_peer_accuracy"] == rows["dml/peer"]["top1_per_seed"][0] / 100
    online = [r for r in records if r["run"] == "online" and "loss" in r]
    assert {"teacher/accuracy", "bdkd_online/teacher_ce"} <= set(online[0])


@pytest.mark.slow  # 7 s: a resume with another configuration is refused by name in tests/test_resume.py; `pytest -m slow`
def test_a_resume_with_another_teacher_is_refused(tmp_path):
    from jaxkd import models
    from jaxkd.checkpoint import save_variables

    teacher = models.get("mlp", num_classes=10, hidden_sizes=(32,))
    x = np.zeros((2, 8, 8, 1), np.float32)
    for seed in (0, 1):
        save_variables(tmp_path / f"teacher{seed}" / "seed0", teacher.init(jax.random.PRNGKey(seed), x))
    args = (["--out", str(tmp_path / "run"), "--set", f"data_dir={tmp_path / 'tfds'}"]
            + sum((["--set", s] for s in TINY), []) + ["--set", "seeds=(0,)", "--set", "methods={'kd': 'ce + kd'}"])
    distill.main(args + ["--set", f"teacher_checkpoint={tmp_path / 'teacher0' / 'seed{seed}'}"])
    with pytest.raises(ValueError, match=r"teachers\.teacher\.values: checkpoint has"):
        distill.main(args + ["--set", f"teacher_checkpoint={tmp_path / 'teacher1' / 'seed{seed}'}"])


@pytest.mark.slow  # 7 s: a resume with another configuration is refused by name in tests/test_resume.py; `pytest -m slow`
def test_a_bf16_frozen_teacher_is_recorded_and_a_resume_in_another_precision_is_refused(tmp_path):
    args = (["--out", str(tmp_path / "run"), "--set", f"data_dir={tmp_path / 'tfds'}"]
            + sum((["--set", s] for s in TINY), []) + ["--set", "seeds=(0,)", "--set", "methods={'kd': 'ce + kd'}"])
    summary = distill.main(args + ["--set", "frozen_dtype=bfloat16"])
    rows = {r["run"]: r for r in summary["rows"]}
    assert rows["kd"]["top1_mean"] > 20.0  # 10 classes: chance is 10%
    assert json.load(open(tmp_path / "run" / "config.json"))["frozen_dtype"] == "bfloat16"
    with pytest.raises(ValueError, match="frozen_dtype"):
        distill.main(args)  # the kd run's checkpoint was distilled from the bf16 teacher
    with pytest.raises(ValueError, match="frozen_dtype must be one of"):
        distill.main(args + ["--set", "frozen_dtype=float16"])
