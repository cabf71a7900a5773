"""A frozen teacher in bfloat16: ``cast_params`` plus a model built with that compute dtype."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxkd
from jaxkd import methods, models
from jaxkd.participants import cast_params

from tests.helpers import NUM_CLASSES, tiny_image_batch

BATCH = tiny_image_batch()
TEACHER = models.get("resnet8", num_classes=NUM_CLASSES)
TEACHER_BF16 = models.get("resnet8", num_classes=NUM_CLASSES, dtype=jnp.bfloat16)
STUDENT = models.get("resnet8", num_classes=NUM_CLASSES)
VARIABLES = TEACHER.init(jax.random.PRNGKey(1), BATCH["image"])


def test_cast_params_casts_floating_parameters_only():
    cast = cast_params(VARIABLES, jnp.bfloat16)
    assert {leaf.dtype for leaf in jax.tree.leaves(cast["params"])} == {jnp.dtype(jnp.bfloat16)}
    for before, after in zip(jax.tree.leaves(VARIABLES["params"]), jax.tree.leaves(cast["params"])):
        np.testing.assert_array_equal(np.asarray(after, np.float32), np.asarray(before.astype(jnp.bfloat16), np.float32))
    # Batch statistics are not parameters: they stay float32, bit for bit.
    jax.tree.map(np.testing.assert_array_equal, cast["batch_stats"], VARIABLES["batch_stats"])
    counts = {"params": {"step": jnp.array(3, jnp.int32), "w": jnp.ones(2)}}
    assert cast_params(counts, jnp.bfloat16)["params"]["step"].dtype == jnp.int32


def test_cast_params_refuses_a_non_floating_dtype_and_a_tree_without_params():
    with pytest.raises(ValueError, match="floating dtype"):
        cast_params(VARIABLES, jnp.int8)
    with pytest.raises(ValueError, match="'params' entry"):
        cast_params(VARIABLES["batch_stats"], jnp.bfloat16)


def test_a_bf16_teacher_gives_float32_logits_within_bf16_rounding_of_the_float32_teacher():
    image = BATCH["image"]
    full = TEACHER.apply(VARIABLES, image, train=False).logits
    half = TEACHER_BF16.apply(cast_params(VARIABLES, jnp.bfloat16), image, train=False).logits
    assert half.dtype == jnp.float32
    scale = float(jnp.max(jnp.abs(full)))
    error = float(jnp.max(jnp.abs(half - full)))
    # bf16 keeps 8 significant bits (relative rounding 2^-8 per operation): computed in bf16, the logits
    # differ from float32's, by a few percent of their scale at most after a few layers.
    assert 0 < error < 0.05 * scale


def test_distilling_from_a_bf16_teacher_trains_the_float32_student():
    tx = optax.sgd(0.05, momentum=0.9)
    method = methods.ce() + methods.kd(temperature=4.0)
    states = {
        name: jaxkd.create(
            student=STUDENT, method=method, tx=tx, sample_batch=BATCH, rng=jax.random.PRNGKey(0),
            participants={"teacher": jaxkd.Participant(teacher, variables, trains=False)},
        )
        for name, teacher, variables in (("float32", TEACHER, VARIABLES),
                                         ("bfloat16", TEACHER_BF16, cast_params(VARIABLES, jnp.bfloat16)))
    }
    assert states["bfloat16"].teacher.params["fc"]["kernel"].dtype == jnp.bfloat16  # kept as given
    step = jaxkd.make_train_step()
    losses = {}
    for name, state in states.items():
        new, metrics = step(state, BATCH)
        assert new.student.params["fc"]["kernel"].dtype == jnp.float32
        losses[name] = float(metrics["kd"])
    assert losses["bfloat16"] == pytest.approx(losses["float32"], rel=0.05)
    assert losses["bfloat16"] != losses["float32"]


def test_a_trained_participant_must_keep_its_models_dtypes():
    with pytest.raises(ValueError, match=r"variables do not match the model at \['params'\]"):
        jaxkd.create(student=STUDENT, method=methods.ce(), tx=optax.sgd(0.1), sample_batch=BATCH,
                     rng=jax.random.PRNGKey(0), student_variables=cast_params(VARIABLES, jnp.bfloat16))
