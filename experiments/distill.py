"""Train a teacher, then the same student from scratch and with each distillation method; print a table.

    python -m experiments.distill                                  # the default (digits; time in the README)
    python -m experiments.distill --config experiments/configs/cifar100_resnet32x4_resnet8x4.py \\
        --set data_dir=/data/tfds
    python -m experiments.distill --set steps=300 --set "methods.kd_t8=ce + kd(temperature=8)"

Per seed: the teacher is trained on the full training split with cross-entropy (or loaded from
``teacher_checkpoint``), saved with Orbax, and loaded back from disk for distillation. Then every method
of ``config.methods`` trains the student from the same initialization, data order and augmentation (same
seed), for the same number of steps; the test accuracy after the last step is reported (last, not best:
picking the best epoch on the test split inflates results). The run folder holds ``config.json``,
``metrics.jsonl`` (every train step and every evaluation), ``results.json``, ``results.md`` and
``learning_curves.png``, plus the teacher checkpoints.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import Any

import jax

# rbg keys: conv-net initialization compiles ~5x faster on CPU than with threefry, and quality is ample
# for initialization, shuffling and dropout. Set before any key is made; scripts only, never the library.
jax.config.update("jax_default_prng_impl", "rbg")

import numpy as np  # noqa: E402
import optax  # noqa: E402
from tqdm import tqdm  # noqa: E402

import jaxkd  # noqa: E402
from jaxkd import data, methods, models, sharding  # noqa: E402
from jaxkd.checkpoint import load_variables, save_variables  # noqa: E402

from experiments import config as config_lib  # noqa: E402
from experiments import report  # noqa: E402


def parse_methods(cfg: config_lib.Config) -> dict[str, methods.Method]:
    """The config's method specs, parsed before anything trains. Specs may use the named constants
    ``steps`` (the student's step budget), ``batch_size`` and ``lr`` (the student's learning rate), e.g.
    ``"ce + taid(total_steps=steps)"``."""
    constants = {"steps": cfg.steps, "batch_size": cfg.batch_size, "lr": cfg.lr}
    parsed = {}
    for name, spec in cfg.methods.items():
        try:
            parsed[name] = methods.parse(spec, constants)
        except ValueError as e:
            raise ValueError(f"config methods[{name!r}]: {e}") from None
    return parsed


def schedule_of(cfg: config_lib.Config, lr: float, steps: int) -> optax.Schedule:
    if cfg.schedule == "cosine":
        return optax.cosine_decay_schedule(lr, steps)
    if cfg.schedule == "multistep":
        return optax.piecewise_constant_schedule(lr, {int(f * steps): 0.1 for f in cfg.milestones})
    raise ValueError(f"schedule must be 'cosine' or 'multistep', got {cfg.schedule!r}")


def make_optimizer(cfg: config_lib.Config, schedule: optax.Schedule) -> optax.GradientTransformation:
    """SGD with momentum and (coupled) weight decay, the optimizer of the CIFAR KD literature."""
    return optax.chain(optax.add_decayed_weights(cfg.weight_decay), optax.sgd(schedule, momentum=cfg.momentum))


@dataclasses.dataclass
class Data:
    train: data.Split
    student_train: data.Split
    test_batches: list
    mean: tuple
    std: tuple


def load_data(cfg: config_lib.Config) -> Data:
    train = data.load_split(cfg.dataset, cfg.train_split, data_dir=cfg.data_dir)
    test = data.load_split(cfg.dataset, cfg.test_split, data_dir=cfg.data_dir)
    mean, std = data.NORMALIZATION.get(cfg.dataset) or data.channel_stats(train.images)
    student_train = train
    if cfg.labels_per_class is not None:
        student_train = train.subset(data.subset_per_class(train.labels, cfg.labels_per_class, cfg.data_seed))
    test_loader = data.Loader(
        test.images, test.labels, batch_size=cfg.eval_batch_size, mean=mean, std=std,
        shuffle=False, drop_remainder=False, num_epochs=1,
    )
    return Data(train, student_train, list(test_loader), mean, std)


def with_meta(batch: dict, meta_batch: dict, prefix: str | None) -> dict:
    """``batch`` plus ``meta_batch``'s entries under ``prefix`` (``batch`` itself when ``prefix`` is None)."""
    if prefix is None:
        return batch
    return {**batch, **{f"{prefix}{k}": v for k, v in meta_batch.items()}}


def hold_out(split: data.Split, per_class: int, seed: int) -> tuple[data.Split, data.Split]:
    """``(rest, held_out)`` with ``per_class`` examples of each class held out (a meta/validation set)."""
    held = data.subset_per_class(split.labels, per_class, seed)
    rest = np.setdiff1d(np.arange(len(split)), held)
    return split.subset(rest), split.subset(held)


class Runner:
    """Trains one (model, method) pair per call; jitted steps are built once and reused across seeds."""

    def __init__(self, cfg: config_lib.Config, dataset: Data, out_dir: str, progress: tqdm):
        self.cfg, self.data, self.progress = cfg, dataset, progress
        self.mesh = sharding.make_mesh() if cfg.data_parallel else None
        self.train_step = jaxkd.make_train_step(mesh=self.mesh)
        self.eval_step = jaxkd.make_eval_step(mesh=self.mesh)
        self.log = open(os.path.join(out_dir, "metrics.jsonl"), "w")

    def close(self) -> None:
        self.log.close()

    def _write(self, record: dict[str, Any]) -> None:
        self.log.write(json.dumps(record) + "\n")

    def _batches(self, split: data.Split, seed: int):
        return iter(data.Loader(
            split.images, split.labels, batch_size=min(self.cfg.batch_size, len(split)), mean=self.data.mean,
            std=self.data.std, shuffle=True, seed=seed, drop_remainder=True, num_epochs=None,
            augment=self.cfg.augment, num_classes=split.num_classes,
        ))

    def fit(self, *, run: str, seed: int, state, split: data.Split, steps: int, lr_schedule,
            meta: data.Split | None = None, meta_prefix: str | None = None) -> tuple[Any, float]:
        """Trains ``steps`` steps, evaluating every ``eval_every``; returns the state and final test accuracy.

        With ``meta``, every batch also carries a batch of it under ``meta_prefix`` (``meta_image``,
        ``meta_label``: for methods with a held-out meta objective, e.g. TGeo-KD). A step whose loss or
        gradients are not finite raises (``jaxkd.steps.NonFiniteError``): the run stops there.
        """
        cfg = self.cfg
        batches = self._batches(split, seed)
        if meta is not None:
            train_batches, meta_batches = batches, self._batches(meta, seed + 10_000)
            batches = (with_meta(b, next(meta_batches), meta_prefix) for b in train_batches)
        pending: list[tuple[int, dict]] = []  # device metrics, fetched at eval points (no per-step sync)

        def flush_and_eval(step: int) -> float:
            for s, m in jax.device_get(pending):
                self._write({"run": run, "seed": seed, "step": s, "lr": float(lr_schedule(s - 1)),
                             **{k: float(v) for k, v in m.items()}})
            pending.clear()
            result = jaxkd.evaluate(state, self.data.test_batches, self.eval_step)
            self._write({"run": run, "seed": seed, "step": step, "test_accuracy": result["accuracy"]})
            return result["accuracy"]

        self.progress.set_description(f"{run} seed {seed}")
        accuracy = flush_and_eval(0)
        for step in range(1, steps + 1):
            state, metrics = self.train_step(state, next(batches))
            pending.append((step, metrics))
            self.progress.update(1)
            if step % cfg.eval_every == 0 or step == steps:
                accuracy = flush_and_eval(step)
                self.progress.set_postfix(test_acc=f"{100 * accuracy:.1f}")
        self.log.flush()
        return state, accuracy


def run_experiment(cfg: config_lib.Config, out_dir: str) -> dict[str, Any]:
    run_methods = parse_methods(cfg)  # a bad spec fails before anything is loaded or trained
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(dataclasses.asdict(cfg), f, indent=2)
    dataset = load_data(cfg)
    num_classes = dataset.train.num_classes
    teacher = models.get(cfg.teacher, num_classes=num_classes, **cfg.teacher_kwargs)
    student = models.get(cfg.student, num_classes=num_classes, **cfg.student_kwargs)
    teacher_schedule = schedule_of(cfg, cfg.teacher_lr, cfg.teacher_steps)
    student_schedule = schedule_of(cfg, cfg.lr, cfg.steps)
    teacher_tx, student_tx = make_optimizer(cfg, teacher_schedule), make_optimizer(cfg, student_schedule)
    teacher_method = methods.parse("ce")
    sample = data.Loader(dataset.train.images[:2], dataset.train.labels[:2], batch_size=2).batch((0, 0))

    train_teachers = cfg.teacher_checkpoint is None
    total = len(cfg.seeds) * (len(run_methods) * cfg.steps + (cfg.teacher_steps if train_teachers else 0))
    progress = tqdm(total=total, unit="step", dynamic_ncols=True, mininterval=0.5)
    runner = Runner(cfg, dataset, out_dir, progress)
    results: dict[str, list[float]] = {"teacher": [], **{name: [] for name in run_methods}}
    started = time.time()
    try:
        for seed in cfg.seeds:
            rng = jax.random.PRNGKey(seed)
            teacher_rng, student_rng = jax.random.split(rng)
            abstract_teacher = jax.eval_shape(teacher.init, teacher_rng, sample["image"])
            if train_teachers:
                state = jaxkd.create(student=teacher, method=teacher_method, tx=teacher_tx,
                                     sample_batch=sample, rng=teacher_rng)
                state, _ = runner.fit(run="teacher", seed=seed, state=state, split=dataset.train,
                                      steps=cfg.teacher_steps, lr_schedule=teacher_schedule)
                teacher_dir = os.path.join(out_dir, "teachers", f"seed{seed}")
                save_variables(teacher_dir, jax.device_get(state.student.variables()))
                del state
            else:
                teacher_dir = cfg.teacher_checkpoint.format(seed=seed)
            # Distill from the checkpoint on disk, exactly what a later run would load.
            teacher_vars = load_variables(teacher_dir, abstract_teacher)
            for name, method in run_methods.items():
                with_teacher = method.needs_teacher
                train_split, meta_split = dataset.student_train, None
                if method.meta_prefix is not None:
                    train_split, meta_split = hold_out(dataset.student_train, cfg.meta_per_class, cfg.data_seed)
                method_sample = with_meta(sample, sample, method.meta_prefix)
                state = jaxkd.create(
                    student=student, method=method, tx=student_tx, sample_batch=method_sample, rng=student_rng,
                    teacher=teacher if with_teacher else None,
                    teacher_variables=teacher_vars if with_teacher else None,
                )
                state, accuracy = runner.fit(run=name, seed=seed, state=state, split=train_split,
                                             steps=cfg.steps, lr_schedule=student_schedule, meta=meta_split,
                                             meta_prefix=method.meta_prefix)
                results[name].append(accuracy)
            teacher_eval = jaxkd.create(student=teacher, method=teacher_method, tx=teacher_tx,
                                        sample_batch=sample, rng=teacher_rng, student_variables=teacher_vars)
            results["teacher"].append(jaxkd.evaluate(teacher_eval, dataset.test_batches, runner.eval_step)["accuracy"])
    finally:
        runner.close()
        progress.close()

    summary = report.summarize(cfg, results, seconds=time.time() - started, num_train=len(dataset.train),
                               num_student_train=len(dataset.student_train), num_test=int(sum(b["mask"].sum() for b in dataset.test_batches)))
    report.write(out_dir, summary)
    report.plot_learning_curves(os.path.join(out_dir, "metrics.jsonl"), os.path.join(out_dir, "learning_curves.png"))
    return summary


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=os.path.join(os.path.dirname(__file__), "configs", "digits.py"),
                        help="a Python file with get_config() (default: the digits experiment)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field; repeatable")
    parser.add_argument("--out", default=None, help="run folder (default: <out_dir>/<name>-<time>)")
    args = parser.parse_args(argv)
    cfg = config_lib.apply_overrides(config_lib.load(args.config), args.overrides)
    out_dir = args.out or os.path.join(cfg.out_dir, f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    summary = run_experiment(cfg, out_dir)
    print()
    print(summary["table"])
    print(f"\nrun folder: {out_dir}", file=sys.stderr)
    return summary


if __name__ == "__main__":
    main()
