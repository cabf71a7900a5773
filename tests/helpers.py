"""Tiny models and batches shared by the tests (compiled in well under a second)."""

import jax
import numpy as np

from jaxkd import models

NUM_CLASSES = 5


def tiny_models(num_classes=NUM_CLASSES):
    """A wider MLP teacher and a narrower MLP student over 4x4x1 inputs."""
    teacher = models.get("mlp", num_classes=num_classes, hidden_sizes=(32,))
    student = models.get("mlp", num_classes=num_classes, hidden_sizes=(16,))
    return teacher, student


def tiny_batch(seed=0, batch_size=16, num_classes=NUM_CLASSES):
    rng = np.random.default_rng(seed)
    return {
        "image": rng.normal(size=(batch_size, 4, 4, 1)).astype(np.float32),
        "label": rng.integers(0, num_classes, size=batch_size).astype(np.int32),
    }


def teacher_variables(teacher, batch, seed=1):
    return teacher.init(jax.random.PRNGKey(seed), batch["image"])


def tiny_conv_models(num_classes=NUM_CLASSES):
    """A teacher and a student that are both resnet8 (CIFAR ResNets, one block per stage, separately
    initialized) with every RepDistiller feature tap: stem, stage1-3, stage*_preact, pooled — for methods
    that read feature maps; use with :func:`tiny_image_batch` (8x8x1 images: maps 8x8, 4x4, 2x2). One block
    per stage keeps the compiled train step small (the depth, not the width, sets the compile time)."""
    teacher = models.get("resnet8", num_classes=num_classes)
    student = models.get("resnet8", num_classes=num_classes)
    return teacher, student


def tiny_image_batch(seed=0, batch_size=8, num_classes=NUM_CLASSES):
    rng = np.random.default_rng(seed)
    return {
        "image": rng.normal(size=(batch_size, 8, 8, 1)).astype(np.float32),
        "label": rng.integers(0, num_classes, size=batch_size).astype(np.int32),
    }
