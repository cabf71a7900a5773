"""LM methods that sample or use preferences, against closed forms: DistiLLM on data is the skew KL and its
adaptive probability moves as the official rule says; preference distillation against a reference equal to
the policy is log 2; ADPA with a teacher equal to its reference has no advantage; DAC-KL over the whole
distribution without spans is the forward KL; LLaVA-MoD switches stage; MiniLLM runs in the step."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxkd
from jaxkd import losses, methods
from jaxkd.batch import TOKEN_NORMALIZER as TOKEN_NORMALIZER_KEY, token_normalizer
from jaxkd.methods.base import LossInputs
from jaxkd.methods.lm.dac_kl import identifier_spans
from jaxkd.models import lm as lm_models
from jaxkd.participants import student, teacher

V, B, T = 128, 3, 8   # byte-sized vocabulary for the identifier spans
CFG = lm_models.LMConfig(vocab_size=V, d_model=16, num_layers=1, num_heads=2, d_ff=32, max_len=T)
MODEL = lm_models.lm(CFG)
KEYS = ("tokens", "mask")
rng = np.random.default_rng(0)
TOKENS = rng.integers(32, V, size=(B, T)).astype(np.int32)
MASK = np.arange(T)[None] < np.array([[8], [6], [7]])
BATCH = {"tokens": TOKENS, "mask": MASK, TOKEN_NORMALIZER_KEY: token_normalizer(MASK[:, 1:] & MASK[:, :-1])}
VARS = [jaxkd.sharding.unbox(MODEL.init(jax.random.PRNGKey(i), {"tokens": TOKENS})) for i in range(3)]


def new_state(method, teacher_vars=VARS[1], reference_vars=None):
    parts = {"student": student(MODEL, VARS[0], input=KEYS), "teacher": teacher(MODEL, teacher_vars, input=KEYS)}
    if reference_vars is not None:
        parts["reference"] = teacher(MODEL, reference_vars, input=KEYS)
    return jaxkd.create(participants=parts, method=method, tx=optax.sgd(0.1), sample_batch=BATCH,
                        rng=jax.random.PRNGKey(0))


def loss_and_metrics(state, rng=jax.random.PRNGKey(3), batch=BATCH):
    """The method's loss and metrics on ``batch`` for the state's variables (no update)."""
    def run(state, batch):
        x = {"tokens": batch["tokens"], "mask": batch["mask"]}
        variables = {name: v.variables() for name, v in {**state.trained, **state.frozen}.items()}
        outputs = {name: state.participant(name).model.apply(v, x, train=False) for name, v in variables.items()}
        inputs = LossInputs(outputs=outputs, batch=batch, step=state.step, variables=variables,
                            participants=state.participants, label_key="label")
        value, aux = state.method.loss(state.method_vars, inputs, rng)
        return value, aux.metrics
    return jax.jit(run)(state, batch)


def test_distillm_on_data_is_the_skew_kl_and_its_probability_follows_the_validation_loss():
    state = new_state(methods.distillm(alpha=0.2, prompt_length=3))
    value, metrics = loss_and_metrics(state)
    reference, _ = loss_and_metrics(new_state(methods.token_kd(divergence="skew_kl", alpha=0.2)))
    np.testing.assert_allclose(float(value), float(reference), rtol=1e-6)
    assert float(metrics["distillm/p"]) == 0.0 and float(metrics["distillm/student_output"]) == 0.0
    observe = methods.observe_validation_loss
    state = observe(state, 2.0)        # first evaluation: recorded, p unchanged
    state = observe(state, 2.05)       # +0.05 < eps: unchanged
    assert float(state.method_vars.state["distillm"].threshold) == 0.0
    state = observe(state, 2.15)       # +0.15 >= eps over 2.0: p += 0.1
    assert float(state.method_vars.state["distillm"].threshold) == pytest.approx(0.1)
    always = new_state(methods.distillm(init_threshold=1.0, prompt_length=3))
    value, metrics = loss_and_metrics(always)
    assert float(metrics["distillm/student_output"]) == 1.0 and np.isfinite(float(value))


def test_preference_kd_against_a_reference_equal_to_the_policy_is_log_2():
    for loss_type in ("dpo", "kto_pair"):
        value, metrics = loss_and_metrics(new_state(methods.preference_kd(loss_type=loss_type, prompt_length=3),
                                                    teacher_vars=VARS[0]))
        np.testing.assert_allclose(float(value), np.log(2.0) if loss_type == "dpo" else 0.5, rtol=1e-5)
        assert float(metrics["preference_kd/reward_margin"]) == pytest.approx(0.0, abs=1e-6)


def test_preference_kd_scores_only_the_completion_of_the_chosen_row_under_a_loss_mask():
    """A loss mask dropping the targets 3-4 of the chosen (data) rows removes exactly their policy-minus-
    reference log-ratio from the chosen side: the reward margins differ by β·Σ (log p_S − log p_T) over them
    (averaged over the rows); the rejected (sampled) side is the same draw in both runs."""
    beta = 0.5
    state = new_state(methods.preference_kd(beta=beta, prompt_length=3))
    loss_mask = np.broadcast_to(np.arange(T) >= 5, (B, T))
    _, plain = loss_and_metrics(state)
    _, masked = loss_and_metrics(state, batch={**BATCH, "loss_mask": loss_mask})

    def log_probs(variables):
        z = np.asarray(MODEL.apply(variables, {"tokens": TOKENS, "mask": MASK}, train=False).logits, np.float64)
        z = z - z.max(-1, keepdims=True)
        lp = z - np.log(np.exp(z).sum(-1, keepdims=True))
        return np.take_along_axis(lp[:, :-1], TOKENS[:, 1:, None], -1)[..., 0]

    dropped = (np.arange(1, T) >= 3) & (np.arange(1, T) < 5)  # targets after the prompt, before the completion
    ratio = np.where(dropped[None] & MASK[:, 1:], log_probs(VARS[0]) - log_probs(VARS[1]), 0.0).sum(-1)
    margin = "preference_kd/reward_margin"
    np.testing.assert_allclose(float(plain[margin]) - float(masked[margin]), beta * ratio.mean(), rtol=1e-4,
                               atol=1e-6)
    assert abs(beta * ratio.mean()) > 1e-3


def test_adpa_without_an_advantage_is_zero_and_dac_kl_unclipped_is_the_forward_kl():
    value, _ = loss_and_metrics(new_state(methods.adpa(prompt_length=3), teacher_vars=VARS[1], reference_vars=VARS[1]))
    assert float(value) == 0.0
    dac, metrics = loss_and_metrics(new_state(methods.dac_kl(lower=0.0, upper=1.0, span_weight=0.0)))
    forward_kl, _ = loss_and_metrics(new_state(methods.token_kd(divergence="forward_kl")))
    np.testing.assert_allclose(float(dac), float(forward_kl), rtol=1e-5)
    assert float(metrics["dac_kl/span"]) > 0.0  # spans exist in random bytes; they only weigh 0 here


def test_identifier_spans_are_runs_of_identifier_bytes():
    tokens = jnp.asarray([list(b"ab_1 (x)")], jnp.int32)
    spans = identifier_spans(tokens, jnp.ones(tokens.shape, bool))
    np.testing.assert_array_equal(spans, [[0, 0, 0, 0, -1, -1, 1, -1]])


def test_llava_mod_mimics_then_prefers_and_minillm_trains_in_the_step():
    state = new_state(methods.llava_mod(mimic_steps=1, prompt_length=3))
    step = jaxkd.make_train_step()
    state, first = step(state, BATCH)
    state, second = step(state, BATCH)
    assert float(first["mimic/weight"]) == 1.0 and float(first["preference/weight"]) == 0.0
    assert float(second["mimic/weight"]) == 0.0 and float(second["preference/weight"]) == 1.0
    mini = new_state(methods.parse("lm_ce + minillm(prompt_length=3)"))
    mini, metrics = step(mini, BATCH)
    assert np.isfinite(float(metrics["loss"])) and float(metrics["skipped"]) == 0.0


def test_taid_for_lms_at_t_1_is_the_token_cross_entropy_to_the_teacher():
    value, metrics = loss_and_metrics(new_state(methods.taid(total_steps=10, t_start=1.0, tokens=True)))
    x = {"tokens": BATCH["tokens"], "mask": BATCH["mask"]}
    zs = np.asarray(MODEL.apply(VARS[0], x, train=False).logits, np.float64)[:, :-1]
    zt = np.asarray(MODEL.apply(VARS[1], x, train=False).logits, np.float64)[:, :-1]
    log_s = zs - np.log(np.exp(zs - zs.max(-1, keepdims=True)).sum(-1, keepdims=True)) - zs.max(-1, keepdims=True)
    pt = np.exp(zt - zt.max(-1, keepdims=True))
    pt /= pt.sum(-1, keepdims=True)
    ce = -(pt * log_s).sum(-1)
    target_mask = MASK[:, 1:] & MASK[:, :-1]
    np.testing.assert_allclose(float(value), ce[target_mask].mean(), rtol=1e-5)
    assert float(metrics["taid/t"]) == 1.0
