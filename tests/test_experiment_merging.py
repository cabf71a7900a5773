"""The two merging experiments end to end on tiny settings, their resume from the run folder, and their configs.

The vision run's figures are checked against a NumPy forward pass of the saved stages: the soup's and task
arithmetic's accuracy (with its λ chosen on the validation split) per subset and overall, recomputed from the
parameters on disk with NumPy's own merge, forward pass and argmax — an independent path from the script's
merge call, jitted forward and scorer. The merges themselves are tested against mergekit in their own files
(tests/test_merging_*.py)."""

import os

import jax
import numpy as np
import pytest

import jaxkd
from experiments import config as config_lib
from experiments import lm_merging
from experiments import merging as merging_experiment
from jaxkd.checkpoint import load_variables
from tests import test_lm_experiments as lm_tests

#: The fixture of tests/test_lm_experiments.py: a folder of generated .py files in two packages, alpha and beta.
corpus_dir = lm_tests.corpus_dir

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "experiments", "configs")

TINY = [
    "model_kwargs={'hidden_sizes': (8,)}", "base_steps=3", "expert_steps=3", "multitask_steps=3", "seeds=(0,)",
    "batch_size=16", "eval_every=3", "compilation_cache=None", "tensorboard=False", "scale_grid=(0.5, 1.0)",
    "merges={'linear': {'method': 'linear'}, 'task_arithmetic': {'method': 'task_arithmetic', 'scaled': True}, "
    "'dare': {'method': 'dare', 'density': 0.5, 'scaled': True}, 'nope': {'method': 'no_such_merge'}}",
    "learned={}",
]
#: Every learned merge, a few steps each.
LEARNED = ("learned={'em': {'method': 'expert_merging', 'steps': 2, 'lr': 0.5, 'calibration_per_subset': 4, "
           "'batch_size': 2}, 'twin': {'method': 'twin_merging', 'rank': 2, 'steps': 2, 'lr': 0.01}, "
           "'scalearn': {'method': 'scalearn', 'steps': 2, 'lr': 0.01, 'labels_per_class': 2}}")


def _args(out, extra=()):
    return ["--out", str(out)] + sum((["--set", s] for s in [*TINY, *extra]), [])


def _numpy_logits(params, x):
    h = x.reshape(len(x), -1).astype(np.float64)
    h = np.maximum(h @ params["dense1"]["kernel"] + params["dense1"]["bias"], 0.0)
    return h @ params["fc"]["kernel"] + params["fc"]["bias"]


def _accuracy(params, x, y, subsets):
    hit = np.argmax(_numpy_logits(params, x), -1) == y
    return [100.0 * hit[np.isin(y, s)].mean() for s in subsets] + [100.0 * hit.mean()]


def test_vision_run_matches_numpy_merges_then_resumes_without_training(tmp_path, monkeypatch):
    summary = merging_experiment.main(_args(tmp_path / "run"))
    rows = {r["run"]: r for r in summary["rows"]}
    assert list(rows) == ["base", "expert0", "expert1", "expert2", "multitask", "linear", "task_arithmetic", "dare"]
    assert "| linear |" in summary["table"] and "expert_merging" not in summary["table"]
    # A merge this version of jaxkd.merging lacks is reported under the table, not fatal.
    assert summary["skipped"] == {"nope": "jaxkd.merging has no 'no_such_merge'"}
    assert "Not run" in summary["table"] and "nope (" in summary["table"]

    # The figures, recomputed in NumPy from the stages saved on disk.
    cfg = config_lib.apply_overrides(config_lib.load(None, merging_experiment.MergingExperiment), TINY)
    dataset = merging_experiment.load_data(cfg)
    model = jaxkd.models.get("mlp", num_classes=10, hidden_sizes=(8,))
    test_x, test_y = dataset.arrays(dataset.test)
    val_x, val_y = dataset.arrays(dataset.val)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), test_x[:2])
    stage = {name: jax.tree.map(np.asarray, load_variables(tmp_path / "run" / "stages" / "seed0" / name,
                                                           shapes)["params"])
             for name in ("base", "expert0", "expert1", "expert2")}
    experts = [stage[f"expert{k}"] for k in range(3)]
    soup = jax.tree.map(lambda *p: np.mean(p, axis=0), *experts)
    row_values = [rows["linear"][f"{k}_mean"] for k in ("s0", "s1", "s2", "all")]
    np.testing.assert_allclose(row_values, _accuracy(soup, test_x, test_y, cfg.subsets), atol=1e-9)

    def arithmetic(scale):
        return jax.tree.map(lambda b, *e: b + scale * sum(x - b for x in e), stage["base"], *experts)

    val = [np.mean(np.argmax(_numpy_logits(arithmetic(s), val_x), -1) == val_y) for s in cfg.scale_grid]
    best = cfg.scale_grid[int(np.argmax(val))]
    assert rows["task_arithmetic"]["scale_per_seed"] == [best]
    row_values = [rows["task_arithmetic"][f"{k}_mean"] for k in ("s0", "s1", "s2", "all")]
    np.testing.assert_allclose(row_values, _accuracy(arithmetic(best), test_x, test_y, cfg.subsets), atol=1e-9)
    expert_row = [rows["expert1"][f"{k}_mean"] for k in ("s0", "s1", "s2", "all")]
    np.testing.assert_allclose(expert_row, _accuracy(experts[1], test_x, test_y, cfg.subsets), atol=1e-9)

    # Every stage and merge is in the run folder: a re-run reads them back, no step runs again.
    assert sorted(os.listdir(tmp_path / "run" / "merges" / "seed0")) == ["dare.json", "linear.json",
                                                                        "task_arithmetic.json"]

    def no_steps(*args, **kwargs):
        def step(*args, **kwargs):
            raise AssertionError("a finished stage trained again")
        return step

    monkeypatch.setattr(jaxkd, "make_train_step", no_steps)
    real_score = merging_experiment.score_merge

    def only_unavailable(cfg, spec, *args):  # a merge the library lacked is tried again, the others are read back
        if spec["method"] != "no_such_merge":
            pytest.fail(f"merge {spec} was recomputed")
        return real_score(cfg, spec, *args)

    monkeypatch.setattr(merging_experiment, "score_merge", only_unavailable)
    again = merging_experiment.main(_args(tmp_path / "run"))
    assert [r["all_per_seed"] for r in again["rows"]] == [r["all_per_seed"] for r in summary["rows"]]
    # A stage finished with other settings is not silently reused: the run stops, naming what differs.
    with pytest.raises(ValueError, match="stage 'expert0' of seed 0 .* another configuration .*steps"):
        merging_experiment.main(_args(tmp_path / "run", ["expert_steps=4"]))


# Slow (~20 s): three learned merges compiled and trained; the fast test above covers the stages, the merges and
# the resume, tests/test_merging_expert_merging.py, test_merging_twin.py and test_merging_scalearn.py the merges.
@pytest.mark.slow
def test_learned_merges_run_then_are_read_back_without_training(tmp_path, monkeypatch):
    summary = merging_experiment.main(_args(tmp_path / "run", ["merges={}", LEARNED]))
    rows = {r["run"]: r for r in summary["rows"]}
    assert list(rows)[5:] == ["em", "twin", "scalearn"]
    assert all(0.0 <= rows[r]["all_mean"] <= 100.0 for r in ("em", "twin", "scalearn"))
    assert os.path.isdir(tmp_path / "run" / "checkpoints" / "seed0" / "em")

    def no_steps(*args, **kwargs):
        def step(*args, **kwargs):
            raise AssertionError("a finished stage trained again")
        return step

    monkeypatch.setattr(jaxkd, "make_train_step", no_steps)
    monkeypatch.setattr(jaxkd.merging, "train_twin_router", lambda *a, **k: pytest.fail("the router trained again"))
    again = merging_experiment.main(_args(tmp_path / "run", ["merges={}", LEARNED]))
    assert [r["all_per_seed"] for r in again["rows"]] == [r["all_per_seed"] for r in summary["rows"]]


@pytest.mark.parametrize("setting, match", [
    ("subsets=((0, 1), (1, 2))", "disjoint"),
    ("learned={'x': {'method': 'ties'}}", "learned"),
    ("subsets=((0, 1, 2),)", "at least two"),
    ("merges={'x': {'density': 0.5}}", "'method'"),
    ("scale_grid=(0.5, -1.0)", "scale_grid"),
    ("base_steps=0", "base_steps"),
])
def test_bad_vision_configs_are_refused_before_training(tmp_path, setting, match):
    with pytest.raises(ValueError, match=match):
        merging_experiment.main(_args(tmp_path / "run", [setting]))
    assert not os.path.exists(tmp_path / "run" / "stages")


@pytest.mark.parametrize("path, experiment", [
    ("digits_merging.py", merging_experiment.MergingExperiment),
    ("lm_merging.py", lm_merging.LMMergingExperiment),
])
def test_default_configs_parse(path, experiment):
    cfg = config_lib.load(os.path.join(CONFIGS, path), experiment)
    assert isinstance(cfg, experiment)
    assert {"task_arithmetic", "ties", "dare", "variation_ratio", "sce", "linear"} <= set(cfg.merges)
    for spec in cfg.merges.values():  # every default merge names a function of jaxkd.merging
        assert callable(getattr(jaxkd.merging, spec["method"]))


def test_call_merge_passes_what_each_signature_takes():
    base = {"w": np.zeros(3, np.float32)}
    experts = [{"w": np.full(3, v, np.float32)} for v in (1.0, 3.0, 5.0)]
    call = merging_experiment.call_merge
    rng = jax.random.PRNGKey(0)
    np.testing.assert_allclose(call({"method": "linear"}, base, experts, rng)["w"], 3.0)
    np.testing.assert_allclose(call({"method": "task_arithmetic"}, base, experts, rng)["w"], 9.0)
    np.testing.assert_allclose(call({"method": "slerp", "t": 0.5, "models": (0, 2)}, base, experts, rng)["w"], 3.0)
    np.testing.assert_allclose(merging_experiment.scaled(base, experts[0], 0.25)["w"], 0.25)
    with pytest.raises(ValueError, match="two models"):
        call({"method": "slerp", "t": 0.5}, base, experts, rng)


# Slow (~25 s): four tiny LMs pretrained and two students distilled; the pieces are covered in the fast suite by
# tests/test_lm_experiments.py (the pretrained-model cache and the LM runs) and the merge call above.
@pytest.mark.slow
def test_lm_merging_scores_every_model_then_resumes_without_training(corpus_dir, tmp_path, monkeypatch):
    config = lm_tests._write_config(
        tmp_path / "lm_merging.py", "experiments.lm_merging.LMMergingExperiment", name="tiny_merging",
        out_dir=str(tmp_path / "runs"), corpus_dir=corpus_dir, seq_len=32, domains=("alpha", "beta"),
        max_general_files=None, max_eval_rows=4, large=dict(d_model=16, num_layers=1, num_heads=2, d_ff=32),
        small=dict(d_model=8, num_layers=1, num_heads=1, d_ff=16), base_steps=2, teacher_steps=2, student_steps=2,
        warmup_steps=1, batch_size=4, eval_every=2, scale_grid=(0.5, 1.0), tensorboard=False,
        compilation_cache=None)
    summary = lm_merging.main(["--config", config, "--out", str(tmp_path / "run")])
    names = [r["model"] for r in summary["rows"]]
    assert names[:7] == ["large base", "teacher: large tuned on alpha", "teacher: large tuned on beta", "small base",
                         "reference: small tuned on every domain (lm_ce, 4 steps)", "student of the alpha teacher",
                         "student of the beta teacher"]
    assert set(names[7:]) == set(lm_merging.LMMergingExperiment().merges)
    assert all(np.isfinite(r[f"{c}_bpb"]) for r in summary["rows"] for c in ("alpha", "beta", "general"))
    assert os.path.isdir(tmp_path / "run" / "stages" / "student_alpha")

    def no_steps(*args, **kwargs):
        def step(*args, **kwargs):
            raise AssertionError("a finished model trained again")
        return step

    monkeypatch.setattr(jaxkd, "make_train_step", no_steps)
    again = lm_merging.main(["--config", config, "--out", str(tmp_path / "run")])
    assert again["rows"] == summary["rows"]
    monkeypatch.undo()
    with pytest.raises(ValueError, match="student of 'alpha' .* another configuration .*lr"):
        lm_merging.main(["--config", config, "--out", str(tmp_path / "run"), "--set", "student_lr=0.01"])


def test_bad_lm_configs_are_refused(tmp_path):
    with pytest.raises(ValueError, match="'method'"):
        config_lib.apply_overrides(lm_merging.LMMergingExperiment(), ["merges={'x': {}}"])
    with pytest.raises(ValueError, match="reads participants"):
        lm_merging.main(["--out", str(tmp_path / "run"), "--set", "method=lm_ce + token_kd(teacher='other')",
                         "--set", f"out_dir={tmp_path}"])
