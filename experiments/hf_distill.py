"""Distill a Hugging Face teacher into a smaller student on local chat JSONL, and export the student.

    python -m experiments.hf_distill --config experiments/configs/hf_distill.py \\
        --set teacher=checkpoints/Qwen2.5-1.5B-Instruct --set student=checkpoints/Qwen2.5-0.5B \\
        --set train_data=data/train.jsonl --set eval_data=data/eval.jsonl --out runs/qwen-1.5b-to-0.5b

Everything is read from local directories (no download): the checkpoints as transformers writes them
(``config.json`` + safetensors), the tokenizer's ``tokenizer.json`` / ``tokenizer_config.json`` (default: the
teacher's directory), data in TRL's formats (:mod:`jaxkd.data.text.chat`).

1. The tokenizer (:class:`jaxkd.data.HFTokenizer`) and both models (:func:`jaxkd.models.from_hf`) with their
   logits cut to the tokenizer's real vocabulary: released models pad their embedding past it (Qwen2.5:
   151936 or 152064 rows for 151665 tokens), the padded rows are no token and are left out of every loss
   and divergence; a tokenizer larger than a model's embedding is refused, naming both sizes.
2. The student: another checkpoint (``student`` a path), or ``student="init_from_teacher"``: the teacher
   with ``student_layers`` of its blocks chosen by ``layer_strategy`` (:func:`jaxkd.models.hf.init_student_from`).
3. Rows: :func:`jaxkd.data.chat_rows` of the JSONL (completion-only targets; packed with segment ids when
   ``pack``), batches from :class:`jaxkd.data.TextLoader`.
4. Training: ``method`` (default ``lm_ce + token_kd(divergence='forward_kl')``) with AdamW (warm-up, cosine
   decay) through :meth:`experiments.runner.Runner.fit`: resumable (SIGKILL: re-run the command with the same
   ``--out``; SIGTERM: a checkpoint, status 143), ``metrics.jsonl`` with held-out loss (nats per target
   token) and bits per byte every ``eval_every`` steps.
5. Export: the trained student with :func:`jaxkd.models.to_hf` into ``<out>/student_hf`` (every embedding
   row kept), with the tokenizer files: ``transformers.AutoModelForCausalLM.from_pretrained`` loads it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import shutil
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import jaxkd
from jaxkd import inference, methods, sharding
from jaxkd.batch import MASK, POSITIONS, SEGMENT_IDS, TOKENS, batch_target_mask, with_token_normalizer
from jaxkd.data import HFTokenizer, TextLoader, chat_rows
from jaxkd.models.hf import from_hf, init_student_from, to_hf
from jaxkd.models import lm as lm_models
from jaxkd.models.lm import lm_logical_rules
from jaxkd.models.vocab import truncate_vocab
from jaxkd.precision import lm_config, policy
from jaxkd.sharding import unbox

from experiments import config as config_lib
from experiments.lm_distill import check_lm_batch
from experiments.lm_training import optimizer, rows_fingerprint, schedule
from experiments.run_log import PreemptionFlag
from experiments.runner import Evaluation, Runner, entry_point, progress_bar, run_command
from experiments.timing import Phases

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "hf_distill.py")
INIT_FROM_TEACHER = "init_from_teacher"
LAYER_STRATEGIES = ("maximally_spaced", "first_n", "every_other")
DTYPES = ("float32", "bfloat16", "checkpoint")
#: Tokenizer files copied next to the exported student.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


@dataclasses.dataclass(frozen=True)
class HFDistillExperiment:
    """One Hugging Face distillation run (a config file's ``get_config()`` returns one).

    Attributes:
      teacher: the teacher's checkpoint directory (``config.json`` + safetensors).
      student: the student's checkpoint directory, or ``"init_from_teacher"``: ``student_layers`` teacher
        blocks chosen by ``layer_strategy`` (``maximally_spaced``, ``first_n``, ``every_other``; 0 layers:
        half the teacher's).
      tokenizer: the directory with ``tokenizer.json`` (None: the teacher's).
      train_data, eval_data: JSONL in TRL's formats (``messages``, ``prompt``/``completion``, ``text``);
        ``eval_data`` None: no held-out evaluation besides the training loss.
      seq_len, pack: tokens per row; several examples per row (segment ids) or one.
      method: the method spec (constants ``steps``, ``batch_size``, ``lr``, ``seq_len``).
      steps, lr, warmup_steps, weight_decay, batch_size, microbatches, seed: the student's training.
      dtype: parameters and compute, ``float32`` (default), ``bfloat16`` or ``checkpoint`` (as stored).
      precision: the student's mixed-precision policy (:func:`jaxkd.precision.policy`): ``"float32"`` (default)
        leaves it as ``dtype`` says; ``"bfloat16"`` trains float32 parameters and optimizer state with bfloat16
        compute and float32 logits (the teacher keeps ``dtype``; the export is float32).
      max_eval_rows: held-out rows scored (the first ones).
      eval_every, checkpoint_every: steps between evaluations / checkpoints (and at the end).
      mesh: None (one device) or the device mesh's axis sizes, e.g. ``{"data": 2, "fsdp": 2, "tensor": 2}``
        (:func:`jaxkd.sharding.make_mesh`): both models are read from their safetensors into their shards,
        the student's state and the teacher are sharded by the LM's logical rules (MaxText's layout), batches
        split over ``data`` x ``fsdp`` (``batch_size / microbatches`` must divide by it).
      out_dir: where run folders go without ``--out``.
    """

    name: str = "hf_distill"
    teacher: str = "checkpoints/teacher"
    student: str = INIT_FROM_TEACHER
    student_layers: int = 0
    layer_strategy: str = "maximally_spaced"
    tokenizer: str | None = None
    train_data: str = "data/train.jsonl"
    eval_data: str | None = None
    seq_len: int = 1024
    pack: bool = True
    method: str = "lm_ce + token_kd(divergence='forward_kl')"
    steps: int = 1000
    lr: float = 5e-5
    warmup_steps: int = 50
    weight_decay: float = 0.0
    batch_size: int = 8
    microbatches: int = 1
    seed: int = 0
    dtype: str = "float32"
    precision: str = "float32"
    max_eval_rows: int = 256
    eval_every: int = 100
    checkpoint_every: int = 100
    tensorboard: bool = True
    mesh: dict | None = None
    out_dir: str = "runs"
    compilation_cache: str | None = "default"

    def check(self) -> None:
        check_lm_batch(self)
        for name in ("teacher", "student", "train_data"):
            if not getattr(self, name).strip():
                raise ValueError(f"{name} must be a path, got {name}={getattr(self, name)!r}")


def _check_method(name: str, value: Any) -> None:
    config_lib.check_methods(name, {"student": value})


HFDistillExperiment.CHECKS = {
    **{name: config_lib.at_least(1) for name in ("steps", "batch_size", "microbatches", "eval_every",
                                                  "max_eval_rows")},
    "seq_len": config_lib.at_least(2), "warmup_steps": config_lib.at_least(0),
    "checkpoint_every": config_lib.at_least(0), "student_layers": config_lib.at_least(0),
    "seed": config_lib.at_least(0), "lr": config_lib.positive, "weight_decay": config_lib.nonnegative,
    "layer_strategy": config_lib.one_of(LAYER_STRATEGIES), "dtype": config_lib.one_of(DTYPES),
    "method": _check_method, "mesh": config_lib.optional(config_lib.check_mesh),
    "precision": config_lib.check_precision,
}


def parse_method(cfg: HFDistillExperiment) -> methods.Method:
    constants = {"steps": cfg.steps, "batch_size": cfg.batch_size, "lr": cfg.lr, "seq_len": cfg.seq_len}
    try:
        return methods.parse(cfg.method, constants)
    except ValueError as e:
        raise ValueError(f"config method: {e}") from None


def check_paths(cfg: HFDistillExperiment) -> None:
    """Every input is a local file or directory (nothing is downloaded): the first missing one is named."""
    dirs = [("teacher", cfg.teacher)] + ([("student", cfg.student)] if cfg.student != INIT_FROM_TEACHER else [])
    for name, path in dirs:
        if not os.path.isdir(path):
            raise FileNotFoundError(f"{name}: no checkpoint directory {path} (the recipe reads local directories: "
                                    "download the checkpoint first, e.g. huggingface-cli download REPO --local-dir DIR)")
    for name, path in (("train_data", cfg.train_data), ("eval_data", cfg.eval_data)):
        if path is not None and not os.path.isfile(path):
            raise FileNotFoundError(f"{name}: no file {path}")


# ----- models -----


def load_models(cfg: HFDistillExperiment, vocab_size: int, mesh=None):
    """``(teacher model, teacher variables, student model, student variables)``, both cut to the tokenizer's
    ``vocab_size`` (:func:`jaxkd.models.from_hf`'s ``vocab_size``); with a mesh, read from the safetensors
    straight into their shards (the LM rules), never whole on one host."""
    dtype = None if cfg.dtype == "checkpoint" else jnp.dtype(cfg.dtype)
    placed = dict(mesh=mesh, rules=lm_logical_rules()) if mesh is not None else {}
    teacher, teacher_vars = from_hf(cfg.teacher, dtype=dtype, vocab_size=vocab_size, **placed)
    if cfg.student == INIT_FROM_TEACHER:
        layers = teacher.module.config.num_layers
        n = cfg.student_layers or max(1, layers // 2)
        rule = cfg.layer_strategy if cfg.layer_strategy == "every_other" else (cfg.layer_strategy, n)
        student, student_vars = init_student_from(teacher, teacher_vars, rule)
        # Its own buffers: the train step donates the student's, the teacher's are read on.
        student_vars = jax.tree.map(lambda a: jnp.array(a, copy=True), student_vars)
        if teacher.vocab_size is not None:
            student = truncate_vocab(student, teacher.vocab_size)
    else:
        student, student_vars = from_hf(cfg.student, dtype=dtype, vocab_size=vocab_size, **placed)
    if cfg.precision != "float32":
        student, student_vars = with_policy(student, student_vars, policy(cfg.precision))
    # Plain arrays, as the train state holds them (the logical axis names are the models' own).
    return teacher, unbox(teacher_vars), student, unbox(student_vars)


def with_policy(model, variables, p):
    """The LM ``model`` rebuilt under policy ``p`` (its ``LMConfig``'s dtypes; a cut vocabulary kept) and its
    variables cast to the policy's parameter dtype."""
    rebuilt = lm_models.lm(lm_config(p, model.module.config))
    if model.vocab_size is not None:
        rebuilt = truncate_vocab(rebuilt, model.vocab_size)
    return rebuilt, p.cast_to_param(variables)


def input_keys(rows) -> tuple[str, ...]:
    return tuple(k for k in (TOKENS, MASK, SEGMENT_IDS, POSITIONS) if k in rows)


# ----- held-out evaluation -----


def eval_batches(rows: dict[str, np.ndarray], batch_size: int, max_rows: int) -> list[dict[str, np.ndarray]]:
    """The first ``max_rows`` rows in batches of ``batch_size``, the last padded with rows of no target."""
    rows = {k: v[:max_rows] for k, v in rows.items()}
    n = len(rows[TOKENS])
    pad = -n % batch_size
    rows = {k: np.concatenate([v, np.zeros((pad, *v.shape[1:]), v.dtype)]) for k, v in rows.items()}
    return [{k: v[i:i + batch_size] for k, v in rows.items()} for i in range(0, n + pad, batch_size)]


def _loss_sums(lengths, outputs, batch):
    """Per batch: summed next-token nats over the targets (completion tokens, within a document), their count
    and the bytes they stand for."""
    logits = outputs.logits.astype(jnp.float32)[:, :-1]
    targets = batch[TOKENS][:, 1:]
    keep = batch_target_mask(batch)
    nats = -jnp.take_along_axis(jax.nn.log_softmax(logits, -1), targets[..., None], -1)[..., 0]
    nats = jnp.where(keep, nats, 0.0)
    return {"nats": jnp.sum(nats), "tokens": jnp.sum(keep), "bytes": jnp.sum(jnp.where(keep, lengths[targets], 0))}


def evaluator(model, keys, batches, token_byte_lengths, mesh=None):
    """``variables -> {"loss": nats per target token, "bpb": bits per byte}`` over ``batches`` (split over the
    mesh's batch axes when there is one)."""
    fn = functools.partial(_loss_sums, jnp.asarray(token_byte_lengths, jnp.float32))

    def evaluate(variables) -> dict[str, float]:
        sums = inference.reduce_batches(jaxkd.Participant(model, variables, input=keys), batches, fn, mesh=mesh)
        nats, tokens, num_bytes = (float(sums[k]) for k in ("nats", "tokens", "bytes"))
        return {"loss": nats / max(tokens, 1.0), "bpb": nats / math.log(2.0) / max(num_bytes, 1.0)}

    return evaluate


# ----- the run -----


def run_experiment(cfg: HFDistillExperiment, out_dir: str) -> dict[str, Any]:
    start = time.time()
    phases = Phases()
    method = parse_method(cfg)  # checked before anything loads
    check_paths(cfg)
    mesh = sharding.make_mesh(cfg.mesh) if cfg.mesh is not None else None
    if mesh is not None:
        try:
            sharding.check_batch_size(cfg.batch_size // cfg.microbatches, mesh)
        except ValueError as e:
            raise ValueError(f"batch_size / microbatches = {cfg.batch_size // cfg.microbatches} rows per step of the "
                             f"mesh {dict(mesh.shape)}: {e}") from None
    with phases.phase("setup"):
        tokenizer = HFTokenizer.from_pretrained(cfg.tokenizer or cfg.teacher)
        teacher, teacher_vars, student, student_vars = load_models(cfg, tokenizer.vocab_size, mesh)
    with phases.phase("data"):
        pad = tokenizer.pad_id or 0
        train_rows = chat_rows(cfg.train_data, tokenizer, cfg.seq_len, pack=cfg.pack, pad=pad)
        held_out = (chat_rows(cfg.eval_data, tokenizer, cfg.seq_len, pack=cfg.pack, pad=pad)
                    if cfg.eval_data else None)
    keys = input_keys(train_rows)
    if len(train_rows[TOKENS]) < cfg.batch_size:
        raise ValueError(f"train_data {cfg.train_data} gives {len(train_rows[TOKENS])} rows of {cfg.seq_len} "
                         f"tokens, fewer than batch_size={cfg.batch_size}")
    if held_out is not None:
        evaluate = evaluator(student, keys, eval_batches(held_out, cfg.batch_size, cfg.max_eval_rows),
                             tokenizer.token_byte_lengths, mesh)
        teacher_result = evaluator(teacher, keys, eval_batches(held_out, cfg.batch_size, cfg.max_eval_rows),
                                   tokenizer.token_byte_lengths, mesh)(teacher_vars)
    else:
        evaluate, teacher_result = (lambda variables: {}), {}

    def after(state, result):
        return methods.observe_validation_loss(state, result["loss"]) if "loss" in result else state

    evaluation = Evaluation(lambda state: evaluate(state.student.variables()), prefix="val_", after=after,
                            progress=("loss", ".4f") if held_out is not None else None)
    sample = with_token_normalizer({k: v[:cfg.batch_size] for k, v in train_rows.items()})
    rules = lm_logical_rules() if mesh is not None else None  # MaxText's layout: fsdp on the width, tensor on heads
    participants = {"student": jaxkd.participants.student(student, student_vars, input=keys, rules=rules)}
    if "teacher" in method.needs.participants:
        participants["teacher"] = jaxkd.participants.teacher(teacher, teacher_vars, input=keys, rules=rules)
    unknown = set(method.needs.participants) - set(participants) - {"student"}
    if unknown:
        raise ValueError(f"method {cfg.method!r} reads participants {sorted(unknown)}; this recipe has 'student' "
                         f"and 'teacher'")
    with phases.phase("setup"):
        state = jaxkd.create(participants=participants, method=method,
                             tx=optimizer(cfg.lr, cfg.steps, cfg.warmup_steps, cfg.weight_decay),
                             sample_batch=sample, rng=jax.random.PRNGKey(cfg.seed), mesh=mesh)
    loader = TextLoader(train_rows, batch_size=cfg.batch_size, seed=cfg.seed, num_epochs=None, pad=pad)
    identity = {"method": cfg.method, "teacher": os.path.abspath(cfg.teacher),
                "student": cfg.student if cfg.student == INIT_FROM_TEACHER else os.path.abspath(cfg.student),
                "student_layers": cfg.student_layers, "layer_strategy": cfg.layer_strategy,
                "vocab_size": tokenizer.vocab_size, "rows": rows_fingerprint(*(train_rows[k] for k in sorted(train_rows))),
                "seed": cfg.seed, "steps": cfg.steps, "lr": cfg.lr, "warmup_steps": cfg.warmup_steps,
                "weight_decay": cfg.weight_decay, "batch_size": cfg.batch_size, "microbatches": cfg.microbatches,
                "seq_len": cfg.seq_len, "pack": cfg.pack, "dtype": cfg.dtype,
                # recorded when not the default, so that float32 runs keep their recorded identity
                **({"precision": cfg.precision} if cfg.precision != "float32" else {})}

    progress = progress_bar(cfg.steps)
    with PreemptionFlag() as preemption:
        runner = Runner(out_dir, progress=progress, preemption=preemption, phases=phases, eval_every=cfg.eval_every,
                        checkpoint_every=cfg.checkpoint_every, tensorboard=cfg.tensorboard,
                        microbatches=cfg.microbatches, mesh=mesh)
        try:
            state, result = runner.fit(run="student", seed=cfg.seed, state=state, loaders={"train": loader},
                                       steps=cfg.steps, lr_schedule=schedule(cfg.lr, cfg.steps, cfg.warmup_steps),
                                       config=identity, evaluation=evaluation)
        finally:
            runner.close()
            progress.close()

    export = os.path.join(out_dir, "student_hf")
    if jax.process_index() == 0:
        with phases.phase("checkpoints"):
            to_hf(student, jax.device_get(state.student.variables()), export, bos_token_id=tokenizer.bos_id,
                  eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
            source = cfg.tokenizer or cfg.teacher
            source = source if os.path.isdir(source) else os.path.dirname(source)
            for name in TOKENIZER_FILES:
                if os.path.isfile(os.path.join(source, name)):
                    shutil.copyfile(os.path.join(source, name), os.path.join(export, name))

    def cell(r, k, fmt=".4f"):
        return format(r[k], fmt) if k in r else "–"

    t_cfg, s_cfg = teacher.module.config, student.module.config
    lines = ["| model | params | layers | val loss (nats/token) | val bits/byte |", "|---|---|---|---|---|",
             f"| teacher | {t_cfg.num_params / 1e6:.2f}M | {t_cfg.num_layers} | {cell(teacher_result, 'loss')} | "
             f"{cell(teacher_result, 'bpb')} |",
             f"| student ({cfg.method}) | {s_cfg.num_params / 1e6:.2f}M | {s_cfg.num_layers} | "
             f"{cell(result, 'loss')} | {cell(result, 'bpb')} |"]
    summary = {"table": "\n".join(lines), "teacher": teacher_result, "student": result, "export": export,
               "vocab_size": tokenizer.vocab_size, "train_rows": int(len(train_rows[TOKENS])),
               "devices": len(jax.tree.leaves(state.student.params)[0].sharding.device_set),
               "config": dataclasses.asdict(cfg), "time": phases.breakdown(), "seconds": time.time() - start}
    if jax.process_index() == 0:
        from experiments import report

        report.write(out_dir, summary)
    # In-process callers (tests, notebooks) get the trained student; results.json holds the rest.
    summary["final_student"] = (student, jax.device_get(state.student.variables()))
    return summary


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return run_command(argv, run_experiment, description=__doc__, config_type=HFDistillExperiment,
                       default_config=DEFAULT_CONFIG, epilogue=lambda s: f"student exported to {s['export']}")


if __name__ == "__main__":
    # The importable module's classes, not __main__'s copies: config files import them from there.
    from experiments import hf_distill

    entry_point(hf_distill.main)
