"""CRD as a method: trainable embeddings, two memory banks and the normalization constants in method state."""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxkd.batch import INDEX
from jaxkd import losses
from jaxkd.checks import check_choice, check_in_range, check_int, check_temperature
from jaxkd.losses.core import Array, to_float
from jaxkd.methods.base import LossAux, LossInputs, Method, MethodVars, Needs, Weight, require
from jaxkd.methods.feature.connectors import LinearEmbed
from jaxkd.methods.features import module_apply, module_init, student_feature, teacher_feature
from jaxkd.methods.registry import register

__all__ = ["crd", "crd_memory_update"]


def _class_tables(labels: Any, num_examples: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(labels, order, start, count): the dataset's indices sorted by class, and each class's slice."""
    labels = np.asarray(labels)
    if labels.shape != (num_examples,) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"crd: labels must be the integer labels of the whole dataset, shape (num_examples,)=({num_examples},), "
            f"got dtype {labels.dtype} and shape {labels.shape}"
        )
    if labels.min() < 0:
        raise ValueError(f"crd: labels must be >= 0, got {int(labels.min())}")
    num_classes = int(labels.max()) + 1
    count = np.bincount(labels, minlength=num_classes)
    if np.any(count[np.unique(labels)] == num_examples):
        raise ValueError("crd: mode='exact' draws negatives from other classes, but the dataset has a single class")
    order = np.argsort(labels, kind="stable")
    start = np.concatenate([[0], np.cumsum(count)[:-1]])
    return labels.astype(np.int32), order.astype(np.int32), start.astype(np.int32), count.astype(np.int32)


def _contrast_indices(rng, index: jax.Array, *, num_negatives: int, num_examples: int, tables) -> jax.Array:
    """``[B, 1 + K]``: each example's own index, then ``K`` negatives drawn with replacement — uniformly
    over the dataset (``tables is None``; RepDistiller's ``AliasMethod`` over uniform unigrams), or
    uniformly over the examples of other classes (``mode="exact"``)."""
    index = jnp.asarray(index, jnp.int32)
    shape = (index.shape[0], num_negatives)
    if tables is None:
        negatives = jax.random.randint(rng, shape, 0, num_examples, dtype=jnp.int32)
    else:
        labels, order, start, count = (jnp.asarray(t) for t in tables)
        c = labels[jnp.clip(index, 0, num_examples - 1)]
        first, size = start[c][:, None], count[c][:, None]
        # A uniform position among the N − n_c entries outside the class's slice of the sorted order.
        u = jax.random.randint(rng, shape, 0, num_examples - size, dtype=jnp.int32)
        negatives = order[jnp.where(u < first, u, u + size)]
    return jnp.concatenate([index[:, None], negatives], axis=1)


@register(
    "crd", example="num_examples=64, nce_k=8",
    paper="Tian, Krishnan & Isola, *Contrastive Representation Distillation*, ICLR 2020",
    losses=("crd", "crd_nce"),
    status="supported (memory banks in method state; needs the example index in the batch)",
)
def crd(
    *,
    num_examples: int,
    nce_k: int = 16384,
    nce_t: float = 0.07,
    nce_m: float = 0.5,
    feat_dim: int = 128,
    mode: str = "uniform",
    labels: Sequence[int] | None = None,
    student_feature_name: str = "pooled",
    teacher_feature_name: str = "pooled",
    index_key: str = INDEX,
    weight: Weight = 1.0,
    name: str = "crd",
) -> Method:
    """Contrastive representation distillation (Tian, Krishnan & Isola, ICLR 2020), following the official
    RepDistiller code (``crd/criterion.py``, ``crd/memory.py``, ``dataset/cifar100.py``).

    ``e_s = l2norm(W_s f_s + b_s)`` and ``e_t = l2norm(W_t f_t + b_t)`` (``Embed``, trainable, on the
    penultimate ``pooled`` features) are contrasted with :func:`jaxkd.losses.crd` against two memory
    banks ``[num_examples, feat_dim]`` held in method state (initialized uniform in ``[−s, s]``,
    ``s = 1/√(feat_dim/3)``): for each example, its own bank row (the positive, at the dataset index
    ``batch[index_key]``) and ``nce_k`` negatives drawn with the method's rng. ``Z_s``, ``Z_t`` are set
    on the first step to ``mean(exp(scores/T))·N`` and then frozen (state). After each forward pass the
    banks are written at the positives (:func:`jaxkd.methods.crd_memory_update`, momentum ``nce_m``);
    masked (padding) examples neither count in the loss or ``Z`` nor write into the banks.

    Args:
      num_examples: ``N``, the size of the training set (the banks' rows); ``batch[index_key]`` must
        hold each example's index in ``[0, N)``.
      nce_k: negatives per example (``K < N``).
      nce_t, nce_m: temperature and bank momentum.
      feat_dim: embedding size.
      mode: ``"uniform"``: negatives uniform over the dataset (RepDistiller's ``ContrastMemory`` sampler;
        a negative may be the positive itself); ``"exact"``: negatives uniform over the examples of
        *other* classes (RepDistiller's ``CIFAR100InstanceSample(mode='exact')``, what its CIFAR runs
        use), which needs ``labels``, the labels of the whole training set by index (Python API only:
        a method spec cannot pass an array). Negatives are drawn with replacement; the official
        ``exact`` sampler draws without replacement when ``K`` is at most the number of candidates.
      student_feature_name, teacher_feature_name: the features embedded (RepDistiller: ``feat[-1]``).
      index_key: the batch entry with the examples' dataset indices.

    Metrics: ``z_student``, ``z_teacher``. Official CIFAR-100 recipe (``scripts/run_cifar_distill.sh``): ``-a 0 -b 0.8``, i.e.
    ``ce + 0.8 * crd(num_examples=50000)`` (CRD+KD: ``-a 1``, ``ce + kd(temperature=4) + 0.8 * crd(...)``).
    """
    num_examples = check_int("num_examples", num_examples, low=2)
    nce_k = check_int("nce_k", nce_k, low=1)
    if nce_k >= num_examples:
        raise ValueError(
            f"crd: the memory bank (num_examples={num_examples}) must be larger than the number of negatives "
            f"nce_k={nce_k}; lower nce_k below the dataset size"
        )
    check_temperature("nce_t", nce_t)
    check_in_range("nce_m", nce_m, 0.0, 1.0)
    feat_dim = check_int("feat_dim", feat_dim, low=1)
    check_choice("mode", mode, ("uniform", "exact"))
    if mode == "exact" and labels is None:
        raise ValueError("crd: mode='exact' draws negatives from other classes and needs labels (the dataset's labels)")
    if mode == "uniform" and labels is not None:
        raise ValueError("crd: labels are only used by mode='exact'; pass mode='exact' or leave labels out")
    tables = _class_tables(labels, num_examples) if mode == "exact" else None
    embed = LinearEmbed(feat_dim)
    bound = 1.0 / float(np.sqrt(feat_dim / 3.0))

    def features(inputs: LossInputs):
        return (student_feature(inputs, student_feature_name, method=name),
                teacher_feature(inputs, teacher_feature_name, method=name))

    def init(rng, inputs: LossInputs) -> MethodVars:
        f_s, f_t = features(inputs)
        r_s, r_t, r_ms, r_mt = jax.random.split(rng, 4)
        embed_s, embed_t = module_init(embed, r_s, f_s), module_init(embed, r_t, f_t)
        shape = (num_examples, feat_dim)
        state = {
            "memory_student": jax.random.uniform(r_ms, shape, jnp.float32, -bound, bound),
            "memory_teacher": jax.random.uniform(r_mt, shape, jnp.float32, -bound, bound),
            "z_student": -jnp.ones((), jnp.float32),
            "z_teacher": -jnp.ones((), jnp.float32),
        }
        return MethodVars(params={"embed_student": embed_s.params, "embed_teacher": embed_t.params}, state=state)

    def loss(vars: MethodVars, inputs: LossInputs, rng):
        index = require(inputs.batch, index_key, method=name)
        f_s, f_t = features(inputs)
        state, mask = vars.state, inputs.example_mask
        e_s, _ = module_apply(embed, MethodVars(vars.params["embed_student"]), f_s)
        e_t, _ = module_apply(embed, MethodVars(vars.params["embed_teacher"]), f_t)
        idx = _contrast_indices(rng, index, num_negatives=nce_k, num_examples=num_examples, tables=tables)
        rows_s = jax.lax.stop_gradient(state["memory_student"][idx])
        rows_t = jax.lax.stop_gradient(state["memory_teacher"][idx])
        # Z is set once, from the first step's scores, then frozen (RepDistiller's params[2:4] = -1 sentinel).
        first_s = losses.crd_partition_constant(jax.lax.stop_gradient(losses.crd_scores(e_s, rows_t, temperature=nce_t)),
                                        num_examples, mask)
        first_t = losses.crd_partition_constant(jax.lax.stop_gradient(losses.crd_scores(e_t, rows_s, temperature=nce_t)),
                                        num_examples, mask)
        # (A step whose examples are all masked leaves Z unset: 0, and the next step sets it.)
        z_s = jnp.where(state["z_student"] > 0, state["z_student"], first_s)
        z_t = jnp.where(state["z_teacher"] > 0, state["z_teacher"], first_t)
        value = losses.crd(e_s, e_t, rows_s, rows_t, z_student=z_s, z_teacher=z_t, num_examples=num_examples,
                           temperature=nce_t, mask=mask)
        new_state = {
            "memory_student": crd_memory_update(state["memory_student"], e_s, index, momentum=nce_m, mask=mask),
            "memory_teacher": crd_memory_update(state["memory_teacher"], e_t, index, momentum=nce_m, mask=mask),
            "z_student": z_s,
            "z_teacher": z_t,
        }
        return value, LossAux({"z_student": z_s, "z_teacher": z_t}, new_state)

    return Method(name=name, loss=loss, init=init, weight=weight,
                  needs=Needs(participants=("teacher",), batch_keys=(index_key,)))


def crd_memory_update(
    memory: Array, embedding: Array, indices: Array, *, momentum: float = 0.5, mask: Array | None = None
) -> Array:
    """The bank after RepDistiller's write: ``memory[y] = normalize(momentum·memory[y] + (1 − momentum)·e)``
    at each example's own index ``y``; masked examples (padding) write nothing. Gradient-free (the
    official code writes under ``torch.no_grad``)."""
    check_in_range("momentum", momentum, 0.0, 1.0)
    memory_dtype = jnp.result_type(memory)
    memory = jax.lax.stop_gradient(to_float(memory))
    e = jax.lax.stop_gradient(to_float(embedding))
    indices = jnp.asarray(indices)
    if e.ndim != 2 or indices.shape != e.shape[:1] or memory.ndim != 2 or memory.shape[1] != e.shape[1]:
        raise ValueError(
            f"crd_memory_update takes memory [N, D], embedding [B, D] and indices [B], got shapes {memory.shape}, "
            f"{e.shape} and {indices.shape}"
        )
    mixed = momentum * memory[indices] + (1.0 - momentum) * e
    updated = mixed / jnp.sqrt(jnp.sum(mixed * mixed, axis=-1, keepdims=True))
    if mask is not None:
        # An index past the end is dropped: a masked example writes nothing.
        indices = jnp.where(jnp.asarray(mask, bool), indices, memory.shape[0])
    return memory.at[indices].set(updated, mode="drop").astype(memory_dtype)
