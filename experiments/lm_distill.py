"""Language-model distillation on the Python standard library's own source code (offline, 2 CPU cores).

    python -m experiments.lm_distill                                   # the default run (< 15 min)
    python -m experiments.lm_distill --config experiments/configs/lm_methods.py
    python -m experiments.lm_distill --set steps=200 --set seeds=(0,)

1. The corpus: the ``.py`` files of the running interpreter's standard library (``sysconfig``), as the
   TFDS data set ``stdlib_corpus`` (array_record, prepared once into ``<out_dir>/tfds``), split by file
   (:mod:`jaxkd.data.stdlib_corpus`), byte-tokenized and packed into rows of ``seq_len`` tokens.
2. The teacher: a transformer LM pretrained with next-token cross-entropy; saved once per config (its
   fingerprint checked on reuse) in ``<out_dir>/teachers``.
3. Students: the same small LM trained for the same number of steps from the same initialization per
   seed, on data alone (``scratch``) and with each distillation objective, every method selected by its
   registry name in a spec string (``"lm_ce + token_kd(divergence='reverse_kl')"``).
4. Validation bits per byte (:func:`jaxkd.data.text.bits_per_byte`) of the teacher and of every student,
   mean ± std over seeds, printed as a Markdown table and written to ``results.md``/``results.json``
   with the curves in ``curves.png``.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import hashlib
import json
import logging
import math
import os
import sys
import time
from typing import Any, Callable, Mapping

import jax
import numpy as np
import optax

import jaxkd
from jaxkd import compilation_cache, losses, methods
from jaxkd.checkpoint import load_variables, save_variables
from jaxkd.data import text
from jaxkd.data.teacher_cache import TopKCache, cache_teacher_topk
from jaxkd.data.stdlib_corpus import stdlib_corpus_sequences
from jaxkd.losses.tokens import TOKEN_NORMALIZER_KEY, token_normalizer
from jaxkd.models import lm as lm_models

log = logging.getLogger("jaxkd.lm_experiment")


@dataclasses.dataclass(frozen=True)
class LMExperiment:
    """One LM distillation experiment (a config file's ``get_config()`` returns one).

    Attributes:
      name: the run folder's prefix.
      seq_len: tokens per packed row (the models' context).
      max_train_files, max_eval_files: how many corpus files each split keeps (a stable spread-out subset,
        :func:`jaxkd.data.stdlib_corpus.stdlib_corpus_sequences`); ``None`` keeps all.
      max_eval_rows: validation rows scored (the first ones, fixed across runs).
      teacher, student: :class:`jaxkd.models.lm.LMConfig` fields (besides ``vocab_size``/``max_len``).
      cache_k: top-k entries per token of the offline teacher cache, written once per teacher when a method
        reads it (``sparse_token_kd(cached=True)``).
      extra_teachers: further teachers by participant name (``{"teacher_b": {...}}``), pretrained the same
        way (another seed) when a method reads them (multi-teacher fusion); a ``"steps"`` entry gives that
        teacher its own pretraining budget (ADPA's less-trained ``reference``).
      teacher_steps, teacher_lr: the teachers' pretraining.
      steps, lr, warmup_steps, weight_decay, batch_size: every student's budget (AdamW, linear warm-up,
        cosine decay).
      microbatches: gradient accumulation inside the step (the batch is split; same update).
      methods: run name -> method spec; ``"scratch"`` is the data-only baseline. Specs may use the
        constants ``steps``, ``batch_size``, ``lr``, ``seq_len``.
      seeds: one student per seed and method (same initialization across methods for a seed).
      eval_every: steps between validation evaluations (and the last step).
      out_dir: where run folders go.
      corpus_dir: a folder of ``.py`` files to read instead of the running interpreter's standard library
        (:class:`jaxkd.data.stdlib_corpus.StdlibCorpus`'s ``source_dir``, same split by file); None: the stdlib.
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
    steps: int = 400
    lr: float = 3e-3
    warmup_steps: int = 40
    weight_decay: float = 0.01
    batch_size: int = 32
    microbatches: int = 1
    methods: Mapping[str, str] = dataclasses.field(
        default_factory=lambda: {"scratch": "lm_ce", "token_kd": "lm_ce + token_kd()"})
    seeds: tuple[int, ...] = (0, 1, 2)
    eval_every: int = 100
    out_dir: str = "runs"
    corpus_dir: str | None = None
    compilation_cache: str | None = "default"


def load_config(path: str | None) -> LMExperiment:
    if path is None:
        return LMExperiment()
    namespace: dict[str, Any] = {}
    with open(path) as f:
        exec(compile(f.read(), path, "exec"), namespace)
    if "get_config" not in namespace:
        raise ValueError(f"{path} defines no get_config()")
    return namespace["get_config"]()


def apply_overrides(cfg: LMExperiment, overrides: list[str]) -> LMExperiment:
    """``key=value`` pairs (Python literals; a bare word is a string) replacing config fields."""
    fields = {f.name for f in dataclasses.fields(cfg)}
    changes = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or key not in fields:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE with KEY one of {sorted(fields)}")
        try:
            changes[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            changes[key] = value
    return dataclasses.replace(cfg, **changes)


def parse_methods(cfg: LMExperiment, **extra_constants: Any) -> dict[str, methods.Method]:
    """The config's method specs, parsed before anything trains; specs may use the constants ``steps``,
    ``batch_size``, ``lr``, ``seq_len`` and any ``extra_constants``."""
    constants = {"steps": cfg.steps, "batch_size": cfg.batch_size, "lr": cfg.lr, "seq_len": cfg.seq_len,
                 **extra_constants}
    parsed = {}
    for name, spec in cfg.methods.items():
        try:
            parsed[name] = methods.parse(spec, constants)
        except ValueError as e:
            raise ValueError(f"config methods[{name!r}]: {e}") from None
    return parsed


# ----- data -----


def with_normalizer(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The batch plus its global target-token count per example (exact means under accumulation)."""
    target_mask = batch["mask"][:, 1:] & batch["mask"][:, :-1]
    return {**batch, TOKEN_NORMALIZER_KEY: token_normalizer(target_mask)}


def eval_batches(data: text.PackedText, batch_size: int, max_rows: int) -> list[dict[str, np.ndarray]]:
    """Validation rows in order, the last batch padded with fully masked rows (they score nothing)."""
    tokens, mask = data.tokens[:max_rows], data.mask[:max_rows]
    pad = -len(tokens) % batch_size
    tokens = np.concatenate([tokens, np.full((pad, tokens.shape[1]), text.PAD_ID, np.int32)])
    mask = np.concatenate([mask, np.zeros((pad, mask.shape[1]), bool)])
    return [{"tokens": tokens[i:i + batch_size], "mask": mask[i:i + batch_size]}
            for i in range(0, len(tokens), batch_size)]


@jax.jit
def _nats(logits, tokens, mask):
    targets, target_mask = losses.next_token_targets(tokens, mask)
    return losses.cross_entropy(logits[:, :-1], targets, mask=target_mask, reduction="sum")


def validation_bpb(model: jaxkd.models.Model, variables, batches, num_bytes: int) -> float:
    """Bits per byte of ``model`` over the validation batches."""
    apply = jax.jit(lambda v, x: model.apply(v, x, train=False).logits)
    total = 0.0
    for batch in batches:
        total += float(_nats(apply(variables, {"tokens": batch["tokens"], "mask": batch["mask"]}),
                             batch["tokens"], batch["mask"]))
    return text.bits_per_byte(total, num_bytes)


# ----- training -----


def optimizer(lr: float, steps: int, warmup: int, weight_decay: float) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, min(warmup, steps - 1), steps)
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=weight_decay))


def lm_participant(config: lm_models.LMConfig, variables=None, *, trains: bool) -> jaxkd.Participant:
    model = lm_models.lm(config)
    if trains:
        return jaxkd.participants.student(model, variables, input=("tokens", "mask"))
    return jaxkd.participants.teacher(model, variables, input=("tokens", "mask"))


def train(state, batches, steps: int, *, microbatches: int, eval_fn, eval_every: int, record) -> tuple[Any, float]:
    """``steps`` updates; ``record(step, metrics or eval)``; returns the state and the steady-state ms/step."""
    step_fn = jaxkd.make_train_step(microbatches=microbatches)
    times = []
    for i in range(1, steps + 1):
        start = time.perf_counter()
        state, metrics = step_fn(state, next(batches))
        loss = float(metrics["loss"])  # waits for the step
        times.append(time.perf_counter() - start)
        record({"step": i, "loss": loss})
        if i % eval_every == 0 or i == steps:
            bpb = eval_fn(state)
            record({"step": i, "val_bpb": bpb})
            # DistiLLM's adaptive schedule reads the validation loss (nats per byte here: per token for bytes).
            state = methods.observe_validation_loss(state, bpb * math.log(2.0))
    steady = times[len(times) // 5:] or times
    return state, 1000.0 * float(np.median(steady))


def _config_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


#: The default teacher's seed (extra teachers take the next ones).
TEACHER_SEED = 1234


@dataclasses.dataclass(frozen=True)
class Corpus:
    """The packed training rows, the validation batches and the bytes their targets stand for."""

    train: text.PackedText
    eval_batches: list
    eval_bytes: int


def load_corpus(cfg: LMExperiment) -> Corpus:
    """The byte-level training rows and validation batches of ``cfg`` (TFDS prepared once into
    ``<out_dir>/tfds``)."""
    data_dir = os.path.join(cfg.out_dir, "tfds")
    train_data = stdlib_corpus_sequences("train", seq_len=cfg.seq_len, data_dir=data_dir, source_dir=cfg.corpus_dir,
                                         max_files=cfg.max_train_files)
    val_data = stdlib_corpus_sequences("validation", seq_len=cfg.seq_len, data_dir=data_dir,
                                       source_dir=cfg.corpus_dir, max_files=cfg.max_eval_files)
    eval_rows = eval_batches(val_data, cfg.batch_size, cfg.max_eval_rows)
    num_bytes = text.count_byte_targets(np.concatenate([b["tokens"] for b in eval_rows]),
                                        np.concatenate([b["mask"] for b in eval_rows]),
                                        text.ByteTokenizer().token_byte_lengths)
    return Corpus(train_data, eval_rows, num_bytes)


def _model_input(batch):
    return {"tokens": batch["tokens"], "mask": batch["mask"]}


def pretrained_teacher(cfg: LMExperiment, corpus: Corpus, name: str, arch: Mapping[str, Any], seed: int, record):
    """A byte-level teacher pretrained with ``lm_ce`` for ``cfg.teacher_steps``, once per (architecture,
    budget, data, seed): reused from ``<out_dir>/teachers/<hash>`` when present, its checksums checked.
    Returns ``(LMConfig, Model, variables, validation bits per byte, directory)``."""
    vocab = text.ByteTokenizer().vocab_size
    arch_cfg = lm_models.LMConfig(vocab_size=vocab, max_len=cfg.seq_len, **arch)
    identity = {"teacher": dict(arch), "steps": cfg.teacher_steps, "lr": cfg.teacher_lr, "seed": seed,
                "seq_len": cfg.seq_len, "files": cfg.max_train_files, "batch": cfg.batch_size}
    if cfg.corpus_dir is not None:  # only then, so the stdlib teachers keep their keys
        identity["corpus"] = os.path.abspath(cfg.corpus_dir)
    key = _config_hash(identity)
    directory = os.path.abspath(os.path.join(cfg.out_dir, "teachers", key))
    model = lm_models.lm(arch_cfg)
    train_data, eval_rows, num_bytes = corpus.train, corpus.eval_batches, corpus.eval_bytes
    sample = with_normalizer({"tokens": train_data.tokens[:cfg.batch_size], "mask": train_data.mask[:cfg.batch_size]})
    if os.path.exists(os.path.join(directory, "fingerprint.json")):
        abstract = jax.eval_shape(lambda: jaxkd.sharding.unbox(model.init(jax.random.PRNGKey(0), _model_input(sample))))
        with open(os.path.join(directory, "fingerprint.json")) as f:
            variables = load_variables(directory, abstract, expected=json.load(f))
        print(f"{name}: reusing {directory}", file=sys.stderr)
    else:
        print(f"{name}: pretraining {arch_cfg.num_params / 1e6:.2f}M parameters for {cfg.teacher_steps} steps",
              file=sys.stderr)
        state = jaxkd.create(participants={"student": lm_participant(arch_cfg, trains=True)},
                             method=methods.lm_ce(), tx=optimizer(cfg.teacher_lr, cfg.teacher_steps,
                                                                  cfg.warmup_steps, cfg.weight_decay),
                             sample_batch=sample, rng=jax.random.PRNGKey(seed))
        state, _ = train(
            state, iter(text.TextLoader(train_data.tokens, train_data.mask, batch_size=cfg.batch_size, seed=seed,
                                        num_epochs=None)), cfg.teacher_steps,
            microbatches=cfg.microbatches, eval_every=cfg.eval_every, record=record,
            eval_fn=lambda s: validation_bpb(model, s.student.variables(), eval_rows, num_bytes))
        variables = jax.device_get(state.student.variables())
        fp = save_variables(directory, variables)
        with open(os.path.join(directory, "fingerprint.json"), "w") as f:
            json.dump(fp, f)
    return arch_cfg, model, variables, validation_bpb(model, variables, eval_rows, num_bytes), directory


def run_experiment(cfg: LMExperiment, out_dir: str) -> dict[str, Any]:
    start = time.time()
    os.makedirs(out_dir, exist_ok=True)
    run_methods = parse_methods(cfg)  # every spec checked before anything trains
    corpus = load_corpus(cfg)
    train_data, eval_rows, num_bytes = corpus.train, corpus.eval_batches, corpus.eval_bytes
    vocab = text.ByteTokenizer().vocab_size
    student_cfg = lm_models.LMConfig(vocab_size=vocab, max_len=cfg.seq_len, **cfg.student)
    metrics_path = os.path.join(out_dir, "metrics.jsonl")
    metrics_file = open(metrics_path, "a")
    recorder = metrics_recorder(metrics_file)

    sample = with_normalizer({"tokens": train_data.tokens[:cfg.batch_size], "mask": train_data.mask[:cfg.batch_size]})
    cached_sample = None

    teachers = {"teacher": pretrained_teacher(cfg, corpus, "teacher", cfg.teacher, TEACHER_SEED, recorder("teacher", 0))}
    needed = {p for m in run_methods.values() for p in m.participants}
    budgets = {"teacher": cfg.teacher_steps}
    for i, (name, arch) in enumerate(cfg.extra_teachers.items()):
        if name in needed:
            arch = dict(arch)
            steps = budgets[name] = arch.pop("steps", cfg.teacher_steps)
            teachers[name] = pretrained_teacher(dataclasses.replace(cfg, teacher_steps=steps), corpus, name, arch,
                                                TEACHER_SEED + 1 + i, recorder(name, 0))
    teacher_cfg, teacher_model, teacher_vars, teacher_bpb, teacher_dir = teachers["teacher"]

    cache = None
    if any("topk_indices" in m.batch_keys for m in run_methods.values()):
        cache_path = os.path.join(teacher_dir, f"topk{cfg.cache_k}.array_record")
        if os.path.exists(cache_path):
            cache = TopKCache(cache_path, k=cfg.cache_k, seq_len=cfg.seq_len)
        else:
            start_cache = time.time()
            cache = cache_teacher_topk(cache_path, teacher_model, teacher_vars, train_data.tokens, train_data.mask,
                                       k=cfg.cache_k)
            print(f"teacher cache: top-{cfg.cache_k} of {len(train_data)} rows in {time.time() - start_cache:.0f} s "
                  f"({os.path.getsize(cache_path) / 2**20:.1f} MiB)", file=sys.stderr)

    if cache is not None:
        cached_sample = {**sample, **cache.batch(np.arange(cfg.batch_size))}

    results: dict[str, list[float]] = {}
    step_ms: dict[str, list[float]] = {}
    for run, method in run_methods.items():
        for seed in cfg.seeds:
            parts = {"student": lm_participant(student_cfg, trains=True)}
            for name in method.participants:
                if name not in teachers:
                    raise ValueError(f"method {run!r} reads participant {name!r}; the config's teachers are "
                                     f"{sorted(teachers)} (add it to extra_teachers)")
                parts[name] = lm_participant(teachers[name][0], teachers[name][2], trains=False)
            state = jaxkd.create(participants=parts, method=method,
                                 tx=optimizer(cfg.lr, cfg.steps, cfg.warmup_steps, cfg.weight_decay),
                                 sample_batch=cached_sample if "topk_indices" in method.batch_keys else sample,
                                 rng=jax.random.PRNGKey(seed))
            student_model = lm_models.lm(student_cfg)
            state, ms = train(
                state, iter(text.TextLoader(train_data.tokens, train_data.mask, batch_size=cfg.batch_size, seed=seed,
                                            num_epochs=None, teacher_cache=cache if "topk_indices" in method.batch_keys
                                            else None)), cfg.steps,
                microbatches=cfg.microbatches, eval_every=cfg.eval_every, record=recorder(run, seed),
                eval_fn=lambda s: validation_bpb(student_model, s.student.variables(), eval_rows, num_bytes))
            results.setdefault(run, []).append(validation_bpb(student_model, state.student.variables(), eval_rows,
                                                              num_bytes))
            step_ms.setdefault(run, []).append(ms)
    metrics_file.close()
    summary = summarize(cfg, {n: (t[0], t[3], budgets[n]) for n, t in teachers.items()}, student_cfg, results, step_ms,
                        seconds=time.time() - start,
                        num_train_rows=len(train_data), num_eval_bytes=num_bytes)
    write_results(out_dir, summary, metrics_path)
    return summary


def write_results(out_dir: str, summary: dict[str, Any], metrics_path: str) -> None:
    """``results.json``, ``results.md`` (the table) and ``curves.png`` of an LM run."""
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(summary, f, indent=2)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(summary["table"] + "\n")
    plot_curves(metrics_path, os.path.join(out_dir, "curves.png"))


def summarize(cfg: LMExperiment, teachers, student_cfg, results, step_ms, *, seconds: float,
              num_train_rows: int, num_eval_bytes: int) -> dict[str, Any]:
    """``teachers``: name -> (LMConfig, validation bits per byte, pretraining steps)."""
    base = np.mean(results["scratch"]) if "scratch" in results else None
    lines = ["| run | method | params | val bits/byte | Δ vs scratch | ms/step |", "|---|---|---|---|---|---|"]
    for name, (teacher_cfg, teacher_bpb, teacher_steps) in teachers.items():
        lines.append(f"| {name} | `lm_ce` ({teacher_steps} steps) | {teacher_cfg.num_params / 1e6:.2f}M | "
                     f"{teacher_bpb:.4f} | | |")
    rows = []
    for run, values in results.items():
        mean = float(np.mean(values))
        std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
        delta = "" if base is None or run == "scratch" else f"{mean - base:+.4f}"
        ms = float(np.mean(step_ms[run]))
        rows.append({"run": run, "method": cfg.methods[run], "bpb_mean": mean, "bpb_std": std, "bpb_per_seed": values,
                     "ms_per_step": ms})
        lines.append(f"| {run} | `{cfg.methods[run]}` | {student_cfg.num_params / 1e6:.2f}M | {mean:.4f} ± {std:.4f} | "
                     f"{delta} | {ms:.0f} |")
    source = (f"Python {sys.version_info.major}.{sys.version_info.minor} standard library" if cfg.corpus_dir is None
              else f"the .py files of {cfg.corpus_dir}")
    caption = (f"{source}, byte-level, rows of "
               f"{cfg.seq_len} tokens ({num_train_rows} training rows); students trained {cfg.steps} steps of "
               f"{cfg.batch_size} rows; validation bits per byte over {num_eval_bytes} bytes, mean ± std over seeds "
               f"{tuple(cfg.seeds)}. Wall time {seconds / 60:.1f} min.")
    return {"config": dataclasses.asdict(cfg), "teacher_bpb": {n: t[1] for n, t in teachers.items()}, "rows": rows,
            "table": "\n".join(lines) + "\n\n" + caption, "seconds": seconds}


def plot_curves(metrics_path: str, png_path: str) -> None:
    """Validation bits per byte against step, mean over seeds (band: min–max)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, dict[int, dict[int, float]]] = {}
    with open(metrics_path) as f:
        for line in f:
            r = json.loads(line)
            if "val_bpb" in r:
                series.setdefault(r["run"], {}).setdefault(r["seed"], {})[r["step"]] = r["val_bpb"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for run, by_seed in series.items():
        steps = sorted(set.intersection(*(set(v) for v in by_seed.values())))
        values = np.array([[by_seed[s][t] for t in steps] for s in by_seed])
        line, = ax.plot(steps, values.mean(0), label=run, marker="o", markersize=3)
        if values.shape[0] > 1:
            ax.fill_between(steps, values.min(0), values.max(0), color=line.get_color(), alpha=0.2)
    ax.set_xlabel("step")
    ax.set_ylabel("validation bits per byte")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)


def metrics_recorder(metrics_file) -> Callable[[str, int], Callable[[Mapping[str, Any]], None]]:
    """``recorder(run, seed)`` gives ``record(entry)``: each entry becomes one JSON line of ``metrics.jsonl``
    (``{"run", "seed", **entry}``); validation results are flushed and printed as they come."""
    def recorder(run: str, seed: int):
        def record(entry):
            metrics_file.write(json.dumps({"run": run, "seed": seed, **entry}) + "\n")
            if "val_bpb" in entry:
                metrics_file.flush()
                print(f"  {run} seed {seed} step {entry['step']}: val bpb {entry['val_bpb']:.4f}", file=sys.stderr)
        return record
    return recorder


def cli(argv: list[str] | None, run: Callable[[Any, str], dict[str, Any]], *, default: Callable[[], Any],
        description: str, epilogue: Callable[[dict[str, Any]], str] | None = None) -> dict[str, Any]:
    """The command line of the LM experiment scripts: ``--config`` (a file with ``get_config()``; without
    it ``default()``), repeatable ``--set KEY=VALUE`` overrides and ``--out``; runs ``run(cfg, out_dir)``
    and prints its table (and ``epilogue(summary)``)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="a Python file with get_config() (default: the script's)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", default=None, help="run folder (default: <out_dir>/<name>-<time>)")
    args = parser.parse_args(argv)
    cfg = apply_overrides(default() if args.config is None else load_config(args.config), args.overrides)
    compilation_cache.enable(cfg.compilation_cache)
    out_dir = args.out or os.path.join(cfg.out_dir, f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    summary = run(cfg, out_dir)
    print(summary["table"])
    if epilogue is not None:
        print(epilogue(summary))
    print(f"\nrun folder: {out_dir}", file=sys.stderr)
    return summary


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return cli(argv, run_experiment, default=LMExperiment, description=__doc__)


if __name__ == "__main__":
    main()
