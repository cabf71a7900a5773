"""Born-again networks: generations of one architecture, each distilled from the previous one; print a table.

    python -m experiments.born_again                       # experiments/configs/digits_born_again.py
    python -m experiments.born_again --config experiments/configs/digits_tf_kd_self.py      # Tf-KD_self
    python -m experiments.born_again --set generations=2 --set "method=kd(temperature=1)"

Furlanello, Lipton, Tschannen, Itti & Anandkumar, "Born-Again Neural Networks", ICML 2018. Per seed, generation 0
is the student architecture trained from the labels (``first_method``, default ``ce``; initialized, fed and trained
exactly as :mod:`experiments.distill`'s students, so with ``ce`` it is that script's ``scratch`` run); generation
``k >= 1`` is a fresh student of the *same* architecture (its own initialization) trained with ``method``, whose
participant ``"teacher"`` is generation ``k − 1`` frozen. Every generation trains on the same split (the config's
``labels_per_class`` subset), for ``steps`` steps, with the same optimizer. The table reports each generation's
test top-1 after its last step (mean ± std over seeds, Δ against generation 0) and, with ``ensemble``, BANE:
the born-again generations ``1..G`` ensembled by averaging their softmax outputs.

Tf-KD_self (Yuan et al., "Revisiting Knowledge Distillation via Label Smoothing Regularization", CVPR 2020) is one
born-again generation — the trained student is its own teacher — with the official ``loss_kd_self`` weights:
``(1 − α)·CE + α·multiplier·T²·KL/K`` (``nn.KLDivLoss()`` averages over the ``K`` classes too), i.e.
``"0.05 * ce + (0.95 * 50 / K) * kd(temperature=6)"`` for ResNet-18 on CIFAR-100 (α 0.95, T 6, multiplier 50,
``experiments/kd_experiments/resnet18_distill/resnet18_self_teacher/params.json``); on digits (K = 10)
``experiments/configs/digits_tf_kd_self.py``.

Resumable after a kill, with the machinery of :mod:`experiments.distill`: each generation of each seed is one run
of :class:`experiments.runner.Runner` (``checkpoints/seed<seed>/gen<k>/``: re-running the same command skips
finished generations and resumes the interrupted one from its newest checkpoint), and each generation's final
student is written with :func:`jaxkd.checkpoint.save_variables` under ``generations/seed<seed>/gen<k>/``; the
next generation loads its teacher back from there (recorded by fingerprint in its run's checkpoint, so a resume
with another teacher is refused). The config's ``teacher*`` and ``methods`` fields are not used.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import jax
import jax.numpy as jnp

import jaxkd
from jaxkd import data, methods, models, sharding
from jaxkd.checkpoint import load_variables, save_variables
from jaxkd.participants import TEACHER, cast_params

from experiments import config as config_lib
from experiments import distill, report
from experiments.run_log import PreemptionFlag
from experiments.runner import Evaluation, Runner, entry_point, progress_bar, run_command
from experiments.timing import Phases


@dataclasses.dataclass
class BornAgainConfig(config_lib.Config):
    """:class:`experiments.config.Config` plus the generations (``student``, ``steps``, ``lr``, the data and
    optimizer fields are the generations')."""

    # Born-again generations after generation 0 (so generations + 1 students are trained per seed).
    generations: int = 3
    # Generation 0's method: trained from the labels alone.
    first_method: str = "ce"
    # Every later generation's method; its participant "teacher" is the previous generation (frozen).
    method: str = "ce + kd(temperature=4)"
    # Also report BANE: generations 1..G ensembled (mean of their softmax outputs).
    ensemble: bool = True


BornAgainConfig.CHECKS = {**config_lib.Config.CHECKS, "generations": config_lib.at_least(1)}


def generation_methods(cfg: BornAgainConfig) -> tuple[methods.Method, methods.Method]:
    """``(first, later)``: generation 0's method (no teacher) and the born-again one (reads ``"teacher"`` only,
    trains no other participant)."""
    constants = {"steps": cfg.steps, "batch_size": cfg.batch_size, "lr": cfg.lr}
    parsed = config_lib.parse_methods({"first_method": cfg.first_method, "method": cfg.method}, constants)
    first, later = parsed["first_method"], parsed["method"]
    if first.needs.participants:
        raise ValueError(f"first_method={cfg.first_method!r} reads participants {list(first.needs.participants)}; "
                         f"generation 0 has no teacher")
    if later.needs.trained or set(later.needs.participants) - {TEACHER}:
        raise ValueError(f"method={cfg.method!r} must read only the participant 'teacher' (the previous generation), "
                         f"and train none besides the student; it reads {list(later.needs.participants)}")
    return first, later


def generation_dir(out_dir: str, seed: int, generation: int) -> str:
    return os.path.join(out_dir, "generations", f"seed{seed}", f"gen{generation}")


def ensemble_accuracy(model, generation_variables: list, test_batches: list) -> float:
    """Top-1 of the mean of the generations' softmax outputs (eval mode) over the valid test examples."""

    @jax.jit
    def correct(variables, batch):
        probs = jnp.mean(jnp.stack([jax.nn.softmax(model.apply(v, batch["image"], train=False).logits.astype(jnp.float32))
                                    for v in variables]), axis=0)
        hit = (jnp.argmax(probs, axis=-1) == batch["label"]) & batch["mask"]
        return jnp.sum(hit), jnp.sum(batch["mask"])

    hits = total = 0
    for batch in test_batches:
        h, n = jax.device_get(correct(generation_variables, batch))
        hits, total = hits + int(h), total + int(n)
    return hits / max(total, 1)


def run_experiment(cfg: BornAgainConfig, out_dir: str) -> dict[str, Any]:
    with jax.default_prng_impl(distill.PRNG_IMPL):
        return _run_experiment(cfg, out_dir)


def _run_experiment(cfg: BornAgainConfig, out_dir: str) -> dict[str, Any]:
    first, later = generation_methods(cfg)  # a bad spec fails before anything is loaded or trained
    phases = Phases()
    with phases.phase("data"):
        dataset = distill.load_data(cfg)
    distill.check_batch_size(cfg, dataset, {"first_method": first, "method": later})
    num_classes = dataset.train.num_classes
    arch, kwargs = distill.with_precision(cfg, (cfg.student, dict(cfg.student_kwargs)))
    student = models.get(arch, num_classes=num_classes, **kwargs)
    # A frozen generation runs in `frozen_dtype` (float32 by default: then the student's own Model object, so
    # the teacher's forward and the student's share compiled code).
    as_teacher = student if cfg.precision == "float32" else models.get(cfg.student, num_classes=num_classes,
                                                                         **cfg.student_kwargs)
    if cfg.frozen_dtype != "float32":
        as_teacher = models.get(cfg.student, num_classes=num_classes,
                                **{**cfg.student_kwargs, "dtype": jnp.dtype(cfg.frozen_dtype)})
    schedule = distill.schedule_of(cfg, cfg.lr, cfg.steps)
    tx = distill.make_optimizer(cfg, schedule)
    sample = data.Loader(dataset.train.images[: cfg.batch_size], dataset.train.labels[: cfg.batch_size],
                         batch_size=min(cfg.batch_size, len(dataset.train))).batch((0, 0))
    shared = distill.data_config(cfg)
    progress = progress_bar(len(cfg.seeds) * (cfg.generations + 1) * cfg.steps)
    rows: dict[str, report.Row] = {}
    started = time.time()
    mesh = sharding.make_mesh(cfg.mesh) if cfg.mesh is not None else None
    eval_step = jaxkd.make_eval_step(mesh=mesh, frozen=False)
    evaluation = Evaluation(lambda state: jaxkd.evaluate(state, dataset.test_batches, eval_step), prefix="test_",
                            progress=("accuracy", ".3f"))
    abstract = jax.eval_shape(as_teacher.init, jax.random.PRNGKey(0), sample["image"])
    saved: dict[tuple[int, int], Any] = {}
    with PreemptionFlag() as preemption:
        runner = Runner(out_dir, progress=progress, preemption=preemption, phases=phases, eval_every=cfg.eval_every,
                        checkpoint_every=cfg.checkpoint_every, tensorboard=cfg.tensorboard, mesh=mesh)
        try:
            # Generation by generation over the seeds: a generation's compiled programs serve all its seeds.
            for generation in range(cfg.generations + 1):
                method, text = (first, cfg.first_method) if generation == 0 else (later, cfg.method)
                for seed in cfg.seeds:
                    _, student_rng = jax.random.split(jax.random.PRNGKey(seed))
                    participants, teachers = {}, {}
                    if generation > 0:
                        # The previous generation, from the checkpoint on disk (what a resumed run loads too).
                        with phases.phase("setup"):
                            variables = load_variables(generation_dir(out_dir, seed, generation - 1), abstract)
                        teachers = {TEACHER: distill.teacher_fingerprint(variables)}
                        if cfg.frozen_dtype != "float32":
                            variables = cast_params(variables, jnp.dtype(cfg.frozen_dtype))
                        participants = {TEACHER: jaxkd.Participant(as_teacher, variables, trains=False)}
                    # Generation 0 starts exactly as experiments.distill's students (its `scratch` row, with
                    # first_method="ce"); each later generation from its own initialization.
                    rng = student_rng if generation == 0 else jax.random.fold_in(student_rng, generation)
                    with phases.phase("setup"):
                        state = jaxkd.create(student=student, method=method, tx=tx, participants=participants,
                                             rng=rng, sample_batch=sample,
                                             mesh=mesh)
                    run = f"gen{generation}"
                    config = {**shared, "run": run, "seed": seed, "method": text, "student": cfg.student,
                              "student_kwargs": cfg.student_kwargs, "steps": cfg.steps, "lr": cfg.lr,
                              "precision": cfg.precision, "frozen_dtype": cfg.frozen_dtype, "teachers": teachers}
                    state, result = distill.fit(runner, cfg, dataset, evaluation, run=run, seed=seed, state=state,
                                                split=dataset.student_train, steps=cfg.steps, lr_schedule=schedule,
                                                config=config)
                    final = jax.device_get(state.student.variables())
                    with phases.phase("checkpoints"):
                        save_variables(generation_dir(out_dir, seed, generation), final)
                    saved[seed, generation] = final
                    entry = rows.setdefault(run, report.Row(run, {"model": cfg.student, "method": text}, []))
                    entry.per_seed.append({"accuracy": result["accuracy"]})
                    entry.ms_per_step.append(result.get("ms_per_step"))
                    del state
                jax.clear_caches()
            if cfg.ensemble:
                eval_model = models.get(cfg.student, num_classes=num_classes, **cfg.student_kwargs)  # float32
                name = f"BANE (gen1..gen{cfg.generations})"
                for seed in cfg.seeds:
                    members = [saved[seed, g] for g in range(1, cfg.generations + 1)]
                    with phases.phase("evaluation"):
                        accuracy = ensemble_accuracy(eval_model, members, dataset.test_batches)
                    entry = rows.setdefault("bane", report.Row(
                        "bane", {"model": f"{cfg.generations} x {cfg.student}", "method": name}, []))
                    entry.per_seed.append({"accuracy": accuracy})
                    entry.ms_per_step.append(None)
        finally:
            runner.close()
            progress.close()

    with phases.phase("report"):
        num_student, num_test = len(dataset.student_train), int(sum(b["mask"].sum() for b in dataset.test_batches))
        caption = (f"{cfg.dataset}: born-again generations of {cfg.student}, each trained on {num_student} images for "
                   f"{cfg.steps} steps (gen0: `{cfg.first_method}`; gen k >= 1: `{cfg.method}` from gen k-1); test top-1 "
                   f"on {num_test} images after the last step, mean ± std over seeds {tuple(cfg.seeds)}.")
        summary = report.summarize(list(rows.values()), [report.Metric("accuracy", "top1", "top-1 (%)", 100.0, 2)],
                                   baseline="gen0", caption=caption, seconds=time.time() - started)
        summary["config"] = dataclasses.asdict(cfg)
    summary["time"] = phases.breakdown()
    report.write(out_dir, summary)
    return summary


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return run_command(argv, run_experiment, description=__doc__, config_type=BornAgainConfig,
                       default_config=os.path.join(os.path.dirname(__file__), "configs", "digits_born_again.py"))


if __name__ == "__main__":
    # The importable module's classes, not __main__'s copies: config files import them from there.
    from experiments import born_again

    entry_point(born_again.main)
