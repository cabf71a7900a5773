"""ULD (jaxkd/losses/lm/uld.py, jaxkd/methods/lm/uld.py) against TRL's GOLD ``ULDLoss``
(trl/experimental/gold/gold_trainer.py, trl 1.16.0) on the same random logits, tokens and byte offsets:
both merge strategies, plain and hybrid (matched vocabulary: generalized JSD; the rest: sorted L1), trailing
zero-width EOS; the alignment against GOLD's ``_align_by_byte_offsets`` and against ALM's chunks on tiling
texts; gradients against float64 central finite differences; the method on ALM's parallel rows (trained beside ALM in
tests/test_cross_tokenizer.py)."""

import os
import types

import jax
import numpy as np
import pytest

from jaxkd import losses, methods
from tests.test_loss_contract import central_differences

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
import torch  # noqa: E402  (dev extra: the reference implementation only)
from trl.experimental.gold.gold_trainer import ULDLoss  # noqa: E402

VS, VT = 11, 13
STUDENT_VOCAB = {f"s{i}": i for i in range(VS)}
# Teacher tokens 2, 5, 6, 9, 12 share their string with student tokens 7, 0, 3, 10, 4.
TEACHER_VOCAB = {f"t{i}": i for i in range(VT)}
for t_id, s_id in ((2, 7), (5, 0), (6, 3), (9, 10), (12, 4)):
    TEACHER_VOCAB.pop(f"t{t_id}")
    TEACHER_VOCAB[f"s{s_id}"] = t_id


def split(rng, n_bytes, max_piece):
    """Random (start, end) spans tiling [0, n_bytes)."""
    spans, start = [], 0
    while start < n_bytes:
        end = min(n_bytes, start + int(rng.integers(1, max_piece + 1)))
        spans.append((start, end))
        start = end
    return spans


def gold_case(seed=0, batch=3, teacher_eos=True, max_bytes=8):
    """Rows ``prompt + completion (+ zero-width EOS on the teacher)`` under two random tokenizations of the same
    completion bytes, right-padded; TRL's ``labels`` (-100 off the completion) and completion-relative offsets."""
    rng = np.random.default_rng(seed)
    rows = []
    for b in range(batch):
        n_bytes = int(rng.integers(3, max_bytes + 1))
        s_spans, t_spans = split(rng, n_bytes, 3), split(rng, n_bytes, 2)
        if teacher_eos:
            t_spans.append((n_bytes, n_bytes))
        rows.append((1 + b % 2, s_spans, 2 - b % 2, t_spans))
    ts = max(p + len(s) for p, s, _, _ in rows) + 1
    tt = max(p + len(t) for _, _, p, t in rows) + 1

    def side(which, length, vocab):
        ids = rng.integers(0, vocab, size=(batch, length)).astype(np.int64)
        labels = np.full((batch, length), -100, np.int64)
        offsets = np.zeros((batch, length, 2), np.int64)
        for b, row in enumerate(rows):
            prompt, spans = row[2 * which], row[2 * which + 1]
            labels[b, prompt:prompt + len(spans)] = ids[b, prompt:prompt + len(spans)]
            offsets[b, prompt:prompt + len(spans)] = spans
        return ids, labels, offsets

    s_ids, s_labels, s_off = side(0, ts, VS)
    t_ids, t_labels, t_off = side(1, tt, VT)
    zs = (2.0 * rng.normal(size=(batch, ts, VS))).astype(np.float32)
    zt = (2.0 * rng.normal(size=(batch, tt, VT))).astype(np.float32)
    return dict(zs=zs, zt=zt, s_ids=s_ids, t_ids=t_ids, s_labels=s_labels, t_labels=t_labels, s_off=s_off,
                t_off=t_off)


def trl_uld(case, *, merge, hybrid=False, weights=(None, None), beta=0.5, temperatures=(1.0, 1.0), extended=True,
            skip_eos=False):
    config = types.SimpleNamespace(
        uld_crossentropy_weight=0.0, uld_distillation_weight=1.0, uld_student_temperature=temperatures[0],
        uld_teacher_temperature=temperatures[1], uld_skip_student_eos=skip_eos, uld_skip_teacher_eos=skip_eos,
        use_extended_uld=extended, uld_token_merge_strategy=merge, uld_use_hybrid_loss=hybrid,
        uld_hybrid_matched_weight=weights[0], uld_hybrid_unmatched_weight=weights[1], beta=beta)
    vocab = lambda v: types.SimpleNamespace(get_vocab=lambda: v)  # noqa: E731
    loss = ULDLoss(config, student_tokenizer=vocab(STUDENT_VOCAB), teacher_tokenizer=vocab(TEACHER_VOCAB))
    t = lambda k: torch.from_numpy(case[k])  # noqa: E731
    return float(loss(t("zs"), t("zt"), t("s_labels"), t("t_labels"), t("s_ids"), t("t_ids"),
                      student_byte_offsets=t("s_off"), teacher_byte_offsets=t("t_off")))


def without_last(mask):
    """``mask`` without each row's last True entry (TRL's ``uld_skip_*_eos``: the answer's last token)."""
    last = mask.shape[1] - 1 - np.argmax(mask[:, ::-1], axis=1)
    out = mask.copy()
    out[np.arange(len(mask))[mask.any(1)], last[mask.any(1)]] = False
    return out


def jaxkd_arrays(case, merge, skip_eos=False):
    """The loss's inputs in the next-token coordinates (targets ``tokens[:, 1:]``): the groups of the
    completion targets; ``"bayesian"`` reads ``logits[:, :-1]``, ``"observed"`` ``logits[:, 1:]``."""
    s_mask, t_mask = case["s_labels"][:, 1:] != -100, case["t_labels"][:, 1:] != -100
    if skip_eos:
        s_mask, t_mask = without_last(s_mask), without_last(t_mask)
    s_group, t_group, group_mask = losses.uld_alignment(case["s_off"][:, 1:], case["t_off"][:, 1:],
                                                        student_mask=s_mask, teacher_mask=t_mask)
    cut = (lambda z: z[:, :-1]) if merge == "bayesian" else (lambda z: z[:, 1:])
    return (cut(case["zs"]), cut(case["zt"]), case["s_ids"][:, 1:].astype(np.int32),
            case["t_ids"][:, 1:].astype(np.int32), s_group, t_group, group_mask)


MATCHED = losses.uld_matched_vocabulary(STUDENT_VOCAB, TEACHER_VOCAB)


_COMPILED = {}


def uld_jit(*args, **kwargs):
    """losses.uld compiled with its hyper-parameters (the matched vocabulary included) as constants."""
    key = repr(sorted(kwargs.items()))
    if key not in _COMPILED:
        _COMPILED[key] = jax.jit(lambda *a: losses.uld(*a, **kwargs))
    return _COMPILED[key](*args)


def test_matched_vocabulary_pairs_the_shared_strings_in_teacher_order():
    np.testing.assert_array_equal(MATCHED[1], [2, 5, 6, 9, 12])
    np.testing.assert_array_equal(MATCHED[0], [7, 0, 3, 10, 4])


@pytest.mark.parametrize("seed", range(4))
def test_alignment_is_golds_walk(seed):
    case = gold_case(seed)
    s_group, t_group, group_mask = losses.uld_alignment(
        case["s_off"], case["t_off"], student_mask=case["s_labels"] != -100, teacher_mask=case["t_labels"] != -100)
    for b in range(case["zs"].shape[0]):
        s_pos, t_pos = np.flatnonzero(case["s_labels"][b] != -100), np.flatnonzero(case["t_labels"][b] != -100)
        sg, tg = ULDLoss._align_by_byte_offsets(case["s_off"][b, s_pos].tolist(), case["t_off"][b, t_pos].tolist())
        pairs = [(s, t) for s, t in zip(sg, tg) if s and t]  # GOLD drops a group empty on one side
        assert group_mask[b].sum() == len(pairs)
        for g, (s, t) in enumerate(pairs):
            np.testing.assert_array_equal(np.flatnonzero(s_group[b] == g), s_pos[s])
            np.testing.assert_array_equal(np.flatnonzero(t_group[b] == g), t_pos[t])


def test_alignment_equals_alms_chunks_on_tiling_texts():
    rng = np.random.default_rng(3)
    for _ in range(20):
        n = int(rng.integers(1, 15))
        s, t = np.asarray(split(rng, n, 4)), np.asarray(split(rng, n, 3))
        ours = losses.uld_alignment(s, t, num_groups=n)
        alm_t, alm_s, alm_mask = losses.alm_chunk_alignment(t, s, num_chunks=n)
        for a, b in zip(ours, (alm_s, alm_t, alm_mask)):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("merge,hybrid,weights,beta", [
    ("bayesian", False, (None, None), 0.5), ("observed", False, (None, None), 0.5),
    ("bayesian", True, (None, None), 0.5), ("observed", True, (None, None), 0.2),
    ("bayesian", True, (0.3, 0.9), 0.0), ("observed", True, (None, None), 1.0)])
def test_values_equal_trls_uld_loss(merge, hybrid, weights, beta):
    # TRL's uld_skip_*_eos (its default) drops each answer's last token: here the mask given to the alignment.
    for seed, skip_eos in ((0, False), (1, False), (2, True)):
        case = gold_case(seed)
        want = trl_uld(case, merge=merge, hybrid=hybrid, weights=weights, beta=beta, temperatures=(1.5, 0.8),
                       skip_eos=skip_eos)
        got = uld_jit(*jaxkd_arrays(case, merge, skip_eos), merge=merge, student_temperature=1.5, teacher_temperature=0.8,
                      matched_vocabulary=MATCHED if hybrid else None, beta=beta, matched_weight=weights[0],
                      unmatched_weight=weights[1])
        np.testing.assert_allclose(float(got), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("merge", ["bayesian", "observed"])
def test_positional_alignment_equals_trls_uld_without_byte_offsets(merge):
    """The original ULD (TRL's ``use_extended_uld=False``): the k-th answer tokens paired, up to the shorter."""
    case = gold_case(7, batch=4)
    s_group, t_group, group_mask = losses.uld_positional_alignment(case["s_labels"][:, 1:] != -100,
                                                                   case["t_labels"][:, 1:] != -100)
    args = list(jaxkd_arrays(case, merge))
    args[4:] = s_group, t_group, group_mask
    want = trl_uld(case, merge=merge, extended=False)
    np.testing.assert_allclose(float(uld_jit(*args, merge=merge)), want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="same batch"):
        losses.uld_positional_alignment(np.ones((2, 3)), np.ones((3, 3)))


def test_gradients_match_float64_finite_differences():
    """The hybrid loss (its matched JSD and its sorted L1 on the unmatched entries, through the group merge),
    coordinate by coordinate over both models' logits."""
    case = gold_case(5, batch=2, max_bytes=4)
    zs, zt, ys, yt, sg, tg, gm = jaxkd_arrays(case, "bayesian")
    with jax.enable_x64(True):
        zs64, zt64 = zs.astype(np.float64), zt.astype(np.float64)
        n = zs64.size

        def f(flat):
            a, b = flat[:n].reshape(zs64.shape), flat[n:].reshape(zt64.shape)
            return losses.uld(a, b, ys, yt, sg, tg, gm, student_temperature=1.3, matched_vocabulary=MATCHED,
                              beta=0.4)

        x = np.concatenate([zs64.ravel(), zt64.ravel()])
        grad = np.asarray(jax.jit(jax.grad(f))(x))
        fd = central_differences(f, x)
    assert np.abs(grad).max() > 1e-3
    np.testing.assert_allclose(grad, fd, rtol=1e-6, atol=1e-8)


def test_positions_outside_groups_do_not_count_and_bad_inputs_are_refused():
    case = gold_case(2)
    args = jaxkd_arrays(case, "bayesian")
    base = float(uld_jit(*args))
    zs = np.array(args[0])
    zs[args[4] < 0] = 40.0 * np.random.default_rng(0).normal(size=zs[args[4] < 0].shape)
    np.testing.assert_allclose(float(uld_jit(zs, *args[1:])), base, rtol=1e-6)
    with pytest.raises(ValueError, match="merge"):
        losses.uld(*args, merge="first")
    with pytest.raises(ValueError, match="student_group_ids"):
        losses.uld(args[0], args[1], args[2], args[3], args[4][:, :-1], args[5], args[6])
    with pytest.raises(ValueError, match=r"teacher_group_ids must lie in \[-1"):
        losses.uld(*args[:5], args[5] + 50, args[6])
    with pytest.raises(ValueError, match="both or neither"):
        losses.uld(*args, matched_weight=0.5)
    with pytest.raises(ValueError, match="matched_vocabulary ids"):
        losses.uld(*args, matched_vocabulary=(np.array([VS]), np.array([0])))
    with pytest.raises(ValueError, match="student_temperature"):
        losses.uld(*args, student_temperature=0.0)
    with pytest.raises(ValueError, match="num_groups"):
        losses.uld_alignment(case["s_off"], case["t_off"], num_groups=1)


# ----- the method, beside ALM, on parallel rows of two tokenizers -----


def test_uld_method_is_the_loss_of_the_next_token_logits_over_alms_chunks():
    """On parallel rows (tests/test_cross_tokenizer.py, which also trains ``lm_ce + alm + uld`` in one step),
    the method is losses.uld of the participants' logits over ALM's chunks: ``"bayesian"`` reads
    ``logits[:, :-1]``, ``"observed"`` ``logits[:, 1:]``, both with the targets ``tokens[:, 1:]``."""
    from tests.test_cross_tokenizer import jitted_loss, loss_case

    batch, zs, zt = loss_case(2, rows=slice(0, 4))
    groups = (batch["alm_student_chunks"], batch["alm_teacher_chunks"], batch["alm_chunk_mask"])
    targets = (batch["student_tokens"][:, 1:], batch["tokens"][:, 1:])

    @jax.jit
    def direct(zs, zt):
        return (losses.uld(zs[:, :-1], zt[:, :-1], *targets, *groups),
                losses.uld(zs[:, 1:], zt[:, 1:], *targets, *groups, merge="observed", matched_vocabulary=matched,
                           beta=0.3))

    matched = (np.array([3, 5, 40]), np.array([7, 1, 100]))
    bayesian, observed = (float(v) for v in direct(zs, zt))
    assert bayesian > 0 and abs(bayesian - observed) > 1e-4
    got, metrics = jitted_loss(methods.uld())(zs, zt, batch)
    np.testing.assert_allclose(float(got), bayesian, rtol=1e-6)
    assert float(metrics["groups"]) == batch["alm_chunk_mask"].sum()
    got, _ = jitted_loss(methods.uld(merge="observed", matched_vocabulary=matched, beta=0.3))(zs, zt, batch)
    np.testing.assert_allclose(float(got), observed, rtol=1e-6)
    assert methods.uld().needs.cross_vocabulary
    with pytest.raises(ValueError, match="both or neither"):
        methods.uld(matched_weight=0.5)
