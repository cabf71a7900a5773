"""The jitted train and eval steps, and the host-side checks around them.

``make_train_step`` builds one function ``(state, batch) -> (state, metrics)``: the method's batch
transform if it has one (``Method.prepare``: mixup, CutMix, a crop — seen by every participant), teacher
forward (eval mode, ``stop_gradient``), student forward, the method's loss, gradients, the Optax update and the
method's post-step update — all in one compiled program, with the state donated so its buffers are
updated in place.

Nothing wrong passes silently. Before dispatch, the host checks each batch against the sample batch the
state was created with (keys, per-example shapes, dtypes, a non-empty batch, NumPy labels in range).
Inside the program, what only the values can tell — a non-finite loss or gradient, a device-array label
outside ``[0, num_classes)`` — sets a status word; the update is not applied when it is set, and the host
reads that one integer after the step and raises (:class:`NonFiniteError`, ``ValueError``) or, with
``on_nonfinite="skip"``, counts the skipped update in ``state.skipped_steps`` (as
``optax.apply_if_finite`` does, but for the whole state: batch statistics and method state included).
Reading the status waits for the step to finish; ``step.jitted`` is the raw compiled function for
callers that check ``metrics["status"]`` themselves. A step that fails while running (out of device
memory) after its state was donated raises :class:`StepFailedError`: that state is gone, and a long run
resumes from its last checkpoint.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Literal, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from jaxkd import sharding as shd
from jaxkd.checks import check_choice, check_int, check_label_values
from jaxkd.eval_metrics import EvalMetric, EvalView, correct_and_count, top1
from jaxkd.losses.core import combine_masks
from jaxkd.batch import LABELED, MASK, is_normalizer_key
from jaxkd.methods.base import LossInputs, MethodVars, StepInfo, require
from jaxkd.participants import STUDENT
from jaxkd.train_state import ModelVariables, TrainState, check_sample_batch

PyTree = Any

Metrics = dict[str, jax.Array]

# Bits of the status word a step returns (metrics["status"]).
NONFINITE_LOSS = 1
NONFINITE_GRADS = 2
LABEL_OUT_OF_RANGE = 4


class NonFiniteError(FloatingPointError):
    """A step's loss or gradients were not finite. The update was not applied: ``state`` is the train
    state as it was before the step (the input state was donated), ``metrics`` the step's metrics."""

    def __init__(self, message: str, state: TrainState, metrics: Metrics):
        super().__init__(message)
        self.state, self.metrics = state, metrics


class StepFailedError(RuntimeError):
    """The compiled step failed while running (XLA's ``RESOURCE_EXHAUSTED`` for an out-of-memory batch, a
    device fault) after its input state had been donated: that state's buffers are deleted, so training
    can only go on from a saved copy (the last checkpoint). JAX's error is the ``__cause__``."""


def check_batch(state: TrainState, batch: Mapping[str, Any], *, only: Sequence[str] | None = None) -> None:
    """Host-side checks of a batch against the sample batch ``state`` was created with.

    Raises ``ValueError`` for a missing model input, an empty batch, an entry whose per-example shape or
    dtype kind differs from the sample's (uint8 images where float ones were expected, another image
    size or channel count), non-integer labels, and NumPy labels outside ``[0, num_classes)``. Device
    labels are checked inside the step.
    """
    participants = dict(state.participants)
    if only is not None:  # an eval step that skips some participants does not read their inputs
        participants = {name: p for name, p in participants.items() if name in only}
    check_sample_batch(batch, participants, label_key=state.label_key)
    for key, shape, kind in state.batch_spec.examples:
        if key not in batch:
            continue  # e.g. eval batches carry no meta batch; the models' inputs are checked above
        dtype = jnp.result_type(batch[key])
        got_shape = tuple(np.shape(batch[key])[1:])
        if got_shape != shape or dtype.kind != kind:
            raise ValueError(
                f"batch[{key!r}] has examples of shape {got_shape} and dtype {dtype}, but the "
                f"train state was created for shape {shape} and dtype kind {kind!r} "
                f"({ {'f': 'float', 'i': 'int', 'u': 'unsigned int', 'b': 'bool'}.get(kind, kind) })"
            )
    labels = batch.get(state.label_key)
    if labels is None or not state.num_classes:
        return
    name = f"batch[{state.label_key!r}]"
    if isinstance(labels, jax.Array):
        # Only the dtype: reading a device array's values here would wait for the device; the step
        # checks them.
        check_label_values(np.empty((0,), labels.dtype), state.num_classes, name=name)
        return
    flags = [np.asarray(batch[k], bool) for k in (MASK, LABELED) if k in batch]
    where = np.logical_and.reduce(flags) if flags else None
    check_label_values(np.asarray(labels), state.num_classes, where=where, name=name)


def _label_status(labels: jax.Array, valid: jax.Array | None, num_classes: int) -> jax.Array:
    out_of_range = (labels < 0) | (labels >= num_classes)
    if valid is not None:
        out_of_range = out_of_range & valid
    return jnp.where(jnp.any(out_of_range), LABEL_OUT_OF_RANGE, 0)


def _labels_and_mask(state: TrainState, batch: Mapping[str, jax.Array]):
    labels = batch.get(state.label_key)
    valid = combine_masks(batch.get(MASK), batch.get(LABELED))
    return labels, valid


def _all_finite(tree) -> jax.Array:
    leaves = jax.tree.leaves(tree)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in leaves])) if leaves else jnp.array(True)


def _forward(state: TrainState, name: str, variables: PyTree, batch: Mapping[str, jax.Array], *, train: bool,
             rng: jax.Array | None = None):
    p = state.participant(name)
    rngs = {} if rng is None else {"dropout": rng}
    return p.model.apply(variables, p.model_input(batch, name=name), train=train, rngs=rngs)


def _microbatches(batch: Mapping[str, jax.Array], k: int) -> dict[str, jax.Array]:
    """``[B, ...] -> [k, B/k, ...]``; micro-batch ``i`` holds rows ``i, i + k, i + 2k, …`` so that every
    device of a sharded batch contributes the same number of rows to each micro-batch (no resharding)."""
    out = {}
    for key, x in batch.items():
        if x.shape[0] % k:
            raise ValueError(f"the batch of {x.shape[0]} examples cannot be split into {k} micro-batches "
                             f"(batch[{key!r}])")
        out[key] = jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)
    return out


def _equalize_normalizers(batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """Spreads each global count (the entries named ``*normalizer``, :func:`jaxkd.batch.is_normalizer_key`)
    evenly over the examples before the batch is split: per-host shares (each host's count over its rows)
    sum to the global count, but only equal shares make every micro-batch's normalizer ``b/B`` of it (see
    :mod:`jaxkd.losses.lm.tokens`)."""
    batch = dict(batch)
    for key, share in batch.items():
        if is_normalizer_key(key) and jnp.ndim(share) == 1:
            share = jnp.asarray(share, jnp.float32)
            batch[key] = jnp.full(share.shape, jnp.sum(share) / share.shape[0], jnp.float32)
    return batch


#: Folded into the method's key to draw the key of its batch transform (``Method.prepare``). The method's own
#: key is split as it always was, so a method without a transform keeps its random streams bit for bit.
PREPARE_STREAM = 0x6D6978  # "mix"


def prepare_key(method_rng: jax.Array) -> jax.Array:
    """The key of the method's batch transform in a step (or micro-batch) whose method key is ``method_rng``."""
    return jax.random.fold_in(method_rng, PREPARE_STREAM)


def _loss_and_grads(state: TrainState, trainable, model_states, method_state, batch, dropout_rng, method_rng):
    """One forward/backward pass over ``batch``: ``(loss, grads, trained outputs, aux)``.

    The method's batch transform (``Method.prepare``: mixup, CutMix, a crop) runs first, outside the
    differentiated function, so every participant — frozen teachers included — sees the same transformed
    batch; with micro-batches it runs per micro-batch, with that micro-batch's key."""
    method = state.method
    if method.prepare is not None:
        batch = method.prepare(MethodVars(trainable["method"], method_state), batch, prepare_key(method_rng))
    dropout_rngs = dict(zip(state.trained, jax.random.split(dropout_rng, len(state.trained))))

    # Frozen participants run once, outside the differentiated function and under stop_gradient, so no
    # method needs to detach them again.
    frozen_out = {
        name: jax.lax.stop_gradient(_forward(state, name, v.variables(), batch, train=False))
        for name, v in state.frozen.items()
    }
    frozen_variables = {name: jax.lax.stop_gradient(v.variables()) for name, v in state.frozen.items()}

    def loss_fn(trainable):
        # A participant trained in part (LoRA adapters only) differentiates through its other parameters
        # under stop_gradient: JAX treats them as constants (no weight-gradient matmul is traced; their gradient
        # is a zero array), where masking the update alone (optax.masked / set_to_zero) would still compute every
        # frozen weight's gradient.
        trainable = {name: state.participant(name).stop_frozen_gradients(p) if name in state.trained else p
                     for name, p in trainable.items()}
        variables = {name: ModelVariables(trainable[name], model_states[name]).variables() for name in state.trained}
        trained_out = {
            name: _forward(state, name, variables[name], batch, train=True, rng=dropout_rngs[name]) for name in variables
        }
        inputs = LossInputs(
            outputs={**trained_out, **frozen_out}, batch=batch, step=state.step,
            variables={**frozen_variables, **variables},
            participants=state.participants, label_key=state.label_key,
        )
        loss, aux = method.loss(MethodVars(trainable["method"], method_state), inputs, method_rng)
        return loss, (trained_out, aux)

    (loss, (trained_out, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
    return loss, grads, trained_out, aux


def _batch_metrics(state: TrainState, batch, trained_out) -> tuple[jax.Array, Metrics]:
    """The label status bits and the trained participants' train accuracies on ``batch``."""
    status, metrics = jnp.zeros((), jnp.int32), {}
    labels, valid = _labels_and_mask(state, batch)
    if labels is not None and jnp.issubdtype(labels.dtype, jnp.integer):
        status = _label_status(labels, valid, state.num_classes)
        for name, out in trained_out.items():
            correct, count = correct_and_count(out.logits, labels, valid)
            metrics["accuracy" if name == STUDENT else f"{name}/accuracy"] = correct / jnp.maximum(count, 1.0)
    return status, metrics


def _accumulated_loss_and_grads(state: TrainState, batch, rng, k: int):
    """``k`` micro-batches in a ``lax.scan``: gradients, losses and metrics averaged; model state (batch
    statistics) and method state carried from one micro-batch to the next, as ``k`` smaller steps
    without updates in between would carry them. Token losses stay exact global means through the
    token normalizers (:mod:`jaxkd.losses.lm.tokens`); other means are means of equal-size micro-batches."""
    model_states = {name: v.model_state for name, v in state.trained.items()}
    micro = _microbatches(_equalize_normalizers(batch), k)

    def one(carry, xs):
        model_states, method_state, total = carry
        mb, (dropout_rng, method_rng) = xs
        loss, grads, trained_out, aux = _loss_and_grads(state, state.trainable, model_states, method_state, mb,
                                                        dropout_rng, method_rng)
        status, batch_metrics = _batch_metrics(state, mb, trained_out)
        summed = {"loss": loss, "grads": grads, "metrics": {**aux.metrics, **batch_metrics}}
        total = jax.tree.map(lambda a, b: a + b / k, total, summed)
        new_states = {name: out.model_state for name, out in trained_out.items()}
        return (new_states, aux.state, total), status

    first = jax.tree.map(lambda x: x[0], micro)
    rngs = jax.random.split(rng, (k, 2))
    def shapes():
        _, grads, out, aux = _loss_and_grads(state, state.trainable, model_states, state.method_vars.state, first, rng, rng)
        return grads, {**aux.metrics, **_batch_metrics(state, first, out)[1]}

    grads_shape, metrics_shape = jax.eval_shape(shapes)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), {"loss": jax.ShapeDtypeStruct((), jnp.float32),
                                                                 "grads": grads_shape, "metrics": metrics_shape})
    (model_states, method_state, total), statuses = jax.lax.scan(
        one, (model_states, state.method_vars.state, zeros), (micro, (rngs[:, 0], rngs[:, 1])))
    status = jnp.max(statuses)  # bits: any micro-batch's label problem is the step's
    return total["loss"], total["grads"], model_states, method_state, total["metrics"], status


def _train_step(state: TrainState, batch: Mapping[str, jax.Array], microbatches: int = 1) -> tuple[TrainState, Metrics]:
    method = state.method
    rng, dropout_rng, method_rng = jax.random.split(state.rng, 3)
    if microbatches == 1:
        model_states = {name: v.model_state for name, v in state.trained.items()}
        loss, grads, trained_out, aux = _loss_and_grads(state, state.trainable, model_states, state.method_vars.state,
                                                        batch, dropout_rng, method_rng)
        label_status, batch_metrics = _batch_metrics(state, batch, trained_out)
        new_model_states = {name: out.model_state for name, out in trained_out.items()}
        method_state_after_loss, loss_metrics = aux.state, {**aux.metrics, **batch_metrics}
    else:
        loss, grads, new_model_states, method_state_after_loss, loss_metrics, label_status = (
            _accumulated_loss_and_grads(state, batch, method_rng, microbatches))
    updates, opt_state = state.tx.update(grads, state.opt_state, state.trainable)
    trainable = _keep_frozen(state, optax.apply_updates(state.trainable, updates))
    step = state.step + 1
    info = StepInfo(step=step, student_params=trainable[STUDENT], metrics=loss_metrics)
    method_state = method.update(trainable["method"], method_state_after_loss, info)

    status = jnp.where(jnp.isfinite(loss), 0, NONFINITE_LOSS) + jnp.where(_all_finite(grads), 0, NONFINITE_GRADS)
    status = status + label_status
    metrics: Metrics = {**loss_metrics, "loss": loss, "grad_norm": optax.tree.norm(grads)}
    updated = state.replace(
        step=step,
        trained={name: ModelVariables(trainable[name], new_model_states[name]) for name in state.trained},
        opt_state=opt_state,
        method_vars=MethodVars(params=trainable["method"], state=method_state),
        rng=rng,
    )
    # A bad step changes nothing but the key and the count of skipped steps: the update, the batch
    # statistics and the method state of a NaN step would poison every later step.
    ok = status == 0
    kept = state.replace(rng=rng, skipped_steps=state.skipped_steps + 1)
    new_state = jax.tree.map(lambda new, old: jnp.where(ok, new, old), updated, kept)
    metrics["status"] = status.astype(jnp.int32)
    metrics["skipped"] = (~ok).astype(jnp.float32)
    return new_state, metrics


def _keep_frozen(state: TrainState, trainable: PyTree) -> PyTree:
    """``trainable`` with each participant's parameters outside its ``trainable`` selection taken from
    ``state`` as they were: bit-identical (their zero update would still turn a ``-0.0`` into ``0.0``)."""
    out = dict(trainable)
    for name in state.trained:
        p = state.participant(name)
        if p.trainable is not None:
            out[name] = jax.tree.map(lambda keep, new, old: new if keep else old, p.trainable_mask(out[name]),
                                     out[name], state.trainable[name])
    return out


def _describe_status(status: int, label_key: str, num_classes: int) -> str:
    parts = []
    if status & NONFINITE_LOSS:
        parts.append("the loss is not finite")
    if status & NONFINITE_GRADS:
        parts.append("a gradient is not finite")
    if status & LABEL_OUT_OF_RANGE:
        parts.append(f"batch[{label_key!r}] holds a label outside [0, num_classes={num_classes})")
    return "; ".join(parts)


def _compiled(fn: Callable, mesh: Mesh | None, *, donate: bool, metrics_out: bool = True) -> Callable:
    """``fn(state, batch)`` compiled; with a mesh, the state keeps its own shardings (in and out: a
    parameter sharded over ``fsdp`` stays sharded after the update) and the batch is split over
    (``data``, ``fsdp``). One compiled function per state layout, built on first use."""
    kwargs: dict[str, Any] = {"donate_argnums": (0,) if donate else ()}
    if mesh is None:
        return jax.jit(fn, **kwargs)
    cache: dict[Any, Callable] = {}

    def call(state, batch):
        layout = jax.tree.map(lambda a: a.sharding, state)
        key = jax.tree.structure(state), tuple(jax.tree.leaves(layout))
        if key not in cache:
            rep = shd.replicated(mesh)
            out = (layout, rep) if metrics_out else rep
            cache[key] = jax.jit(fn, in_shardings=(layout, shd.batch_sharding(mesh)), out_shardings=out, **kwargs)
        return cache[key](state, batch)

    return call


def _donated(state: TrainState) -> bool:
    """Whether ``state``'s buffers were donated (deleted). Its step counter is donated with every other
    leaf, so one leaf tells (a microsecond, not a walk over the whole state each step)."""
    return isinstance(state.step, jax.Array) and state.step.is_deleted()


def _host_wrapper(compiled: Callable, mesh: Mesh | None, on_bad_status: Callable, *, donates: bool = False,
                  reads: Callable[[TrainState], Sequence[str]] | None = None) -> Callable:
    def step(state: TrainState, batch: Mapping[str, Any]):
        if donates and _donated(state):
            raise ValueError("the train state was donated to an earlier step (its buffers are deleted): pass the "
                             "state that step returned, or the one restored from the last checkpoint")
        check_batch(state, batch, only=None if reads is None else reads(state))
        if mesh is not None:
            batch = shd.shard_batch(batch, mesh)
        try:
            out = compiled(state, batch)
            return on_bad_status(state, out)  # reads the status: a failure while running surfaces here or above
        except RuntimeError as e:  # JaxRuntimeError; the checks above raise ValueError / NonFiniteError
            if not (donates and _donated(state)):
                raise  # failed before taking the state (e.g. compiling): the caller's state is intact
            # Without this, the next use of the state reports only "Array has been deleted".
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise StepFailedError(
                f"the train step failed at run time ({first_line}); its input state was donated to the step and "
                "its buffers are deleted: restore the state from the last checkpoint (then, for an out-of-memory "
                "error, a smaller batch or make_train_step(microbatches=k)); make_train_step(donate=False) keeps "
                "the input state through such a failure, at the cost of a second copy in device memory"
            ) from e

    step.jitted = compiled
    return step


def make_train_step(
    *, mesh: Mesh | None = None, donate: bool = True, on_nonfinite: Literal["raise", "skip"] = "raise",
    microbatches: int = 1,
) -> Callable:
    """Returns ``step(state, batch) -> (state, metrics)``, compiled once per batch shape.

    Args:
      mesh: the mesh the state was created on (``jaxkd.create(..., mesh=mesh)``): the batch is split over
        its ``data`` and ``fsdp`` axes, every state array keeps its sharding, and XLA inserts the
        gradient reductions and the parameter all-gathers. ``None`` runs on the default device.
      donate: donate the input state's buffers (the caller must not reuse the old state). If the step then
        fails while running (out of device memory), the input state is gone too: the step raises
        :class:`StepFailedError` (restore the last checkpoint). ``False`` keeps the input state through
        such a failure, at the cost of a second copy of the state in device memory during the step.
      on_nonfinite: a step whose loss or gradients are not finite is never applied; ``"raise"``
        (default) then raises :class:`NonFiniteError` (holding the unchanged state), ``"skip"`` goes on
        and counts it in ``state.skipped_steps``. A label out of range always raises ``ValueError``.
      microbatches: gradient accumulation: the batch is split into this many micro-batches (rows
        ``i, i+k, …``), run one after another in a ``lax.scan`` inside the same compiled step (peak
        activation memory of one micro-batch), their gradients averaged, and one update applied. Token
        losses are normalized by the global target count (:mod:`jaxkd.losses.lm.tokens`), so the update
        equals the unsplit batch's; batch statistics and method state pass from one micro-batch to the
        next.

    Metrics: ``loss`` (the weighted total), one entry per method term, ``grad_norm``, ``skipped`` (1.0
    for a skipped step), ``status`` (the check bits) and, when the batch has labels, the student's train
    ``accuracy`` over the labeled examples (and ``<name>/accuracy`` for other trained participants).
    """
    check_choice("on_nonfinite", on_nonfinite, ("raise", "skip"))

    def on_bad_status(old_state: TrainState, out):
        new_state, metrics = out
        status = int(metrics["status"])
        if status & LABEL_OUT_OF_RANGE:
            raise ValueError(_describe_status(status, new_state.label_key, new_state.num_classes))
        if status and on_nonfinite == "raise":
            message = _describe_status(status, new_state.label_key, new_state.num_classes)
            raise NonFiniteError(
                f"update {int(new_state.step) + 1}: {message}; it was not applied. Lower the learning rate, "
                "check the inputs for NaN, or pass make_train_step(on_nonfinite='skip') to skip such steps",
                new_state, metrics,
            )
        return new_state, metrics

    check_int("microbatches", microbatches, low=1)
    step_fn = _train_step if microbatches == 1 else functools.partial(_train_step, microbatches=microbatches)
    return _host_wrapper(_compiled(step_fn, mesh, donate=donate), mesh, on_bad_status, donates=donate)


#: Suffixes of an eval step's sums: metric ``m`` is ``sums[m + NUM] / sums[m + DEN]`` over the whole dataset.
NUM, DEN = ":num", ":den"


def _eval_step(state: TrainState, batch: Mapping[str, jax.Array], frozen: bool = True,
               metrics: tuple[EvalMetric, ...] = ()) -> Metrics:
    metrics = metrics or (top1(),)
    needs_labels = any(m.needs_labels for m in metrics)
    if needs_labels:
        require(batch, state.label_key, method="evaluation")
    labels, valid = _labels_and_mask(state, batch)
    if valid is not None and valid.ndim > 1:  # a token mask (language models): a row is valid if any token is
        valid = jnp.any(valid, axis=tuple(range(1, valid.ndim)))
    out = {"status": (_label_status(labels, valid, state.num_classes) if needs_labels
                      else jnp.zeros((), jnp.int32)).astype(jnp.int32)}
    wanted = {p for m in metrics for p in m.participants}
    logits = {}
    for name, _ in state.participants:
        if not frozen and name not in state.trained and name not in wanted:
            continue
        result = _forward(state, name, state.variables_of(name).variables(), batch, train=False)
        logits[name] = result.logits
        if name == STUDENT and state.method.predict is not None:
            logits[name] = state.method.predict(state.method_vars, result)
        finite = jnp.all(jnp.isfinite(logits[name]), axis=tuple(range(1, logits[name].ndim)))
        out[f"{'' if name == STUDENT else name + '_'}nonfinite"] = jnp.sum(
            jnp.where(valid if valid is not None else True, ~finite, False).astype(jnp.int32))
    view = EvalView(logits, batch, labels, valid)
    for metric in metrics:
        for key, (num, den) in metric(view).items():
            out[key + NUM], out[key + DEN] = num, den
    out["count"] = jnp.sum(view.weights(next(iter(logits.values()))))
    return out


def make_eval_step(*, mesh: Mesh | None = None, frozen: bool = True,
                   metrics: tuple[EvalMetric, ...] | None = None) -> Callable:
    """Returns ``eval_step(state, batch) -> sums`` of every metric over the batch's valid examples.

    ``metrics`` (default :func:`jaxkd.eval_metrics.top1`: ``accuracy``, ``<name>_accuracy``) are
    :mod:`jaxkd.eval_metrics` functions — top-1, :func:`~jaxkd.eval_metrics.agreement` and
    :func:`~jaxkd.eval_metrics.teacher_student_kl` with a teacher, :func:`~jaxkd.eval_metrics.bits_per_byte`
    of a language model, or your own. Every participant is evaluated; ``frozen=False`` skips the frozen ones
    (teachers) unless a metric reads them, since their scores do not change during training (compute them once
    instead). Sums, not means, so padded eval batches (``batch["mask"]``) aggregate exactly: accumulate them on
    device with :func:`accumulate` and divide once at the end (:func:`evaluate` does). A label out of range
    raises ``ValueError``; predictions that are not finite are counted (``nonfinite``) and make
    :func:`evaluate` raise, so a diverged model never reaches a results table.
    """
    metrics = tuple(metrics) if metrics is not None else (top1(),)
    for metric in metrics:
        if not isinstance(metric, EvalMetric):
            raise ValueError(f"metrics must be jaxkd.eval_metrics metrics (e.g. eval_metrics.top1()), got {metric!r}")

    def on_bad_status(state: TrainState, metrics):
        if int(metrics["status"]) & LABEL_OUT_OF_RANGE:
            raise ValueError(_describe_status(LABEL_OUT_OF_RANGE, state.label_key, state.num_classes))
        return metrics

    step = functools.partial(_eval_step, frozen=frozen, metrics=metrics)
    wanted = {p for m in metrics for p in m.participants}

    def evaluated(state: TrainState) -> tuple[str, ...]:
        """The participants ``_eval_step`` runs (a skipped frozen teacher's inputs, e.g. a cached teacher's
        batch entries, need not be in eval batches)."""
        return tuple(name for name, _ in state.participants
                     if frozen or name == STUDENT or name in state.trained or name in wanted)

    return _host_wrapper(_compiled(step, mesh, donate=False, metrics_out=False), mesh, on_bad_status,
                         reads=evaluated)


def accumulate(total: Metrics | None, metrics: Metrics) -> Metrics:
    """Adds metric sums on device (no host sync)."""
    if total is None:
        return dict(metrics)
    return {k: total[k] + metrics[k] for k in total}


def evaluate(state: TrainState, batches, eval_step: Callable) -> dict[str, float]:
    """Every metric of ``eval_step`` (:func:`make_eval_step`) over an iterable of batches — by default top-1
    accuracy: ``accuracy`` (the student) and ``<name>_accuracy`` for the others (``teacher_accuracy``,
    ``peer_accuracy`` …) — and ``count``, the valid examples.

    Raises ``FloatingPointError`` when any participant's predictions for any example are not finite.
    """
    total = None
    for batch in batches:
        total = accumulate(total, eval_step(state, batch))
    if total is None:
        raise ValueError("evaluate got no batches")
    total = jax.device_get(total)
    for name, _ in state.participants:
        bad = int(total.get(f"{'' if name == STUDENT else name + '_'}nonfinite", 0))
        if bad:
            raise FloatingPointError(
                f"the {name}'s predictions are not finite for {bad} of {int(total['count'])} examples: the "
                "model has diverged (NaN or inf parameters)"
            )
    result = {key[:-len(NUM)]: float(total[key]) / max(float(total[key[:-len(NUM)] + DEN]), 1e-30)
              for key in total if key.endswith(NUM)}
    result["count"] = float(total["count"])
    return result
