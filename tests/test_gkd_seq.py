"""GKD's sequence-level branch (``gkd(seq_kd=True)``: the frozen teacher generates the rows that are not
on-policy) and completion-only masks (``loss_mask``) in ``token_kd``, ``gkd`` and ``lm_ce``, against TRL
(trl 1.16.0: ``GKDTrainer.generalized_jsd_loss`` with ``labels = -100`` off the completion,
trl/experimental/gkd/gkd_trainer.py; the -100 convention of ``DataCollatorForChatML``) and against greedy
generations done by hand with ``jaxkd.models.sampling.generate``."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxkd import methods
from jaxkd.batch import LOSS_MASK, TOKEN_NORMALIZER, token_normalizer
from jaxkd.methods.base import MethodVars
from jaxkd.models import lm as lm_models
from jaxkd.models.sampling import generate
from tests.test_lm_methods import loss_and_metrics
from tests.test_lm_train import (B, BATCH, STUDENT_CFG, T, TEACHER_CFG, TEACHER_MODEL, TEACHER_VARS, V, inputs_of,
                                 new_state)

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
import torch  # noqa: E402  (dev extra: the reference implementation only)
from trl.experimental.gkd.gkd_trainer import GKDTrainer  # noqa: E402

PROMPT = 3


def trl_gjsd(zs, zt, tokens, target_mask, beta, temperature=1.0):
    """TRL's GKD loss on shifted logits with ``labels = tokens[:, 1:]`` and -100 where no target counts."""
    labels = np.where(target_mask, np.asarray(tokens)[:, 1:], -100)
    return float(GKDTrainer.generalized_jsd_loss(
        torch.from_numpy(np.array(zs, np.float32)[:, :-1]), torch.from_numpy(np.array(zt, np.float32)[:, :-1]),
        labels=torch.from_numpy(labels), beta=beta, temperature=temperature))


def logits(model, variables, tokens, mask):
    return np.asarray(model.apply(variables, {"tokens": tokens, "mask": mask}, train=False).logits)


def student_variables(state):
    return {"params": jax.device_get(state.student.params)}


STUDENT_MODEL = lm_models.lm(STUDENT_CFG)


def greedy(cfg, variables, tokens, mask):
    """A hand generation: ``tokens[:, :PROMPT]`` continued greedily to the row length."""
    out = generate(cfg, variables["params"], jnp.asarray(tokens[:, :PROMPT]), jnp.asarray(mask[:, :PROMPT]),
                   rng=jax.random.PRNGKey(123), max_new_tokens=T - PROMPT, temperature=0.0)
    gen_tokens, gen_mask = np.asarray(out.tokens), np.asarray(out.mask)
    targets = gen_mask[:, 1:] & gen_mask[:, :-1] & (np.arange(1, T) >= PROMPT)[None]
    return gen_tokens, gen_mask, targets


# ----- completion-only masks -----

COMPLETION = np.broadcast_to(np.arange(T) >= PROMPT, (B, T)) & BATCH["mask"]
MASKED_BATCH = {**BATCH, LOSS_MASK: COMPLETION,
                TOKEN_NORMALIZER: token_normalizer(BATCH["mask"][:, 1:] & BATCH["mask"][:, :-1] & COMPLETION[:, 1:])}
TARGETS = BATCH["mask"][:, 1:] & BATCH["mask"][:, :-1] & COMPLETION[:, 1:]


def method_value(method, zs, zt, batch=MASKED_BATCH):
    return float(method.loss(MethodVars(), inputs_of(jnp.asarray(zs), jnp.asarray(zt), batch),
                             jax.random.PRNGKey(0))[0])


def test_token_kd_gkd_and_lm_ce_score_only_the_completion_like_trl():
    rng = np.random.default_rng(0)
    zs, zt = (2 * rng.normal(size=(2, B, T, V))).astype(np.float32)
    assert 0 < TARGETS.sum() < (BATCH["mask"][:, 1:] & BATCH["mask"][:, :-1]).sum()
    for beta in (0.0, 0.3, 1.0):
        want = trl_gjsd(zs, zt, BATCH["tokens"], TARGETS, beta, temperature=2.0)
        for method in (methods.token_kd(divergence="generalized_jsd", beta=beta, temperature=2.0),
                       methods.gkd(lmbda=0.0, beta=beta, temperature=2.0)):
            np.testing.assert_allclose(method_value(method, zs, zt), want, rtol=1e-5)
    labels = np.where(TARGETS, BATCH["tokens"][:, 1:], -100)
    want_ce = float(torch.nn.functional.cross_entropy(torch.from_numpy(zs[:, :-1]).reshape(-1, V),
                                                      torch.from_numpy(labels.astype(np.int64)).reshape(-1)))
    np.testing.assert_allclose(method_value(methods.lm_ce(), zs, zt), want_ce, rtol=1e-5)
    # Logits predicting prompt tokens do not matter; one predicting a completion token does.
    for method in (methods.token_kd(), methods.gkd(lmbda=0.0), methods.lm_ce()):
        base = method_value(method, zs, zt)
        zs2, zt2 = zs.copy(), zt.copy()
        zs2[:, :PROMPT - 1], zt2[:, :PROMPT - 1] = 30.0 * rng.normal(size=(2, B, PROMPT - 1, V))
        np.testing.assert_allclose(method_value(method, zs2, zt2), base, rtol=1e-6)
        zs2[0, PROMPT] += 5.0 * rng.normal(size=V).astype(np.float32)
        assert abs(method_value(method, zs2, zt2) - base) > 1e-4
    # The cross-entropy reads the target tokens: a prompt token's id does not matter, a completion token's does.
    base = method_value(methods.lm_ce(), zs, zt)
    tokens = BATCH["tokens"].copy()
    tokens[:, 1:PROMPT] = (tokens[:, 1:PROMPT] + 1) % V
    np.testing.assert_allclose(method_value(methods.lm_ce(), zs, zt, {**MASKED_BATCH, "tokens": tokens}), base,
                               rtol=1e-6)
    tokens[0, PROMPT + 1] = (tokens[0, PROMPT + 1] + 1) % V
    assert abs(method_value(methods.lm_ce(), zs, zt, {**MASKED_BATCH, "tokens": tokens}) - base) > 1e-4


def test_gkd_data_rows_honour_the_loss_mask_and_seq_kd_scores_the_teachers_greedy_generation():
    """The step loss of two GKD terms on a completion-masked batch, each against TRL's loss on a batch built
    by hand with greedy generations (``jaxkd.models.sampling.generate``):

    * ``gkd(λ=0.5)``: rows 0-1 are the student's continuations (their generated tokens count), rows 2-3 data
      rows (their completion tokens only);
    * ``gkd(λ=0, seq_kd=True)``: every row is the teacher's continuation of its prompt (its generated tokens
      count), not the dataset's completion.
    """
    mixed = methods.gkd(lmbda=0.5, beta=0.4, prompt_length=PROMPT, sampling_temperature=0.0)
    seq = methods.gkd(lmbda=0.0, seq_kd=True, beta=0.5, prompt_length=PROMPT, sampling_temperature=0.0,
                      name="gkd_seq")
    state = new_state(mixed + seq)
    student = student_variables(state)

    gen_tokens, gen_mask, gen_targets = greedy(STUDENT_CFG, student, BATCH["tokens"][:2], BATCH["mask"][:2])
    tokens = np.concatenate([gen_tokens, BATCH["tokens"][2:]])
    mask = np.concatenate([gen_mask, BATCH["mask"][2:]])
    targets = np.concatenate([gen_targets, TARGETS[2:]])
    want_mixed = trl_gjsd(logits(STUDENT_MODEL, student, tokens, mask),
                          logits(TEACHER_MODEL, TEACHER_VARS, tokens, mask), tokens, targets, beta=0.4)

    t_tokens, t_mask, t_targets = greedy(TEACHER_CFG, TEACHER_VARS, BATCH["tokens"], BATCH["mask"])
    assert not np.array_equal(t_tokens[:, PROMPT:], BATCH["tokens"][:, PROMPT:])
    want_seq = trl_gjsd(logits(STUDENT_MODEL, student, t_tokens, t_mask),
                        logits(TEACHER_MODEL, TEACHER_VARS, t_tokens, t_mask), t_tokens, t_targets, beta=0.5)
    on_data = trl_gjsd(logits(STUDENT_MODEL, student, BATCH["tokens"], BATCH["mask"]),
                       logits(TEACHER_MODEL, TEACHER_VARS, BATCH["tokens"], BATCH["mask"]), BATCH["tokens"],
                       TARGETS, beta=0.5)
    assert abs(want_seq - on_data) > 1e-3  # the teacher's tokens, not the dataset's

    _, metrics = loss_and_metrics(state, batch=MASKED_BATCH)  # the step's loss, without the update's compile
    np.testing.assert_allclose(float(metrics["gkd"]), want_mixed, rtol=1e-5)
    assert float(metrics["gkd/generated_tokens"]) == gen_targets.sum()
    np.testing.assert_allclose(float(metrics["gkd_seq"]), want_seq, rtol=1e-5)
    assert float(metrics["gkd_seq/teacher_generated_tokens"]) == t_targets.sum()
    assert float(metrics["gkd_seq/generated_fraction"]) == 0.0
    with pytest.raises(ValueError, match="seq_kd"):
        methods.gkd(seq_kd=1)
