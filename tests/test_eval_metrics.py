"""make_eval_step's metric functions against NumPy computed from their definitions: agreement and
teacher–student KL (big_vision's distance evaluators) on padded batches split unevenly, and bits per byte of a
language model on left-padded rows with holes, compared with the LM experiments' own inference-path scorer."""

import jax
import numpy as np
import optax
import pytest

import jaxkd
from jaxkd import eval_metrics, methods
from jaxkd.data import ByteTokenizer
from jaxkd.models import lm as lm_models
from tests.helpers import teacher_variables, tiny_batch, tiny_models


def _log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


@pytest.fixture(scope="module")
def state_and_batch():
    teacher, student = tiny_models()
    batch = tiny_batch()
    state = jaxkd.create(student=student, teacher=teacher, teacher_variables=teacher_variables(teacher, batch),
                         method=methods.ce() + methods.kd(), tx=optax.sgd(0.1), sample_batch=batch,
                         rng=jax.random.PRNGKey(0))
    return state, batch, teacher, student


def test_agreement_and_kl_match_numpy_over_padded_uneven_batches(state_and_batch):
    state, batch, teacher, student = state_and_batch
    s = np.asarray(student.apply(state.student.variables(), batch["image"], train=False).logits, np.float64)
    t = np.asarray(teacher.apply(state.teacher.variables(), batch["image"], train=False).logits, np.float64)
    valid = np.arange(len(s)) % 3 != 1  # holes, not a prefix
    p = np.exp(_log_softmax(t / 2.0))
    kl = np.sum(p * (_log_softmax(t / 2.0) - _log_softmax(s / 2.0)), -1)
    expected = {"agreement": np.mean((s.argmax(-1) == t.argmax(-1))[valid]), "kl": np.mean(kl[valid]),
                "accuracy": np.mean((s.argmax(-1) == batch["label"])[valid])}
    step = jaxkd.make_eval_step(frozen=False, metrics=(eval_metrics.top1(), eval_metrics.agreement(),
                                                        eval_metrics.teacher_student_kl(temperature=2.0)))
    halves = [{k: v[:11] for k, v in batch.items()}, {k: v[11:] for k, v in batch.items()}]
    for part, lo in zip(halves, (0, 11)):
        part["mask"] = valid[lo:lo + len(part["label"])]
    result = jaxkd.evaluate(state, halves, step)
    for key, value in expected.items():
        np.testing.assert_allclose(result[key], value, rtol=1e-5, atol=1e-6, err_msg=key)
    assert result["count"] == valid.sum()
    assert "teacher_accuracy" in result  # the teacher was run for the distance metrics


def test_distance_metrics_name_a_missing_participant(state_and_batch):
    state, batch, _, _ = state_and_batch
    step = jaxkd.make_eval_step(metrics=(eval_metrics.agreement(teacher="peer"),))
    with pytest.raises(ValueError, match="reads participant 'peer'.*evaluates \\['student', 'teacher'\\]"):
        step(state, batch)
    with pytest.raises(ValueError, match="jaxkd.eval_metrics metrics"):
        jaxkd.make_eval_step(metrics=(lambda view: {},))


def test_bits_per_byte_matches_the_definition_on_left_padded_rows_with_holes():
    tok = ByteTokenizer()
    config = lm_models.LMConfig(vocab_size=tok.vocab_size, max_len=12, d_model=16, num_layers=1, num_heads=2, d_ff=32)
    model = lm_models.lm(config)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 256, (5, 12)).astype(np.int32)  # bytes; one special target below
    mask = np.ones((5, 12), bool)
    mask[0, :4] = False  # left padding
    mask[1, 6] = False  # a hole: neither the target at 6 nor the one at 7 counts
    mask[2, 9:] = False  # right padding
    tokens[3, 5] = tok.bos_id  # a special target: 0 bytes
    variables = model.init(jax.random.PRNGKey(1), {"tokens": tokens[:2], "mask": mask[:2]})
    variables = jaxkd.sharding.unbox(variables)
    state = jaxkd.create(participants={"student": jaxkd.participants.student(model, variables, input=("tokens", "mask"))},
                         method=methods.lm_ce(), tx=optax.sgd(0.1),
                         sample_batch={"tokens": tokens, "mask": mask}, rng=jax.random.PRNGKey(0))
    step = jaxkd.make_eval_step(metrics=(eval_metrics.bits_per_byte(tok.token_byte_lengths),))
    result = jaxkd.evaluate(state, [{"tokens": tokens[:3], "mask": mask[:3]}, {"tokens": tokens[3:], "mask": mask[3:]}],
                            step)
    logits = np.asarray(model.apply(state.student.variables(), {"tokens": tokens, "mask": mask}, train=False).logits,
                        np.float64)
    log_probs = _log_softmax(logits[:, :-1])
    target_mask = mask[:, 1:] & mask[:, :-1]
    assert target_mask.sum() == 5 * 11 - 4 - 2 - 3  # literal count: 4 left-padded, 2 around the hole, 3 right
    nats = -np.take_along_axis(log_probs, tokens[:, 1:, None], -1)[..., 0][target_mask].sum()
    num_bytes = np.asarray(tok.token_byte_lengths)[tokens[:, 1:]][target_mask].sum()
    assert num_bytes == target_mask.sum() - 1  # the BOS target stands for no byte
    np.testing.assert_allclose(result["bpb"], nats / np.log(2) / num_bytes, rtol=1e-5)
    # The LM experiments' scorer (jaxkd.inference, the shorter last batch padded) gives the same number.
    from experiments.lm_training import bpb_evaluator

    evaluate = bpb_evaluator(model, [{"tokens": tokens[:4], "mask": mask[:4]}, {"tokens": tokens[4:], "mask": mask[4:]}])
    np.testing.assert_allclose(evaluate(state.student.variables()), result["bpb"], rtol=1e-5)
