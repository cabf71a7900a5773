"""LELP as a method: the teacher's per-class projections (computed once) as method state, and a
method-owned expanded head (``num_classes · subclasses`` outputs) on the student's embedding."""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxkd.batch import IMAGE, LABEL, MASK
from jaxkd import losses
from jaxkd.checks import check_int, check_temperature
from jaxkd.inference import map_batches
from jaxkd.losses.core import Array, to_float
from jaxkd.methods.base import LossAux, LossInputs, Method, MethodVars, Needs, Weight, check_roles
from jaxkd.methods.features import dense_layer, param_at, student_feature, teacher_feature
from jaxkd.methods.heads import dense, dense_init
from jaxkd.methods.registry import LOGIT_ROLES, register
from jaxkd.models.base import Outputs, get_feature
from jaxkd.participants import Participant

__all__ = ["lelp", "lelp_projections", "lelp_projections_from_moments", "teacher_lelp_projections"]


def teacher_lelp_projections(
    model: Any,
    variables: Any,
    batches: Iterable[Mapping[str, Any]],
    *,
    num_classes: int,
    subclasses: int = 4,
    feature: str = "pooled",
    classifier: str | None = "fc",
    input_key: str = IMAGE,
    label_key: str = LABEL,
    mask_key: str = MASK,
) -> np.ndarray:
    """The teacher's LELP projections ``[K, S, D + 1]`` over a dataset, for :func:`lelp`.

    Runs ``model`` in eval mode over ``batches`` (e.g. one epoch of the training loader without
    augmentation; ``batch[mask_key]``, when present, leaves out padding), collects the embeddings
    ``feature`` and calls :func:`jaxkd.methods.lelp_projections` with the teacher's classifier kernel (its
    dense layer at ``classifier``, ``"fc"`` on the CIFAR models; ``None`` skips the null-space step).
    Save the result with ``np.save`` to name it in a method spec: ``lelp(projections='proj.npy')``.
    """
    num_classes = check_int("num_classes", num_classes, low=1)

    def embed(outputs, batch):
        f = get_feature(outputs, feature, who="teacher")
        return jnp.asarray(f, jnp.float32).reshape(f.shape[0], -1)

    feats, labels = [], []
    teacher = Participant(model, variables, trains=False, input=input_key)
    batches = list(batches)
    for batch, f in zip(batches, map_batches(teacher, batches, embed, name="teacher")):
        y = np.asarray(batch[label_key])
        keep = np.asarray(batch[mask_key], bool) if mask_key in batch else np.ones(y.shape, bool)
        feats.append(f[keep])
        labels.append(y[keep])
    if not feats:
        raise ValueError("teacher_lelp_projections needs at least one batch")
    kernel = None
    if classifier is not None:
        layer = param_at(variables["params"], classifier, who="the teacher", method="teacher_lelp_projections")
        kernel = np.asarray(layer["kernel"], np.float64)
    return lelp_projections(np.concatenate(feats), np.concatenate(labels), num_classes=num_classes,
                                   subclasses=subclasses, classifier_kernel=kernel)


@register(
    "lelp",
    paper="Loo, Iliopoulos, Hu & Vee, *Linear Projections of Teacher Embeddings for Few-Class Distillation*, 2024",
    losses=("lelp", "lelp_targets"),
    status="supported (pseudo-subclass targets reconstructed from the paper's description; no official code)",
    contract=LOGIT_ROLES,
)
def lelp(
    *,
    projections: Any = None,
    subclasses: int = 4,
    classifier: str | None = "fc",
    temperature: float = 1.0,
    subclass_temperature: float = 1.0,
    embedding: str = "pooled",
    teacher_embedding: str | None = None,
    student: str = "student",
    teacher: str = "teacher",
    predict_with_head: bool = False,
    weight: Weight = 1.0,
    name: str = "lelp",
) -> Method:
    """LELP (Loo, Iliopoulos, Hu & Vee, "Linear Projections of Teacher Embeddings for Few-Class
    Distillation", 2024): :func:`jaxkd.losses.lelp` between a method-owned linear head on the student's
    ``embedding`` with ``K·S`` outputs and the teacher's pseudo-subclass targets
    (:func:`jaxkd.losses.lelp_targets`: the teacher's class probability split over the class's ``S``
    pseudo-subclasses by the standardized projections of its embedding ``teacher_embedding`` onto the
    class's principal directions).

    ``projections`` (``[K, S, D + 1]``, computed once: :func:`teacher_lelp_projections` over the training
    set, or :func:`jaxkd.methods.lelp_projections`; or the path of a ``.npy`` file holding it, for method
    specs) is held as method state (saved with checkpoints). With ``projections=None`` (the default) they
    are computed in the train step instead: the state accumulates each class's moments ``Σ f``, ``Σ f fᵀ``
    and counts of the frozen teacher's embeddings over every (unmasked, labeled) example seen, and each
    step's projections are :func:`jaxkd.methods.lelp_projections_from_moments` of them (``subclasses``
    directions per class, the teacher classifier at ``classifier`` — a path in its parameters, ``"fc"``
    on the CIFAR models, ``None`` to skip the null-space step): the projections of the whole training set
    once every example has been seen (of the augmented images). The head (PyTorch ``nn.Linear`` init) is a
    method parameter trained with the student; the student's own classifier is left to ``ce``. With
    ``predict_with_head`` evaluation scores the head instead, its class logits being
    ``logsumexp`` over each class's subclass logits (the class marginal). No official code was found; the
    choices made (the factorized targets, standardized projections, defaults ``T = τ = 1`` and ``S = 4``)
    are stated in :mod:`jaxkd.losses.feature.lelp`.

    ``student``/``teacher`` name the participants in the two roles, as in :func:`~jaxkd.methods.kd`: the
    head reads the embedding of the participant in the ``student`` role; the teacher's logits, embedding
    and classifier are gradient-stopped targets (the projections are of the ``teacher``'s embeddings).
    Evaluation scores the student, so ``predict_with_head`` applies only when the learner is the student.
    """
    check_temperature("temperature", temperature)
    check_roles(name, student, teacher)
    if predict_with_head and student != "student":
        raise ValueError(f"{name}: predict_with_head scores the student's head, but the head here is {student!r}'s")
    check_temperature("subclass_temperature", subclass_temperature)
    online = projections is None
    if isinstance(projections, str):
        projections = np.load(projections)
    if online:
        s = check_int("subclasses", subclasses, low=1)
        proj = None
    else:
        proj = np.asarray(projections)
        if proj.ndim != 3 or not np.issubdtype(proj.dtype, np.floating) or not np.all(np.isfinite(proj)):
            raise ValueError(
                f"projections must be a finite float array [num_classes, subclasses, dim + 1], got shape "
                f"{proj.shape} ({proj.dtype})"
            )
        proj = jnp.asarray(proj, jnp.float32)
        _, s, _ = proj.shape
    t_name = teacher_embedding or embedding

    def classifier_kernel(inputs: LossInputs):
        return None if classifier is None else dense_layer(inputs, teacher, classifier, method=name)["kernel"]

    def features(inputs: LossInputs):
        f_s = student_feature(inputs, embedding, method=name, participant=student)
        f_t = teacher_feature(inputs, t_name, method=name, participant=teacher)
        if len(f_s.shape) != 2 or len(f_t.shape) != 2:
            raise ValueError(
                f"{name!r} reads [B, D] embeddings; got student {tuple(f_s.shape)} and teacher {tuple(f_t.shape)}"
            )
        if not online and f_t.shape[-1] + 1 != proj.shape[-1]:
            raise ValueError(
                f"{name!r}: the teacher embedding {t_name!r} has {f_t.shape[-1]} dims but projections is "
                f"{tuple(proj.shape)} (expected [K, S, {f_t.shape[-1] + 1}])"
            )
        return f_s, f_t

    def init(rng, inputs: LossInputs) -> MethodVars:
        f_s, f_t = features(inputs)
        k = inputs.target(teacher, method=name).logits.shape[-1]
        if online:
            classifier_kernel(inputs)  # a wrong path is reported now
            if s > f_t.shape[-1]:
                raise ValueError(f"{name!r}: subclasses={s} exceeds the teacher embedding width {f_t.shape[-1]}")
            d = f_t.shape[-1]
            state = {"sums": jnp.zeros((k, d), jnp.float32), "outer": jnp.zeros((k, d, d), jnp.float32),
                     "counts": jnp.zeros((k,), jnp.float32)}
        else:
            if proj.shape[0] != k:
                raise ValueError(f"{name!r}: projections has {proj.shape[0]} classes, the teacher predicts {k}")
            state = {"projections": proj}
        return MethodVars(params={"head": dense_init(rng, f_s.shape[-1], k * s)}, state=state)

    def loss(vars: MethodVars, inputs: LossInputs, rng):
        f_s, f_t = features(inputs)
        zt = inputs.target(teacher, method=name).logits
        state = vars.state
        if online:
            # This batch's teacher embeddings join the per-class moments (masked / unlabeled ones excluded).
            labels = inputs.labels(name)
            w = jnp.ones(labels.shape, jnp.float32) if inputs.label_mask is None else inputs.label_mask.astype(jnp.float32)
            one_hot = jax.nn.one_hot(labels, state["counts"].shape[0], dtype=jnp.float32) * w[:, None]
            f = jnp.asarray(f_t, jnp.float32)
            state = {"sums": state["sums"] + one_hot.T @ f,
                     "outer": state["outer"] + jnp.einsum("bk,bd,be->kde", one_hot, f, f),
                     "counts": state["counts"] + jnp.sum(one_hot, axis=0)}
            current = lelp_projections_from_moments(
                state["sums"], state["outer"], state["counts"], subclasses=s, classifier_kernel=classifier_kernel(inputs)
            )
        else:
            current = state["projections"]
        value = losses.lelp(
            dense(vars.params["head"], f_s), zt, f_t, jax.lax.stop_gradient(current),
            temperature=temperature, subclass_temperature=subclass_temperature, mask=inputs.example_mask,
        )
        return value, LossAux({}, state)

    def predict(vars: MethodVars, outputs: Outputs) -> jax.Array:
        logits = dense(vars.params["head"], get_feature(outputs, embedding, who="student"))
        return jax.nn.logsumexp(logits.reshape(logits.shape[0], -1, s), axis=-1)

    return Method(name=name, loss=loss, init=init, weight=weight, needs=Needs(trained=(student,), participants=(teacher,)),
                  predict=predict if predict_with_head else None)


def lelp_projections(
    embeddings,
    labels,
    *,
    num_classes: int,
    subclasses: int = 4,
    classifier_kernel=None,
) -> np.ndarray:
    """LELP's per-class linear projections, ``[K, S, D + 1]`` (NumPy, computed once offline).

    For each class ``c`` with embeddings ``E_c`` (rows of ``embeddings`` whose label is ``c``) and mean
    ``μ_c``: the centred rows ``X = E_c − μ_c`` are projected onto the null space of the teacher's
    classifier (``X ← X (I − W W⁺)`` for ``classifier_kernel`` ``W`` ``[D, K]``, when given), and the top
    ``S`` principal directions ``v_{c,1..S}`` of ``X`` (right singular vectors, largest first) are kept.
    Projection ``s`` of an embedding ``f`` is the standardized coordinate
    ``u_{c,s}(f) = (f − μ_c)·v_{c,s} / σ_{c,s}``, with ``σ_{c,s}`` the standard deviation of the class's
    coordinates along ``v_{c,s}``; it is stored in homogeneous form: ``out[c, s] = [v/σ, −μ_c·v/σ]``, so
    ``u = out[c, s, :D]·f + out[c, s, D]``. The sign of each direction is fixed so that its largest
    coordinate is positive (PCA leaves it arbitrary). A direction without variance (fewer examples than
    directions, or a class without examples) is all zeros: its pseudo-subclasses share the class equally.

    Args:
      embeddings: ``[N, D]`` teacher embeddings of the training set.
      labels: ``[N]`` integer labels in ``[0, num_classes)``.
      num_classes: ``K``.
      subclasses: ``S``, the pseudo-subclasses per class (at most ``D``). The count is a hyper-parameter
        of LELP; 4 is this implementation's default.
      classifier_kernel: the teacher's classifier kernel ``[D, K]`` (Flax layout) whose column span is
        removed first, or ``None`` to skip that step.
    """
    num_classes = check_int("num_classes", num_classes, low=1)
    subclasses = check_int("subclasses", subclasses, low=1)
    e = np.asarray(embeddings, np.float64)
    y = np.asarray(labels)
    if e.ndim != 2:
        raise ValueError(f"embeddings must be [N, D], got shape {e.shape}")
    if y.shape != (e.shape[0],):
        raise ValueError(f"labels must be [N] for embeddings {e.shape}, got shape {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels must be integers, got {y.dtype}")
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got values in [{y.min()}, {y.max()}]")
    if not np.all(np.isfinite(e)):
        raise ValueError("embeddings must be finite")
    d = e.shape[1]
    if subclasses > d:
        raise ValueError(f"subclasses={subclasses} exceeds the embedding width {d}")
    null = np.eye(d)
    if classifier_kernel is not None:
        w = np.asarray(classifier_kernel, np.float64)
        if w.ndim != 2 or w.shape[0] != d:
            raise ValueError(f"classifier_kernel must be [D={d}, K], got shape {w.shape}")
        null = null - w @ np.linalg.pinv(w)
    out = np.zeros((num_classes, subclasses, d + 1), np.float64)
    for c in range(num_classes):
        rows = e[y == c]
        if rows.shape[0] == 0:
            continue
        mean = rows.mean(axis=0)
        x = (rows - mean) @ null
        _, sing, vt = np.linalg.svd(x, full_matrices=False)
        scale = np.max(np.abs(sing)) if sing.size else 0.0
        for s in range(min(subclasses, vt.shape[0])):
            std = sing[s] / np.sqrt(rows.shape[0])
            if sing[s] <= 1e-10 * max(scale, 1e-300):
                continue
            v = vt[s] * np.sign(vt[s][np.argmax(np.abs(vt[s]))])
            out[c, s, :d] = v / std
            out[c, s, d] = -mean @ v / std
    return out if np.asarray(embeddings).dtype == np.float64 else out.astype(np.float32)


def lelp_projections_from_moments(
    sums: Array, outer: Array, counts: Array, *, subclasses: int, classifier_kernel: Array | None = None
) -> Array:
    """:func:`lelp_projections` from per-class moments, jittable: what LELP computes in the train step when
    no projections are given (the moments accumulate in method state over the batches seen).

    ``sums [K, D]``, ``outer [K, D, D]`` and ``counts [K]`` are ``Σ f``, ``Σ f fᵀ`` and the number of each
    class's embeddings. The class covariance ``Σ_c = outer/n − μμᵀ`` (population, as the singular values
    over ``√n`` of :func:`lelp_projections`) is projected onto the classifier's null space
    (``P Σ_c P``, ``P = I − W W⁺``), and its top ``S`` eigenvectors (``jnp.linalg.eigh``; the same
    directions as the right singular vectors of the centred rows) give ``[v/σ, −μ·v/σ]`` with
    ``σ = √λ``, the same sign rule (largest coordinate positive) and zeros for directions without variance.
    Equal to :func:`lelp_projections` on the same embeddings up to rounding (tested), for distinct
    eigenvalues (tied ones leave the basis of their eigenspace arbitrary, in both).
    """
    subclasses = check_int("subclasses", subclasses, low=1)
    sums, outer, counts = to_float(sums), to_float(outer), to_float(counts)
    k, d = sums.shape
    if outer.shape != (k, d, d) or counts.shape != (k,):
        raise ValueError(f"moments must be sums [K, D], outer [K, D, D], counts [K]; got {sums.shape}, {outer.shape}, {counts.shape}")
    if subclasses > d:
        raise ValueError(f"subclasses={subclasses} exceeds the embedding width {d}")
    n = jnp.maximum(counts, 1.0)[:, None]
    mean = sums / n
    cov = outer / n[..., None] - mean[:, :, None] * mean[:, None, :]
    if classifier_kernel is not None:
        w = to_float(classifier_kernel)
        if w.ndim != 2 or w.shape[0] != d:
            raise ValueError(f"classifier_kernel must be [D={d}, K], got shape {w.shape}")
        null = jnp.eye(d, dtype=cov.dtype) - w @ jnp.linalg.pinv(w)
        cov = null @ cov @ null
    cov = 0.5 * (cov + jnp.swapaxes(cov, -1, -2))
    eigvals, eigvecs = jnp.linalg.eigh(cov)  # ascending
    lam = eigvals[:, ::-1][:, :subclasses]  # [K, S]
    v = jnp.swapaxes(eigvecs[:, :, ::-1][:, :, :subclasses], -1, -2)  # [K, S, D]
    biggest = jnp.take_along_axis(v, jnp.argmax(jnp.abs(v), axis=-1)[..., None], axis=-1)
    v = v * jnp.where(biggest < 0, -1.0, 1.0)
    scale = jnp.max(jnp.abs(eigvals), axis=-1, keepdims=True)
    # σ_s = √λ_s; the SVD helper drops singular values below 1e-10 of the largest, i.e. λ below 1e-20 of it.
    keep = (lam > 1e-12 * scale) & (lam > 0) & (counts[:, None] > 0)
    std = jnp.sqrt(jnp.where(keep, lam, 1.0))
    direction = jnp.where(keep[..., None], v / std[..., None], 0.0)
    offset = -jnp.einsum("ksd,kd->ks", direction, mean)
    return jnp.concatenate([direction, offset[..., None]], axis=-1)
