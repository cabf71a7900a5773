"""Tests of jaxkd.data: the digits TFDS builder, load_split and the Loader."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from jaxkd import data
from jaxkd.data import Loader, Position, load_split


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory) -> str:
    """A data_dir with the digits builder prepared in it (once per module)."""
    import tensorflow_datasets as tfds

    from jaxkd.data.images.digits import Digits

    data_dir = str(tmp_path_factory.mktemp("tfds"))
    builder = Digits(data_dir=data_dir)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False),
        file_format="array_record",
    )
    return data_dir


@pytest.fixture(scope="module")
def digits_train(digits_dir):
    return load_split("digits", "train", data_dir=digits_dir)


# ---------------------------------------------------------------- builder


def test_digits_builder_reads_back_through_data_source(digits_dir):
    from jaxkd.data.images.digits import Digits

    builder = Digits(data_dir=digits_dir)
    assert builder.is_prepared()
    assert str(builder.info.file_format.value) == "array_record"
    assert builder.info.supervised_keys == ("image", "label")
    assert builder.info.features["label"].num_classes == 10
    train = builder.as_data_source(split="train")
    test = builder.as_data_source(split="test")
    assert (len(train), len(test)) == (1297, 500)
    record = train[0]
    assert record["image"].shape == (8, 8, 1)
    assert record["image"].dtype == np.uint8
    assert 0 <= int(record["label"]) < 10


def test_digits_splits_sizes_disjoint_and_match_sklearn(digits_dir, digits_train):
    from sklearn.datasets import load_digits

    from jaxkd.data.images.digits.digits import split_indices

    test = load_split("digits", "test", data_dir=digits_dir)
    assert len(digits_train) == 1297 and len(test) == 500
    assert digits_train.num_classes == test.num_classes == 10
    for s in (digits_train, test):
        assert s.images.shape[1:] == (8, 8, 1) and s.images.dtype == np.uint8
        assert s.labels.dtype == np.int32
        assert s.labels.min() >= 0 and s.labels.max() < 10
    assert digits_train.images.max() == 255  # 16 -> 255

    # The splits are the documented permutation of load_digits(); compare as
    # sets of (image, label) rows since the stored order is TFDS's.
    idx = split_indices()
    assert len(np.intersect1d(idx["train"], idx["test"])) == 0
    assert len(np.union1d(idx["train"], idx["test"])) == 1797
    bunch = load_digits()
    ref_images = np.rint(bunch.images * 255 / 16).astype(np.uint8)[..., None]

    def rows(images, labels):
        flat = np.concatenate([images.reshape(len(images), -1), labels[:, None]], axis=1)
        return {r.tobytes() for r in flat.astype(np.int64)}

    for name, s in (("train", digits_train), ("test", test)):
        expected = rows(ref_images[idx[name]], bunch.target[idx[name]])
        assert rows(s.images, s.labels) == expected
    # Disjoint as examples too (no duplicated image+label across splits).
    assert not rows(digits_train.images, digits_train.labels) & rows(test.images, test.labels)


def test_digits_normalization_constants_match_train_split(digits_train):
    mean, std = data.channel_stats(digits_train.images)
    np.testing.assert_allclose(mean, data.DIGITS_MEAN, atol=1e-4)
    np.testing.assert_allclose(std, data.DIGITS_STD, atol=1e-4)


def test_no_tensorflow_needed(tmp_path):
    """Loads digits and mocked cifar100 in a fresh interpreter that cannot see
    TensorFlow, whether or not it is installed."""
    code = textwrap.dedent(
        f"""
            import importlib.abc, sys

            finders = list(sys.meta_path)

            class HideTF(importlib.abc.MetaPathFinder):
                # As if TensorFlow were not installed: `find_spec` says "not found".
                def find_spec(self, name, path=None, target=None):
                    if name == "tensorflow" or name.startswith("tensorflow."):
                        return None
                    for finder in finders:
                        spec = finder.find_spec(name, path, target)
                        if spec is not None:
                            return spec
                    return None

                def invalidate_caches(self):
                    for finder in finders:
                        getattr(finder, "invalidate_caches", lambda: None)()

            sys.meta_path[:] = [HideTF()]
            import importlib.util
            assert importlib.util.find_spec("tensorflow") is None
            import tensorflow_datasets.testing as tfds_testing
            from jaxkd.data import load_split

            # Prepared on first use (PNG encoding, array_record writing), then read.
            s = load_split("digits", "test", data_dir={str(tmp_path)!r})
            assert len(s) == 500, len(s)
            with tfds_testing.mock_data(
                    policy=tfds_testing.MockPolicy.USE_CODE, num_examples=5
            ):
                c = load_split("cifar100", "train", data_dir="/nonexistent")
            assert c.images.shape == (5, 32, 32, 3), c.images.shape
            assert "tensorflow" not in sys.modules
            print("OK")
            """
    )
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]


# ---------------------------------------------------------------- load_split


def test_cifar100_through_load_split_with_mock_data():
    import tensorflow_datasets.testing as tfds_testing

    with tfds_testing.mock_data(policy=tfds_testing.MockPolicy.USE_CODE, num_examples=23):
        split = load_split("cifar100", "train", data_dir="/nonexistent/tfds")
    assert split.images.shape == (23, 32, 32, 3)
    assert split.images.dtype == np.uint8
    assert split.labels.shape == (23,) and split.labels.dtype == np.int32
    assert split.num_classes == 100
    assert split.labels.min() >= 0 and split.labels.max() < 100
    assert split["image"] is split.images and split["label"] is split.labels
    assert "tensorflow" not in sys.modules


def test_unprepared_dataset_raises_file_not_found(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    start = time.monotonic()
    with pytest.raises(FileNotFoundError) as info:
        load_split("cifar10", "train", data_dir=str(empty))
    assert time.monotonic() - start < 30  # no network attempts / retries
    message = str(info.value)
    assert "cifar10" in message and str(empty) in message
    assert "tfds build cifar10" in message
    assert "download_and_prepare(file_format='array_record')" in message
    # Nothing was downloaded or prepared.
    assert not (empty / "cifar10" / "3.0.2" / "dataset_info.json").exists()


def test_label_out_of_range_raises():
    images = np.zeros((4, 8, 8, 1), np.uint8)
    with pytest.raises(ValueError, match="label 10 "):
        data.Split(images, np.array([0, 1, 10, 2], np.int32), num_classes=10)
    with pytest.raises(ValueError, match="label -1 "):
        data.validate_labels(np.array([0, -1]), 10)
    with pytest.raises(ValueError, match="label 3 "):
        Loader(images, np.array([0, 1, 2, 3]), batch_size=2, num_classes=3)
    data.validate_labels(np.array([0, 9]), 10)  # in range: no error


def test_subset_per_class():
    labels = np.repeat(np.arange(5), 20)
    np.random.default_rng(1).shuffle(labels)
    a = data.subset_per_class(labels, 3, seed=7)
    b = data.subset_per_class(labels, 3, seed=7)
    c = data.subset_per_class(labels, 3, seed=8)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert len(np.unique(a)) == 15
    np.testing.assert_array_equal(np.bincount(labels[a]), [3] * 5)
    with pytest.raises(ValueError, match="class"):
        data.subset_per_class(labels, 21, seed=0)


# ---------------------------------------------------------------- Loader


def _toy(n=50, hw=8, c=1):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n, hw, hw, c), dtype=np.uint8)
    # Encode the example index in pixel (0, 0) so batches can be traced back.
    images[:, 0, 0, 0] = np.arange(n)
    labels = np.arange(n) % 10
    return images, labels


def _ids(batch):
    # mean 0 / std 1: image = uint8 / 255.
    return np.rint(batch["image"][:, 0, 0, 0] * 255).astype(int)


def test_loader_shuffling_reproducible_and_covers_each_epoch():
    images, labels = _toy()
    kw = dict(batch_size=8, seed=3, num_epochs=3, drop_remainder=False)
    a = list(Loader(images, labels, **kw))
    b = list(Loader(images, labels, **kw))
    assert len(a) == 3 * 7
    for x, y in zip(a, b):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    epochs = []
    for e in range(3):
        batches = a[7 * e : 7 * (e + 1)]
        ids = np.concatenate([_ids(bt)[bt["mask"]] for bt in batches])
        np.testing.assert_array_equal(np.sort(ids), np.arange(50))  # each once
        labels_seen = np.concatenate([bt["label"][bt["mask"]] for bt in batches])
        np.testing.assert_array_equal(labels_seen, labels[ids])
        epochs.append(ids)
    assert not np.array_equal(epochs[0], epochs[1])
    assert not np.array_equal(epochs[1], epochs[2])
    other = list(Loader(images, labels, **{**kw, "seed": 4}))
    assert not np.array_equal(_ids(other[0]), _ids(a[0]))


def test_loader_train_drops_remainder_and_batch_format():
    images, labels = _toy()
    loader = Loader(images, labels, batch_size=8, seed=0, num_epochs=2, augment="shift")
    assert len(loader) == 6
    batches = list(loader)
    assert len(batches) == 12
    for bt in batches:
        assert set(bt) == {"image", "label"}
        assert bt["image"].shape == (8, 8, 8, 1) and bt["image"].dtype == np.float32
        assert bt["label"].shape == (8,) and bt["label"].dtype == np.int32
    assert loader.position == Position(2, 0)
    # num_epochs=None: infinite.
    inf = iter(Loader(images, labels, batch_size=8, num_epochs=None))
    for _ in range(40):
        next(inf)


def test_loader_resume_from_position():
    images, labels = _toy()
    kw = dict(batch_size=8, seed=11, num_epochs=3, augment="crop_flip", pad=2)
    full = list(Loader(images, labels, **kw))
    loader = Loader(images, labels, **kw)
    it = iter(loader)
    for _ in range(8):  # into the second epoch
        next(it)
    pos = loader.position
    assert pos == Position(1, 2)
    resumed = list(Loader(images, labels, start=pos, **kw))
    assert len(resumed) == len(full) - 8
    for x, y in zip(full[8:], resumed):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["label"], y["label"])
    # batch() is pure and agrees with iteration.
    np.testing.assert_array_equal(loader.batch((0, 3))["image"], full[3]["image"])


def test_loader_eval_padding_and_mask():
    images, labels = _toy(n=21)
    loader = Loader(
        images, labels, batch_size=8, shuffle=False, drop_remainder=False,
        mean=(0.5,), std=(0.25,),
    )
    batches = list(loader)
    assert len(batches) == 3
    for bt in batches:
        assert bt["image"].shape == (8, 8, 8, 1) and bt["mask"].shape == (8,)
        assert bt["mask"].dtype == np.bool_
    np.testing.assert_array_equal(batches[0]["mask"], np.ones(8, bool))
    np.testing.assert_array_equal(batches[2]["mask"], [True] * 5 + [False] * 3)
    assert np.all(batches[2]["image"][5:] == 0) and np.all(batches[2]["label"][5:] == 0)
    # Unshuffled, unaugmented: the normalized images in order.
    got = np.concatenate([bt["image"][bt["mask"]] for bt in batches])
    expected = (images.astype(np.float32) / 255 - 0.5) / 0.25
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(
        np.concatenate([bt["label"][bt["mask"]] for bt in batches]), labels
    )


def test_augment_shapes_dtypes_and_none_is_identity():
    rng = np.random.default_rng(0)
    digits = rng.integers(0, 256, size=(16, 8, 8, 1), dtype=np.uint8)
    cifar = rng.integers(0, 256, size=(16, 32, 32, 3), dtype=np.uint8)
    assert data.augment(digits, "none", rng) is digits
    for images, mode in ((digits, "shift"), (cifar, "crop_flip"), (cifar, "shift")):
        out = data.augment(images, mode, np.random.default_rng(1))
        assert out.shape == images.shape and out.dtype == np.uint8
        assert not np.array_equal(out, images)
    # A shift moves content by at most `pad` pixels: values come from the image
    # or the zero padding.
    one = np.zeros((1, 8, 8, 1), np.uint8)
    one[0, 4, 4, 0] = 200
    for seed in range(10):
        out = data.augment(one, "shift", np.random.default_rng(seed), pad=1)
        (y, x) = np.argwhere(out[0, :, :, 0] == 200)[0]
        assert abs(y - 4) <= 1 and abs(x - 4) <= 1 and out.sum() == 200
    # pad=0 crop_flip is a pure horizontal flip on some examples.
    out = data.augment(cifar, "crop_flip", np.random.default_rng(2), pad=0)
    flipped = np.all(out == cifar[:, :, ::-1], axis=(1, 2, 3))
    kept = np.all(out == cifar, axis=(1, 2, 3))
    assert np.all(flipped | kept) and flipped.any() and kept.any()
    with pytest.raises(ValueError):
        data.augment(digits, "rotate", rng)


def test_loader_none_augmentation_is_identity_after_normalization(digits_train):
    mean, std = data.NORMALIZATION["digits"]
    loader = Loader(
        digits_train.images, digits_train.labels, batch_size=64, seed=5,
        mean=mean, std=std, num_classes=digits_train.num_classes,
    )
    idx = loader.epoch_order(0)[:64]
    batch = next(iter(loader))
    np.testing.assert_allclose(
        batch["image"], data.normalize(digits_train.images[idx], mean, std), rtol=1e-6
    )
    np.testing.assert_array_equal(batch["label"], digits_train.labels[idx])


def _assert_same_batches(xs, ys):
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys):
        assert x.keys() == y.keys()
        for k in x:
            assert x[k].dtype == y[k].dtype and x[k].shape == y[k].shape
            np.testing.assert_array_equal(x[k], y[k])


def _take(loader, n):
    return [next(loader) for _ in range(n)]


@pytest.mark.parametrize("num_threads", [0, 2])
def test_loader_state_resume_is_bitwise_through_orbax_json(tmp_path, num_threads):
    """7 batches uninterrupted == 3 batches, state saved (Orbax JSON item), fresh loader, 4 more;
    with 6 batches per epoch, batches 4-7 cross the epoch boundary."""
    import orbax.checkpoint as ocp

    images, labels = _toy()
    kw = dict(batch_size=8, seed=11, num_epochs=None, augment="crop_flip", pad=2,
              mean=(0.5,), std=(0.25,), num_threads=num_threads)
    full = _take(Loader(images, labels, **kw), 7)
    first = Loader(images, labels, **kw)
    _assert_same_batches(_take(first, 3), full[:3])
    state = first.get_state()
    assert state == {"epoch": 0, "step": 3, "seed": 11, "batch_size": 8, "num_examples": 50}
    assert json.loads(json.dumps(state)) == state
    with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as ckpt:
        ckpt.save(tmp_path / "data", args=ocp.args.JsonSave(state))
        restored = ckpt.restore(tmp_path / "data", args=ocp.args.JsonRestore())
    assert restored == state
    fresh = Loader(images, labels, **kw)
    fresh.set_state(restored)
    assert fresh.position == Position(0, 3)
    resumed = _take(fresh, 4)
    _assert_same_batches(resumed, full[3:7])
    assert fresh.position == Position(1, 1) and fresh.get_state()["epoch"] == 1
    # The batches really differ from step to step (the comparison is not vacuous).
    assert not np.array_equal(full[5]["image"], full[6]["image"])
    # set_state on a loader mid-iteration rewinds Grain's live iterator.
    _assert_same_batches(_take(first, 2), full[3:5])
    first.set_state(state)
    _assert_same_batches(_take(first, 4), full[3:7])
    # An out-of-range restore on a finite loader: nothing left to iterate.
    finite = Loader(images, labels, **{**kw, "num_epochs": 1})
    finite.set_state({**state, "epoch": 1, "step": 0})
    assert list(finite) == []


def test_loader_state_refuses_another_stream():
    images, labels = _toy()
    loader = Loader(images, labels, batch_size=8, seed=1)
    state = loader.get_state()
    for key, value in (("seed", 2), ("batch_size", 4), ("num_examples", 49)):
        with pytest.raises(ValueError, match=rf"state was saved by a loader with {key}={value}"):
            loader.set_state({**state, key: value})
    with pytest.raises(ValueError, match=r"state must be a dict with 'epoch' and 'step'"):
        loader.set_state({"next_index": 3})
    with pytest.raises(ValueError, match=r"position\.step must be an integer >= 0"):
        loader.set_state({"epoch": 0, "step": -1})
    # A bare position (no identifying entries) is accepted.
    loader.set_state({"epoch": 2, "step": 7})
    assert loader.position == Position(3, 1)


def test_loader_same_seed_same_batches_other_seed_other_batches():
    """Two constructions with one seed agree bitwise; another seed changes the order and, with the
    order fixed (shuffle=False), the augmentation."""
    images, labels = _toy()
    kw = dict(batch_size=10, num_epochs=2, augment="crop_flip", pad=2)
    a = list(Loader(images, labels, seed=5, **kw))
    _assert_same_batches(a, list(Loader(images, labels, seed=5, **kw)))
    b = list(Loader(images, labels, seed=6, **kw))
    assert not np.array_equal(a[0]["label"], b[0]["label"])
    c = next(Loader(images, labels, seed=5, shuffle=False, **kw))
    d = next(Loader(images, labels, seed=6, shuffle=False, **kw))
    np.testing.assert_array_equal(c["label"], d["label"])  # same examples ...
    assert not np.array_equal(c["image"], d["image"])  # ... augmented differently
    # Augmentation is a pure function of (seed, epoch, step): batch() agrees with iteration.
    loader = Loader(images, labels, seed=5, **kw)
    _assert_same_batches([loader.batch((1, 3))], [a[5 + 3]])


@pytest.mark.parametrize("process_count", [2, 4])
@pytest.mark.parametrize("train", [True, False])
def test_loader_per_host_parts_make_up_the_single_host_batch(process_count, train):
    """Process p of P gets rows p*B/P:(p+1)*B/P of every global batch: concatenated in process
    order, the parts are bitwise the single-process batches (augmentation and padding included)."""
    images, labels = _toy(n=21 if not train else 50)
    if train:
        kw = dict(batch_size=8, seed=3, num_epochs=2, augment="crop_flip", pad=2)
    else:
        kw = dict(batch_size=8, shuffle=False, drop_remainder=False, mean=(0.5,), std=(0.25,))
    single = list(Loader(images, labels, process_index=0, process_count=1, **kw))
    parts = [
        list(Loader(images, labels, process_index=p, process_count=process_count, **kw))
        for p in range(process_count)
    ]
    local = 8 // process_count
    for p, batches in enumerate(parts):
        assert len(batches) == len(single)
        for bt in batches:
            assert bt["image"].shape == (local, 8, 8, 1) and bt["label"].shape == (local,)
        assert Loader(images, labels, process_index=p, process_count=process_count,
                      **kw).local_batch_size == local
    for i, whole in enumerate(single):
        for k in whole:
            np.testing.assert_array_equal(np.concatenate([parts[p][i][k] for p in range(process_count)]),
                                          whole[k])
    # Disjoint examples: read the example ids (pixel (0, 0), unaugmented, unnormalized).
    plain = {**kw, "augment": "none", "mean": (0.0,), "std": (1.0,)}
    first = [next(Loader(images, labels, process_index=p, process_count=process_count, **plain))
             for p in range(process_count)]
    ids = np.concatenate([_ids(bt) for bt in first])
    assert len(set(ids.tolist())) == 8
    np.testing.assert_array_equal(ids, Loader(images, labels, **plain).epoch_order(0)[:8])
    if not train:  # last batch: 5 real examples of 8
        last = [parts[p][-1]["mask"] for p in range(process_count)]
        np.testing.assert_array_equal(np.concatenate(last), [True] * 5 + [False] * 3)
        if process_count == 4:
            assert not last[3].any() and np.all(parts[3][-1]["image"] == 0)


def test_loader_state_moves_between_process_counts():
    """The state counts global batches: a state saved with 2 processes resumes on 1 (and back)."""
    images, labels = _toy()
    kw = dict(batch_size=8, seed=2, num_epochs=None, augment="shift")
    host0 = Loader(images, labels, process_index=0, process_count=2, **kw)
    _take(host0, 5)
    single = Loader(images, labels, process_index=0, process_count=1, **kw)
    single.set_state(host0.get_state())
    whole = _take(single, 3)
    host1 = Loader(images, labels, process_index=1, process_count=2, **kw)
    host1.set_state(host0.get_state())
    for w, a, b in zip(whole, _take(host0, 3), _take(host1, 3)):
        np.testing.assert_array_equal(np.concatenate([a["image"], b["image"]]), w["image"])
        np.testing.assert_array_equal(np.concatenate([a["label"], b["label"]]), w["label"])


def test_loader_is_a_grain_map_dataset_of_batches():
    import grain

    images, labels = _toy()
    loader = Loader(images, labels, batch_size=8, seed=4, num_epochs=3, augment="shift")
    ds = loader.dataset
    assert isinstance(ds, grain.MapDataset)
    assert len(ds) == 3 * len(loader) == 18
    _assert_same_batches([ds[k] for k in (0, 7, 17)],
                         [loader.batch((0, 0)), loader.batch((1, 1)), loader.batch((2, 5))])
    _assert_same_batches(list(loader), [ds[k] for k in range(18)])
    assert len(Loader(images, labels, batch_size=8, num_epochs=None).dataset) == sys.maxsize


@pytest.mark.slow  # 9 s: Grain worker processes; the in-process loader's batches and resume stay in the suite; `pytest -m slow`
def test_loader_worker_processes_give_the_same_batches():
    """Grain worker processes (mp_prefetch) build the same batches, in order, and resume."""
    images, labels = _toy()
    kw = dict(batch_size=8, seed=9, num_epochs=None, augment="crop_flip", pad=1)
    reference = _take(Loader(images, labels, **kw), 9)
    with Loader(images, labels, worker_count=2, **kw) as loader:
        _assert_same_batches(_take(loader, 4), reference[:4])
        state = loader.get_state()
        loader.seek((0, 0))
        _assert_same_batches(_take(loader, 2), reference[:2])
        loader.set_state(state)
        _assert_same_batches(_take(loader, 5), reference[4:9])


# ---------------------------------------------------------------- argument checks


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"labels": np.arange(12, dtype=np.float32) % 3}, r"labels must have an integer dtype.*float32"),
        ({"labels": np.full(12, 2**40)}, r"labels must fit in int32"),
        ({"batch_size": 0}, r"batch_size must be an integer >= 1, got batch_size=0"),
        ({"batch_size": 2.5}, r"batch_size must be an integer, got batch_size=2\.5"),
        ({"seed": -1}, r"seed must be an integer >= 0, got seed=-1"),
        ({"seed": 1.5}, r"seed must be an integer, got seed=1\.5"),
        ({"num_epochs": 0}, r"num_epochs must be an integer >= 1, got num_epochs=0"),
        ({"num_epochs": 1.5}, r"num_epochs must be an integer, got num_epochs=1\.5"),
        ({"pad": -1}, r"pad must be an integer >= 0, got pad=-1"),
        ({"std": (0.0,)}, r"std\[0\] must lie in \(0, inf\], got std\[0\]=0\.0"),
        ({"std": (-0.5,)}, r"std\[0\] must lie in \(0, inf\], got std\[0\]=-0\.5"),
        ({"std": (float("nan"),)}, r"std\[0\] must be a finite number, got std\[0\]=nan"),
        ({"std": (float("inf"),)}, r"std\[0\] must be a finite number, got std\[0\]=inf"),
        ({"mean": (float("nan"),)}, r"mean\[0\] must be a finite number, got mean\[0\]=nan"),
        ({"mean": (0.1, 0.2)}, r"mean must have 1 entry \(one per channel of the 1-channel images\), got 2"),
        ({"mean": "0.5"}, r"mean must be a number or a sequence"),
        ({"augment": "rotate"}, r"augment must be one of \(.*\), got augment='rotate'"),
        ({"num_classes": 0}, r"num_classes must be an integer >= 1, got num_classes=0"),
        ({"start": (0.5, 0)}, r"position\.epoch must be an integer, got position\.epoch=0\.5"),
        ({"start": (0, 1, 2)}, r"position must be a pair \(epoch, step\)"),
        ({"process_count": 0}, r"process_count must be an integer >= 1, got process_count=0"),
        ({"process_index": 2, "process_count": 2},
         r"process_index must be an integer in \[0, process_count=2\), got process_index=2"),
        ({"process_index": -1, "process_count": 2}, r"process_index must be an integer >= 0"),
        ({"process_index": 0, "process_count": 3},
         r"batch_size must be divisible by process_count .*batch_size=4, process_count=3"),
        ({"num_threads": -1}, r"num_threads must be an integer >= 0, got num_threads=-1"),
        ({"worker_count": 1.0}, r"worker_count must be an integer, got worker_count=1\.0"),
    ],
)
def test_loader_refuses_bad_arguments(kwargs, match):
    """Every bad argument is a ValueError naming it, instead of a quiet wrong number or NaN images."""
    images = np.zeros((12, 4, 4, 1), np.uint8)
    args = {"labels": np.arange(12) % 3, "batch_size": 4, **kwargs}
    with pytest.raises(ValueError, match=match):
        Loader(images, **args)


def test_loader_accepts_one_or_per_channel_constants():
    """One mean/std value applies to every channel; C values apply per channel."""
    images = np.full((4, 2, 2, 3), 51, np.uint8)  # 51 / 255 = 0.2
    for mean, std in [((0.2,), (0.5,)), ((0.2, 0.2, 0.2), (0.5, 0.5, 0.5)), (0.2, 0.5)]:
        batch = next(iter(Loader(images, np.zeros(4, np.int64), batch_size=4, mean=mean, std=std)))
        np.testing.assert_allclose(batch["image"], 0.0, atol=1e-6)
    np.testing.assert_allclose(data.normalize(images, np.float32(0.2), np.float64(0.5)), 0.0, atol=1e-6)


@pytest.mark.parametrize(
    "mean, std, match",
    [
        ((0.1, 0.2), (1.0,), r"mean must have 1 or 3 entries .*3-channel.*got 2"),
        ((0.5,), (1.0, 1.0, 1.0, 1.0), r"std must have 1 or 3 entries .*got 4"),
        ((0.5,), (1.0, 0.0, 1.0), r"std\[1\] must lie in \(0, inf\], got std\[1\]=0\.0"),
        ((0.5,), (float("inf"),), r"std\[0\] must be a finite number"),
        ((0.5, float("-inf"), 0.5), (1.0,), r"mean\[1\] must be a finite number"),
    ],
)
def test_normalize_refuses_bad_mean_std(mean, std, match):
    """normalize checks mean/std like the Loader (a zero std used to give inf/NaN images)."""
    images = np.zeros((2, 4, 4, 3), np.uint8)
    with pytest.raises(ValueError, match=match):
        data.normalize(images, mean, std)


@pytest.mark.parametrize("mode", ["none", "shift", "crop_flip"])
@pytest.mark.parametrize("pad, match", [(-1, r"pad must be an integer >= 0, got pad=-1"),
                                        (1.5, r"pad must be an integer, got pad=1\.5")])
def test_augment_refuses_bad_pad(mode, pad, match):
    """A negative pad used to be accepted silently (as no padding)."""
    images = np.zeros((2, 4, 4, 1), np.uint8)
    with pytest.raises(ValueError, match=match):
        data.augment(images, mode, np.random.default_rng(0), pad=pad)


def test_augment_refusal_names_mode():
    """An unknown augmentation names the ``mode`` argument and the choices."""
    with pytest.raises(ValueError, match=r"mode must be one of .*got mode='rotate'"):
        data.augment(np.zeros((2, 4, 4, 1), np.uint8), "rotate", np.random.default_rng(0))


def test_digits_unwritable_data_dir_names_it(tmp_path):
    """Preparing digits into a data_dir that cannot be created says so, naming data_dir (tests run as
    root, where permissions do not stop writes: a path below a regular file cannot be created)."""
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a directory")
    data_dir = blocker / "tfds"
    with pytest.raises(ValueError, match=r"data_dir must be a writable directory") as info:
        load_split("digits", "train", data_dir=str(data_dir))
    message = str(info.value)
    assert str(data_dir) in message and "already prepared" in message
    assert blocker.read_text() == "not a directory"


def test_with_index_yields_each_examples_row():
    """``with_index=True``: ``batch["index"]`` is each example's row in the images (CRD's bank index)."""
    images = np.arange(10, dtype=np.uint8).reshape(10, 1, 1, 1)
    labels = np.arange(10) % 3
    loader = Loader(images, labels, batch_size=4, with_index=True, drop_remainder=False, seed=3)
    seen = []
    for batch in loader:
        real = batch["mask"]
        np.testing.assert_array_equal(batch["label"][real], labels[batch["index"][real]])
        np.testing.assert_allclose(batch["image"][real, 0, 0, 0], batch["index"][real] / 255.0, rtol=1e-6)
        seen += list(batch["index"][real])
    assert sorted(seen) == list(range(10))
    assert "index" not in next(iter(Loader(images, labels, batch_size=4)))
