"""The jitted train and eval steps.

``make_train_step`` builds one function ``(state, batch) -> (state, metrics)``: teacher forward (eval
mode, ``stop_gradient``), student forward, the method's loss, gradients, the Optax update and the
method's post-step update — all in one compiled program, with the state donated so its buffers are
updated in place. Metrics come back as device arrays; nothing in the step waits on the host.

The returned callable is a thin host-side wrapper: it checks integer labels of a NumPy batch against
the number of classes (an out-of-range label would otherwise silently one-hot to zeros inside jit) and,
with a mesh, places the batch on it. The jitted function itself is ``step.jitted``.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from jaxkd import sharding as shd
from jaxkd.methods.base import LossInputs, MethodVars, StepInfo
from jaxkd.train_state import StudentState, TrainState

Metrics = dict[str, jax.Array]


def check_batch_labels(batch: Mapping[str, Any], num_classes: int, *, label_key: str = "label") -> None:
    """Raises ``ValueError`` for a host (NumPy) label outside ``[0, num_classes)``; device arrays pass."""
    labels = batch.get(label_key)
    if labels is None or isinstance(labels, jax.Array) or not num_classes:
        return
    labels = np.asarray(labels)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        bad = labels.min() if labels.min() < 0 else labels.max()
        raise ValueError(f"batch[{label_key!r}] holds label {bad}, outside [0, num_classes={num_classes})")


def _accuracy_terms(logits: jax.Array, batch: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """(number correct, number of valid examples) over the batch's ``mask``."""
    labels = batch["label"]
    valid = batch.get("mask", jnp.ones(labels.shape, bool)).astype(jnp.float32)
    correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32) * valid
    return jnp.sum(correct), jnp.sum(valid)


def _host_wrapper(jitted: Callable, mesh: Mesh | None) -> Callable:
    def step(state: TrainState, batch: Mapping[str, Any]):
        check_batch_labels(batch, state.num_classes)
        if mesh is not None:
            batch = shd.shard_batch(batch, mesh)
        return jitted(state, batch)

    step.jitted = jitted
    return step


def _train_step(state: TrainState, batch: Mapping[str, jax.Array]) -> tuple[TrainState, Metrics]:
    method = state.method_def
    rng, dropout_rng, method_rng = jax.random.split(state.rng, 3)
    x = batch[state.input_key]

    teacher_out = None
    if state.teacher is not None:
        teacher_out = state.teacher_model.apply(state.teacher_variables(), x, train=False)
        teacher_out = jax.lax.stop_gradient(teacher_out)

    def loss_fn(trainable):
        variables = {"params": trainable["student"], **state.student.model_state}
        student_out = state.student_model.apply(variables, x, train=True, rngs={"dropout": dropout_rng})
        inputs = LossInputs(
            student=student_out, teacher=teacher_out, batch=batch, step=state.step,
            student_variables=variables, student_model=state.student_model, input_key=state.input_key,
        )
        loss, aux = method.loss(MethodVars(trainable["method"], state.method.state), inputs, method_rng)
        return loss, (student_out, aux)

    (loss, (student_out, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.trainable)
    updates, opt_state = state.tx.update(grads, state.opt_state, state.trainable)
    trainable = optax.apply_updates(state.trainable, updates)
    step = state.step + 1
    info = StepInfo(step=step, student_params=trainable["student"], metrics=aux.metrics)
    method_state = method.update(trainable["method"], aux.state, info)

    metrics: Metrics = {**aux.metrics, "loss": loss, "grad_norm": optax.tree.norm(grads)}
    if "label" in batch:
        correct, count = _accuracy_terms(student_out.logits, batch)
        metrics["accuracy"] = correct / jnp.maximum(count, 1.0)
    new_state = state.replace(
        step=step,
        student=StudentState(params=trainable["student"], model_state=student_out.model_state),
        opt_state=opt_state,
        method=MethodVars(params=trainable["method"], state=method_state),
        rng=rng,
    )
    return new_state, metrics


def make_train_step(*, mesh: Mesh | None = None, donate: bool = True) -> Callable:
    """Returns ``step(state, batch) -> (state, metrics)``, compiled once per batch shape.

    Args:
      mesh: shard the batch over the mesh's ``data`` axis and replicate the state; ``None`` runs on
        the default device.
      donate: donate the input state's buffers (the caller must not reuse the old state).

    Metrics: ``loss`` (the weighted total), one entry per method term, ``grad_norm`` and, when the batch
    has labels, the student's train ``accuracy``.
    """
    kwargs: dict[str, Any] = {"donate_argnums": (0,) if donate else ()}
    if mesh is not None:
        rep = shd.replicated(mesh)
        kwargs.update(in_shardings=(rep, shd.batch_sharding(mesh)), out_shardings=(rep, rep))
    return _host_wrapper(jax.jit(_train_step, **kwargs), mesh)


def _eval_step(state: TrainState, batch: Mapping[str, jax.Array]) -> Metrics:
    x = batch[state.input_key]
    out = state.student_model.apply(state.student_variables(), x, train=False)
    predict = state.method_def.predict
    logits = out.logits if predict is None else predict(state.method, out)
    correct, count = _accuracy_terms(logits, batch)
    metrics = {"correct": correct, "count": count}
    if state.teacher is not None:
        t_out = state.teacher_model.apply(state.teacher_variables(), x, train=False)
        metrics["teacher_correct"], _ = _accuracy_terms(t_out.logits, batch)
    return metrics


def make_eval_step(*, mesh: Mesh | None = None) -> Callable:
    """Returns ``eval_step(state, batch) -> {"correct", "count"[, "teacher_correct"]}`` (sums).

    Sums, not means, so padded eval batches (``batch["mask"]``) aggregate exactly: accumulate them on
    device with :func:`accumulate` and divide once at the end.
    """
    kwargs: dict[str, Any] = {}
    if mesh is not None:
        rep = shd.replicated(mesh)
        kwargs.update(in_shardings=(rep, shd.batch_sharding(mesh)), out_shardings=rep)
    return _host_wrapper(jax.jit(_eval_step, **kwargs), mesh)


def accumulate(total: Metrics | None, metrics: Metrics) -> Metrics:
    """Adds metric sums on device (no host sync)."""
    if total is None:
        return dict(metrics)
    return {k: total[k] + metrics[k] for k in total}


def evaluate(state: TrainState, batches, eval_step: Callable) -> dict[str, float]:
    """Top-1 accuracy of the student (and teacher) over an iterable of batches."""
    total = None
    for batch in batches:
        total = accumulate(total, eval_step(state, batch))
    if total is None:
        raise ValueError("evaluate got no batches")
    total = jax.device_get(total)
    count = max(float(total["count"]), 1.0)
    result = {"accuracy": float(total["correct"]) / count, "count": float(total["count"])}
    if "teacher_correct" in total:
        result["teacher_accuracy"] = float(total["teacher_correct"]) / count
    return result
