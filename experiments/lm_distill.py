"""Language-model distillation on the Python standard library's own source code (offline, 2 CPU cores).

    python -m experiments.lm_distill                                   # the default run (< 15 min)
    python -m experiments.lm_distill --config experiments/configs/lm_methods.py
    python -m experiments.lm_distill --set steps=200 --set seeds=(0,)

1. The corpus: the ``.py`` files of the running interpreter's standard library (``sysconfig``), as the
   TFDS data set ``stdlib_corpus`` (array_record, prepared once into ``<out_dir>/tfds``), split by file
   (:mod:`jaxkd.data.text.stdlib_corpus`), byte-tokenized and packed into rows of ``seq_len`` tokens.
2. The teacher: a transformer LM pretrained with next-token cross-entropy, once per (architecture, budget,
   optimizer, training rows, seed) in ``<out_dir>/teachers`` (:func:`experiments.lm_training.pretrained_lm`).
3. Students: the same small LM trained for the same number of steps from the same initialization per
   seed, on data alone (``scratch``) and with each distillation objective, every method selected by its
   registry name in a spec string (``"lm_ce + token_kd(divergence='reverse_kl')"``).
4. Validation bits per byte (:func:`jaxkd.data.bits_per_byte`) of the teacher and of every student,
   mean ± std over seeds, printed as a Markdown table and written to ``results.md``/``results.json``
   with the curves in ``curves.png``.

Runs survive being killed, as the vision experiment's do (:mod:`experiments.runner`): every
``checkpoint_every`` steps and at the end of each run (the teacher's pretraining included) the train state and
the loader's position are saved; re-running the same command with the same ``--out`` skips finished runs,
resumes the interrupted one and ends with the uninterrupted run's results, bitwise; SIGTERM saves and exits
with status 143; resuming with another method, student, precision, teacher or data is refused, naming what
differs.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import Any, Mapping

import jax
import numpy as np

import jaxkd
from jaxkd import methods
from jaxkd.batch import with_token_normalizer
from jaxkd.data import ByteTokenizer, PackedText, TextLoader, count_byte_targets
from jaxkd.data.text.teacher_cache import TopKCache, cache_teacher_topk
from jaxkd.data.text.stdlib_corpus import stdlib_corpus_sequences
from jaxkd.models import lm as lm_models
from jaxkd.models.lora import ADAPTERS, init_lora, lora
from jaxkd.models.quantize import quantize_int8
from jaxkd.precision import POLICIES, lm_config, policy

from experiments import config as config_lib
from experiments import report
from experiments.lm_training import (
    bpb_evaluation,
    bpb_evaluator,
    optimizer,
    padded_batches,
    pretrained_lm,
    rows_fingerprint,
    schedule,
)
from experiments.run_log import PreemptionFlag
from experiments.runner import Runner, entry_point, progress_bar, run_command
from experiments.timing import Phases


@dataclasses.dataclass(frozen=True)
class LMExperiment:
    """One LM distillation experiment (a config file's ``get_config()`` returns one).

    Attributes:
      name: the run folder's prefix.
      seq_len: tokens per packed row (the models' context).
      max_train_files, max_eval_files: how many corpus files each split keeps (a stable spread-out subset,
        :func:`jaxkd.data.text.stdlib_corpus.stdlib_corpus_sequences`); ``None`` keeps all.
      max_eval_rows: validation rows scored (the first ones, fixed across runs).
      teacher, student: :class:`jaxkd.models.lm.LMConfig` fields (besides ``vocab_size``/``max_len``).
      cache_k: top-k entries per token of the offline teacher cache, written once per teacher when a method
        reads it (``sparse_token_kd(cached=True)``).
      extra_teachers: further teachers by participant name (``{"teacher_b": {...}}``), pretrained the same
        way (another seed) when a method reads them (multi-teacher fusion); a ``"steps"`` entry gives that
        teacher its own pretraining budget (ADPA's less-trained ``reference``).
      teacher_steps, teacher_lr: the teachers' pretraining.
      teacher_int8: every frozen teacher is held with int8 weight-only matmul weights, one float32 scale per
        output channel (:func:`jaxkd.models.quantize.quantize_int8`), about half its bfloat16 bytes; the offline
        top-k cache is then the int8 teacher's (its own file).
      student_init_steps: the student starts from its architecture pretrained with ``lm_ce`` for that many
        steps (like a teacher: cached in ``<out_dir>/teachers``, its own seed); 0 (the default): a fresh
        initialization per seed.
      student_lora: ``{"targets": regex, "rank": r, "alpha": a}``: the student trains LoRA adapters only, on the
        weights whose path matches ``targets`` (:func:`jaxkd.models.lora.lora`; the rest stays its starting
        weights); needs ``student_init_steps > 0``. ``None`` (the default): every weight trains.
      steps, lr, warmup_steps, weight_decay, batch_size: every student's budget (AdamW, linear warm-up,
        cosine decay).
      precision: the student's mixed-precision policy (:func:`jaxkd.precision.policy`): ``"float32"``, or
        ``"bfloat16"`` (its ``LMConfig`` gets ``dtype=bfloat16``, ``param_dtype=float32``: bf16 compute,
        float32 parameters, AdamW state and logits). The student's dtypes come from it alone (``student``
        may not set ``dtype`` / ``param_dtype``). Teachers (and ``student_init_steps``' starting weights)
        are pretrained in float32 whatever it is, so students of either precision distill from the same
        teacher and the pretrained-model cache is shared.
      microbatches: gradient accumulation inside the step (the batch is split; same update).
      methods: run name -> method spec; ``"scratch"`` is the data-only baseline. Specs may use the
        constants ``steps``, ``batch_size``, ``lr``, ``seq_len``.
      seeds: one student per seed and method (same initialization across methods for a seed).
      eval_every: steps between validation evaluations (and the last step).
      out_dir: where run folders go.
      corpus_dir: a folder of ``.py`` files to read instead of the running interpreter's standard library
        (:class:`jaxkd.data.text.stdlib_corpus.StdlibCorpus`'s ``source_dir``, same split by file); None: the stdlib.
      compilation_cache: JAX's persistent compilation cache folder (:func:`jaxkd.compilation_cache.enable`:
        ``"default"``, a path, or None for none).
    """

    name: str = "stdlib_lm"
    seq_len: int = 128
    max_train_files: int | None = 200
    max_eval_files: int | None = 40
    max_eval_rows: int = 256
    teacher: Mapping[str, Any] = dataclasses.field(
        default_factory=lambda: dict(d_model=128, num_layers=4, num_heads=4, d_ff=384))
    student: Mapping[str, Any] = dataclasses.field(
        default_factory=lambda: dict(d_model=64, num_layers=2, num_heads=2, d_ff=192))
    cache_k: int = 16
    extra_teachers: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    teacher_steps: int = 600
    teacher_lr: float = 3e-3
    teacher_int8: bool = False
    student_init_steps: int = 0
    student_lora: Mapping[str, Any] | None = None
    steps: int = 400
    lr: float = 3e-3
    warmup_steps: int = 40
    weight_decay: float = 0.01
    batch_size: int = 32
    microbatches: int = 1
    precision: str = "float32"
    methods: Mapping[str, str] = dataclasses.field(
        default_factory=lambda: {"scratch": "lm_ce", "token_kd": "lm_ce + token_kd()"})
    seeds: tuple[int, ...] = (0, 1, 2)
    eval_every: int = 100
    checkpoint_every: int = 100
    tensorboard: bool = True
    out_dir: str = "runs"
    corpus_dir: str | None = None
    compilation_cache: str | None = "default"

    def check(self) -> None:
        """Checks across fields (after every field's own, :func:`experiments.config.validate`)."""
        check_lm_batch(self)
        check_student_dtypes(self.student)
        if self.student_lora is not None:
            if set(self.student_lora) != {"targets", "rank", "alpha"}:
                raise ValueError(f"student_lora takes exactly the keys ['alpha', 'rank', 'targets'], got "
                                 f"{sorted(self.student_lora)}")
            if self.student_init_steps == 0:
                raise ValueError("student_lora trains adapters on the student's starting weights: set "
                                 "student_init_steps > 0 (adapters on a random initialization learn little)")
        for name, arch in self.extra_teachers.items():
            if not isinstance(name, str) or not name or name in ("teacher", "student") or not isinstance(arch, Mapping):
                raise ValueError(f"extra_teachers must map new participant names to LMConfig fields, got "
                                 f"{name!r}: {arch!r}")


def check_lm_batch(cfg: Any) -> None:
    if cfg.batch_size % cfg.microbatches:
        raise ValueError(f"microbatches must divide batch_size, got batch_size={cfg.batch_size}, "
                         f"microbatches={cfg.microbatches}")


def check_arch(name: str, value: Any) -> None:
    """LMConfig fields (besides the vocabulary and context, which the experiment sets)."""
    fields = {f.name for f in dataclasses.fields(lm_models.LMConfig)} - {"vocab_size", "max_len"}
    for key in value:
        if key not in fields:
            raise ValueError(config_lib.unknown_key_message(f"{name} field", key, fields))


#: Range checks of every LM experiment's shared fields (the cross-tokenizer experiment adds its own).
LM_CHECKS = {
    **{name: config_lib.at_least(1) for name in
       ("steps", "teacher_steps", "batch_size", "microbatches", "eval_every", "max_eval_rows", "cache_k")},
    "seq_len": config_lib.at_least(2), "warmup_steps": config_lib.at_least(0),
    "checkpoint_every": config_lib.at_least(0), "student_init_steps": config_lib.at_least(0),
    "max_train_files": config_lib.optional(config_lib.at_least(1)),
    "max_eval_files": config_lib.optional(config_lib.at_least(1)),
    "lr": config_lib.positive, "teacher_lr": config_lib.positive, "weight_decay": config_lib.nonnegative,
    "seeds": config_lib.check_seeds, "methods": config_lib.check_methods, "teacher": check_arch,
    "student": check_arch,
}
def check_student_dtypes(student: Mapping[str, Any]) -> None:
    """A student config (``LMConfig`` fields) leaves its dtypes to the experiment's ``precision``."""
    for key in ("dtype", "param_dtype"):
        if key in student:
            raise ValueError(f"student sets {key}={student[key]!r}: the student's dtypes come from "
                             f"precision (one of {sorted(POLICIES)}), set that instead")


LMExperiment.CHECKS = {**LM_CHECKS, "precision": config_lib.check_precision}


def parse_methods(cfg: LMExperiment, **extra_constants: Any) -> dict[str, methods.Method]:
    """The config's method specs, parsed before anything trains; specs may use the constants ``steps``,
    ``batch_size``, ``lr``, ``seq_len`` and any ``extra_constants``."""
    constants = {"steps": cfg.steps, "batch_size": cfg.batch_size, "lr": cfg.lr, "seq_len": cfg.seq_len,
                 **extra_constants}
    return config_lib.parse_methods(cfg.methods, constants)


# ----- data -----


#: The default teacher's seed (extra teachers take the next ones).
TEACHER_SEED = 1234
#: The seed of the student's pretrained starting weights (``student_init_steps``).
STUDENT_BASE_SEED = 4321


@dataclasses.dataclass(frozen=True)
class Corpus:
    """The packed training rows, the validation batches and the bytes their targets stand for."""

    train: PackedText
    eval_batches: list
    eval_bytes: int


def load_corpus(cfg: Any) -> Corpus:
    """The byte-level training rows and validation batches of ``cfg`` (TFDS prepared once into
    ``<out_dir>/tfds``)."""
    data_dir = os.path.join(cfg.out_dir, "tfds")
    train_data = stdlib_corpus_sequences("train", seq_len=cfg.seq_len, data_dir=data_dir, source_dir=cfg.corpus_dir,
                                         max_files=cfg.max_train_files)
    val_data = stdlib_corpus_sequences("validation", seq_len=cfg.seq_len, data_dir=data_dir,
                                       source_dir=cfg.corpus_dir, max_files=cfg.max_eval_files)
    eval_rows = padded_batches(val_data.tokens[:cfg.max_eval_rows], val_data.mask[:cfg.max_eval_rows], cfg.batch_size)
    num_bytes = count_byte_targets(np.concatenate([b["tokens"] for b in eval_rows]),
                                        np.concatenate([b["mask"] for b in eval_rows]),
                                        ByteTokenizer().token_byte_lengths)
    return Corpus(train_data, eval_rows, num_bytes)


# ----- the teachers -----


@dataclasses.dataclass(frozen=True)
class Teacher:
    config: lm_models.LMConfig
    variables: Any
    directory: str
    steps: int
    bpb: float


def pretrained_teacher(cfg: Any, runner: Runner, corpus: Corpus, name: str, arch: Mapping[str, Any], seed: int,
                       steps: int | None = None) -> Teacher:
    """A byte-level teacher pretrained with ``lm_ce`` for ``steps`` (default ``cfg.teacher_steps``) on the
    corpus' training rows, shared by every experiment through ``<out_dir>/teachers``
    (:func:`experiments.lm_training.pretrained_lm`)."""
    steps = cfg.teacher_steps if steps is None else steps
    config = lm_models.LMConfig(vocab_size=ByteTokenizer().vocab_size, max_len=cfg.seq_len, **arch)
    evaluate = bpb_evaluator(lm_models.lm(config), corpus.eval_batches)
    variables, directory = pretrained_lm(
        runner, cache_root=os.path.join(cfg.out_dir, "teachers"), label=name, config=config, rows=corpus.train,
        steps=steps, lr=cfg.teacher_lr, warmup_steps=cfg.warmup_steps, weight_decay=cfg.weight_decay,
        batch_size=cfg.batch_size, microbatches=cfg.microbatches, seed=seed, evaluate_variables=evaluate)
    return Teacher(config, variables, directory, steps, evaluate(variables))


def teacher_identity(teacher: Teacher) -> str:
    """What a student's checkpoint records of a frozen teacher: its folder's key (every setting and the
    training rows it was trained on)."""
    return os.path.basename(teacher.directory)


def lm_runner(cfg: Any, out_dir: str, *, progress, preemption, phases) -> Runner:
    return Runner(out_dir, progress=progress, preemption=preemption, phases=phases, eval_every=cfg.eval_every,
                  checkpoint_every=cfg.checkpoint_every, tensorboard=cfg.tensorboard, microbatches=cfg.microbatches)


def student_config(cfg: Any, method_spec: str, seed: int, **extra: Any) -> dict[str, Any]:
    """What a student run's checkpoint records: resuming with any other value is refused, naming it."""
    return {"method": method_spec, "student": dict(cfg.student), "seed": seed, "steps": cfg.steps, "lr": cfg.lr,
            "warmup_steps": cfg.warmup_steps, "weight_decay": cfg.weight_decay, "batch_size": cfg.batch_size,
            "microbatches": cfg.microbatches, "seq_len": cfg.seq_len, **extra}


LM_KEYS = ("tokens", "mask")


def held_teacher(cfg: Any, teacher: Teacher, sample: Mapping[str, Any]) -> tuple[jaxkd.models.Model, Any]:
    """The frozen teacher's ``(model, variables)`` as the students' runs hold it: float32, or int8 weight-only
    with ``teacher_int8``."""
    model = lm_models.lm(teacher.config)
    if not cfg.teacher_int8:
        return model, teacher.variables
    return quantize_int8(model, teacher.variables, {k: sample[k] for k in LM_KEYS})


def student_participant(cfg: Any, model: jaxkd.models.Model, base: Teacher | None, sample: Mapping[str, Any],
                        seed: int) -> jaxkd.Participant:
    """The student: freshly initialized, or from its pretrained ``base``; with ``student_lora``, adapters on
    the base weights and only they train."""
    if cfg.student_lora is None:
        return jaxkd.participants.student(model, None if base is None else base.variables, input=LM_KEYS)
    variables = init_lora(model, base.variables, jax.random.PRNGKey(seed), {k: sample[k] for k in LM_KEYS})
    return jaxkd.Participant(model, variables, input=LM_KEYS, trainable=ADAPTERS)


def student_start(cfg: Any, base: Teacher | None) -> dict[str, Any]:
    """What a student run's checkpoint records of its start and of the teachers' precision (only when set, so
    that runs without them keep their recorded configs)."""
    out: dict[str, Any] = {}
    if base is not None:
        out["student_base"] = teacher_identity(base)
    if cfg.student_lora is not None:
        out["student_lora"] = dict(cfg.student_lora)
    if cfg.teacher_int8:
        out["teacher_int8"] = True
    return out


def trainable_count(state: jaxkd.TrainState, name: str) -> int:
    """How many of participant ``name``'s parameters the optimizer updates."""
    params = state.trained[name].params
    mask = state.participant(name).trainable_mask(params)
    return int(sum(np.size(p) for p, keep in zip(jax.tree.leaves(params), jax.tree.leaves(mask)) if keep))


def tree_bytes(tree: Any) -> int:
    """The bytes of every array in ``tree``."""
    return int(sum(leaf.nbytes for leaf in jax.tree.leaves(tree)))


# ----- the experiment -----


def run_experiment(cfg: LMExperiment, out_dir: str) -> dict[str, Any]:
    start = time.time()
    phases = Phases()
    run_methods = parse_methods(cfg)  # every spec checked before anything trains
    needed = {p for m in run_methods.values() for p in m.needs.participants}
    for name in needed - {"student", "teacher", *cfg.extra_teachers}:
        raise ValueError(f"config methods read participant {name!r}; the config's teachers are "
                         f"{sorted({'teacher', *cfg.extra_teachers})} (add it to extra_teachers)")
    with phases.phase("data"):
        corpus = load_corpus(cfg)
    train_data = corpus.train
    student_cfg = lm_config(policy(cfg.precision), lm_models.LMConfig(
        vocab_size=ByteTokenizer().vocab_size, max_len=cfg.seq_len, **cfg.student))
    student_model = lm_models.lm(student_cfg)
    if cfg.student_lora is not None:
        student_model = lora(student_model, **cfg.student_lora)
    evaluation = bpb_evaluation(bpb_evaluator(student_model, corpus.eval_batches))
    rows_key = rows_fingerprint(train_data.tokens, train_data.mask)
    sample = with_token_normalizer({"tokens": train_data.tokens[:cfg.batch_size], "mask": train_data.mask[:cfg.batch_size]})

    progress = progress_bar(len(run_methods) * len(cfg.seeds) * cfg.steps)
    rows: list[report.Row] = []
    with PreemptionFlag() as preemption:
        runner = lm_runner(cfg, out_dir, progress=progress, preemption=preemption, phases=phases)
        try:
            teachers = {"teacher": pretrained_teacher(cfg, runner, corpus, "teacher", cfg.teacher, TEACHER_SEED)}
            for i, (name, arch) in enumerate(cfg.extra_teachers.items()):
                if name in needed:
                    arch = dict(arch)
                    steps = arch.pop("steps", cfg.teacher_steps)
                    teachers[name] = pretrained_teacher(cfg, runner, corpus, name, arch, TEACHER_SEED + 1 + i, steps)
            student_base = None
            if cfg.student_init_steps:
                student_base = pretrained_teacher(cfg, runner, corpus, "student_base", cfg.student, STUDENT_BASE_SEED,
                                                  cfg.student_init_steps)
                rows.append(report.Row("student_base", {"method": f"lm_ce ({student_base.steps} steps)",
                                                        "params": f"{student_cfg.num_params / 1e6:.2f}M"},
                                       [{"bpb": student_base.bpb}], compare=False))
            held = {name: held_teacher(cfg, t, sample) for name, t in teachers.items()}
            held_bpb = {name: bpb_evaluator(model, corpus.eval_batches)(variables) if cfg.teacher_int8 else
                        teachers[name].bpb for name, (model, variables) in held.items()}
            trainable_params = None
            for name, t in teachers.items():
                rows.append(report.Row(name, {"method": f"lm_ce ({t.steps} steps)",
                                              "params": f"{t.config.num_params / 1e6:.2f}M"}, [{"bpb": t.bpb}],
                                       compare=False))

            cache = None
            if any("topk_indices" in m.needs.batch_keys for m in run_methods.values()):
                teacher = teachers["teacher"]
                # The teacher as held (int8 with teacher_int8): the cache is its own file.
                precision = "-int8" if cfg.teacher_int8 else ""
                cache_path = os.path.join(teacher.directory, f"topk{cfg.cache_k}{precision}-{rows_key}.array_record")
                if os.path.exists(cache_path):
                    cache = TopKCache(cache_path, k=cfg.cache_k, seq_len=cfg.seq_len)
                else:  # written to a temporary file and renamed: a kill leaves no partial cache
                    started = time.time()
                    cache = cache_teacher_topk(cache_path, *held["teacher"],
                                               train_data.tokens, train_data.mask, k=cfg.cache_k)
                    print(f"teacher cache: top-{cfg.cache_k} of {len(train_data)} rows in "
                          f"{time.time() - started:.0f} s ({os.path.getsize(cache_path) / 2**20:.1f} MiB)",
                          file=sys.stderr)

            for run, method in run_methods.items():
                per_seed, ms = [], []
                cached = "topk_indices" in method.needs.batch_keys
                for seed in cfg.seeds:
                    parts = {"student": student_participant(cfg, student_model, student_base, sample, seed)}
                    for name in method.needs.participants:
                        parts[name] = jaxkd.participants.teacher(*held[name], input=LM_KEYS)
                    loader = TextLoader(train_data.tokens, train_data.mask, batch_size=cfg.batch_size, seed=seed,
                                             num_epochs=None, teacher_cache=cache if cached else None)
                    with phases.phase("setup"):
                        state = jaxkd.create(participants=parts, method=method,
                                             tx=optimizer(cfg.lr, cfg.steps, cfg.warmup_steps, cfg.weight_decay),
                                             sample_batch={**sample, **cache.batch(np.arange(cfg.batch_size))}
                                             if cached else sample, rng=jax.random.PRNGKey(seed))
                    if trainable_params is None:
                        trainable_params = trainable_count(state, "student")
                    config = student_config(cfg, cfg.methods[run], seed, rows=rows_key, teachers={
                        p: teacher_identity(teachers[p]) for p in method.needs.participants},
                        cache_k=cfg.cache_k if cached else None, precision=cfg.precision,
                        **student_start(cfg, student_base))
                    _, result = runner.fit(run=run, seed=seed, state=state, loaders={"train": loader},
                                           steps=cfg.steps, lr_schedule=schedule(cfg.lr, cfg.steps, cfg.warmup_steps),
                                           config=config, evaluation=evaluation)
                    per_seed.append({"bpb": result["bpb"]})
                    ms.append(result.get("ms_per_step"))
                rows.append(report.Row(run, {"method": cfg.methods[run],
                                             "params": f"{student_cfg.num_params / 1e6:.2f}M"}, per_seed, ms))
                jax.clear_caches()
        finally:
            runner.close()
            progress.close()

    source = corpus_source(cfg)
    caption = (f"{source}, byte-level, rows of {cfg.seq_len} tokens ({len(train_data)} training rows); students "
               f"trained {cfg.steps} steps of {cfg.batch_size} rows; validation bits per byte over "
               f"{corpus.eval_bytes} bytes, mean ± std over seeds {tuple(cfg.seeds)}. "
               f"Wall time {(time.time() - start) / 60:.1f} min.")
    summary = report.summarize(rows, [report.Metric("bpb", "bpb", "val bits/byte")], baseline="scratch",
                               caption=caption, seconds=time.time() - start)
    summary["rows"] = [r for r in summary["rows"] if r["run"] not in teachers]
    summary.update(config=dataclasses.asdict(cfg), teacher_bpb={n: t.bpb for n, t in teachers.items()},
                   teacher_param_bytes={n: tree_bytes(v["params"]) for n, (_, v) in held.items()},
                   held_teacher_bpb=held_bpb, student_trainable_params=trainable_params,
                   time=phases.breakdown())
    write_results(out_dir, summary, [("val_bpb", "validation bits per byte")])
    return summary


def corpus_source(cfg: Any) -> str:
    if cfg.corpus_dir is None:
        return f"Python {sys.version_info.major}.{sys.version_info.minor} standard library"
    return f"the .py files of {cfg.corpus_dir}"


def write_results(out_dir: str, summary: dict[str, Any], panels: list[tuple[str, str]]) -> None:
    """``results.json``, ``results.md`` (the table) and ``curves.png`` of an LM run."""
    report.write(out_dir, summary)
    report.plot_curves(os.path.join(out_dir, "metrics.jsonl"), os.path.join(out_dir, "curves.png"), panels)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return run_command(argv, run_experiment, description=__doc__, config_type=LMExperiment)


if __name__ == "__main__":
    # The importable module's classes, not __main__'s copies: config files import them from there.
    from experiments import lm_distill

    entry_point(lm_distill.main)
