"""Packed documents with segment ids train exactly like the same documents unpacked, one per row: the same
per-token logits, the same lm_ce / token_kd loss and gradient, the same global token count (the issue's
acceptance test for packing); completion-only loss masks count only completion targets."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxkd
from jaxkd import methods
from jaxkd.batch import (LOSS_MASK, MASK, POSITIONS, SEGMENT_IDS, TOKEN_NORMALIZER, TOKENS, batch_target_mask,
                         target_mask, token_normalizer)
from jaxkd.data import TextLoader, pack_documents
from jaxkd.methods.base import LossInputs
from jaxkd.methods.lm.tokens import lm_targets
from jaxkd.models import lm as lm_models
from jaxkd.participants import student, teacher

V, T = 64, 12
CFG = lm_models.LMConfig(vocab_size=V, d_model=16, num_layers=2, num_heads=2, d_ff=32, max_len=T)
MODEL = lm_models.lm(CFG)
rng = np.random.default_rng(0)
# Rows of 12: [3+2, 5+2], [1+2, 4+2, 1+2], [6+2, padding]: no document is cut (BOS = 1, EOS = 2, PAD = 0).
DOCS = [rng.integers(3, V, size=n) for n in (3, 5, 1, 4, 1, 6)]
PACKED_KEYS = (TOKENS, MASK, SEGMENT_IDS, POSITIONS)


def packed_batch():
    packed = pack_documents(DOCS, T, bos=1, eos=2, pad=0, segment_ids=True)
    return {**packed, TOKEN_NORMALIZER: token_normalizer(batch_target_mask(packed))}


def unpacked_batch():
    rows = [np.concatenate([[1], d, [2]]) for d in DOCS]
    tokens = np.zeros((len(rows), T), np.int32)
    mask = np.zeros((len(rows), T), bool)
    for i, r in enumerate(rows):
        tokens[i, : len(r)], mask[i, : len(r)] = r, True
    return {TOKENS: tokens, MASK: mask, TOKEN_NORMALIZER: token_normalizer(target_mask(mask))}


def document_slices(batch):
    """(row, start, stop) of every document of a packed batch, in order."""
    out = []
    for r, seg in enumerate(batch[SEGMENT_IDS]):
        for s in range(1, seg.max() + 1):
            where = np.flatnonzero(seg == s)
            out.append((r, where[0], where[-1] + 1))
    return out


VARS = [jaxkd.sharding.unbox(MODEL.init(jax.random.PRNGKey(i), {TOKENS: np.zeros((1, T), np.int32)}))
        for i in range(2)]


def loss_and_grad(method, batch, keys):
    parts = {"student": student(MODEL, VARS[0], input=keys), "teacher": teacher(MODEL, VARS[1], input=keys)}
    state = jaxkd.create(participants=parts, method=method, tx=optax.sgd(0.1), sample_batch=batch,
                         rng=jax.random.PRNGKey(0))
    x = {k: batch[k] for k in keys}

    def loss(student_params):
        variables = {"student": {**VARS[0], "params": student_params}, "teacher": VARS[1]}
        outputs = {name: MODEL.apply(v, x, train=False) for name, v in variables.items()}
        inputs = LossInputs(outputs=outputs, batch=batch, step=state.step, variables=variables,
                            participants=state.participants, label_key="label")
        return state.method.loss(state.method_vars, inputs, jax.random.PRNGKey(1))[0]

    return jax.jit(jax.value_and_grad(loss))(VARS[0]["params"])


def test_pack_documents_segment_ids_and_positions():
    packed = pack_documents([[5, 6], [7], [8, 9, 10]], 6, bos=1, eos=2, pad=0, segment_ids=True)
    np.testing.assert_array_equal(packed[TOKENS], [[1, 5, 6, 2, 1, 7], [2, 1, 8, 9, 10, 2]])
    np.testing.assert_array_equal(packed[SEGMENT_IDS], [[1, 1, 1, 1, 2, 2], [1, 2, 2, 2, 2, 2]])
    np.testing.assert_array_equal(packed[POSITIONS], [[0, 1, 2, 3, 0, 1], [0, 0, 1, 2, 3, 4]])
    # The EOS of a document predicts nothing; padding gets segment 0.
    np.testing.assert_array_equal(target_mask(packed[MASK], packed[SEGMENT_IDS]),
                                  [[1, 1, 1, 0, 1], [0, 1, 1, 1, 1]])
    padded = pack_documents([[5, 6, 7]], 4, bos=1, eos=2, pad=0, segment_ids=True)
    np.testing.assert_array_equal(padded[SEGMENT_IDS], [[1, 1, 1, 1], [1, 0, 0, 0]])
    assert set(pack_documents([[5]], 4)) == {TOKENS, MASK}


def test_packed_logits_equal_unpacked_logits_per_document():
    packed, unpacked = packed_batch(), unpacked_batch()
    assert packed[TOKENS].shape[0] < unpacked[TOKENS].shape[0]
    lp = MODEL.apply(VARS[0], {k: packed[k] for k in PACKED_KEYS}, train=False).logits
    lu = MODEL.apply(VARS[0], {TOKENS: unpacked[TOKENS], MASK: unpacked[MASK]}, train=False).logits
    # Positions derived from the segment ids when the input has none are the same.
    no_positions = {k: packed[k] for k in (TOKENS, MASK, SEGMENT_IDS)}
    np.testing.assert_array_equal(MODEL.apply(VARS[0], no_positions, train=False).logits, lp)
    slices = document_slices(packed)
    assert len(slices) == len(DOCS)
    worst = 0.0
    for i, (r, a, b) in enumerate(slices):
        worst = max(worst, float(jnp.max(jnp.abs(lp[r, a:b] - lu[i, : b - a]))))
    print(f"max |packed - unpacked| logits: {worst:.3g}")
    assert worst < 1e-5, worst
    # Without segment ids the packed logits differ (attention crosses documents).
    plain = MODEL.apply(VARS[0], {TOKENS: packed[TOKENS], MASK: packed[MASK]}, train=False).logits
    r, a, b = slices[1]
    assert float(jnp.max(jnp.abs(plain[r, a:b] - lu[1, : b - a]))) > 1e-3


def test_packed_losses_gradients_and_token_count_equal_unpacked():
    packed, unpacked = packed_batch(), unpacked_batch()
    count = int(target_mask(unpacked[MASK]).sum())
    assert count == sum(len(d) + 1 for d in DOCS) == 26
    assert int(batch_target_mask(packed).sum()) == count
    np.testing.assert_allclose([packed[TOKEN_NORMALIZER].sum(), unpacked[TOKEN_NORMALIZER].sum()], count, rtol=1e-6)
    assert int(lm_targets({k: jnp.asarray(v) for k, v in packed.items()})[1].sum()) == count
    for method in (methods.lm_ce(), methods.token_kd(divergence="forward_kl"),
                   methods.token_kd(divergence="reverse_kl", temperature=2.0)):
        vp, gp = loss_and_grad(method, packed, PACKED_KEYS)
        vu, gu = loss_and_grad(method, unpacked, (TOKENS, MASK))
        np.testing.assert_allclose(float(vp), float(vu), rtol=1e-5, atol=1e-6)
        diffs = jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), gp, gu))
        print(f"{method.name}: |loss diff| {abs(float(vp) - float(vu)):.3g}, max |grad diff| {max(diffs):.3g}")
        assert max(diffs) < 1e-5, max(diffs)


def test_a_train_step_on_packed_rows_split_in_micro_batches_equals_the_unpacked_step():
    method = methods.lm_ce() + methods.token_kd(divergence="forward_kl")

    def state(batch, keys):
        parts = {"student": student(MODEL, VARS[0], input=keys), "teacher": teacher(MODEL, VARS[1], input=keys)}
        return jaxkd.create(participants=parts, method=method, tx=optax.sgd(0.5), sample_batch=batch,
                            rng=jax.random.PRNGKey(0))

    packed, unpacked = packed_batch(), unpacked_batch()
    a, ma = jaxkd.make_train_step(microbatches=3)(state(packed, PACKED_KEYS), packed)
    b, mb = jaxkd.make_train_step()(state(unpacked, (TOKENS, MASK)), unpacked)
    np.testing.assert_allclose(float(ma["loss"]), float(mb["loss"]), rtol=1e-5)
    diffs = jax.tree.leaves(jax.tree.map(lambda x, y: float(np.max(np.abs(x - y))),
                                         jax.device_get(a.student.params), jax.device_get(b.student.params)))
    print(f"train step: |loss diff| {abs(float(ma['loss']) - float(mb['loss'])):.3g}, max |param diff| {max(diffs):.3g}")
    assert max(diffs) < 1e-5


def test_text_loader_passes_segment_ids_and_counts_within_documents():
    packed = pack_documents(DOCS, T, bos=1, eos=2, pad=0, segment_ids=True)
    n = packed[TOKENS].shape[0]
    loader = TextLoader(packed, batch_size=n + 1, shuffle=False, drop_remainder=False)
    batch = next(iter(loader))
    assert set(batch) >= {TOKENS, MASK, SEGMENT_IDS, POSITIONS, TOKEN_NORMALIZER}
    np.testing.assert_array_equal(batch[SEGMENT_IDS][:n], packed[SEGMENT_IDS])
    np.testing.assert_array_equal(batch[SEGMENT_IDS][n], 0)
    np.testing.assert_array_equal(batch[POSITIONS][:n], packed[POSITIONS])
    np.testing.assert_allclose(batch[TOKEN_NORMALIZER].sum(), sum(len(d) + 1 for d in DOCS), rtol=1e-6)
    loss_mask = np.ones_like(packed[MASK])
    loss_mask[:, :4] = False
    batch = next(iter(TextLoader(packed[TOKENS], packed[MASK], loss_mask=loss_mask, batch_size=n, shuffle=False)))
    expected = target_mask(packed[MASK], None, loss_mask).sum()
    np.testing.assert_allclose(batch[TOKEN_NORMALIZER].sum(), expected, rtol=1e-6)
    assert batch[LOSS_MASK].dtype == bool


# Completion-only loss: rows of prompt + completion, the prompt tokens never targets.
LOSS_TOKENS = rng.integers(3, V, size=(3, T)).astype(np.int32)
LOSS_ROW_MASK = np.arange(T)[None] < np.array([[12], [9], [7]])
PROMPT_LENGTHS = np.array([[5], [2], [4]])
COMPLETION = (np.arange(T)[None] >= PROMPT_LENGTHS) & LOSS_ROW_MASK


def completion_batch(loss_mask):
    batch = {TOKENS: LOSS_TOKENS, MASK: LOSS_ROW_MASK, LOSS_MASK: loss_mask}
    return {**batch, TOKEN_NORMALIZER: token_normalizer(batch_target_mask(batch))}


def log_softmax(x):
    x = np.asarray(x, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_loss_mask_counts_only_completion_targets():
    batch = completion_batch(COMPLETION)
    # Targets are tokens 1..len-1 of each row that are completion tokens: 12-5, 9-2, 7-4.
    np.testing.assert_array_equal(batch_target_mask(batch).sum(axis=1), [7, 7, 3])
    np.testing.assert_allclose(batch[TOKEN_NORMALIZER], np.full(3, 17 / 3), rtol=1e-6)
    _, mask, normalizer = lm_targets({k: jnp.asarray(v) for k, v in batch.items()})
    assert int(mask.sum()) == 17 and float(normalizer) == 17.0
    # Packing and a loss mask together: both apply.
    packed = pack_documents([[5, 6], [7]], 7, bos=1, eos=2, pad=0, segment_ids=True)
    loss_mask = np.array([[0, 0, 1, 1, 0, 1, 1]], bool)
    expected = [[0, 1, 1, 0, 1, 1]]
    np.testing.assert_array_equal(target_mask(packed[MASK], packed[SEGMENT_IDS], loss_mask), expected)
    np.testing.assert_array_equal(batch_target_mask({**packed, LOSS_MASK: loss_mask}), expected)


def test_completion_only_lm_ce_and_token_kd_against_numpy():
    batch = completion_batch(COMPLETION)
    x = {TOKENS: LOSS_TOKENS, MASK: LOSS_ROW_MASK}
    ls = log_softmax(MODEL.apply(VARS[0], x, train=False).logits)[:, :-1]
    lt = log_softmax(MODEL.apply(VARS[1], x, train=False).logits)[:, :-1]
    weights = (LOSS_ROW_MASK[:, 1:] & LOSS_ROW_MASK[:, :-1] & COMPLETION[:, 1:]).astype(np.float64)
    assert weights.sum() == 17
    nll = -np.take_along_axis(ls, LOSS_TOKENS[:, 1:, None], -1)[..., 0]
    forward_kl = (np.exp(lt) * (lt - ls)).sum(-1)
    for method, expected in ((methods.lm_ce(), (nll * weights).sum() / 17),
                             (methods.token_kd(divergence="forward_kl"), (forward_kl * weights).sum() / 17)):
        value, _ = loss_and_grad(method, batch, (TOKENS, MASK))
        np.testing.assert_allclose(float(value), expected, rtol=1e-5)


@pytest.mark.slow  # 15 s: packed = unpacked logits, losses and gradients stay in the suite (this file); the split of every token method; `pytest -m slow`
def test_every_token_method_splits_over_prompt_and_completion_targets():
    """For a per-token mean, L(all)·N(all) = L(completion)·N(completion) + L(prompt)·N(prompt): each method
    sums exactly the targets its loss mask leaves."""
    prompt = ~COMPLETION & LOSS_ROW_MASK
    n_all, n_completion = int(target_mask(LOSS_ROW_MASK).sum()), 17
    n_prompt = int(target_mask(LOSS_ROW_MASK, None, prompt).sum())
    assert n_all == n_completion + n_prompt == 25 and n_prompt == 8
    for method in (methods.lm_ce(), methods.token_kd(divergence="reverse_kl"),
                   methods.sparse_token_kd(k=4), methods.taid(total_steps=10, tokens=True),
                   methods.gkd(lmbda=0.0, prompt_length=2)):
        everything, _ = loss_and_grad(method, completion_batch(LOSS_ROW_MASK), (TOKENS, MASK))
        completion, _ = loss_and_grad(method, completion_batch(COMPLETION), (TOKENS, MASK))
        prompts, _ = loss_and_grad(method, completion_batch(prompt), (TOKENS, MASK))
        np.testing.assert_allclose(float(completion) * n_completion + float(prompts) * n_prompt,
                                   float(everything) * n_all, rtol=1e-5, err_msg=method.name)
        assert abs(float(completion) - float(everything)) > 1e-4, method.name
