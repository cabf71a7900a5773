"""What an evaluation measures: metric functions for :func:`jaxkd.make_eval_step`.

A metric reads the evaluated participants' logits on a batch and returns, per reported name, a pair of
*sums* ``(numerator, denominator)`` over the batch's valid examples (or tokens). The eval step returns the
sums, :func:`jaxkd.accumulate` adds them across batches on the device, and :func:`jaxkd.evaluate` divides
once at the end, so padded batches and uneven last batches aggregate exactly.

* :func:`top1` — accuracy of every evaluated participant (``accuracy``, ``<name>_accuracy``); the default.
* :func:`agreement` — how often the student's top-1 class is the teacher's (big_vision's distillation
  evaluators report it next to the KL; Beyer et al., "Knowledge distillation: A good teacher is patient and
  consistent", CVPR 2022).
* :func:`teacher_student_kl` — ``KL(p_teacher || p_student)`` per example, the distance big_vision's
  distill trainer reports.
* :func:`bits_per_byte` — next-token cross-entropy of a language model in bits per byte of text (each target
  token counts its bytes, :func:`jaxkd.data.bits_per_byte`'s definition).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxkd.batch import MASK, TOKENS
from jaxkd.checks import check_temperature

Array = jax.Array
Sums = dict[str, tuple[Array, Array]]


@dataclasses.dataclass(frozen=True)
class EvalView:
    """What a metric sees of one eval batch: ``logits`` of every evaluated participant by name (the student's
    through its method's ``predict`` when it has one), the ``batch``, its ``labels`` (None without a label
    entry) and ``valid`` examples (``batch["mask"] & batch["labeled"]``, None when all are)."""

    logits: Mapping[str, Array]
    batch: Mapping[str, Array]
    labels: Array | None
    valid: Array | None

    def weights(self, like: Array) -> Array:
        """Per-example float weights: 1 for a valid example, 0 for padding."""
        n = like.shape[0]
        return jnp.ones((n,), jnp.float32) if self.valid is None else self.valid.astype(jnp.float32)

    def logits_of(self, name: str, metric: str) -> Array:
        if name not in self.logits:
            raise ValueError(f"eval metric {metric!r} reads participant {name!r}, but the train state evaluates "
                             f"{sorted(self.logits)}")
        return jnp.asarray(self.logits[name], jnp.float32)


@dataclasses.dataclass(frozen=True)
class EvalMetric:
    """A metric: ``fn(view) -> {name: (numerator sum, denominator sum)}``; ``participants`` it must see besides
    the trained ones (e.g. a frozen teacher, run even when the eval step skips frozen participants);
    ``needs_labels`` whether the batch must carry labels."""

    name: str
    fn: Callable[[EvalView], Sums]
    participants: tuple[str, ...] = ()
    needs_labels: bool = False

    def __call__(self, view: EvalView) -> Sums:
        return self.fn(view)


def _prefix(name: str) -> str:
    return "" if name == "student" else f"{name}_"


def correct_and_count(logits: jax.Array, labels: jax.Array, weights: jax.Array | None = None):
    """``(Σ w·[argmax z = y], Σ w)`` over the examples (``weights`` 0/1 or ``None``: all count): the sums of
    top-1 accuracy, shared by the eval metric and the train step's running accuracy."""
    weights = jnp.ones(labels.shape, jnp.float32) if weights is None else weights.astype(jnp.float32)
    correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32) * weights
    return jnp.sum(correct), jnp.sum(weights)


def top1() -> EvalMetric:
    """Top-1 accuracy of every evaluated participant: ``accuracy`` (the student), ``<name>_accuracy``."""
    def fn(view: EvalView) -> Sums:
        return {f"{_prefix(name)}accuracy": correct_and_count(logits, view.labels, view.weights(logits))
                for name, logits in view.logits.items()}

    return EvalMetric("top1", fn, needs_labels=True)


def agreement(student: str = "student", teacher: str = "teacher") -> EvalMetric:
    """``<student>_<teacher>_agreement``-style ``agreement``: the fraction of valid examples where the student's
    top-1 class is the teacher's."""
    def fn(view: EvalView) -> Sums:
        s, t = view.logits_of(student, "agreement"), view.logits_of(teacher, "agreement")
        w = view.weights(s)
        same = (jnp.argmax(s, -1) == jnp.argmax(t, -1)).astype(jnp.float32) * w
        return {_name("agreement", student, teacher): (jnp.sum(same), jnp.sum(w))}

    return EvalMetric("agreement", fn, participants=(student, teacher))


def teacher_student_kl(student: str = "student", teacher: str = "teacher", *, temperature: float = 1.0) -> EvalMetric:
    """Mean ``KL(softmax(t/T) || softmax(s/T))`` over valid examples, in nats (``kl``); terms where the teacher
    gives a class zero probability contribute 0, so ``-inf`` logits are safe."""
    check_temperature("temperature", temperature)

    def fn(view: EvalView) -> Sums:
        s, t = view.logits_of(student, "kl"), view.logits_of(teacher, "kl")
        log_p, log_q = jax.nn.log_softmax(t / temperature, -1), jax.nn.log_softmax(s / temperature, -1)
        p = jnp.exp(log_p)
        kl = jnp.sum(jnp.where(p > 0, p * (log_p - jnp.where(p > 0, log_q, 0.0)), 0.0), -1)
        w = view.weights(s)
        return {_name("kl", student, teacher): (jnp.sum(kl * w), jnp.sum(w))}

    return EvalMetric("kl", fn, participants=(student, teacher))


def _name(metric: str, student: str, teacher: str) -> str:
    if (student, teacher) == ("student", "teacher"):
        return metric
    return f"{student}_{teacher}_{metric}"


def bits_per_byte(token_byte_lengths: Any, *, participant: str = "student", tokens_key: str = TOKENS,
                  mask_key: str = MASK) -> EvalMetric:
    """A language model's next-token cross-entropy in bits per byte (``bpb``, ``<name>_bpb``): over the targets
    ``tokens[:, 1:]`` where both positions are real (``mask[:, 1:] & mask[:, :-1]``), the summed nats over
    ``ln 2`` divided by the bytes the targets stand for (``token_byte_lengths[id]`` each; 0 for specials)."""
    lengths = np.asarray(token_byte_lengths, np.float32)
    if lengths.ndim != 1 or np.any(lengths < 0):
        raise ValueError(f"token_byte_lengths must be a [vocab] array of byte counts >= 0, got shape {lengths.shape}")

    def fn(view: EvalView) -> Sums:
        logits = view.logits_of(participant, "bits_per_byte")
        tokens, mask = view.batch[tokens_key], view.batch[mask_key].astype(bool)
        targets, target_mask = tokens[:, 1:], mask[:, 1:] & mask[:, :-1]
        log_probs = jax.nn.log_softmax(logits[:, :-1], -1)
        nats = -jnp.take_along_axis(log_probs, targets[..., None], -1)[..., 0]
        nats = jnp.where(target_mask, nats, 0.0)
        num_bytes = jnp.where(target_mask, jnp.asarray(lengths)[targets], 0.0)
        return {f"{_prefix(participant)}bpb": (jnp.sum(nats) / math.log(2.0), jnp.sum(num_bytes))}

    return EvalMetric("bits_per_byte", fn, participants=(participant,))
