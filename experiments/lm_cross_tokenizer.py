"""Cross-tokenizer distillation: a byte-level teacher LM into a student LM with a small learned BPE (ALM).

    python -m experiments.lm_cross_tokenizer                          # the default run (BPE students)
    python -m experiments.lm_cross_tokenizer --config experiments/configs/lm_cross_tokenizer.py  # + bytes
    python -m experiments.lm_cross_tokenizer --set steps=100 --set "seeds=(0,)"

1. The corpus: the standard library's ``.py`` files (:mod:`jaxkd.data.text.stdlib_corpus`), split by file.
2. The student's tokenizer: a byte-level BPE of ``bpe_vocab_size`` tokens learned on the *training*
   split's files (:func:`jaxkd.data.text.bpe.train_bpe`), saved as ``tokenizer.json`` in the run folder.
3. Parallel rows (:func:`jaxkd.data.text.cross_tokenizer.parallel_rows`): every file cut into windows that end
   at a boundary of both tokenizations; per window the teacher's ``[BOS] + bytes`` (``seq_len`` tokens),
   the student's ``[BOS] + BPE tokens`` (``student_len``) and the ALM chunks of their targets. Cached in
   ``<out_dir>/cross_tokenizer/<key>.npz`` (the chunk alignment is host-side Python).
4. The teacher: the byte-level LM of the default LM experiment (:mod:`experiments.lm_distill`), pretrained
   once per config by its :func:`~experiments.lm_distill.pretrained_teacher` and shared with it through
   ``<out_dir>/teachers/<key>``.
5. Students trained for the same steps, per seed from the same initialization: the BPE student on its own
   tokens alone (``bpe_scratch``: ``lm_ce``) and with ALM (``bpe_alm``: ``lm_ce + alm``); the config file
   adds, for reference, the byte-level student of the LM experiment on the teacher's rows
   (``byte_scratch``). A run whose method reads ``batch["student_tokens"]`` trains the BPE student, any
   other the byte-level one. ``alm(cached=True)`` reads the teacher's target log-probabilities of every
   training window, computed once per teacher into ``<teacher dir>/alm_log_probs-<rows key>.npy`` (the
   same loss as the live teacher; no teacher in the step).
6. Bits per byte on the first ``max_eval_rows`` windows of the validation and the test split (the same
   bytes are targets under both tokenizers, so the numbers compare across tokenizers), mean ± std over
   seeds: ``results.md``/``results.json``, ``curves.png`` (validation, during training).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time
from typing import Any, Mapping

import jax
import numpy as np

import jaxkd
from jaxkd.precision import lm_config, policy
from jaxkd import methods
from jaxkd.data import ByteTokenizer
from jaxkd.data.text.bpe import BPETokenizer, train_bpe
from jaxkd.data.text.cross_tokenizer import PARALLEL_KEYS, ParallelBatches, ParallelText, check_byte_counts, parallel_rows
from jaxkd.data.text.stdlib_corpus import stdlib_corpus_texts
from jaxkd.models import lm as lm_models
from experiments import config as config_lib
from experiments import report
from experiments.lm_distill import parse_methods as lm_parse_methods
from experiments.lm_distill import (
    LM_CHECKS,
    TEACHER_SEED,
    LMExperiment,
    check_lm_batch,
    check_student_dtypes,
    corpus_source,
    lm_runner,
    load_corpus,
    pretrained_teacher,
    student_config,
    teacher_identity,
    write_results,
)
from experiments.lm_training import bpb_evaluator, lm_participant, optimizer, padded_batches, schedule
from experiments.run_log import PreemptionFlag
from experiments.runner import Evaluation, entry_point, progress_bar, run_command
from experiments.timing import Phases

_LM = LMExperiment()

BPE_SCRATCH = "lm_ce(tokens_key='student_tokens', mask_key='student_mask')"
#: Where ``alm(cached=True)`` reads the teacher's target log-probabilities (computed once per teacher).
CACHE_KEY = "alm_teacher_log_probs"
#: The held-out splits scored; the first is the one evaluated during training (the curves).
EVAL_SPLITS = ("validation", "test")


@dataclasses.dataclass(frozen=True)
class CrossTokenizerExperiment:
    """A cross-tokenizer distillation experiment (a config file's ``get_config()`` returns one).

    The teacher's fields (``seq_len``, ``max_train_files``, ``teacher``, ``teacher_steps``, ``teacher_lr``,
    ``batch_size``, ``warmup_steps``, ``weight_decay``, ``microbatches``, ``eval_every``, ``out_dir``,
    ``corpus_dir``, ``compilation_cache``) mean
    what they mean in :class:`experiments.lm_distill.LMExperiment` and default to its values, so the default
    run reuses the default LM experiment's pretrained teacher. ``seq_len`` is also the teacher rows' length.

    Attributes:
      bpe_vocab_size: the student tokenizer's vocabulary (256 bytes, 3 specials, the merges).
      student_len: tokens per student row (``BOS`` included); windows end where either row is full.
      max_eval_files, max_eval_rows: files read and windows scored (the first ones) of each held-out split.
      student: :class:`jaxkd.models.lm.LMConfig` fields of every student (the LM experiment's).
      steps, lr: every student's budget (AdamW, warm-up, cosine decay, as the LM experiment).
      methods: run name -> method spec (:func:`jaxkd.methods.parse`; constants ``steps``, ``batch_size``,
        ``lr``, ``seq_len``, ``student_len``).
      seeds: one student per seed and run.
      precision: the students' mixed-precision policy (:func:`jaxkd.precision.policy`), as in
        :class:`experiments.lm_distill.LMExperiment` (the teacher is pretrained in float32 either way).
    """

    name: str = "stdlib_cross_tokenizer"
    seq_len: int = _LM.seq_len
    student_len: int = 96
    bpe_vocab_size: int = 512
    max_train_files: int | None = _LM.max_train_files
    max_eval_files: int | None = _LM.max_eval_files
    max_eval_rows: int = _LM.max_eval_rows
    teacher: Mapping[str, Any] = dataclasses.field(default_factory=lambda: dict(_LM.teacher))
    student: Mapping[str, Any] = dataclasses.field(default_factory=lambda: dict(_LM.student))
    teacher_steps: int = _LM.teacher_steps
    teacher_lr: float = _LM.teacher_lr
    steps: int = _LM.steps
    lr: float = _LM.lr
    warmup_steps: int = _LM.warmup_steps
    weight_decay: float = _LM.weight_decay
    batch_size: int = _LM.batch_size
    microbatches: int = _LM.microbatches
    methods: Mapping[str, str] = dataclasses.field(default_factory=lambda: {
        "bpe_scratch": BPE_SCRATCH,
        "bpe_alm": BPE_SCRATCH + " + 100 * alm(temperature=100.0, cached=True)",
    })
    seeds: tuple[int, ...] = (0, 1, 2)
    precision: str = _LM.precision
    eval_every: int = _LM.eval_every
    checkpoint_every: int = _LM.checkpoint_every
    tensorboard: bool = _LM.tensorboard
    out_dir: str = _LM.out_dir
    corpus_dir: str | None = _LM.corpus_dir
    compilation_cache: str | None = _LM.compilation_cache

    def check(self) -> None:
        check_lm_batch(self)
        check_student_dtypes(self.student)

    def teacher_experiment(self) -> LMExperiment:
        """The LM experiment whose teacher this one uses (its fields that define the teacher)."""
        return LMExperiment(seq_len=self.seq_len, max_train_files=self.max_train_files, teacher=dict(self.teacher),
                            teacher_steps=self.teacher_steps, teacher_lr=self.teacher_lr, batch_size=self.batch_size,
                            warmup_steps=self.warmup_steps, weight_decay=self.weight_decay,
                            microbatches=self.microbatches, eval_every=self.eval_every, out_dir=self.out_dir,
                            corpus_dir=self.corpus_dir)


CrossTokenizerExperiment.CHECKS = {**LM_CHECKS, "precision": config_lib.check_precision,
                                   "student_len": config_lib.at_least(2),
                                   "bpe_vocab_size": config_lib.at_least(259)}


def parse_methods(cfg: CrossTokenizerExperiment) -> dict[str, methods.Method]:
    return lm_parse_methods(cfg, student_len=cfg.student_len)


def uses_bpe(method: methods.Method) -> bool:
    """A run trains the BPE student when its method reads the student's tokens."""
    return "student_tokens" in method.needs.batch_keys


# ----- data -----


def rows_key(files, bpe: BPETokenizer, cfg: CrossTokenizerExperiment, *, split: str, max_rows: int | None) -> str:
    """What the parallel rows of ``files`` depend on, hashed: ``"<split>-<16 hex>"``."""
    return split + "-" + hashlib.sha256(json.dumps({
        "bpe": bpe.to_json(), "seq_len": cfg.seq_len, "student_len": cfg.student_len, "split": split,
        "max_rows": max_rows, "files": [p for p, _ in files],
        "bytes": hashlib.sha256(b"".join(t for _, t in files)).hexdigest()}).encode()).hexdigest()[:16]


def cached_parallel_rows(files, bpe: BPETokenizer, cfg: CrossTokenizerExperiment, *, split: str,
                         max_rows: int | None = None) -> ParallelText:
    """:func:`parallel_rows` of ``files`` (byte teacher, BPE student), cached in ``<out_dir>/cross_tokenizer``."""
    path = os.path.join(cfg.out_dir, "cross_tokenizer", rows_key(files, bpe, cfg, split=split, max_rows=max_rows)
                        + ".npz")
    fields = PARALLEL_KEYS + ("row_bytes", "row_documents")
    if os.path.exists(path):
        with np.load(path) as f:
            return ParallelText(**{k: f[k] for k in fields}, num_documents=int(f["num_documents"]),
                                paths=tuple(f["paths"].tolist()))
    start = time.time()
    data = parallel_rows(files, ByteTokenizer(), bpe, teacher_len=cfg.seq_len, student_len=cfg.student_len,
                         max_rows=max_rows)
    check_byte_counts(data, ByteTokenizer(), bpe)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp.npz"
    np.savez(tmp, **{k: getattr(data, k) for k in fields}, num_documents=data.num_documents,
             paths=np.array(data.paths))
    os.replace(tmp, path)
    print(f"parallel rows ({split}): {len(data)} windows in {time.time() - start:.0f} s -> {path}", file=sys.stderr)
    return data


# ----- the teacher -----


def cached_teacher_log_probs(teacher_cfg, teacher_vars, teacher_dir: str, data: ParallelText, key: str,
                             batch_size: int) -> np.ndarray:
    """The teacher's target log-probabilities of the training windows (``alm(cached=True)``), computed once
    per teacher and rows into ``<teacher_dir>/alm_log_probs-<rows key>.npy``."""
    path = os.path.join(teacher_dir, f"alm_log_probs-{key}.npy")
    if os.path.exists(path):
        return np.load(path)
    start = time.time()
    values = methods.cache_teacher_log_probs(lm_models.lm(teacher_cfg), teacher_vars, data.tokens, data.mask,
                                             batch_size=batch_size)
    tmp = path + ".tmp.npy"
    np.save(tmp, values)
    os.replace(tmp, path)
    print(f"teacher log-probabilities of {len(data)} windows in {time.time() - start:.0f} s -> {path}",
          file=sys.stderr)
    return values


# ----- the experiment -----


def run_experiment(cfg: CrossTokenizerExperiment, out_dir: str) -> dict[str, Any]:
    start = time.time()
    phases = Phases()
    run_methods = parse_methods(cfg)  # every spec checked before anything trains
    data_dir = os.path.join(cfg.out_dir, "tfds")

    with phases.phase("data"):
        # The student's tokenizer, learned on the training split only.
        train_files = stdlib_corpus_texts("train", data_dir=data_dir, source_dir=cfg.corpus_dir,
                                          max_files=cfg.max_train_files)
        bpe_start = time.time()
        bpe = train_bpe([t for _, t in train_files], cfg.bpe_vocab_size)
        bpe_seconds = time.time() - bpe_start
        with open(os.path.join(out_dir, "tokenizer.json"), "w") as f:
            f.write(bpe.to_json())
        train_data = cached_parallel_rows(train_files, bpe, cfg, split="train")
        train_key = rows_key(train_files, bpe, cfg, split="train", max_rows=None)
        bytes_per_bpe_token = train_data.num_byte_targets / int(
            (train_data.student_mask[:, 1:] & train_data.student_mask[:, :-1]).sum())
        # Scored windows of each held-out split: the same bytes are the targets under both tokenizers.
        evals: dict[str, dict[str, Any]] = {}
        for split in EVAL_SPLITS:
            files = stdlib_corpus_texts(split, data_dir=data_dir, source_dir=cfg.corpus_dir,
                                        max_files=cfg.max_eval_files)
            data = cached_parallel_rows(files, bpe, cfg, split=split, max_rows=cfg.max_eval_rows)
            evals[split] = {"num_bytes": check_byte_counts(data, ByteTokenizer(), bpe),
                            "byte": padded_batches(data.tokens, data.mask, cfg.batch_size),
                            "bpe": padded_batches(data.student_tokens, data.student_mask, cfg.batch_size)}
        lm_cfg = cfg.teacher_experiment()
        lm_corpus = load_corpus(lm_cfg)
    print(f"BPE: {bpe.vocab_size} tokens in {bpe_seconds:.1f} s, {bytes_per_bpe_token:.2f} bytes per token; "
          f"{len(train_data)} training windows; scored: "
          + ", ".join(f"{split} {e['num_bytes']} bytes" for split, e in evals.items()), file=sys.stderr)

    def evaluator(model, kind: str):
        """``variables -> {"<split>_bpb": bits per byte}``."""
        lengths = bpe.token_byte_lengths if kind == "bpe" else ByteTokenizer().token_byte_lengths
        fns = {split: bpb_evaluator(model, e[kind], lengths) for split, e in evals.items()}
        return lambda variables: {f"{split}_bpb": fn(variables) for split, fn in fns.items()}

    def observe(state, result):  # DistiLLM's adaptive schedule reads the validation loss (nats per byte)
        return methods.observe_validation_loss(state, result[f"{EVAL_SPLITS[0]}_bpb"] * np.log(2.0))

    student_policy = policy(cfg.precision)
    configs = {
        "byte": lm_config(student_policy, lm_models.LMConfig(vocab_size=ByteTokenizer().vocab_size,
                                                             max_len=cfg.seq_len, **cfg.student)),
        "bpe": lm_config(student_policy, lm_models.LMConfig(vocab_size=bpe.vocab_size, max_len=cfg.student_len,
                                                            **cfg.student)),
    }
    progress = progress_bar(len(run_methods) * len(cfg.seeds) * cfg.steps)
    rows: list[report.Row] = []
    with PreemptionFlag() as preemption:
        runner = lm_runner(cfg, out_dir, progress=progress, preemption=preemption, phases=phases)
        try:
            teacher = pretrained_teacher(lm_cfg, runner, lm_corpus, "teacher", lm_cfg.teacher, TEACHER_SEED)
            teacher_bpb = evaluator(lm_models.lm(teacher.config), "byte")(teacher.variables)
            print(f"teacher on the windows: {teacher_bpb}", file=sys.stderr)
            rows.append(report.Row("teacher", {"tokenizer": f"bytes ({teacher.config.vocab_size})",
                                               "method": f"lm_ce ({teacher.steps} steps)",
                                               "params": f"{teacher.config.num_params / 1e6:.2f}M"},
                                   [teacher_bpb], compare=False))
            extra = {}
            if any(CACHE_KEY in m.needs.batch_keys for m in run_methods.values()):
                extra[CACHE_KEY] = cached_teacher_log_probs(teacher.config, teacher.variables, teacher.directory,
                                                            train_data, train_key, cfg.batch_size)
            for run, method in run_methods.items():
                kind = "bpe" if uses_bpe(method) else "byte"
                student_model = lm_models.lm(configs[kind])
                evaluation = Evaluation(lambda s, f=evaluator(student_model, kind): f(s.student.variables()),
                                        prefix="", after=observe, progress=(f"{EVAL_SPLITS[0]}_bpb", ".4f"))
                student_input = methods.student_input if kind == "bpe" else ("tokens", "mask")
                per_seed, ms = [], []
                for seed in cfg.seeds:
                    parts = {"student": jaxkd.participants.student(student_model, input=student_input)}
                    if method.needs.teacher:
                        parts["teacher"] = lm_participant(teacher.config, teacher.variables, trains=False)
                    batches = ParallelBatches(train_data, batch_size=cfg.batch_size, seed=seed,
                                              extra=extra if CACHE_KEY in method.needs.batch_keys else None)
                    with phases.phase("setup"):
                        state = jaxkd.create(participants=parts, method=method,
                                             tx=optimizer(cfg.lr, cfg.steps, cfg.warmup_steps, cfg.weight_decay),
                                             sample_batch=batches.batch(0, 0), rng=jax.random.PRNGKey(seed))
                    config = student_config(cfg, cfg.methods[run], seed, rows=train_key, tokenizer=kind,
                                            student_len=cfg.student_len, precision=cfg.precision, teacher=teacher_identity(teacher)
                                            if method.needs.teacher else None)
                    _, result = runner.fit(run=run, seed=seed, state=state, loaders={"train": batches},
                                           steps=cfg.steps, lr_schedule=schedule(cfg.lr, cfg.steps, cfg.warmup_steps),
                                           config=config, evaluation=evaluation)
                    per_seed.append({k: result[k] for k in teacher_bpb})
                    ms.append(result.get("ms_per_step"))
                tokenizer = (f"BPE ({configs[kind].vocab_size})" if kind == "bpe"
                             else f"bytes ({configs[kind].vocab_size})")
                rows.append(report.Row(run, {"tokenizer": tokenizer, "method": cfg.methods[run],
                                             "params": f"{configs[kind].num_params / 1e6:.2f}M"}, per_seed, ms,
                                       extra={"tokenizer": kind, "vocab_size": configs[kind].vocab_size}))
                jax.clear_caches()
        finally:
            runner.close()
            progress.close()
    scored = ", ".join(f"{split} {e['num_bytes']}" for split, e in evals.items())
    caption = (f"{corpus_source(cfg)}; windows of at most "
               f"{cfg.seq_len - 1} bytes ({cfg.seq_len} byte tokens, {cfg.student_len} BPE tokens with BOS; "
               f"{len(train_data)} training windows); BPE learned on the training files, {bytes_per_bpe_token:.2f} "
               f"bytes per token. Students trained {cfg.steps} steps of {cfg.batch_size} windows; bits per byte over "
               f"the first {cfg.max_eval_rows} windows of each held-out split (the same bytes for every tokenizer: "
               f"{scored}), mean ± std over seeds {tuple(cfg.seeds)}. Wall time {(time.time() - start) / 60:.1f} min.")
    summary = report.summarize(rows, [report.Metric(f"{split}_bpb", f"{split}_bpb", f"{split} bits/byte")
                                      for split in EVAL_SPLITS],
                               baseline="bpe_scratch", caption=caption, seconds=time.time() - start)
    summary["rows"] = [r for r in summary["rows"] if r["run"] != "teacher"]
    summary.update(config=dataclasses.asdict(cfg), teacher_bpb=dict(teacher_bpb), time=phases.breakdown())
    write_results(out_dir, summary, [(f"{EVAL_SPLITS[0]}_bpb", f"{EVAL_SPLITS[0]} bits per byte")])
    return summary


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return run_command(argv, run_experiment, description=__doc__, config_type=CrossTokenizerExperiment)


if __name__ == "__main__":
    # The importable module's classes, not __main__'s copies: config files import them from there.
    from experiments import lm_cross_tokenizer

    entry_point(lm_cross_tokenizer.main)
