"""Cached frozen teachers for image distillation: the teacher runs once, the step reads its outputs by index.

A frozen teacher's forward pass is most of a KD step's cost when the teacher is larger than the student.
With a fixed view of each training example (no random augmentation) its logits are a function of the
example alone, so they can be computed once and read back by the example's row, as torchdistill caches
teacher outputs (github.com/yoshitomo-matsubara/torchdistill: ``DistillationBox.get_teacher_output`` takes
a frozen teacher's outputs from the batch's ``cached_data``, stored per example at ``cache_file_path``
after the first epoch; here they are written before training, in one file). With random
augmentation they are not: FKD (Shen & Xing, "A Fast Knowledge Distillation Framework for Visual
Recognition", ECCV 2022; official code github.com/szq0214/FKD) stores, per image, ``N`` crop/flip
parameters drawn in advance and the teacher's top-k soft label on each of those exact views; training
replays one stored view of each image per epoch, with exactly the stored crop and flip, and matches the
student to that region's soft label.

Two kinds of cache (:func:`write_teacher_cache`):

``"fixed"``
    The teacher's logits on every example's un-augmented image, ``float32 [num_examples, C]``.
``"fkd"``
    For every example ``i`` and view ``v < N``: the crop offsets ``dy, dx`` and flip of the loader's
    ``augment`` mode (drawn once from ``seed``), and the teacher's ``k`` largest softmax probabilities
    (``T = 1``) and their classes on that view. FKD's "marginal smoothing" turns them back into a dense
    label: ``p̃_c = p_c`` for the top-k classes, ``(1 − Σ_topk p) / (C − k)`` for every other class
    (``Recover_soft_label`` in the official ``utils_FKD.py``).

The step reads them through a frozen participant (:func:`cached_teacher`) whose "model" returns the
cached logits (fixed) or ``log p̃`` (FKD) as :attr:`~jaxkd.models.Outputs.logits`: every logit method
works unchanged (``"ce + kd(temperature=4)"``). With FKD ``kd(temperature=1)`` is FKD's soft
cross-entropy up to the label's entropy (a constant): the same gradient. At another temperature ``T`` it
compares the student with ``softmax(log p̃ / T)``, a sharpened/softened copy of the stored label, not with
the teacher's ``softmax(z / T)``. A method that reads teacher features is refused by :func:`jaxkd.create`
(the cached teacher sows none).

The batches come from :class:`CachedTeacherLoader`, a :class:`~jaxkd.data.Loader` that adds the cache
rows of its examples (and, for FKD, applies the stored crop/flip of the view it replays instead of
drawing one). It resumes exactly like the plain loader: the view of example ``i`` in epoch ``e`` is drawn
with ``default_rng([seed, 2, e])`` (one of the ``N`` uniformly, like the official loader's
``randperm`` pick), a pure function of the loader's seed and the epoch.

Fingerprint. The header records the teacher (a hash of its variables' structure and one of their values,
:func:`jaxkd.checkpoint.fingerprint`), the dataset and split names, the number of examples and a sha256 of
the images, the normalization, the kind, and for FKD the augmentation mode and padding, ``N``, ``k`` and
the seed of the views. :class:`TeacherCache` refuses a cache whose header differs from what the caller
expects, naming every field that differs.

Storage: a directory with ``header.json`` and one ``.npy`` file per array, written under a temporary
name and renamed when complete. ``.npy`` because the rows are fixed-size and read by fancy-indexing a
memory map (``np.load(mmap_mode="r")``): a batch is one vectorized gather, with no per-record decoding
(array_record, which the language-model cache :mod:`jaxkd.data.text.teacher_cache` uses for its large
variable-length records, would read a batch record by record). Sizes: ``4·C`` bytes per example (fixed);
``N·(8·k + 5)`` (FKD: float32 values, int32 classes, int16 offsets, a bool flip).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jaxkd.batch import IMAGE, INDEX, LABEL
from jaxkd.checks import check_choice, check_int
from jaxkd.data.images.augmentation import AUGMENTATIONS, _apply, _draw, _Draws
from jaxkd.data.images.loader import Loader, _BatchMaker
from jaxkd.data.images.normalization import _channel_values, _Normalizer

__all__ = ["CACHE_KINDS", "CachedTeacherLoader", "TeacherCache", "cached_teacher", "teacher_print",
           "load_or_write_teacher_cache", "write_teacher_cache", "LOGITS", "TOPK_CLASSES", "TOPK_PROBS"]

CACHE_KINDS: tuple[str, ...] = ("fixed", "fkd")
#: Batch entries a :class:`CachedTeacherLoader` adds (and :func:`cached_teacher` reads).
LOGITS = "cached_teacher_logits"
TOPK_CLASSES = "cached_teacher_topk_classes"
TOPK_PROBS = "cached_teacher_topk_probs"

_FORMAT = "jaxkd.image_teacher_cache"
_HEADER = "header.json"


def teacher_print(variables: Any) -> dict[str, str]:
    """A frozen teacher's identity: sha256 of its tree structure, shapes and dtypes, and of its values."""
    from jaxkd.checkpoint import fingerprint

    found = fingerprint(variables)
    structure = hashlib.sha256(json.dumps(found["leaves"], sort_keys=True).encode()).hexdigest()
    return {"structure": structure, "values": found["sha256"]}


def _images_sha256(images: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(images).tobytes()).hexdigest()


def _header(kind, *, variables, images, num_classes, mean, std, dataset, split, augment, pad, num_views, k,
            seed) -> dict[str, Any]:
    header = {
        "format": _FORMAT, "version": 1, "kind": kind, "teacher": teacher_print(variables),
        "dataset": dataset, "split": split, "num_examples": int(images.shape[0]),
        "image_shape": list(images.shape[1:]), "images_sha256": _images_sha256(images),
        "num_classes": int(num_classes), "mean": [float(m) for m in mean], "std": [float(s) for s in std],
    }
    if kind == "fkd":
        header.update(augment=augment, pad=int(pad), num_views=int(num_views), k=int(k), seed=int(seed))
    return header


def _default_pad(augment: str, pad: int | None) -> int:
    return (1 if augment == "shift" else 4) if pad is None else int(pad)


def _settings(model, variables, images, *, kind, mean, std, dataset, split, augment, pad, num_views, k, seed,
              batch_size) -> tuple[dict[str, Any], np.ndarray]:
    """The validated cache header of these settings, and the images as a NumPy array."""
    import jax
    import jax.numpy as jnp

    check_choice("kind", kind, CACHE_KINDS)
    check_choice("augment", augment, AUGMENTATIONS)
    check_int("batch_size", batch_size, low=1)
    check_int("seed", seed, low=0)
    images = np.asarray(images)
    if images.ndim != 4 or images.dtype != np.uint8 or images.shape[0] == 0:
        raise ValueError(f"images must be uint8 [N, H, W, C] with N >= 1, got {images.dtype} {images.shape}")
    mean = _channel_values("mean", mean, images.shape[-1], positive=False)
    std = _channel_values("std", std, images.shape[-1], positive=True)
    num_classes = int(jax.eval_shape(lambda x: model.apply(variables, x, train=False).logits,
                                     jax.ShapeDtypeStruct((1, *images.shape[1:]), jnp.float32)).shape[-1])
    if kind == "fixed":
        if augment != "none":
            raise ValueError(f"a fixed-view cache holds the logits of the un-augmented images (augment='none'), "
                             f"got augment={augment!r}; use kind='fkd' to cache randomly augmented views")
        pad, num_views, k = 0, 1, None
    else:
        if augment == "none":
            raise ValueError("an FKD cache stores random views: augment must be 'shift' or 'crop_flip', got 'none' "
                             "(use kind='fixed' for un-augmented images)")
        if pad is not None:
            check_int("pad", pad, low=0)
        pad = _default_pad(augment, pad)
        check_int("num_views", num_views, low=1)
        if k is None:
            raise ValueError("an FKD cache needs k, the number of top classes stored per view")
        check_int("k", k, low=1)
        if k > num_classes:
            raise ValueError(f"k={k} is larger than the teacher's {num_classes} classes; use k <= {num_classes}")
    header = _header(kind, variables=variables, images=images, num_classes=num_classes, mean=mean, std=std,
                     dataset=dataset, split=split, augment=augment, pad=pad, num_views=num_views, k=k, seed=seed)
    return header, images


def _expected(header: Mapping[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in header.items() if key not in ("format", "version")}


def load_or_write_teacher_cache(path: str | os.PathLike, model: Any, variables: Any, images: np.ndarray,
                                **settings: Any) -> TeacherCache:
    """The cache at ``path`` if there is one, else :func:`write_teacher_cache`'s (same arguments).

    An existing cache must have been written with these settings, this teacher and these images: one
    made with another (another teacher, augmentation, ``num_views``, ``k``...) is refused, naming the
    fields that differ (a resumed run never silently distills from another teacher's outputs).
    """
    if os.path.isfile(os.path.join(os.fspath(path), _HEADER)):
        full = {"mean": (0.0,), "std": (1.0,), "dataset": "", "split": "", "augment": "none", "pad": None,
                "num_views": 1, "k": None, "seed": 0, "batch_size": 256, **settings}
        header, _ = _settings(model, variables, images, **full)
        return TeacherCache(path, expect=_expected(header))
    return write_teacher_cache(path, model, variables, images, **settings)


def write_teacher_cache(
    path: str | os.PathLike,
    model: Any,
    variables: Any,
    images: np.ndarray,
    *,
    kind: str,
    mean: Sequence[float] = (0.0,),
    std: Sequence[float] = (1.0,),
    dataset: str = "",
    split: str = "",
    augment: str = "none",
    pad: int | None = None,
    num_views: int = 1,
    k: int | None = None,
    seed: int = 0,
    batch_size: int = 256,
) -> TeacherCache:
    """Runs the frozen teacher once over ``images`` and writes its cache (see the module docstring).

    Args:
      path: the cache directory (replaced if it exists).
      model, variables: the teacher (a :class:`jaxkd.models.Model`, applied in eval mode) and its variables.
      images: uint8 ``[N, H, W, C]``, the split in the order the training loader indexes it.
      kind: ``"fixed"`` (logits of the un-augmented images) or ``"fkd"`` (top-k on ``num_views`` stored
        augmented views per image).
      mean, std: the loader's normalization (the teacher sees exactly the training batches' pixels).
      dataset, split: names recorded in the fingerprint.
      augment, pad: FKD: the augmentation mode (``"shift"`` or ``"crop_flip"``) and padding the views are
        drawn with (:func:`jaxkd.data.augment`); a fixed cache takes ``augment="none"`` only.
      num_views: FKD's ``N`` views per image (``>= 1``).
      k: FKD's top-k (``1 <= k <= C``).
      seed: the seed the views are drawn with (``default_rng([seed, 3])``).
      batch_size: images per teacher forward pass (a memory knob; every pass has this shape).

    Raises:
      ValueError: an argument outside the above (named with the value given).
    """
    import jax
    import jax.numpy as jnp

    header, images = _settings(model, variables, images, kind=kind, mean=mean, std=std, dataset=dataset,
                               split=split, augment=augment, pad=pad, num_views=num_views, k=k, seed=seed,
                               batch_size=batch_size)
    pad, num_views, k = header.get("pad"), header.get("num_views"), header.get("k")
    normalize = _Normalizer(header["mean"], header["std"], *images.shape[2:])
    n = images.shape[0]
    arrays: dict[str, np.ndarray] = {}
    logits_of = jax.jit(lambda v, x: model.apply(v, x, train=False).logits.astype(jnp.float32))

    def forward(count: int, pixels_of, keep) -> list[np.ndarray]:
        """``keep(logits)`` of the teacher's logits of ``count`` images, ``pixels_of(lo, hi)`` giving the uint8
        images ``lo:hi``, concatenated: one pass per ``batch_size`` images (the last padded), so memory holds
        one batch of floats and what ``keep`` keeps."""
        parts = []
        for lo in range(0, count, batch_size):
            chunk = normalize(pixels_of(lo, min(lo + batch_size, count)))
            real = chunk.shape[0]
            if real < batch_size:
                chunk = np.concatenate([chunk, np.zeros((batch_size - real, *chunk.shape[1:]), chunk.dtype)])
            parts.append(keep(np.asarray(logits_of(variables, chunk))[:real]))
        return [np.concatenate(arrays) for arrays in zip(*parts)]

    def topk(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` most probable classes (ties to the lower class) and their softmax probabilities."""
        probs = np.asarray(jax.nn.softmax(logits, axis=-1))
        top = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
        return top.astype(np.int32), np.take_along_axis(probs, top, axis=-1).astype(np.float32)

    if kind == "fixed":
        arrays["logits"], = forward(n, lambda lo, hi: images[lo:hi], lambda logits: (logits,))
    else:
        draws = _draw(augment, n * num_views, np.random.default_rng([seed, 3]), pad)
        # Flat row i * N + v is view v of image i.
        classes, probs = forward(n * num_views, lambda lo, hi: _apply(images[np.arange(lo, hi) // num_views],
                                                                      draws.rows(lo, hi)), topk)
        arrays["topk_classes"] = classes.reshape(n, num_views, k)
        arrays["topk_probs"] = probs.reshape(n, num_views, k)
        shape = (n, num_views)
        zeros = np.zeros(n * num_views, np.int16)
        arrays["dy"] = (zeros if draws.dy is None else draws.dy.astype(np.int16)).reshape(shape)
        arrays["dx"] = (zeros if draws.dx is None else draws.dx.astype(np.int16)).reshape(shape)
        arrays["flip"] = (np.zeros(n * num_views, bool) if draws.flip is None else draws.flip).reshape(shape)
    _write(os.fspath(path), header, arrays)
    return TeacherCache(path, expect=_expected(header))


def _write(path: str, header: dict, arrays: Mapping[str, np.ndarray]) -> None:
    """All or nothing: written into a temporary directory renamed to ``path`` when complete."""
    tmp = f"{path.rstrip(os.sep)}.incomplete-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        for name, array in arrays.items():
            np.save(os.path.join(tmp, f"{name}.npy"), array)
        with open(os.path.join(tmp, _HEADER), "w") as f:
            json.dump(header, f, indent=1, sort_keys=True)
        if os.path.isdir(path):
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class TeacherCache:
    """A cache written by :func:`write_teacher_cache`, its arrays memory-mapped.

    Args:
      path: the cache directory.
      expect: header fields the caller requires (e.g. ``{"teacher": teacher_print(variables),
        "augment": "shift", "num_views": 8, "k": 5}``); a cache that differs in any is refused.

    Raises:
      FileNotFoundError: no cache at ``path``.
      ValueError: not a cache, or its header differs from ``expect``: the message names every differing
        field with the cache's value and the expected one.
    """

    def __init__(self, path: str | os.PathLike, *, expect: Mapping[str, Any] | None = None):
        self.path = os.fspath(path)
        self._expect = dict(expect or {})
        self._open()

    def _open(self) -> None:
        header_path = os.path.join(self.path, _HEADER)
        if not os.path.isfile(header_path):
            raise FileNotFoundError(f"no teacher cache at {self.path!r} (no {_HEADER})")
        with open(header_path) as f:
            try:
                header = json.load(f)
            except json.JSONDecodeError:
                header = None
        if not isinstance(header, dict) or header.get("format") != _FORMAT:
            raise ValueError(f"{self.path!r} is not a jaxkd image teacher cache")
        if header.get("version") != 1:
            raise ValueError(f"{self.path!r}: unsupported teacher cache version {header.get('version')!r}")
        differ = [key for key, want in self._expect.items() if _json(header.get(key)) != _json(want)]
        if differ:
            details = "; ".join(f"{key}: cache has {_short(header.get(key))}, expected {_short(self._expect[key])}"
                                for key in differ)
            raise ValueError(f"the teacher cache at {self.path!r} was made with another {', '.join(differ)} "
                             f"({details}); delete it or write a new one")
        self.header = header
        self.kind = header["kind"]
        self._lock = threading.Lock()
        self._epoch_views: tuple[Any, np.ndarray | None] = (None, None)
        names = ("logits",) if self.kind == "fixed" else ("topk_classes", "topk_probs", "dy", "dx", "flip")
        self.arrays = {name: np.load(os.path.join(self.path, f"{name}.npy"), mmap_mode="r") for name in names}

    def settings(self) -> dict[str, Any]:
        """The header's fields (what a run's checkpoint config records of the cache)."""
        return _expected(self.header)

    @property
    def num_examples(self) -> int:
        return int(self.header["num_examples"])

    @property
    def num_classes(self) -> int:
        return int(self.header["num_classes"])

    @property
    def num_views(self) -> int:
        return int(self.header.get("num_views", 1))

    def views(self, seed: int, epoch: int, rows: np.ndarray) -> np.ndarray:
        """Which stored view example ``rows`` replay in ``epoch`` of a loader seeded ``seed`` (0 for fixed)."""
        if self.kind == "fixed":
            return np.zeros(len(rows), np.int64)
        with self._lock:  # one draw per epoch, not per batch (Grain's reader threads may share the cache)
            if self._epoch_views[0] != (seed, epoch):
                draw = np.random.default_rng([seed, 2, epoch]).integers(0, self.num_views, size=self.num_examples)
                self._epoch_views = ((seed, epoch), draw)
            return self._epoch_views[1][rows]

    def entries(self, rows: np.ndarray, views: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """The batch entries of examples ``rows`` (FKD: on their ``views``)."""
        rows = np.asarray(rows)
        if self.kind == "fixed":
            return {LOGITS: np.asarray(self.arrays["logits"][rows])}
        views = np.zeros(len(rows), np.int64) if views is None else np.asarray(views)
        return {TOPK_CLASSES: np.asarray(self.arrays["topk_classes"][rows, views]),
                TOPK_PROBS: np.asarray(self.arrays["topk_probs"][rows, views])}

    def draws(self, rows: np.ndarray, views: np.ndarray) -> _Draws:
        """FKD: the stored crop offsets and flips of examples ``rows`` on ``views``."""
        pad = int(self.header["pad"])
        flip = np.asarray(self.arrays["flip"][rows, views]) if self.header["augment"] == "crop_flip" else None
        if pad == 0:
            return _Draws(0, None, None, flip)
        return _Draws(pad, np.asarray(self.arrays["dy"][rows, views]), np.asarray(self.arrays["dx"][rows, views]), flip)

    def __getstate__(self):
        return {"path": self.path, "expect": self._expect}

    def __setstate__(self, state):
        self.path, self._expect = state["path"], state["expect"]
        self._open()

    def __repr__(self) -> str:
        extra = "" if self.kind == "fixed" else f", num_views={self.num_views}, k={self.header['k']}"
        return f"TeacherCache({self.path!r}, kind={self.kind!r}, num_examples={self.num_examples}{extra})"


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def _short(value: Any) -> str:
    text = _json(value)
    return text if len(text) <= 120 else text[:117] + "..."


class _CachedBatchMaker(_BatchMaker):
    """:class:`~jaxkd.data.images.loader._BatchMaker` whose batches carry the cache rows of their examples;
    FKD batches are augmented with the stored crop/flip of the view each example replays."""

    def __init__(self, *args, cache: TeacherCache, **kwargs):
        super().__init__(*args, **kwargs)
        self.cache = cache

    def batch(self, epoch: int, step: int) -> dict[str, np.ndarray]:
        b, local, lo = self.batch_size, self.local_batch_size, self.lo
        idx = self.epoch_order(epoch)[step * b : (step + 1) * b][lo : lo + local]
        views = self.cache.views(self.seed, epoch, idx)
        images = self.images[idx]
        if self.cache.kind == "fkd":
            images = _apply(images, self.cache.draws(idx, views))
        out = {IMAGE: self.normalize(images), LABEL: self.labels[idx], **self.cache.entries(idx, views)}
        if self.with_index:
            out[INDEX] = idx.astype(np.int32)
        return out


class CachedTeacherLoader(Loader):
    """A training :class:`~jaxkd.data.Loader` whose batches also carry the cached teacher's rows.

    Batches are the plain loader's (same shuffling, resume state, per-host rows) plus
    ``"cached_teacher_logits": float32 [b, C]`` (fixed cache) or ``"cached_teacher_topk_classes": int32
    [b, k]`` and ``"cached_teacher_topk_probs": float32 [b, k]`` (FKD). An FKD batch's images are the
    stored views: example ``i`` in epoch ``e`` replays view ``default_rng([seed, 2, e]).integers(N)[i]``
    with exactly its stored crop and flip (``augment``/``pad`` come from the cache). Only training
    batches (``drop_remainder=True``).

    Args:
      images, labels: the split the cache was written for (checked: same number of examples and the same
        image bytes).
      cache: the :class:`TeacherCache`.
      **kwargs: :class:`~jaxkd.data.Loader`'s (``augment`` and ``pad`` excepted).

    Raises:
      ValueError: images that are not the cache's, ``drop_remainder=False``, or ``augment``/``pad`` given.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, *, cache: TeacherCache, **kwargs: Any):
        for key in ("augment", "pad"):
            if key in kwargs:
                raise ValueError(f"a CachedTeacherLoader takes its augmentation from the cache; drop {key}=")
        if not kwargs.get("drop_remainder", True):
            raise ValueError("a CachedTeacherLoader makes training batches only (drop_remainder=True)")
        images = np.asarray(images)
        if images.shape[0] != cache.num_examples or _images_sha256(images) != cache.header["images_sha256"]:
            raise ValueError(f"the images are not those {cache!r} was written for ({images.shape[0]} images, "
                             f"the cache has {cache.num_examples}; their sha256 must match too)")
        super().__init__(images, labels, drop_remainder=True, **kwargs)
        self.cache = cache
        self._maker = _CachedBatchMaker(
            self.images, self.labels, batch_size=self.batch_size, mean=self.mean, std=self.std,
            shuffle=self._maker.shuffle, seed=self.seed, drop_remainder=True, augment="none", pad=None,
            steps_per_epoch=self.steps_per_epoch, process_index=self.process_index,
            process_count=self.process_count, with_index=self._maker.with_index, cache=cache,
        )


def _marginal_smoothing_logits(classes: Any, probs: Any, num_classes: int) -> Any:
    """``log p̃``: FKD's marginal smoothing of a top-k soft label (the rest of the mass spread evenly)."""
    import jax.numpy as jnp

    probs = probs.astype(jnp.float32)
    k = probs.shape[-1]
    rest = jnp.clip(1.0 - jnp.sum(probs, axis=-1, keepdims=True), 0.0, 1.0)
    minor = rest / (num_classes - k) if num_classes > k else jnp.zeros_like(rest)
    dense = jnp.broadcast_to(minor, (*probs.shape[:-1], num_classes))
    rows = jnp.arange(probs.shape[0])[:, None]
    dense = dense.at[rows, classes].set(probs)
    return jnp.log(dense)  # -inf where the label has no mass (losses treat it as zero mass)


def cached_teacher(cache: TeacherCache) -> Any:
    """The frozen participant that reads ``cache``'s batch entries (:class:`CachedTeacherLoader` adds them).

    Its logits are the cached logits (fixed) or the log of FKD's marginally smoothed soft label; it has
    no parameters and sows no features. Use it as the ``teacher`` of any logit method::

        jaxkd.create(student=student, participants={"teacher": cached_teacher(cache)}, ...)
    """
    import jax.numpy as jnp

    from jaxkd.models.base import Model, Outputs
    from jaxkd.participants import Participant

    num_classes, kind = cache.num_classes, cache.kind

    def init(rng, x):
        return {"params": {}}

    def apply(variables, x, *, train: bool, rngs=None) -> Outputs:
        if kind == "fixed":
            logits = jnp.asarray(x, jnp.float32)
        else:
            logits = _marginal_smoothing_logits(x[TOPK_CLASSES], x[TOPK_PROBS], num_classes)
        return Outputs(logits=logits, features={}, model_state={})

    model = Model(init=init, apply=apply, name=f"cached_teacher[{kind}]")
    reads = LOGITS if kind == "fixed" else (TOPK_CLASSES, TOPK_PROBS)
    return Participant(model, {"params": {}}, trains=False, input=reads)
