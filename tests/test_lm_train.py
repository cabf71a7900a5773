"""Language-model distillation through the train state: next-token alignment, global token normalization
under gradient accumulation, padding, vocabulary checks, on-policy GKD inside the step, the fused loss."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxkd
from jaxkd import methods
from jaxkd.losses.tokens import TOKEN_NORMALIZER_KEY, normalizer_key_of, token_normalizer
from jaxkd.methods.base import LossInputs, MethodVars
from jaxkd.models import lm as lm_models
from jaxkd.models.base import Outputs
from jaxkd.models.vocab import truncate_vocab
from jaxkd.participants import student, teacher

V, B, T = 13, 4, 8
STUDENT_CFG = lm_models.LMConfig(vocab_size=V, d_model=16, num_layers=1, num_heads=2, d_ff=32, max_len=T)
TEACHER_CFG = lm_models.LMConfig(vocab_size=V, d_model=32, num_layers=1, num_heads=2, d_ff=48, max_len=T,
                                 tie_embeddings=False)
KEYS = ("tokens", "mask")


def lm_batch(seed=0, lengths=(8, 3, 6, 1)):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, V, size=(B, T)).astype(np.int32)
    mask = np.arange(T)[None, :] < np.asarray(lengths)[:, None]
    batch = {"tokens": tokens, "mask": mask}
    return {**batch, TOKEN_NORMALIZER_KEY: token_normalizer(mask[:, 1:] & mask[:, :-1])}


BATCH = lm_batch()
TEACHER_MODEL = lm_models.lm(TEACHER_CFG)
TEACHER_VARS = jaxkd.sharding.unbox(TEACHER_MODEL.init(jax.random.PRNGKey(7), {"tokens": BATCH["tokens"]}))


def new_state(method, *, teacher_model=TEACHER_MODEL, tx=optax.sgd(0.5), **kwargs):
    parts = {"student": student(lm_models.lm(STUDENT_CFG), input=KEYS),
             "teacher": teacher(teacher_model, TEACHER_VARS, input=KEYS)}
    return jaxkd.create(participants=parts, method=method, tx=tx, sample_batch=BATCH, rng=jax.random.PRNGKey(0),
                        **kwargs)


def inputs_of(student_logits, teacher_logits, batch):
    outputs = {"student": Outputs(student_logits, {}, {}), "teacher": Outputs(teacher_logits, {}, {})}
    return LossInputs(outputs=outputs, batch=batch, step=jnp.zeros((), jnp.int32), variables={}, participants=(),
                      label_key="label")


def log_softmax_np(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_lm_ce_and_token_kd_score_position_t_against_token_t_plus_1():
    rng = np.random.default_rng(1)
    zs, zt = rng.normal(size=(2, B, T, V)).astype(np.float32)
    batch = lm_batch(1)
    tokens, mask = batch["tokens"], batch["mask"]
    ls, lt = log_softmax_np(zs.astype(np.float64)), log_softmax_np(zt.astype(np.float64))
    ce_terms, kd_terms = [], []
    for b in range(B):
        for t in range(T - 1):
            if mask[b, t] and mask[b, t + 1]:  # the input at t and the target at t + 1 are real
                ce_terms.append(-ls[b, t, tokens[b, t + 1]])
                kd_terms.append(np.sum(np.exp(lt[b, t]) * (lt[b, t] - ls[b, t])))
    inputs = inputs_of(jnp.asarray(zs), jnp.asarray(zt), batch)
    ce, _ = methods.lm_ce().loss(MethodVars(), inputs, jax.random.PRNGKey(0))
    kd, _ = methods.token_kd().loss(MethodVars(), inputs, jax.random.PRNGKey(0))
    np.testing.assert_allclose(float(ce), np.mean(ce_terms), rtol=1e-5)
    np.testing.assert_allclose(float(kd), np.mean(kd_terms), rtol=1e-5)


def test_gradient_accumulation_normalizes_by_the_global_token_count():
    # Micro-batches of rows {0, 2} and {1, 3} hold 7 + 5 and 2 + 0 targets: the mean of their means is not
    # the batch mean; the token normalizer makes the accumulated update the unsplit one.
    method = methods.lm_ce() + methods.token_kd(divergence="reverse_kl")
    whole, m1 = jaxkd.make_train_step()(new_state(method), BATCH)
    split, m2 = jaxkd.make_train_step(microbatches=2)(new_state(method), BATCH)
    np.testing.assert_allclose(float(m1["loss"]), float(m2["loss"]), rtol=1e-5)
    chex.assert_trees_all_close(jax.device_get(whole.student.params), jax.device_get(split.student.params),
                                rtol=1e-5, atol=1e-6)
    # Without the normalizer each micro-batch is its own mean: a different (wrong) update.
    plain = {k: v for k, v in BATCH.items() if k != TOKEN_NORMALIZER_KEY}
    biased, m3 = jaxkd.make_train_step(microbatches=2)(new_state(method), plain)
    assert abs(float(m3["loss"]) - float(m1["loss"])) > 1e-3



def test_a_second_tokenization_is_normalized_by_its_own_global_count():
    # A student with its own tokenizer reads "student_tokens"; its cross-entropy divides by that
    # tokenization's count ("student_token_normalizer"): micro-batches {0, 2} and {1, 3} hold 1 + 0 and
    # 7 + 4 student targets, and the accumulated update is still the unsplit one.
    second = lm_batch(3, lengths=(2, 8, 1, 5))
    key = normalizer_key_of("student_tokens")
    assert key == "student_token_normalizer"
    batch = {**BATCH, "student_tokens": second["tokens"], "student_mask": second["mask"],
             key: second[TOKEN_NORMALIZER_KEY]}
    method = methods.lm_ce(tokens_key="student_tokens", mask_key="student_mask")

    def fresh():
        parts = {"student": student(lm_models.lm(STUDENT_CFG), input=methods.student_input)}
        return jaxkd.create(participants=parts, method=method, tx=optax.sgd(0.5), sample_batch=batch,
                            rng=jax.random.PRNGKey(0))

    whole, m1 = jaxkd.make_train_step()(fresh(), batch)
    split, m2 = jaxkd.make_train_step(microbatches=2)(fresh(), batch)
    np.testing.assert_allclose(float(m1["loss"]), float(m2["loss"]), rtol=1e-5)
    chex.assert_trees_all_close(jax.device_get(whole.student.params), jax.device_get(split.student.params),
                                rtol=1e-5, atol=1e-6)
    # The teacher tokens' count (BATCH's 7 + 2 + 5 + 0) is not the student's: using it would be wrong,
    # and so would each micro-batch's own mean.
    for wrong in ({**batch, key: BATCH[TOKEN_NORMALIZER_KEY]}, {k: v for k, v in batch.items() if k != key}):
        _, m3 = jaxkd.make_train_step(microbatches=2)(fresh(), wrong)
        assert abs(float(m3["loss"]) - float(m1["loss"])) > 1e-3

def test_padded_positions_change_nothing_and_an_all_padded_batch_is_zero():
    method = methods.lm_ce() + methods.token_kd(divergence="generalized_jsd", beta=0.3)
    state = new_state(method)
    grad = jax.jit(lambda s, b: jax.grad(lambda p: _loss(s, p, b))(s.student.params))
    other = dict(BATCH, tokens=np.where(BATCH["mask"], BATCH["tokens"], (BATCH["tokens"] + 5) % V).astype(np.int32))
    chex.assert_trees_all_close(grad(state, BATCH), grad(state, other), rtol=1e-6, atol=1e-7)
    empty = dict(BATCH, mask=np.zeros_like(BATCH["mask"]), **{TOKEN_NORMALIZER_KEY: np.zeros(B, np.float32)})
    state, metrics = jaxkd.make_train_step()(state, empty)
    assert float(metrics["loss"]) == 0.0 and float(metrics["skipped"]) == 0.0
    assert float(metrics["grad_norm"]) == 0.0


def _loss(state, params, batch):
    s = state.participant("student")
    t = state.participant("teacher")
    x = {"tokens": batch["tokens"], "mask": batch["mask"]}
    outputs = {"student": s.model.apply({"params": params}, x, train=True),
               "teacher": t.model.apply(state.teacher.variables(), x, train=False)}
    inputs = LossInputs(outputs=outputs, batch=batch, step=state.step, variables={}, participants=state.participants,
                        label_key="label")
    return state.method_def.loss(state.method, inputs, jax.random.PRNGKey(0))[0]


def test_vocabularies_of_different_sizes_need_an_explicit_truncation():
    padded_cfg = lm_models.LMConfig(**{**TEACHER_CFG.__dict__, "vocab_size": V + 3})
    padded = lm_models.lm(padded_cfg)
    padded_vars = jaxkd.sharding.unbox(padded.init(jax.random.PRNGKey(3), {"tokens": BATCH["tokens"]}))
    parts = lambda model: {"student": student(lm_models.lm(STUDENT_CFG), input=KEYS),
                           "teacher": teacher(model, padded_vars, input=KEYS)}
    with pytest.raises(ValueError, match=f"student has {V} outputs, 'teacher' has {V + 3}.*truncate_vocab"):
        jaxkd.create(participants=parts(padded), method=methods.token_kd(), tx=optax.sgd(0.1), sample_batch=BATCH,
                     rng=jax.random.PRNGKey(0))
    cut = truncate_vocab(padded, V)
    state = jaxkd.create(participants=parts(cut), method=methods.token_kd(fused=True), tx=optax.sgd(0.1),
                         sample_batch=BATCH, rng=jax.random.PRNGKey(0))
    full = padded.apply(padded_vars, {"tokens": BATCH["tokens"]}, train=False).logits
    np.testing.assert_array_equal(cut.apply(padded_vars, {"tokens": BATCH["tokens"]}, train=False).logits, full[..., :V])
    _, metrics = jaxkd.make_train_step()(state, BATCH)
    assert np.isfinite(float(metrics["loss"]))
    with pytest.raises(ValueError, match=f"only {V + 3} outputs"):
        truncate_vocab(padded, V + 4).apply(padded_vars, {"tokens": BATCH["tokens"]}, train=False)


def test_fused_token_kd_equals_the_logits_path_in_the_train_step():
    # Every divergence of the fused loss is checked against the naive one in tests/test_fused_linear.py.
    for divergence in ("skew_reverse_kl",):
        plain, m1 = jaxkd.make_train_step()(new_state(methods.token_kd(divergence=divergence)), BATCH)
        fused, m2 = jaxkd.make_train_step()(
            new_state(methods.token_kd(divergence=divergence, fused=True, chunk_size=5)), BATCH)
        np.testing.assert_allclose(float(m1["loss"]), float(m2["loss"]), rtol=1e-5)
        chex.assert_trees_all_close(jax.device_get(plain.student.params), jax.device_get(fused.student.params),
                                    rtol=1e-5, atol=1e-6)


def test_gkd_with_lambda_0_is_supervised_token_kd_and_samples_inside_the_step():
    supervised, m1 = jaxkd.make_train_step()(
        new_state(methods.token_kd(divergence="generalized_jsd", beta=0.5)), BATCH)
    gkd0, m2 = jaxkd.make_train_step()(new_state(methods.gkd(lmbda=0.0, beta=0.5)), BATCH)
    np.testing.assert_allclose(float(m1["loss"]), float(m2["loss"]), rtol=1e-6)
    chex.assert_trees_all_close(jax.device_get(supervised.student.params), jax.device_get(gkd0.student.params))
    on_policy = new_state(methods.gkd(lmbda=0.5, beta=1.0, prompt_length=3))
    step = jaxkd.make_train_step()
    on_policy, metrics = step(on_policy, BATCH)
    on_policy, metrics2 = step(on_policy, BATCH)  # a new key: other samples, same compiled step
    assert float(metrics["gkd/generated_fraction"]) == 0.5
    assert np.isfinite(float(metrics["loss"])) and float(metrics["loss"]) != float(metrics2["loss"])


def test_the_offline_top_k_cache_reproduces_the_live_teacher_run(tmp_path):
    from jaxkd.data.teacher_cache import cache_teacher_topk

    cache = cache_teacher_topk(tmp_path / "topk.array_record", TEACHER_MODEL, TEACHER_VARS, BATCH["tokens"],
                               BATCH["mask"], k=6, batch_size=3)
    cached_batch = {**BATCH, **cache.batch(np.arange(B))}
    live, m1 = jaxkd.make_train_step()(new_state(methods.sparse_token_kd(k=4)), BATCH)
    parts = {"student": student(lm_models.lm(STUDENT_CFG), input=KEYS)}  # no teacher at all
    state = jaxkd.create(participants=parts, method=methods.sparse_token_kd(k=4, cached=True), tx=optax.sgd(0.5),
                         sample_batch=cached_batch, rng=jax.random.PRNGKey(0))
    cached, m2 = jaxkd.make_train_step()(state, cached_batch)
    np.testing.assert_allclose(float(m1["loss"]), float(m2["loss"]), rtol=1e-6)
    chex.assert_trees_all_close(jax.device_get(live.student.params), jax.device_get(cached.student.params),
                                rtol=1e-6, atol=1e-7)
