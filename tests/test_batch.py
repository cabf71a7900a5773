"""The batch schema (jaxkd.batch): target masks and global counts against literal values, and the rule that
jaxkd.losses never reads a batch."""

import pathlib
import re

import jax.numpy as jnp
import numpy as np
import pytest

from jaxkd import batch, losses


def test_target_mask_and_normalizer_of_left_padded_and_holed_rows():
    mask = np.array([[0, 0, 1, 1, 1],    # left-padded: targets at 3, 4
                     [1, 1, 0, 1, 1],    # a hole at 2: targets at 1 and 4
                     [1, 1, 1, 0, 0]], bool)  # right-padded: targets at 1, 2
    expected = np.array([[0, 0, 1, 1], [1, 0, 0, 1], [1, 1, 0, 0]], bool)
    np.testing.assert_array_equal(batch.target_mask(mask), expected)
    np.testing.assert_array_equal(np.asarray(batch.target_mask(jnp.asarray(mask))), expected)  # JAX in, JAX out
    np.testing.assert_array_equal(batch.token_normalizer(expected), np.full(3, 6 / 3, np.float32))
    out = batch.with_token_normalizer({"student_tokens": np.zeros((3, 5), np.int32), "student_mask": mask},
                                      tokens_key="student_tokens", mask_key="student_mask")
    np.testing.assert_array_equal(out["student_token_normalizer"], np.full(3, 2.0, np.float32))
    assert float(batch.batch_normalizer(out, "student_token_normalizer")) == 6.0
    assert batch.batch_normalizer(out) is None  # no count of the "tokens" tokenization
    assert batch.is_normalizer_key("student_token_normalizer") and not batch.is_normalizer_key("mask")
    with pytest.raises(ValueError, match="ending in 'tokens'"):
        batch.normalizer_key_of("ids")
    with pytest.raises(ValueError, match="must be \\[batch, length\\]"):
        batch.target_mask(np.ones(4, bool))


def test_losses_never_read_a_batch():
    """Losses take arrays: no batch-key constant is exported from jaxkd.losses and no loss module indexes a
    batch mapping or names a schema entry."""
    assert not [name for name in losses.__all__ if name.endswith("_KEY") or name in batch.__all__]
    root = pathlib.Path(losses.__file__).parent
    for path in sorted(root.glob("*.py")):
        text = path.read_text()
        assert not re.search(r"\bbatch\[|\bbatch\.get\(|jaxkd\.batch import|from jaxkd import batch", text), path.name
