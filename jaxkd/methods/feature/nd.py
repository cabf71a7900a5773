"""The ND loss as a method: teacher class means (computed once) as method state, a projector when widths differ."""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxkd.batch import IMAGE, LABEL, MASK
from jaxkd import losses
from jaxkd.checks import check_int, check_label_values
from jaxkd.losses.core import Array, to_float
from jaxkd.inference import reduce_batches
from jaxkd.methods.base import LossAux, LossInputs, Method, MethodVars, Needs, Weight
from jaxkd.methods.feature.connectors import LinearConnector
from jaxkd.methods.features import embedding_pair, module_apply, module_init
from jaxkd.methods.registry import register
from jaxkd.models.base import get_feature
from jaxkd.participants import Participant

__all__ = ["class_means", "nd", "teacher_class_means"]


def teacher_class_means(
    model: Any,
    variables: Any,
    batches: Iterable[Mapping[str, Any]],
    *,
    num_classes: int,
    feature: str = "pooled",
    input_key: str = IMAGE,
    label_key: str = LABEL,
    mask_key: str = MASK,
) -> jax.Array:
    """The teacher's class-mean features over a dataset, ``[K, D]``, for :func:`nd`.

    Runs ``model`` (a :class:`jaxkd.models.Model`) in eval mode over ``batches`` (an iterable of batch
    mappings, e.g. one epoch of the training loader without augmentation), and averages ``feature`` per
    label (``batch[mask_key]``, when present, leaves out padding). The official
    ``emb_fea_distribution.py`` (github.com/WangYZ1608/Knowledge-Distillation-via-ND) computes these
    once from the trained teacher on the training set and stores them; a class without examples gets 0.
    """
    num_classes = check_int("num_classes", num_classes, low=1)

    def sums(outputs, batch):
        f = get_feature(outputs, feature, who="teacher")
        f = jnp.asarray(f, jnp.float32).reshape(f.shape[0], -1)
        one_hot = jax.nn.one_hot(batch[label_key], num_classes, dtype=jnp.float32) * batch["_valid"][:, None]
        return one_hot.T @ f, jnp.sum(one_hot, axis=0)

    def checked(batch):
        labels = np.asarray(batch[label_key])
        valid = np.asarray(batch[mask_key], bool) if mask_key in batch else np.ones(labels.shape, bool)
        class_means(np.zeros((labels.shape[0], 1), np.float32), labels, num_classes, mask=valid)  # label checks
        return {input_key: batch[input_key], label_key: labels, "_valid": valid}

    try:
        total, count = reduce_batches(Participant(model, variables, trains=False, input=input_key),
                                      map(checked, batches), sums, name="teacher")
    except ValueError as e:
        if "got no batches" in str(e):
            raise ValueError("teacher_class_means needs at least one batch") from None
        raise
    return jnp.asarray(total / np.maximum(count, 1.0)[:, None])


@register(
    "nd",
    paper="Wang et al., *Improving Knowledge Distillation via Regularizing Feature Norm and Direction*, 2023",
    losses=("nd",),
)
def nd(
    *,
    class_means: Any = None,
    embedding: str = "pooled",
    teacher_embedding: str | None = None,
    weight: Weight = 1.0,
    name: str = "nd",
) -> Method:
    """The ND loss (:func:`jaxkd.losses.nd`): ``1 − ⟨s, c_y/‖c_y‖⟩ / max(‖s‖, ‖t‖)`` between the student's
    embedding ``s``, the teacher's ``t`` and the teacher's class mean ``c_y`` of the label.

    ``class_means`` (``[K, D]``, computed once: :func:`teacher_class_means` over the training set, or
    :func:`jaxkd.methods.class_means`; or the path of a ``.npy`` file holding it, for method specs) is held as
    method state (saved with checkpoints). With ``class_means=None`` (the default) they are computed in the
    step instead: the state accumulates, per class, the sum and count of the frozen teacher's embeddings of
    every (unmasked, labeled) training example seen, and the loss uses their running mean (the batch's own
    examples included) — exactly the training-set class mean once every example has been seen, but of
    the *augmented* images, where the official code averages un-augmented ones before training. When the student's
    embedding is narrower or wider than the teacher's, a trainable linear projector maps it to ``D`` (the
    official ``EmbTrans`` is BatchNorm → Dropout(0.5) → Linear; here the linear map only). Wang et al.'s
    recipes add ND to KD or DKD: resnet32x4 → resnet8x4 is ``1·CE + 3.5·KD(T=4) + 2·ND`` (official
    ``train_cifar.sh``). Without a teacher at all the loss cannot run: ``t`` sets the target norm.
    """
    online = class_means is None
    if isinstance(class_means, str):
        class_means = np.load(class_means)
    if not online:
        means = np.asarray(class_means)
        if means.ndim != 2 or not np.issubdtype(means.dtype, np.floating) or not np.all(np.isfinite(means)):
            raise ValueError(
                f"class_means must be a finite float array [num_classes, dim], got shape {means.shape} ({means.dtype})"
            )
        means = jnp.asarray(means, jnp.float32)
    t_name = teacher_embedding or embedding

    def features(inputs: LossInputs):
        s, t = embedding_pair(inputs, embedding, t_name, method=name)
        if not online and t.shape[-1] != means.shape[-1]:
            raise ValueError(
                f"{name!r}: the teacher embedding {t_name!r} has {t.shape[-1]} dims but class_means is {tuple(means.shape)}"
            )
        return s, t

    def init(rng, inputs: LossInputs) -> MethodVars:
        s, t = features(inputs)
        num_classes = inputs.output("student", method=name).logits.shape[-1]
        if online:
            state = {"sums": jnp.zeros((num_classes, t.shape[-1]), jnp.float32),
                     "counts": jnp.zeros((num_classes,), jnp.float32)}
        else:
            if means.shape[0] != num_classes:
                raise ValueError(f"{name!r}: class_means has {means.shape[0]} classes, the student predicts {num_classes}")
            state = {"class_means": means}
        if s.shape[-1] == t.shape[-1]:
            return MethodVars(state=state)
        v = module_init(LinearConnector(t.shape[-1]), rng, s)
        return MethodVars(params={"projector": v.params}, state=state)

    def loss(vars: MethodVars, inputs: LossInputs, rng):
        s, t = features(inputs)
        labels = inputs.labels(name)
        state = vars.state
        if online:
            # This batch's teacher embeddings join the running per-class sums (masked examples excluded).
            w = jnp.ones(labels.shape, jnp.float32) if inputs.label_mask is None else inputs.label_mask.astype(jnp.float32)
            one_hot = jax.nn.one_hot(labels, state["counts"].shape[0], dtype=jnp.float32) * w[:, None]
            state = {"sums": state["sums"] + one_hot.T @ jnp.asarray(t, jnp.float32),
                     "counts": state["counts"] + jnp.sum(one_hot, axis=0)}
            current = state["sums"] / jnp.maximum(state["counts"], 1.0)[:, None]
        else:
            current = state["class_means"]
        if "projector" in vars.params:
            s, _ = module_apply(LinearConnector(t.shape[-1]), MethodVars(vars.params["projector"], {}), s)
        value = losses.nd(s, t, labels, jax.lax.stop_gradient(current), mask=inputs.label_mask)
        return value, LossAux({}, state)

    return Method(name=name, loss=loss, init=init, weight=weight, needs=Needs(participants=("teacher",), labels=True))


def class_means(features: Array, labels: Array, num_classes: int, *, mask: Array | None = None) -> Array:
    """The mean feature of each class, ``[K, D]``: ``c_k = Σ_{i: y_i = k} f_i / |{i: y_i = k}|`` (0 for a class
    without examples). ``features`` ``[N, ...]`` are flattened to ``[N, D]``; ``mask`` (boolean ``[N]``)
    leaves out padding. The ND paper's class centers (the official ``emb_fea_distribution.py`` averages the
    trained teacher's embeddings of the whole training set, in eval mode); to accumulate over batches, use
    :func:`jaxkd.methods.teacher_class_means`.
    """
    num_classes = check_int("num_classes", num_classes, low=1)
    f = to_float(features)
    f = f.reshape(f.shape[0], -1)
    if np.shape(labels) != f.shape[:1]:
        raise ValueError(f"labels must have shape {f.shape[:1]}, got {np.shape(labels)}")
    check_label_values(labels, num_classes)
    w = jnp.ones(f.shape[:1], f.dtype) if mask is None else jnp.asarray(mask, f.dtype)
    one_hot = jax.nn.one_hot(labels, num_classes, dtype=f.dtype) * w[:, None]
    sums = one_hot.T @ f
    counts = jnp.sum(one_hot, axis=0)
    return sums / jnp.maximum(counts, 1.0)[:, None]
