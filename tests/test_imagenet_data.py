"""ImageNet streaming: torchvision's train/eval geometry, normalization, determinism, resume, processes, TFDS.

Expected values are computed from torchvision's formulas by hand (``transforms.py``: ``Resize`` of an int size,
``CenterCrop``'s ``int(round((H - size) / 2))``, ``RandomResizedCrop.get_params``' fallback) or exactly with
NumPy on images the transforms leave unresampled (a crop of an image already at the target size).
"""

import math

import numpy as np
import pytest

from jaxkd import data
from jaxkd.data.images.imagenet import center_crop_box, random_resized_crop_box, resized_size

MEAN, STD = np.array(data.IMAGENET_MEAN, np.float32), np.array(data.IMAGENET_STD, np.float32)


def _source(n=12, seed=0, sizes=((40, 60), (64, 48), (50, 50))):
    rng = np.random.default_rng(seed)
    return [
        {"image": rng.integers(0, 256, (*sizes[i % len(sizes)], 3), dtype=np.uint8), "label": i % 5}
        for i in range(n)
    ]


def _normalized(image):
    return (image.astype(np.float32) / 255.0 - MEAN) / STD


def test_resize_and_center_crop_geometry_follow_torchvision():
    # Resize(256): the shorter side to 256, the longer int(256 * long / short).
    assert resized_size(375, 500, 256) == (256, 341)
    assert resized_size(500, 333, 256) == (384, 256)
    assert resized_size(256, 256, 256) == (256, 256)
    # CenterCrop(224): int(round((H - 224) / 2)), Python's round half to even.
    assert center_crop_box(256, 341, 224) == (16, 58)  # (341 - 224) / 2 = 58.5 -> 58
    assert center_crop_box(384, 256, 224) == (80, 16)
    assert center_crop_box(227, 229, 224) == (2, 2)  # 1.5 -> 2, 2.5 -> 2


def test_random_resized_crop_fallback_is_torchvision_central_crop():
    # No box of area >= 8% with ratio in [3/4, 4/3] fits a 10 x 1000 image: the fallback clamps the ratio.
    rng = np.random.default_rng(0)
    assert random_resized_crop_box(10, 1000, rng) == (0, (1000 - 13) // 2, 10, 13)  # w = round(10 * 4/3)
    assert random_resized_crop_box(1000, 10, rng) == ((1000 - 13) // 2, 0, 13, 10)  # h = round(10 / (3/4))
    # scale (1, 1) and ratio (1, 1) on a square image: the whole image, drawn on the first try.
    assert random_resized_crop_box(50, 50, rng, scale=(1.0, 1.0), ratio=(1.0, 1.0)) == (0, 0, 50, 50)


def test_random_resized_crop_draws_area_and_ratio_as_torchvision():
    """The box of one draw, recomputed from the same generator's numbers with torchvision's formula."""
    height, width, seed = 300, 400, 7
    box = random_resized_crop_box(height, width, np.random.default_rng(seed))
    rng = np.random.default_rng(seed)
    area = height * width * rng.uniform(0.08, 1.0)
    aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
    w, h = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
    assert 0 < w <= width and 0 < h <= height  # seed 7 fits on the first try
    top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
    assert box == (top, left, h, w)


def test_eval_batches_are_the_normalized_center_crop():
    # Images whose shorter side already equals resize_size are not resampled: the batch is an exact crop.
    source = [{**record, "label": 1} for record in _source(2, sizes=((32, 45), (51, 32)))]
    loader = data.ImageNetLoader(source, batch_size=2, train=False, image_size=24, resize_size=32)
    batch = loader.batch((0, 0))
    assert batch["image"].shape == (2, 24, 24, 3) and batch["image"].dtype == np.float32
    a, b = source[0]["image"], source[1]["image"]
    np.testing.assert_allclose(batch["image"][0], _normalized(a[4:28, 10:34]), rtol=1e-6, atol=1e-6)  # 10.5 -> 10
    np.testing.assert_allclose(batch["image"][1], _normalized(b[14:38, 4:28]), rtol=1e-6, atol=1e-6)  # 13.5 -> 14
    assert batch["mask"].tolist() == [True, True] and batch["label"].tolist() == [1, 1]


def test_train_crop_of_whole_image_is_the_image_or_its_mirror():
    source = _source(16, sizes=((20, 20),))
    loader = data.ImageNetLoader(source, batch_size=16, train=True, image_size=20, scale=(1.0, 1.0),
                                 ratio=(1.0, 1.0), shuffle=False, seed=3)
    batch = loader.batch((0, 0))
    flipped = []
    for k, record in enumerate(source):
        plain, mirror = _normalized(record["image"]), _normalized(record["image"][:, ::-1])
        if np.allclose(batch["image"][k], plain, atol=1e-6):
            flipped.append(False)
        else:
            np.testing.assert_allclose(batch["image"][k], mirror, atol=1e-6)
            flipped.append(True)
    assert 0 < sum(flipped) < 16  # both outcomes of the p = 0.5 flip occur


def test_train_batches_deterministic_resumable_and_split_across_processes():
    source = _source(12)
    kwargs = dict(batch_size=4, train=True, image_size=16, seed=5, num_epochs=2)
    first = list(data.ImageNetLoader(source, **kwargs))
    again = list(data.ImageNetLoader(source, **kwargs))
    assert len(first) == 6
    for x, y in zip(first, again):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["label"], y["label"])
    other = data.ImageNetLoader(source, **{**kwargs, "seed": 6}).batch((0, 0))
    assert not np.array_equal(other["image"], first[0]["image"])
    loader = data.ImageNetLoader(source, **kwargs)
    next(loader), next(loader)
    resumed = data.ImageNetLoader(source, **kwargs)
    resumed.set_state(loader.get_state())
    np.testing.assert_array_equal(next(resumed)["image"], first[2]["image"])
    halves = [data.ImageNetLoader(source, **kwargs, process_index=p, process_count=2).batch((1, 2)) for p in (0, 1)]
    np.testing.assert_array_equal(np.concatenate([h["image"] for h in halves]), first[5]["image"])
    # Epoch orders differ and cover every row once.
    orders = [loader.epoch_order(e) for e in (0, 1)]
    assert sorted(orders[0]) == list(range(12)) and not np.array_equal(orders[0], orders[1])


def test_eval_pads_the_last_batch_and_indexes_rows():
    loader = data.ImageNetLoader(_source(5), batch_size=4, train=False, image_size=16, resize_size=20,
                                 with_index=True)
    batches = list(loader)
    assert len(batches) == 2 and batches[1]["mask"].tolist() == [True, False, False, False]
    assert batches[1]["index"].tolist() == [4, 0, 0, 0] and batches[0]["index"].tolist() == [0, 1, 2, 3]
    assert not batches[1]["image"][1:].any()


def test_grey_scale_images_become_rgb():
    grey = np.arange(16 * 16, dtype=np.uint8).reshape(16, 16, 1)
    loader = data.ImageNetLoader([{"image": grey, "label": 0}], batch_size=1, train=False, image_size=16,
                                 resize_size=16)
    np.testing.assert_allclose(loader.batch((0, 0))["image"][0], _normalized(np.repeat(grey, 3, -1)), atol=1e-6)


def test_bad_arguments_are_refused():
    source = _source(4)
    with pytest.raises(ValueError, match="image_size"):
        data.ImageNetLoader(source, batch_size=2, train=True, image_size=0)
    with pytest.raises(ValueError, match="resize_size must be >= image_size"):
        data.ImageNetLoader(source, batch_size=2, train=False, image_size=32, resize_size=16)
    with pytest.raises(ValueError, match="scale"):
        data.ImageNetLoader(source, batch_size=2, train=True, scale=(0.5, 0.1))
    with pytest.raises(ValueError, match="scale"):
        data.ImageNetLoader(source, batch_size=2, train=True, scale=(0.0, 1.0))
    with pytest.raises(ValueError, match="ratio"):
        data.ImageNetLoader(source, batch_size=2, train=True, ratio=(1.0,))
    with pytest.raises(ValueError, match="std"):
        data.ImageNetLoader(source, batch_size=2, train=True, std=(0.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="source is empty"):
        data.ImageNetLoader([], batch_size=2, train=True)
    with pytest.raises(ValueError, match="no full batch"):
        data.ImageNetLoader(source, batch_size=8, train=True)
    loader = data.ImageNetLoader(source, batch_size=2, train=False, image_size=8, resize_size=8, num_classes=3)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, num_classes=3\)"):
        list(loader)  # labels 0..3: the batch holding label 3 is refused when it is read


def test_imagenet2012_streams_from_tfds_mock_data():
    import tensorflow_datasets.testing as tfds_testing

    with tfds_testing.mock_data(policy=tfds_testing.MockPolicy.USE_CODE, num_examples=6):
        source, num_classes = data.imagenet_source("train", data_dir="/nonexistent/tfds")
        loader = data.ImageNetLoader(source, batch_size=3, train=True, image_size=16, num_classes=num_classes)
        batches = list(loader)
    assert num_classes == 1000 and len(source) == 6 and len(batches) == 2
    assert batches[0]["image"].shape == (3, 16, 16, 3) and batches[0]["label"].dtype == np.int32
    assert all(0 <= label < 1000 for b in batches for label in b["label"])


def test_unprepared_imagenet_names_the_preparation(tmp_path):
    with pytest.raises(FileNotFoundError, match="tfds build imagenet2012"):
        data.imagenet_source("train", data_dir=str(tmp_path))
