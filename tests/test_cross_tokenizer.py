"""Cross-tokenizer distillation end to end: parallel rows of the same text under a byte tokenizer and a BPE
(jaxkd/data/text/cross_tokenizer.py), the ALM method (jaxkd/methods/lm/alm.py) against a NumPy reference from
log-softmax up, the cross-vocabulary check of jaxkd.create, and one jitted train step."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxkd
from jaxkd import methods
from jaxkd.data import ByteTokenizer
from jaxkd.data.text.bpe import train_bpe
from jaxkd.data.text.cross_tokenizer import (
    ALM_CHUNK_NORMALIZER_KEY,
    ParallelBatches,
    check_byte_counts,
    parallel_rows,
    window_bounds,
)
from jaxkd.methods.base import LossInputs, MethodVars
from jaxkd.models import lm as lm_models
from jaxkd.models.base import Outputs
from tests.test_alm import np_alm

TEXTS = [
    "def area(r):\n    return 3.14159 * r * r\n",
    "import os\nprint(os.path.join('a', 'b'))  # café → ok\n",
    "",
    "class Point:\n    def __init__(self, x, y):\n        self.x, self.y = x, y\n",
]
BYTES = ByteTokenizer()
BPE = train_bpe(TEXTS * 4, 300)
TT, TS = 12, 7  # teacher rows: BOS + up to 11 bytes; student rows: BOS + up to 6 BPE tokens
DATA = parallel_rows([(f"f{i}.py", t) for i, t in enumerate(TEXTS)], BYTES, BPE, teacher_len=TT, student_len=TS)


# ----- parallel rows -----


def test_rows_hold_the_same_text_under_both_tokenizers_and_tile_each_document():
    assert BPE.vocab_size > 259 and len(DATA) > len(TEXTS)
    assert DATA.tokens.shape == (len(DATA), TT) and DATA.student_tokens.shape == (len(DATA), TS)
    assert DATA.num_documents == 4 and DATA.paths == ("f0.py", "f1.py", "f2.py", "f3.py")
    assert np.all(DATA.tokens[:, 0] == BYTES.bos_id) and np.all(DATA.student_tokens[:, 0] == BPE.bos_id)
    windows = {}
    for i in range(len(DATA)):
        t = DATA.tokens[i][DATA.mask[i]]
        s = DATA.student_tokens[i][DATA.student_mask[i]]
        assert BYTES.decode(t) == BPE.decode(s) and len(BYTES.decode(t)) == DATA.row_bytes[i] > 0
        # Masks are a prefix; padding is PAD.
        for tokens, mask, pad in ((DATA.tokens[i], DATA.mask[i], BYTES.pad_id),
                                  (DATA.student_tokens[i], DATA.student_mask[i], BPE.pad_id)):
            n = mask.sum()
            assert mask[:n].all() and not mask[n:].any() and np.all(tokens[n:] == pad)
        windows.setdefault(int(DATA.row_documents[i]), []).append(BYTES.decode(t))
    for d, text in enumerate(TEXTS):
        assert b"".join(windows.get(d, [])) == text.encode()
        if text:
            # The student rows are the document's own BPE tokens, cut into windows (no re-tokenization).
            rows = np.flatnonzero(DATA.row_documents == d)
            got = np.concatenate([DATA.student_tokens[r][1:DATA.student_mask[r].sum()] for r in rows])
            np.testing.assert_array_equal(got, BPE.encode(text))
    # Some windows are cut by the student's budget (6 tokens), others by the teacher's (11 bytes).
    s_len = DATA.student_mask.sum(1) - 1
    assert np.any(s_len == TS - 1) and np.any(DATA.row_bytes == TT - 1)
    assert check_byte_counts(DATA, BYTES, BPE) == DATA.num_byte_targets == sum(len(t.encode()) for t in TEXTS)


def target_bytes(tokenizer, tokens, mask, j):
    """The bytes of target j (token j + 1) of a row, or None when it is not a target."""
    if not (mask[j] and mask[j + 1]):
        return None
    return tokenizer.token_bytes(int(tokens[j + 1]))


def test_chunk_ids_of_the_targets_cover_the_same_bytes_on_both_sides():
    assert DATA.alm_teacher_chunks.shape == (len(DATA), TT - 1)
    assert DATA.alm_student_chunks.shape == (len(DATA), TS - 1)
    assert DATA.alm_chunk_mask.shape == (len(DATA), min(TT, TS) - 1)
    for i in range(len(DATA)):
        t_tok, t_mask, s_tok, s_mask = DATA.tokens[i], DATA.mask[i], DATA.student_tokens[i], DATA.student_mask[i]
        t_bytes = [target_bytes(BYTES, t_tok, t_mask, j) for j in range(TT - 1)]
        s_bytes = [target_bytes(BPE, s_tok, s_mask, j) for j in range(TS - 1)]
        # A byte-level teacher: every student target is its own chunk, holding the teacher's bytes of it.
        num = int(DATA.alm_chunk_mask[i].sum())
        assert num == sum(b is not None for b in s_bytes)
        assert not DATA.alm_chunk_mask[i, num:].any()
        for j in range(TS - 1):
            assert (DATA.alm_student_chunks[i, j] >= 0) == (s_bytes[j] is not None)
            assert (DATA.alm_student_chunks[i, j] == j) == (s_bytes[j] is not None)
        for j in range(TT - 1):
            assert (DATA.alm_teacher_chunks[i, j] >= 0) == (t_bytes[j] is not None)
        text_of = lambda ids, pieces, c: b"".join(p for k, p in zip(ids, pieces) if k == c)  # noqa: E731
        for c in range(num):
            t_members = np.flatnonzero(DATA.alm_teacher_chunks[i] == c)
            assert np.all(np.diff(t_members) == 1)  # contiguous targets
            assert text_of(DATA.alm_teacher_chunks[i], t_bytes, c) == text_of(DATA.alm_student_chunks[i], s_bytes, c)
            assert text_of(DATA.alm_teacher_chunks[i], t_bytes, c)


def test_two_subword_tokenizers_chunk_at_common_boundaries_and_windows_need_one():
    # A BPE teacher with more merges than the student: chunks may hold several tokens on both sides.
    big = train_bpe(TEXTS * 4, 330)
    data = parallel_rows(TEXTS, big, BPE, teacher_len=8, student_len=8)
    for i in range(len(data)):
        assert big.decode(data.tokens[i][data.mask[i]]) == BPE.decode(data.student_tokens[i][data.student_mask[i]])
        for c in np.flatnonzero(data.alm_chunk_mask[i]):
            t = b"".join(big.token_bytes(int(x)) for x in data.tokens[i, 1:][data.alm_teacher_chunks[i] == c])
            s = b"".join(BPE.token_bytes(int(x)) for x in data.student_tokens[i, 1:][data.alm_student_chunks[i] == c])
            assert t == s and t
    # Token ends 2, 4, 6 and 3, 6: one token per side never reaches a common boundary.
    assert window_bounds([2, 4, 6], [3, 6], max_teacher_tokens=3, max_student_tokens=2, text_length=6) == [
        (0, 6, 0, 3, 0, 2)]
    with pytest.raises(ValueError, match="no window starting at byte 0 fits 1 teacher and 1 student tokens"):
        window_bounds([2, 4, 6], [3, 6], max_teacher_tokens=1, max_student_tokens=1, text_length=6)
    with pytest.raises(ValueError, match="student_len"):
        parallel_rows(TEXTS, BYTES, BPE, teacher_len=8, student_len=1)
    first = parallel_rows(TEXTS, BYTES, BPE, teacher_len=TT, student_len=TS, max_rows=3)
    np.testing.assert_array_equal(first.student_tokens, DATA.student_tokens[:3])


def test_batches_are_deterministic_and_carry_the_global_counts():
    loader = ParallelBatches(DATA, batch_size=3, seed=5)
    first = next(loader)
    again = ParallelBatches(DATA, batch_size=3, seed=5).batch(0, 0)
    for k in first:
        np.testing.assert_array_equal(first[k], again[k])
    rows = np.random.default_rng([5, 0, 0]).permutation(len(DATA))[:3]
    np.testing.assert_array_equal(first["student_tokens"], DATA.student_tokens[rows])
    np.testing.assert_allclose(first[ALM_CHUNK_NORMALIZER_KEY].sum(), DATA.alm_chunk_mask[rows].sum(), rtol=1e-6)
    loader.seek((2, 1))
    np.testing.assert_array_equal(next(loader)["tokens"], ParallelBatches(DATA, batch_size=3, seed=5).batch(2, 1)["tokens"])


# ----- the method -----


def log_softmax_np(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def loss_case(seed=0, rows=slice(0, 3)):
    batch = ParallelBatches(DATA, batch_size=len(DATA), shuffle=False).batch(0, 0)
    batch = {k: v[rows] for k, v in batch.items() if k != ALM_CHUNK_NORMALIZER_KEY and k != "token_normalizer"}
    rng = np.random.default_rng(seed)
    b = batch["tokens"].shape[0]
    zs = rng.normal(size=(b, TS, BPE.vocab_size)).astype(np.float32)
    zt = (2 * rng.normal(size=(b, TT, BYTES.vocab_size))).astype(np.float32)
    return batch, zs, zt


def inputs_of(zs, zt, batch):
    outputs = {"student": Outputs(jnp.asarray(zs), {}, {}), "teacher": Outputs(jnp.asarray(zt), {}, {})}
    return LossInputs(outputs=outputs, batch=batch, step=jnp.zeros((), jnp.int32))


def jitted_loss(method):
    """``(zs, zt, batch) -> (loss, metrics)`` of ``method``, compiled (one trace per shape)."""
    def f(zs, zt, batch):
        value, aux = method.loss(MethodVars(), inputs_of(zs, zt, batch), jax.random.PRNGKey(0))
        return value, aux.metrics
    return jax.jit(f)


def reference_token_log_probs(z, tokens, mask):
    """log p(token t + 1 | ≤ t) from NumPy's log-softmax, 0 where there is no target."""
    lp = log_softmax_np(z.astype(np.float64))
    out = np.zeros(tokens[:, 1:].shape)
    for i in range(tokens.shape[0]):
        for t in range(tokens.shape[1] - 1):
            if mask[i, t] and mask[i, t + 1]:
                out[i, t] = lp[i, t, tokens[i, t + 1]]
    return out


@pytest.mark.parametrize("divergence,temperature", [("binary_kl", 1.0), ("binary_ce", 100.0)])
def test_alm_method_is_alm_of_the_models_target_log_probs(divergence, temperature):
    batch, zs, zt = loss_case()
    ls = reference_token_log_probs(zs, batch["student_tokens"], batch["student_mask"])
    lt = reference_token_log_probs(zt, batch["tokens"], batch["mask"])
    want = np_alm(ls, lt, batch["alm_student_chunks"], batch["alm_teacher_chunks"], batch["alm_chunk_mask"],
                  temperature, divergence)[batch["alm_chunk_mask"]].mean()
    method = methods.alm(temperature=temperature, divergence=divergence)
    got, metrics = jitted_loss(method)(zs, zt, batch)
    np.testing.assert_allclose(float(got), want, rtol=5e-4 if temperature == 100.0 else 2e-5)
    assert float(metrics["chunks"]) == batch["alm_chunk_mask"].sum()
    # Each byte-level chunk of the teacher is a student token: the chunk NLLs are the targets' sums.
    np.testing.assert_allclose(float(metrics["student_chunk_nll"]), -ls.sum() / batch["alm_chunk_mask"].sum(),
                               rtol=1e-5)
    assert method.needs.cross_vocabulary and "student_tokens" in method.needs.batch_keys


def test_alm_method_accumulates_exactly_with_the_chunk_normalizer_and_ignores_padding():
    batch, zs, zt = loss_case(1, rows=slice(0, 4))
    loss = jitted_loss(methods.alm(temperature=2.0))
    full, _ = loss(zs, zt, batch)
    share = np.full(4, batch["alm_chunk_mask"].sum() / 4, np.float32)
    # The train step averages its micro-batches' losses: each divides by its share of the global count.
    halves = 0.0
    for part in (slice(0, 2), slice(2, 4)):
        sub = {**{k: v[part] for k, v in batch.items()}, ALM_CHUNK_NORMALIZER_KEY: share[part]}
        value, _ = loss(zs[part], zt[part], sub)
        halves += float(value) / 2
    np.testing.assert_allclose(halves, float(full), rtol=1e-5)
    # Logits at padded positions (and at the last position, which has no target) do not matter.
    zs2, zt2 = zs.copy(), zt.copy()
    zs2[~batch["student_mask"]] = 50.0
    zt2[~batch["mask"]] = -50.0
    zs2[:, -1], zt2[:, -1] = 7.0, 7.0
    again, _ = loss(zs2, zt2, batch)
    np.testing.assert_allclose(float(again), float(full), rtol=1e-6)
    with pytest.raises(ValueError, match="temperature"):
        methods.alm(temperature=0.0)
    with pytest.raises(ValueError, match="divergence"):
        methods.alm(divergence="kl")


# ----- through the train state -----

# max_len=TT: long enough for the teacher's rows, so a student misconfigured to read them reaches alm's check.
STUDENT_CFG = lm_models.LMConfig(vocab_size=BPE.vocab_size, d_model=16, num_layers=1, num_heads=2, d_ff=32, max_len=TT)
TEACHER_CFG = lm_models.LMConfig(vocab_size=BYTES.vocab_size, d_model=16, num_layers=1, num_heads=2, d_ff=32,
                                 max_len=TT)
TEACHER_MODEL = lm_models.lm(TEACHER_CFG)
BATCH = ParallelBatches(DATA, batch_size=4, seed=0).batch(0, 0)
TEACHER_VARS = jaxkd.sharding.unbox(TEACHER_MODEL.init(jax.random.PRNGKey(3), {"tokens": BATCH["tokens"]}))
STUDENT_CE = "lm_ce(tokens_key='student_tokens', mask_key='student_mask')"


def new_state(spec, student_input=methods.student_input):
    parts = {"student": jaxkd.participants.student(lm_models.lm(STUDENT_CFG), input=student_input),
             "teacher": jaxkd.participants.teacher(TEACHER_MODEL, TEACHER_VARS, input=("tokens", "mask"))}
    return jaxkd.create(participants=parts, method=methods.parse(spec), tx=optax.adam(1e-2), sample_batch=BATCH,
                        rng=jax.random.PRNGKey(0))


def test_create_accepts_other_vocabularies_only_with_a_cross_vocabulary_method():
    with pytest.raises(ValueError, match=f"student has {BPE.vocab_size} outputs, 'teacher' has {BYTES.vocab_size}"):
        new_state(STUDENT_CE + " + token_kd()")
    # A student that reads the teacher's tokens is refused by alm (its logits are not its tokens' length).
    with pytest.raises(ValueError, match="must read its own tokenization"):
        new_state("alm()", student_input=("tokens", "mask"))


def test_one_jitted_train_step_of_lm_ce_plus_alm_plus_uld():
    state = new_state(STUDENT_CE + " + alm(temperature=1.0) + uld()")
    before = jax.device_get(state.student.params)
    state, metrics = jaxkd.make_train_step()(state, BATCH)
    assert int(state.step) == 1
    assert np.isfinite(float(metrics["loss"])) and float(metrics["alm"]) > 0 and float(metrics["lm_ce"]) > 0
    assert float(metrics["uld"]) > 0  # its value: tests/test_uld.py
    np.testing.assert_allclose(float(metrics["loss"]),
                               float(metrics["alm"]) + float(metrics["lm_ce"]) + float(metrics["uld"]), rtol=1e-5)
    assert float(metrics["alm/chunks"]) == float(metrics["uld/groups"]) == BATCH["alm_chunk_mask"].sum()
    changed = jax.tree.leaves(jax.tree.map(lambda a, b: not np.array_equal(a, b), before,
                                           jax.device_get(state.student.params)))
    assert any(changed)


def test_cached_teacher_log_probs_give_the_live_loss_without_a_teacher():
    cache = methods.cache_teacher_log_probs(TEACHER_MODEL, TEACHER_VARS, DATA.tokens, DATA.mask, batch_size=4)
    assert cache.shape == (len(DATA), TT - 1) and len(DATA) % 4  # the last batch is padded
    batch = ParallelBatches(DATA, batch_size=4, seed=0, extra={"alm_teacher_log_probs": cache}).batch(0, 0)
    zt = np.asarray(TEACHER_MODEL.apply(TEACHER_VARS, {"tokens": batch["tokens"], "mask": batch["mask"]},
                                        train=False).logits)
    np.testing.assert_allclose(batch["alm_teacher_log_probs"],
                               reference_token_log_probs(zt, batch["tokens"], batch["mask"]), rtol=1e-5, atol=1e-5)
    zs = np.random.default_rng(2).normal(size=(4, TS, BPE.vocab_size)).astype(np.float32)
    live, _ = jitted_loss(methods.alm(temperature=3.0))(zs, zt, batch)
    method = methods.alm(temperature=3.0, cached=True)
    cached, _ = jitted_loss(method)(zs, np.zeros_like(zt), batch)  # the teacher's logits are not read
    np.testing.assert_allclose(float(cached), float(live), rtol=1e-5)
    assert method.needs.participants == () and "tokens" not in method.needs.batch_keys
    assert "alm_teacher_log_probs" in method.needs.batch_keys
