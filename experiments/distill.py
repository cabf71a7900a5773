"""Train a teacher, then the same student from scratch and with each distillation method; print a table.

    python -m experiments.distill                                  # the default (digits; time in the README)
    python -m experiments.distill --config experiments/configs/cifar100_resnet32x4_resnet8x4.py \\
        --set data_dir=/data/tfds
    python -m experiments.distill --set steps=300 --set "methods.kd_t8=ce + kd(temperature=8)"

Per seed: every frozen teacher a method reads (``teacher``, and the ``teachers`` of the config) is trained
on the full training split with cross-entropy (or loaded from ``teacher_checkpoint``), saved with Orbax in
its own checkpoint, and loaded back from disk for distillation. Then every method of ``config.methods``
trains the student from the same initialization, data order and augmentation (same seed), for the same
number of steps, with the participants the method names: frozen teachers, or trained peers and online
teachers that start from scratch next to the student. The test accuracy after the last step is reported
for the student and every other trained participant (last, not best: picking the best epoch on the test
split inflates results).

Runs survive being killed. Every ``checkpoint_every`` steps, and at the end of each run, the whole train
state (frozen teachers excepted: the checkpoint names them by fingerprint), the data iterators' positions
and the run's results are saved asynchronously with Orbax under ``checkpoints/seed<seed>/<run>/``.
Re-running the same command with the same ``--out`` skips finished runs, resumes the interrupted one from
its newest intact checkpoint, and appends to ``metrics.jsonl`` without duplicates; the end result is
bitwise the uninterrupted run's (on CPU). SIGTERM saves a checkpoint and exits with status 143. A
checkpoint made with another configuration (method spec, models, steps, optimizer, data, teacher) is
refused, naming what differs.

The run folder holds ``config.json``, ``metrics.jsonl`` (every train step and every evaluation),
``tensorboard/`` (the same, as TensorBoard event files), ``results.json``, ``results.md`` and
``learning_curves.png``, plus the teacher and run checkpoints.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

import jaxkd
from jaxkd import compilation_cache, data, methods, models, sharding
from jaxkd.checkpoint import Checkpointer, fingerprint, load_variables, save_variables
from jaxkd.participants import cast_params

from experiments import config as config_lib
from experiments import report
from experiments.run_log import MetricsLog, Preempted, PreemptionFlag
from experiments.timing import Phases, describe

log = logging.getLogger("jaxkd.experiment")


#: ``num_examples`` while the specs are checked before the data is loaded (then parsed with the real count).
_UNKNOWN_NUM_EXAMPLES = 2**31 - 1


def parse_methods(cfg: config_lib.Config, num_examples: int = _UNKNOWN_NUM_EXAMPLES) -> dict[str, methods.Method]:
    """The config's method specs, parsed before anything trains. Specs may use the named constants
    ``steps`` (the student's step budget), ``batch_size``, ``lr`` (the student's learning rate) and
    ``num_examples`` (the examples the student trains on: CRD's memory bank size), e.g.
    ``"ce + taid(total_steps=steps)"``."""
    constants = {"steps": cfg.steps, "batch_size": cfg.batch_size, "lr": cfg.lr, "num_examples": num_examples}
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


def with_index(batch: dict, method: methods.Method) -> dict:
    """``batch`` with an ``"index"`` entry when ``method`` reads one (the loader then yields it)."""
    if "index" not in method.batch_keys:
        return batch
    return {**batch, "index": np.arange(len(batch["label"]), dtype=np.int32)}


def hold_out(split: data.Split, per_class: int, seed: int) -> tuple[data.Split, data.Split]:
    """``(rest, held_out)`` with ``per_class`` examples of each class held out (a meta/validation set)."""
    held = data.subset_per_class(split.labels, per_class, seed)
    rest = np.setdiff1d(np.arange(len(split)), held)
    return split.subset(rest), split.subset(held)


def data_config(cfg: config_lib.Config) -> dict[str, Any]:
    """The settings every run of the experiment shares (recorded in each checkpoint)."""
    keys = ("dataset", "data_dir", "train_split", "test_split", "augment", "labels_per_class", "meta_per_class",
            "batch_size", "momentum", "weight_decay", "schedule", "milestones", "data_seed")
    return {k: getattr(cfg, k) for k in keys}


class Runner:
    """Trains one run (a teacher, or the student with one method) per call, resumably; the jitted steps are
    built once and reused across runs and seeds."""

    def __init__(self, cfg: config_lib.Config, dataset: Data, out_dir: str, progress: tqdm,
                 preemption: PreemptionFlag, phases: Phases):
        self.cfg, self.data, self.progress, self.out_dir = cfg, dataset, progress, out_dir
        self.preemption, self.phases = preemption, phases
        self.mesh = sharding.make_mesh(cfg.mesh) if cfg.mesh is not None else None
        if self.mesh is not None:
            sharding.check_batch_size(cfg.batch_size, self.mesh)
        self.train_step = jaxkd.make_train_step(mesh=self.mesh)
        # Frozen teachers are scored once per seed (the teacher phase), not at every evaluation.
        self.eval_step = jaxkd.make_eval_step(mesh=self.mesh, frozen=False)
        self.log = MetricsLog(out_dir, tensorboard=cfg.tensorboard)

    def close(self) -> None:
        self.log.close()

    def _loader(self, split: data.Split, seed: int, with_index: bool = False) -> data.Loader:
        return data.Loader(
            split.images, split.labels, batch_size=min(self.cfg.batch_size, len(split)), mean=self.data.mean,
            std=self.data.std, shuffle=True, seed=seed, drop_remainder=True, num_epochs=None,
            augment=self.cfg.augment, num_classes=split.num_classes, with_index=with_index,
        )

    def evaluate(self, state) -> dict[str, float]:
        with self.phases.phase("evaluation"):
            return jaxkd.evaluate(state, self.data.test_batches, self.eval_step)

    def fit(self, *, run: str, seed: int, state, split: data.Split, steps: int, lr_schedule, config: dict,
            meta: data.Split | None = None, meta_prefix: str | None = None) -> tuple[Any, dict[str, float]]:
        """Trains ``steps`` steps (resuming from the run's checkpoint when there is one), evaluating every
        ``eval_every``; returns the state and the final evaluation (every participant's test accuracy).

        With ``meta``, every batch also carries a batch of it under ``meta_prefix`` (``meta_image``,
        ``meta_label``: for methods with a held-out meta objective, e.g. TGeo-KD). A step whose loss or
        gradients are not finite raises (``jaxkd.steps.NonFiniteError``): the run stops there.
        """
        cfg = self.cfg
        # Methods that index a per-example memory (CRD) read each example's row in `split`.
        with self.phases.phase("batches"):
            loaders = {"train": self._loader(split, seed, with_index="index" in state.method_def.batch_keys)}
            if meta is not None:
                loaders["meta"] = self._loader(meta, seed + 10_000)
        with self.phases.phase("checkpoints"):
            ckpt = Checkpointer(os.path.join(self.out_dir, "checkpoints", f"seed{seed}", run), max_to_keep=2)
        try:
            with self.phases.phase("checkpoints"):
                restored = ckpt.restore(state.run_tree(), config=config) if ckpt.steps() else None
            start, damaged = 0, set()
            if restored is not None:
                state = state.with_run_tree(restored.tree)
                start, damaged = restored.step, set(restored.skipped)
                for name, loader in loaders.items():
                    loader.set_state(restored.extra["loaders"][name])
                if restored.skipped:
                    log.warning("run %s seed %d: resuming from step %d; damaged newer steps %s will be rewritten",
                                run, seed, start, sorted(restored.skipped))
                if restored.extra.get("final") is not None:
                    self.progress.update(steps)
                    return state, restored.extra["final"]
                self.progress.update(start)
            with self.phases.phase("logging"):
                self.log.resume(run, seed, start if restored is not None else None)

            def save(step: int, final: dict | None = None) -> None:
                extra = {"loaders": {n: loader.get_state() for n, loader in loaders.items()}, "final": final}
                with self.phases.phase("checkpoints"):
                    ckpt.save(step, state.run_tree(), extra=extra, config=config, overwrite=step in damaged)

            batches = (with_meta(b, next(loaders["meta"]), meta_prefix) if meta is not None else b
                       for b in loaders["train"])
            pending: list[tuple[int, dict]] = []  # device metrics, fetched at eval and save points
            with self.phases.phase("logging"):
                # The logged learning rate of every step, in one call: evaluating the schedule once per
                # logged step dispatched a handful of eager ops each time (~1 ms a step).
                learning_rates = np.asarray(jax.device_get(lr_schedule(np.arange(steps))), dtype=np.float64)

            def flush() -> None:
                with self.phases.phase("logging"):
                    for s, m in jax.device_get(pending):
                        self.log.write({"run": run, "seed": seed, "step": s, "lr": float(learning_rates[s - 1]),
                                        **{k: float(v) for k, v in m.items()}})
                    pending.clear()
                    self.log.flush()

            def evaluate(step: int) -> dict[str, float]:
                flush()
                result = self.evaluate(state)
                with self.phases.phase("logging"):
                    self.log.write({"run": run, "seed": seed, "step": step, "test_accuracy": result["accuracy"],
                                    **{f"test_{k}": v for k, v in result.items() if k.endswith("_accuracy")}})
                    self.log.flush()
                return result

            self.progress.set_description(f"{run} seed {seed}")
            result = evaluate(0) if start == 0 else None
            step_seconds, timed = 0.0, 0  # the steady-state step time (the first step compiles)
            for step in range(start + 1, steps + 1):
                with self.phases.phase("batches"):
                    batch = next(batches)
                began = time.perf_counter()
                with self.phases.phase("steps"):
                    state, metrics = self.train_step(state, batch)  # waits for the step: it reads its status
                if step > start + 1:
                    step_seconds, timed = step_seconds + time.perf_counter() - began, timed + 1
                pending.append((step, metrics))
                self.progress.update(1)
                if step % cfg.eval_every == 0 or step == steps:
                    result = evaluate(step)
                    self.progress.set_postfix(test_acc=f"{100 * result['accuracy']:.1f}")
                if step == steps:
                    break
                if self.preemption.requested:
                    flush()
                    save(step)
                    with self.phases.phase("checkpoints"):
                        ckpt.wait_until_finished()
                    raise Preempted(run, seed, step)
                if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                    flush()
                    save(step)
            if timed:  # a run resumed at its last step has no steady-state time of its own
                result = {**result, "ms_per_step": 1000.0 * step_seconds / timed}
            save(steps, final=result)
            return state, result
        finally:
            with self.phases.phase("checkpoints"):
                ckpt.close()  # waits for the last asynchronous save


@dataclasses.dataclass
class Plan:
    """Which participants each method needs, and which teachers must be trained first."""

    methods: dict[str, methods.Method]
    frozen_teachers: list[str]  # trained in the teacher phase, distilled from frozen


def plan(cfg: config_lib.Config, run_methods: dict[str, methods.Method]) -> Plan:
    known = {"teacher", *cfg.teachers}
    frozen: list[str] = []
    for name, method in run_methods.items():
        for participant in method.participants:
            if participant in method.trains:
                continue
            if participant not in known:
                raise ValueError(
                    f"config methods[{name!r}] reads participant {participant!r}, but the config defines teachers "
                    f"{sorted(known)} (add it to `teachers`)"
                )
            if participant not in frozen:
                frozen.append(participant)
    return Plan(run_methods, frozen)


def teacher_model_spec(cfg: config_lib.Config, name: str) -> tuple[str, dict]:
    if name == "teacher":
        return cfg.teacher, dict(cfg.teacher_kwargs)
    entry = cfg.teachers[name]
    return entry["model"], dict(entry.get("kwargs", {}))


def frozen_participant(cfg: config_lib.Config, model, name: str, variables) -> jaxkd.Participant:
    """The frozen teacher ``name`` as students see it: in ``cfg.frozen_dtype`` (its architecture built with
    that compute dtype, its parameters cast to it)."""
    arch, kwargs = teacher_model_spec(cfg, name)
    if cfg.frozen_dtype == "float32":
        return jaxkd.Participant(model((arch, kwargs)), variables, trains=False)
    dtype = jnp.dtype(cfg.frozen_dtype)
    return jaxkd.Participant(model((arch, {**kwargs, "dtype": dtype})), cast_params(variables, dtype), trains=False)


def trained_model_spec(cfg: config_lib.Config, name: str) -> tuple[str, dict]:
    """The architecture of a participant trained next to the student: an online teacher has the teacher's,
    a peer ``cfg.peer`` (default: the student's)."""
    if name == "teacher" or name in cfg.teachers:
        return teacher_model_spec(cfg, name)
    if cfg.peer is not None:
        return cfg.peer, dict(cfg.peer_kwargs)
    return cfg.student, dict(cfg.student_kwargs)


#: The experiment's PRNG: conv-net initialization compiles ~5x faster on CPU with rbg keys than with
#: threefry, and their quality is ample for initialization, shuffling and dropout.
PRNG_IMPL = "rbg"


def run_experiment(cfg: config_lib.Config, out_dir: str) -> dict[str, Any]:
    """Runs ``cfg`` into ``out_dir`` (resuming what is there). Keys are :data:`PRNG_IMPL` inside the run only:
    importing this module or running it leaves the process's default PRNG as it was."""
    with jax.default_prng_impl(PRNG_IMPL):
        return _run_experiment(cfg, out_dir)


def _run_experiment(cfg: config_lib.Config, out_dir: str) -> dict[str, Any]:
    phases = Phases()
    run_plan = plan(cfg, parse_methods(cfg))  # a bad spec fails before anything is loaded or trained
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(dataclasses.asdict(cfg), f, indent=2)
    with phases.phase("data"):
        dataset = load_data(cfg)
    num_classes = dataset.train.num_classes
    run_plan = plan(cfg, parse_methods(cfg, num_examples=len(dataset.student_train)))

    built: dict[str, Any] = {}

    def model(spec: tuple[str, dict]):
        """One Model object per architecture: states built from the same objects share compiled steps."""
        key = json.dumps([spec[0], spec[1]], sort_keys=True, default=str)
        if key not in built:
            built[key] = models.get(spec[0], num_classes=num_classes, **spec[1])
        return built[key]

    student = model((cfg.student, cfg.student_kwargs))
    teacher_schedule = schedule_of(cfg, cfg.teacher_lr, cfg.teacher_steps)
    student_schedule = schedule_of(cfg, cfg.lr, cfg.steps)
    teacher_tx, student_tx = make_optimizer(cfg, teacher_schedule), make_optimizer(cfg, student_schedule)
    ce = methods.parse("ce")
    sample = data.Loader(dataset.train.images[: cfg.batch_size], dataset.train.labels[: cfg.batch_size],
                         batch_size=min(cfg.batch_size, len(dataset.train))).batch((0, 0))
    shared = data_config(cfg)

    train_teachers = cfg.teacher_checkpoint is None
    frozen = run_plan.frozen_teachers
    total = len(cfg.seeds) * (len(run_plan.methods) * cfg.steps + (cfg.teacher_steps * len(frozen) if train_teachers else 0))
    progress = tqdm(total=total, unit="step", dynamic_ncols=True, mininterval=0.5)
    results: dict[str, list[float]] = {}
    step_ms: dict[str, list[float | None]] = {}
    row_info: dict[str, tuple[str, str]] = {}
    started = time.time()
    with PreemptionFlag() as preemption:
        runner = Runner(cfg, dataset, out_dir, progress, preemption, phases)
        try:
            # Teachers first, for every seed; then each method over the seeds, so a method's compiled
            # programs serve all its seeds, and are dropped before the next method (each run compiles
            # its own: a 100-run comparison otherwise exhausts the process's memory maps on CPU).
            teacher_vars, teacher_prints = {}, {}
            for seed in cfg.seeds:
                teacher_rng, _ = jax.random.split(jax.random.PRNGKey(seed))
                teacher_vars[seed], teacher_prints[seed] = {}, {}
                for name in frozen:
                    spec = teacher_model_spec(cfg, name)
                    teacher = model(spec)
                    abstract = jax.eval_shape(teacher.init, teacher_rng, sample["image"])
                    if train_teachers or name != "teacher":
                        run = run_row(name)
                        with phases.phase("setup"):
                            state = jaxkd.create(student=teacher, method=ce, tx=teacher_tx, sample_batch=sample,
                                                 rng=teacher_rng, mesh=runner.mesh)
                        config = {**shared, "run": run, "seed": seed, "model": spec[0], "kwargs": spec[1],
                                  "steps": cfg.teacher_steps, "lr": cfg.teacher_lr}
                        state, _ = runner.fit(run=run, seed=seed, state=state, split=dataset.train,
                                              steps=cfg.teacher_steps, lr_schedule=teacher_schedule, config=config)
                        teacher_dir = os.path.join(out_dir, "teachers", f"seed{seed}", name)
                        with phases.phase("checkpoints"):
                            save_variables(teacher_dir, jax.device_get(state.student.variables()))
                        del state
                    else:
                        teacher_dir = cfg.teacher_checkpoint.format(seed=seed)
                    # Distill from the checkpoint on disk, exactly what a later run would load.
                    with phases.phase("setup"):
                        teacher_vars[seed][name] = load_variables(teacher_dir, abstract)
                        teacher_prints[seed][name] = teacher_fingerprint(teacher_vars[seed][name])
                        evaluated = jaxkd.create(student=teacher, method=ce, tx=teacher_tx, sample_batch=sample,
                                                 rng=teacher_rng, student_variables=teacher_vars[seed][name],
                                                 mesh=runner.mesh)
                    row_info[run_row(name)] = (spec[0], "ce (full train split)")
                    results.setdefault(run_row(name), []).append(runner.evaluate(evaluated)["accuracy"])
            jax.clear_caches()
            for name, method in run_plan.methods.items():
                for seed in cfg.seeds:
                    _, student_rng = jax.random.split(jax.random.PRNGKey(seed))
                    participants = {}
                    for p in method.participants:
                        if p in method.trains:
                            participants[p] = jaxkd.Participant(model(trained_model_spec(cfg, p)))
                        else:
                            participants[p] = frozen_participant(cfg, model, p, teacher_vars[seed][p])
                    train_split, meta_split = dataset.student_train, None
                    if method.meta_prefix is not None:
                        train_split, meta_split = hold_out(dataset.student_train, cfg.meta_per_class, cfg.data_seed)
                    with phases.phase("setup"):
                        state = jaxkd.create(
                            student=student, method=method, tx=student_tx, rng=student_rng, participants=participants,
                            sample_batch=with_meta(with_index(sample, method), sample, method.meta_prefix),
                            mesh=runner.mesh,
                        )
                    config = {**shared, "run": name, "seed": seed, "method": cfg.methods[name], "student": cfg.student,
                              "frozen_dtype": cfg.frozen_dtype,
                              "student_kwargs": cfg.student_kwargs, "steps": cfg.steps, "lr": cfg.lr,
                              "participants": {p: list(trained_model_spec(cfg, p)) for p in method.trains},
                              "teachers": {p: teacher_prints[seed][p] for p in method.participants
                                           if p not in method.trains}}
                    state, result = runner.fit(run=name, seed=seed, state=state, split=train_split, steps=cfg.steps,
                                               lr_schedule=student_schedule, config=config, meta=meta_split,
                                               meta_prefix=method.meta_prefix)
                    results.setdefault(name, []).append(result["accuracy"])
                    step_ms.setdefault(name, []).append(result.get("ms_per_step"))
                    row_info[name] = (cfg.student, cfg.methods[name])
                    for p in method.trains:
                        row = f"{name}/{p}"
                        results.setdefault(row, []).append(result[f"{p}_accuracy"])
                        row_info[row] = (trained_model_spec(cfg, p)[0], f"{cfg.methods[name]} ({p})")
                    del state
                jax.clear_caches()
        finally:
            runner.close()
            progress.close()

    with phases.phase("report"):
        summary = report.summarize(cfg, results, row_info, seconds=time.time() - started, step_ms=step_ms,
                                   num_train=len(dataset.train),
                                   num_student_train=len(dataset.student_train),
                                   num_test=int(sum(b["mask"].sum() for b in dataset.test_batches)))
        report.plot_learning_curves(os.path.join(out_dir, "metrics.jsonl"),
                                    os.path.join(out_dir, "learning_curves.png"))
    summary["time"] = phases.breakdown()
    summary["compiles"] = compilation_cache.compile_counts()
    report.write(out_dir, summary)
    return summary


def teacher_fingerprint(variables) -> dict[str, str]:
    """What a run's checkpoint records of a frozen teacher: a hash of its tree structure, shapes and dtypes,
    and one of its values (``jaxkd.checkpoint.fingerprint``), so a resume with another teacher is refused."""
    print_ = fingerprint(variables)
    structure = hashlib.sha256(json.dumps(print_["leaves"], sort_keys=True).encode()).hexdigest()
    return {"structure": structure, "values": print_["sha256"]}


def run_row(teacher_name: str) -> str:
    return "teacher" if teacher_name == "teacher" else f"teacher:{teacher_name}"


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
    if cfg.distributed:
        sharding.initialize_distributed()
    compilation_cache.enable(cfg.compilation_cache)
    try:
        summary = run_experiment(cfg, out_dir)
    except Preempted as e:
        print(f"\n{e}; re-run the same command with --out {out_dir} to resume", file=sys.stderr)
        raise SystemExit(143) from None
    print()
    print(summary["table"])
    counts = summary["compiles"]
    print(f"\ntime by phase: {describe(summary['time'])} ({counts['compiled']} programs compiled, "
          f"{counts['loaded']} loaded from the compilation cache)", file=sys.stderr)
    print(f"run folder: {out_dir}", file=sys.stderr)
    return summary


if __name__ == "__main__":
    main()
