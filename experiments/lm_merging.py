"""Merging students distilled from different teachers (FuseChat's recipe) on the Python standard library's source
code: one small student per teacher, each distilled from the same small base on its teacher's domain, then merged
in parameter space into one student (offline, 2 CPU cores).

    python -m experiments.lm_merging                        # experiments/configs/lm_merging.py (~6 min)
    python -m experiments.lm_merging --set student_steps=50 --set base_steps=100

Wan et al., "FuseChat: Knowledge Fusion of Chat Models" (2024): pairwise knowledge fusion (a target model
distilled from each source model separately), then the targets merged in parameter space (their VaRM, here
``variation_ratio``; FuseChat-2.0/3.0's SCE, here ``sce``).

1. Data, as :mod:`experiments.lm_fusion` (byte-tokenized rows of ``seq_len``): a *domain* is a top-level package
   of the standard library (default ``encodings/`` and ``asyncio/``); the general text is the training split's
   files outside the domains; each domain's training text is its training-split files. Held-out text: the
   corpus' validation-split files (λ selection) and test-split files (the table) of each domain and, for the
   general column, outside them.
2. Models, each trained once and cached by its key in ``<out_dir>/fusion_models`` (the folder
   :mod:`experiments.lm_fusion` uses: with the same settings, its large and small base are these):
   a LARGE and a SMALL base LM pretrained with next-token cross-entropy on the general text; one TEACHER per
   domain, the large base fine-tuned on that domain.
3. Students: per domain, the small base distilled from that domain's teacher on that domain's training text
   with ``method`` (default ``lm_ce + token_kd()``, :func:`jaxkd.methods.token_kd`), resumably through
   :class:`experiments.runner.Runner` (``checkpoints/seed<seed>/student_<domain>``; final variables in
   ``stages/student_<domain>``).
4. Merges of the students around the small base (:mod:`jaxkd.merging`, nothing trained), each ``× λ`` merge's
   scaling ``λ`` (``base + λ·(merge − base)``) chosen from ``scale_grid`` by the mean validation bits per
   byte over the domains. The reference (``multitask_reference``): the small base tuned with ``lm_ce`` on
   every domain's text at once, for the students' steps together (no teacher).
5. Bits per byte on each domain's and the general test text (teacher forcing) for every model, printed as a
   Markdown table and written to ``results.md``/``results.json``. One seed (``seed``): the students and
   merges are deterministic given it; the spread over seeds is not measured here.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import Any, Mapping

import jax
import numpy as np

import jaxkd
from jaxkd import methods
from jaxkd.batch import with_token_normalizer
from jaxkd.checkpoint import load_variables, save_variables
from jaxkd.data import ByteTokenizer, TextLoader
from jaxkd.data.text.stdlib_corpus import stdlib_corpus_texts
from jaxkd.models import lm as lm_models

from experiments import config as config_lib
from experiments import merging as merging_experiment
from experiments.lm_fusion import check_domains, domain_of, eval_set, pack
from experiments.lm_training import (bpb_evaluator, lm_participant, optimizer, pretrained_lm, rows_fingerprint,
                                     schedule)
from experiments.run_log import PreemptionFlag
from experiments.runner import Evaluation, Runner, entry_point, progress_bar, run_command
from experiments.timing import Phases


def _default_merges() -> dict[str, dict[str, Any]]:
    return {
        "linear": {"method": "linear"},
        "task_arithmetic": {"method": "task_arithmetic", "scaled": True},
        "ties": {"method": "ties", "density": 0.2, "scaled": True},
        "dare": {"method": "dare", "density": 0.3, "scaled": True},
        "variation_ratio": {"method": "variation_ratio", "scaled": True},
        "sce": {"method": "sce", "select_topk": 0.1, "scaled": True},
    }


@dataclasses.dataclass(frozen=True)
class LMMergingExperiment:
    """One merging-of-distilled-students experiment (a config file's ``get_config()`` returns one).

    Attributes:
      name: the run folder's prefix.
      seq_len: tokens per packed row.
      domains: top-level stdlib packages: one teacher and one student each; excluded from the general text.
      max_general_files: general training files kept (sha256 order); None: all.
      max_eval_rows: rows scored per held-out set (evenly spaced, fixed across runs).
      large, small: :class:`jaxkd.models.lm.LMConfig` fields of the teachers' and the students' architecture.
      base_steps, base_lr: both bases' pretraining on the general text.
      teacher_steps, teacher_lr: each teacher's fine-tuning of the large base on its domain.
      student_steps, student_lr: each student's distillation (from the small base) on its domain.
      method: the students' distillation method spec (participants ``student`` and ``teacher``).
      warmup_steps, weight_decay, batch_size: AdamW with warm-up and cosine decay, every model.
      merges: row name -> ``{"method": <jaxkd.merging function>, **keyword arguments, "scaled": bool}``.
      scale_grid: the λ candidates of the ``scaled`` merges (chosen on the validation files).
      multitask_reference: also train and score the small base tuned with ``lm_ce`` on every domain's training
        text at once (the students' steps together): the reference the merges are read against.
      seed: data order and initializations.
    """

    name: str = "stdlib_merging"
    seq_len: int = 128
    domains: tuple[str, ...] = ("encodings", "asyncio")
    max_general_files: int | None = 200
    max_eval_rows: int = 48
    large: Mapping[str, Any] = dataclasses.field(
        default_factory=lambda: dict(d_model=128, num_layers=4, num_heads=4, d_ff=384))
    small: Mapping[str, Any] = dataclasses.field(
        default_factory=lambda: dict(d_model=64, num_layers=2, num_heads=2, d_ff=192))
    base_steps: int = 300
    base_lr: float = 3e-3
    teacher_steps: int = 150
    teacher_lr: float = 1e-3
    student_steps: int = 150
    student_lr: float = 1e-3
    method: str = "lm_ce + token_kd()"
    warmup_steps: int = 30
    weight_decay: float = 0.01
    batch_size: int = 16
    merges: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=_default_merges)
    scale_grid: tuple = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0)
    multitask_reference: bool = True
    seed: int = 0
    eval_every: int = 50
    checkpoint_every: int = 100
    tensorboard: bool = True
    out_dir: str = "runs"
    corpus_dir: str | None = None
    compilation_cache: str | None = "default"

    def check(self) -> None:
        for name, spec in self.merges.items():
            if not isinstance(spec, Mapping) or not isinstance(spec.get("method"), str):
                raise ValueError(f"merges[{name!r}] must be a dict with a 'method' (a jaxkd.merging function), "
                                 f"got {spec!r}")
        if not self.scale_grid or any(not isinstance(v, (int, float)) or v <= 0 for v in self.scale_grid):
            raise ValueError(f"scale_grid must be positive numbers, got {self.scale_grid!r}")


LMMergingExperiment.CHECKS = {
    **{name: config_lib.at_least(1) for name in
       ("base_steps", "teacher_steps", "student_steps", "batch_size", "max_eval_rows", "eval_every")},
    "seq_len": config_lib.at_least(2), "warmup_steps": config_lib.at_least(0), "seed": config_lib.at_least(0),
    "checkpoint_every": config_lib.at_least(0), "max_general_files": config_lib.optional(config_lib.at_least(1)),
    "base_lr": config_lib.positive, "teacher_lr": config_lib.positive, "student_lr": config_lib.positive,
    "weight_decay": config_lib.nonnegative, "domains": check_domains,
}

#: The default run's config file.
DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "lm_merging.py")


def run_experiment(cfg: LMMergingExperiment, out_dir: str) -> dict[str, Any]:
    start = time.time()
    method = methods.parse(cfg.method, {"steps": cfg.student_steps, "batch_size": cfg.batch_size})
    if set(method.needs.participants) - {"student", "teacher"}:
        raise ValueError(f"method={cfg.method!r} reads participants {sorted(method.needs.participants)}; a student "
                         f"here has only its 'teacher'")
    domains = tuple(cfg.domains)
    data_dir = os.path.join(cfg.out_dir, "tfds")

    def files(split):
        return stdlib_corpus_texts(split, data_dir=data_dir, source_dir=cfg.corpus_dir)

    train_files, val_files, test_files = files("train"), files("validation"), files("test")
    general = pack([f for f in train_files if domain_of(f[0], domains) is None][:cfg.max_general_files], cfg.seq_len)
    domain_train = {d: pack([f for f in train_files if domain_of(f[0], domains) == d], cfg.seq_len) for d in domains}

    def held_out(split_files, column):
        chosen = [f for f in split_files if domain_of(f[0], domains) == (None if column == "general" else column)]
        return eval_set(pack(chosen, cfg.seq_len), cfg.max_eval_rows, cfg.batch_size)

    columns = list(domains) + ["general"]
    val = {c: held_out(val_files, c) for c in columns}
    test = {c: held_out(test_files, c) for c in columns}
    for c in columns:
        print(f"held-out {c}: validation {val[c]['rows']} rows ({val[c]['num_bytes']} bytes), test "
              f"{test[c]['rows']} rows ({test[c]['num_bytes']} bytes)", file=sys.stderr)

    vocab = ByteTokenizer().vocab_size
    large_cfg = lm_models.LMConfig(vocab_size=vocab, max_len=cfg.seq_len, **cfg.large)
    small_cfg = lm_models.LMConfig(vocab_size=vocab, max_len=cfg.seq_len, **cfg.small)
    large_model, small_model = lm_models.lm(large_cfg), lm_models.lm(small_cfg)
    test_bpb = {size: {c: bpb_evaluator(m, test[c]["batches"]) for c in columns}
                for size, m in (("large", large_model), ("small", small_model))}
    val_bpb = {c: bpb_evaluator(small_model, val[c]["batches"]) for c in domains}
    cache_root = os.path.join(cfg.out_dir, "fusion_models")
    phases = Phases()
    student_sample = with_token_normalizer({"tokens": general.tokens[:cfg.batch_size],
                                            "mask": general.mask[:cfg.batch_size]})
    results: dict[str, dict[str, float]] = {}
    params_of: dict[str, str] = {}
    scales: dict[str, float] = {}
    skipped: dict[str, str] = {}
    progress = progress_bar(len(domains) * cfg.student_steps)
    with PreemptionFlag() as preemption:
        runner = Runner(out_dir, progress=progress, preemption=preemption, phases=phases, eval_every=cfg.eval_every,
                        checkpoint_every=cfg.checkpoint_every, tensorboard=cfg.tensorboard)
        try:
            def pretrained(label, config, rows, steps, lr, held_rows, init=None, init_key=None):
                evaluate = bpb_evaluator(lm_models.lm(config), held_rows["batches"])
                variables, directory = pretrained_lm(
                    runner, cache_root=cache_root, label=label, config=config, rows=rows, steps=steps, lr=lr,
                    warmup_steps=cfg.warmup_steps, weight_decay=cfg.weight_decay, batch_size=cfg.batch_size,
                    seed=cfg.seed, init_variables=init, init_key=init_key, evaluate_variables=evaluate)
                return variables, os.path.basename(directory)

            large_vars, large_key = pretrained("large base", large_cfg, general, cfg.base_steps, cfg.base_lr,
                                               val["general"])
            small_vars, small_key = pretrained("small base", small_cfg, general, cfg.base_steps, cfg.base_lr,
                                               val["general"])
            teachers = {d: pretrained(f"large tuned on {d}", large_cfg, domain_train[d], cfg.teacher_steps,
                                      cfg.teacher_lr, val[d], init=large_vars, init_key=large_key) for d in domains}

            def score(name, size, variables):
                with phases.phase("evaluation"):
                    results[name] = {c: test_bpb[size][c](variables) for c in columns}
                params_of[name] = f"{(large_cfg if size == 'large' else small_cfg).num_params / 1e6:.2f}M"

            score("large base", "large", large_vars)
            for d in domains:
                score(f"teacher: large tuned on {d}", "large", teachers[d][0])
            score("small base", "small", small_vars)
            if cfg.multitask_reference:
                # The reference merges are read against: the small base tuned on every domain at once, with
                # lm_ce, for the students' steps together (cached like the bases).
                joint = pack([f for f in train_files if domain_of(f[0], domains) is not None], cfg.seq_len)
                joint_vars, _ = pretrained("small tuned on every domain", small_cfg, joint,
                                           cfg.student_steps * len(domains), cfg.student_lr, val[domains[0]],
                                           init=small_vars, init_key=small_key)
                score(f"reference: small tuned on every domain (lm_ce, {cfg.student_steps * len(domains)} steps)",
                      "small", joint_vars)

            students = {}
            for d in domains:
                students[d] = distilled_student(cfg, runner, phases, out_dir, d, method, small_cfg, small_vars,
                                                small_key, teachers[d], domain_train[d], student_sample,
                                                val_bpb[d])
                score(f"student of the {d} teacher", "small", students[d])

            base_params = small_vars["params"]
            expert_params = [students[d]["params"] for d in domains]
            rest = {k: v for k, v in small_vars.items() if k != "params"}

            def domains_val(params) -> float:
                return float(np.mean([val_bpb[d]({"params": params, **rest}) for d in domains]))

            for row, spec in cfg.merges.items():
                try:
                    with phases.phase("evaluation"):
                        merged = merging_experiment.call_merge(spec, base_params, expert_params,
                                                               jax.random.key(cfg.seed))
                        if spec.get("scaled"):
                            by_scale = [domains_val(merging_experiment.scaled(base_params, merged, s))
                                        for s in cfg.scale_grid]
                            scales[row] = float(cfg.scale_grid[int(np.argmin(by_scale))])
                            merged = merging_experiment.scaled(base_params, merged, scales[row])
                except merging_experiment.MergeUnavailable as e:
                    skipped[row] = str(e)
                    continue
                score(row, "small", {"params": merged, **rest})
        finally:
            runner.close()
            progress.close()

    summary = summarize(cfg, results, params_of, scales, skipped, test, seconds=time.time() - start,
                        general_rows=len(general), domain_rows={d: len(domain_train[d]) for d in domains})
    summary["time"] = phases.breakdown()
    from experiments import report

    report.write(out_dir, summary)
    return summary


def distilled_student(cfg, runner, phases, out_dir, domain, method, small_cfg, small_vars, small_key, teacher,
                      rows, sample, evaluate_val):
    """The small base distilled from ``teacher`` on ``rows`` (resumably); loaded when already finished."""
    teacher_vars, teacher_key = teacher
    directory = os.path.join(out_dir, "stages", f"student_{domain}")
    config = {"method": cfg.method, "domain": domain, "student_base": small_key, "teacher": teacher_key,
              "steps": cfg.student_steps, "lr": cfg.student_lr, "warmup_steps": cfg.warmup_steps,
              "weight_decay": cfg.weight_decay, "batch_size": cfg.batch_size, "seq_len": cfg.seq_len,
              "rows": rows_fingerprint(rows.tokens, rows.mask)}
    if os.path.isdir(directory) and os.path.exists(directory + ".json"):
        with open(directory + ".json") as f:
            differences = jaxkd.checkpoint.config_differences(json.load(f), config)
        if differences:
            raise ValueError(f"the student of {domain!r} in {directory} was distilled with another configuration "
                             f"({'; '.join(differences)}): use another --out")
        with phases.phase("checkpoints"):
            variables = load_variables(directory, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                                               small_vars))
        runner.progress.update(cfg.student_steps)
        return variables
    large_cfg = lm_models.LMConfig(vocab_size=small_cfg.vocab_size, max_len=cfg.seq_len, **cfg.large)
    parts = {"student": lm_participant(small_cfg, small_vars, trains=True),
             "teacher": lm_participant(large_cfg, teacher_vars, trains=False)}
    with phases.phase("setup"):
        state = jaxkd.create(participants=parts, method=method,
                             tx=optimizer(cfg.student_lr, cfg.student_steps, cfg.warmup_steps, cfg.weight_decay),
                             sample_batch=sample, rng=jax.random.PRNGKey(cfg.seed))
    loader = TextLoader(rows.tokens, rows.mask, batch_size=cfg.batch_size, seed=cfg.seed, num_epochs=None)
    evaluation = Evaluation(lambda state: {"bpb": evaluate_val(state.student.variables())}, prefix="val_",
                            progress=("bpb", ".4f"))
    state, _ = runner.fit(run=f"student_{domain}", seed=cfg.seed, state=state, loaders={"train": loader},
                          steps=cfg.student_steps, lr_schedule=schedule(cfg.student_lr, cfg.student_steps,
                                                                        cfg.warmup_steps),
                          config=config, evaluation=evaluation)
    variables = jax.device_get(state.student.variables())
    with phases.phase("checkpoints"):
        save_variables(directory, variables)
    merging_experiment.write_json(directory + ".json", config)  # last: the student is finished
    return variables


def summarize(cfg, results, params_of, scales, skipped, test, *, seconds, general_rows, domain_rows):
    domains = list(cfg.domains)
    columns = domains + ["general"]
    header = ["model", "params", *(f"{c} test bpb" for c in columns), "domains mean", "λ (val)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    rows = []
    for name, bpb in results.items():
        mean = float(np.mean([bpb[d] for d in domains]))
        rows.append({"model": name, "params": params_of[name], **{f"{c}_bpb": bpb[c] for c in columns},
                     "domains_mean_bpb": mean, "scale": scales.get(name)})
        scale = f"{scales[name]:g}" if name in scales else ""
        lines.append(f"| {name} | {params_of[name]} | " + " | ".join(f"{bpb[c]:.4f}" for c in columns)
                     + f" | {mean:.4f} | {scale} |")
    sizes = ", ".join(f"{c}: {test[c]['num_bytes']} bytes" for c in columns)
    tuned = ", ".join(f"{d}: {n} rows" for d, n in domain_rows.items())
    merges = "; ".join(f"{row}: {merging_experiment.describe_merge(spec)}" for row, spec in cfg.merges.items()
                       if row not in skipped)
    caption = (
        f"Bits per byte (lower is better) on the corpus' test-split files ({sizes}; general: outside the domains), "
        f"teacher forcing; Python {sys.version_info.major}.{sys.version_info.minor} standard library"
        f"{'' if cfg.corpus_dir is None else f' (files of {cfg.corpus_dir})'}, byte-level rows of {cfg.seq_len} "
        f"tokens. Bases: {cfg.base_steps} steps on general text ({general_rows} rows); teachers: the large base "
        f"tuned {cfg.teacher_steps} steps on each domain ({tuned}); "
        f"students: the small base distilled {cfg.student_steps} steps from its domain's teacher on that domain "
        f"with `{cfg.method}`; merges of the students around the small base ({merges}), the `× λ` merges' λ "
        f"chosen from {tuple(cfg.scale_grid)} by the domains' mean validation-split bits per byte. One seed "
        f"({cfg.seed}). Wall time {seconds / 60:.1f} min.")
    if skipped:
        caption += " Not run (not in this version of jaxkd.merging): " + "; ".join(
            f"{row} ({why})" for row, why in skipped.items()) + "."
    return {"rows": rows, "table": "\n".join(lines) + "\n\n" + caption, "seconds": seconds, "skipped": skipped,
            "config": json.loads(json.dumps(dataclasses.asdict(cfg), default=str))}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return run_command(argv, run_experiment, description=__doc__, config_type=LMMergingExperiment,
                       default_config=DEFAULT_CONFIG)


if __name__ == "__main__":
    # The importable module's classes, not __main__'s copies: config files import them from there.
    from experiments import lm_merging

    entry_point(lm_merging.main)
