"""What every language-model experiment shares: the optimizer, participants, bits-per-byte scoring, padded
evaluation batches, and byte-level LMs pretrained once, resumably, and reused by every run that needs them.

A pretrained model (a distillation teacher, a fusion base or expert) lives in ``<cache_root>/<key hash>``:
its variables and ``fingerprint.json`` (written last: a folder without it is not finished). The key holds
everything its training depends on — architecture, steps, learning rate, warm-up, weight decay, batch,
gradient accumulation, seed, initialization and a hash of the training rows themselves — so a changed
setting or a rewritten corpus trains a new model instead of reusing a stale one. Training runs through
:meth:`experiments.runner.Runner.fit` with its checkpoints in ``<folder>/training``: a process killed while
pretraining resumes there, and the folder is locked while one process trains it.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import sys
from typing import Any, Mapping

import jax
import numpy as np
import optax

import jaxkd
from jaxkd import eval_metrics, inference, methods
from jaxkd.checkpoint import load_variables, save_variables
from jaxkd.data import PAD_ID, ByteTokenizer, PackedText, TextLoader
from jaxkd.batch import with_token_normalizer
from jaxkd.models import lm as lm_models

from experiments.runner import Evaluation, Runner, folder_lock


def optimizer(lr: float, steps: int, warmup: int, weight_decay: float) -> optax.GradientTransformation:
    """AdamW with global-norm clipping, linear warm-up and cosine decay (every LM experiment's)."""
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule(lr, steps, warmup),
                                                                    weight_decay=weight_decay))


def schedule(lr: float, steps: int, warmup: int) -> optax.Schedule:
    return optax.warmup_cosine_decay_schedule(0.0, lr, min(warmup, steps - 1), steps)


def lm_participant(config: lm_models.LMConfig, variables=None, *, trains: bool,
                   input=("tokens", "mask")) -> jaxkd.Participant:
    model = lm_models.lm(config)
    if trains:
        return jaxkd.participants.student(model, variables, input=input)
    return jaxkd.participants.teacher(model, variables, input=input)


def padded_batches(tokens: np.ndarray, mask: np.ndarray, batch_size: int) -> list[dict[str, np.ndarray]]:
    """Rows in order, in batches of ``batch_size``, the last padded with fully masked rows (they score
    nothing): one compiled shape for every batch."""
    pad = -len(tokens) % batch_size
    tokens = np.concatenate([tokens, np.full((pad, tokens.shape[1]), PAD_ID, np.int32)])
    mask = np.concatenate([mask, np.zeros((pad, mask.shape[1]), bool)])
    return [{"tokens": tokens[i:i + batch_size], "mask": mask[i:i + batch_size]}
            for i in range(0, len(tokens), batch_size)]


def bpb_evaluator(model: jaxkd.models.Model, batches: list[dict[str, np.ndarray]], token_byte_lengths=None):
    """``variables -> bits per byte`` of ``model`` over ``batches`` (``{"tokens", "mask"}``): the eval step's
    :func:`jaxkd.eval_metrics.bits_per_byte` summed over the batches through :mod:`jaxkd.inference` (one
    compile per model). ``token_byte_lengths``: the tokenizer's bytes per token (default: bytes, 1 each)."""
    lengths = ByteTokenizer().token_byte_lengths if token_byte_lengths is None else token_byte_lengths
    metric = eval_metrics.bits_per_byte(lengths)

    def evaluate(variables) -> float:
        num, den = inference.reduce_batches(jaxkd.Participant(model, variables, input=("tokens", "mask")), batches,
                                            functools.partial(_bpb_sums, metric))
        return float(num) / float(den)

    return evaluate


def _bpb_sums(metric, outputs, batch):
    return metric(eval_metrics.EvalView({"student": outputs.logits}, batch, None, None))["bpb"]


def bpb_evaluation(evaluate_variables, *, observe: bool = True) -> Evaluation:
    """The runner's evaluation of a student LM: validation bits per byte, logged as ``val_bpb``. With
    ``observe``, the validation loss (nats per byte) is handed to methods that read it (DistiLLM's adaptive
    schedule, :func:`jaxkd.methods.observe_validation_loss`)."""
    def after(state, result):
        return methods.observe_validation_loss(state, result["bpb"] * np.log(2.0)) if observe else state

    return Evaluation(lambda state: {"bpb": evaluate_variables(state.student.variables())}, prefix="val_",
                      after=after, progress=("bpb", ".4f"))


def rows_fingerprint(*arrays: np.ndarray) -> str:
    """A hash of training rows (their bytes, shapes and dtypes): part of a pretrained model's key."""
    digest = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        digest.update(f"{a.dtype}{a.shape}".encode())
        digest.update(a.tobytes())
    return digest.hexdigest()[:16]


def key_hash(key: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12]


def model_key(config: lm_models.LMConfig, rows: PackedText, *, steps: int, lr: float, warmup_steps: int,
              weight_decay: float, batch_size: int, microbatches: int, seed: int, init_key: str | None) -> dict:
    """Everything a pretrained model depends on, as JSON values: two trainings share a folder only when
    every entry (the training rows' hash included) is equal."""
    key = {"arch": dataclasses.asdict(config), "steps": steps, "lr": lr, "warmup": warmup_steps,
           "weight_decay": weight_decay, "batch": batch_size, "microbatches": microbatches, "seed": seed,
           "init": init_key, "rows": rows_fingerprint(rows.tokens, rows.mask)}
    return json.loads(json.dumps(key, sort_keys=True, default=str))  # JSON values (a dtype as its name)


def pretrained_lm(runner: Runner, *, cache_root: str, label: str, config: lm_models.LMConfig, rows: PackedText,
                  steps: int, lr: float, warmup_steps: int, weight_decay: float, batch_size: int, seed: int,
                  evaluate_variables, microbatches: int = 1, init_variables=None,
                  init_key: str | None = None) -> tuple[Any, str]:
    """A byte-level LM trained with ``lm_ce`` on ``rows`` (from ``init_variables``, named by ``init_key`` in the
    cache key, or fresh), once: returns ``(variables, folder)``, loading the folder when it holds the model
    (checksums checked) and training it there otherwise (resumably; ``evaluate_variables(variables) -> bits per
    byte`` is logged at evaluations)."""
    if (init_variables is None) != (init_key is None):
        raise ValueError("init_variables and init_key go together (the key names the initialization)")
    key = model_key(config, rows, steps=steps, lr=lr, warmup_steps=warmup_steps, weight_decay=weight_decay,
                    batch_size=batch_size, microbatches=microbatches, seed=seed, init_key=init_key)
    directory = os.path.abspath(os.path.join(cache_root, key_hash(key)))
    model = lm_models.lm(config)
    sample = with_token_normalizer({"tokens": rows.tokens[:batch_size], "mask": rows.mask[:batch_size]})
    fingerprint_path = os.path.join(directory, "fingerprint.json")

    def load():
        abstract = jax.eval_shape(lambda: jaxkd.sharding.unbox(
            model.init(jax.random.PRNGKey(0), {"tokens": sample["tokens"], "mask": sample["mask"]})))
        with open(fingerprint_path) as f:
            return load_variables(os.path.join(directory, "variables"), abstract, expected=json.load(f))

    if os.path.exists(fingerprint_path):
        print(f"{label}: reusing {directory}", file=sys.stderr)
        return load(), directory
    with folder_lock(directory, "model folder"):
        if os.path.exists(fingerprint_path):  # finished by another process while this one waited
            return load(), directory
        with open(os.path.join(directory, "key.json"), "w") as f:
            json.dump(key, f, indent=2, default=str)
        print(f"{label}: training {config.num_params / 1e6:.2f}M parameters for {steps} steps in {directory}",
              file=sys.stderr)
        runner.progress.total = (runner.progress.total or 0) + steps  # the bar counts this training too
        runner.progress.refresh()
        with runner.phases.phase("setup"):
            state = jaxkd.create(participants={"student": lm_participant(config, init_variables, trains=True)},
                                 method=methods.lm_ce(), tx=optimizer(lr, steps, warmup_steps, weight_decay),
                                 sample_batch=sample, rng=jax.random.PRNGKey(seed))
        loader = TextLoader(rows.tokens, rows.mask, batch_size=batch_size, seed=seed, num_epochs=None)
        evaluation = bpb_evaluation(evaluate_variables, observe=False)
        state, _ = runner.fit(run=label, seed=seed, state=state, loaders={"train": loader}, steps=steps,
                              lr_schedule=schedule(lr, steps, warmup_steps), config=key, evaluation=evaluation,
                              checkpoint_dir=os.path.join(directory, "training"))
        variables = jax.device_get(state.student.variables())
        with runner.phases.phase("checkpoints"):
            fingerprint = save_variables(os.path.join(directory, "variables"), variables)
        tmp = fingerprint_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(fingerprint, f)
        os.replace(tmp, fingerprint_path)  # last: the folder now holds a finished model
    return variables, directory
