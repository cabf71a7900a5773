"""ALM cross-tokenizer distillation (jaxkd/losses/lm/alm.py): chunk alignment on concrete strings with
hand-made byte offsets, the loss against a float64 NumPy reference written from the paper's binarised
divergences (tokenkit's ``compute_alm_loss``), gradients against float64 central differences, tokens
outside chunks and masked chunks, and argument checks.
"""

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxkd import losses as L
from tests.test_loss_contract import central_differences


def offsets(tokens, start=0):
    """(start, end) byte offsets of consecutive tokens of a text."""
    out, pos = [], start
    for token in tokens:
        out.append((pos, pos + len(token.encode())))
        pos += len(token.encode())
    return np.array(out, np.int64)


# ----- alignment -----


def test_byte_level_teacher_makes_each_student_token_a_chunk():
    text = "the cat sat"
    teacher = offsets([chr(b) for b in text.encode()])  # one token per byte
    student = offsets(["the", " cat", " sat"])
    t_ids, s_ids, chunk_mask = L.alm_chunk_alignment(teacher, student)
    np.testing.assert_array_equal(t_ids, [[0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]])
    np.testing.assert_array_equal(s_ids, [[0, 1, 2]])
    np.testing.assert_array_equal(chunk_mask, [[True, True, True]])
    assert t_ids.dtype == s_ids.dtype == np.int32


def test_two_subword_tokenizations_chunk_at_their_common_boundaries():
    # "unbelievable day": teacher ends 2, 8, 12, 16; student ends 5, 8, 12, 14, 16 -> common 8, 12, 16.
    teacher = offsets(["un", "believ", "able", " day"])
    student = offsets(["unbel", "iev", "able", " d", "ay"])
    t_ids, s_ids, chunk_mask = L.alm_chunk_alignment(teacher, student)
    np.testing.assert_array_equal(t_ids, [[0, 0, 1, 2]])
    np.testing.assert_array_equal(s_ids, [[0, 0, 1, 2, 2]])
    np.testing.assert_array_equal(chunk_mask, [[True, True, True]])


def test_special_tokens_masks_truncation_and_batches():
    # BOS with an empty span belongs to no chunk; the student's first real token is masked (nothing
    # predicts it), which drops the chunk holding it; the student is truncated after "able", so the
    # teacher's " day" is an unfinished chunk; the second sequence is padding-heavy.
    teacher = np.stack([np.concatenate([[[0, 0]], offsets(["un", "believ", "able", " day"])]),
                        np.concatenate([offsets(["ab", "c"]), [[0, 0]] * 3])])
    student = np.stack([np.concatenate([[[0, 0]], offsets(["unbel", "iev", "able"])]),
                        np.concatenate([offsets(["a", "bc"]), [[0, 0], [0, 0]]])])
    s_mask = np.array([[True, False, True, True], [True, True, False, False]])
    t_mask = np.array([[True, True, True, True, True], [True, True, False, False, False]])
    t_ids, s_ids, chunk_mask = L.alm_chunk_alignment(teacher, student, teacher_mask=t_mask, student_mask=s_mask)
    # Sequence 0: common ends 8 and 12; chunk [0, 8) lost "unbel" on the student side -> dropped.
    np.testing.assert_array_equal(t_ids[0], [-1, -1, -1, 0, -1])
    np.testing.assert_array_equal(s_ids[0], [-1, -1, -1, 0])
    # Sequence 1: "ab"+"c" vs "a"+"bc": one chunk "abc".
    np.testing.assert_array_equal(t_ids[1], [0, 0, -1, -1, -1])
    np.testing.assert_array_equal(s_ids[1], [0, 0, -1, -1])
    np.testing.assert_array_equal(chunk_mask, [[True], [True]])
    _, _, wide = L.alm_chunk_alignment(teacher, student, teacher_mask=t_mask, student_mask=s_mask, num_chunks=3)
    np.testing.assert_array_equal(wide, [[True, False, False], [True, False, False]])
    with pytest.raises(ValueError, match="num_chunks=1 is smaller than the 3 chunks"):
        L.alm_chunk_alignment(offsets(list("abc")), offsets(list("abc")), num_chunks=1)
    # A gap inside a chunk (the teacher skips a byte) drops it.
    t_ids, s_ids, chunk_mask = L.alm_chunk_alignment(np.array([[0, 1], [2, 3]]), np.array([[0, 3]]))
    np.testing.assert_array_equal(chunk_mask, [[False]])
    np.testing.assert_array_equal(s_ids, [[-1]])


# ----- the loss -----


def np_log1mexp(x):
    return np.log(-np.expm1(x))


def np_alm(ls, lt, s_ids, t_ids, chunk_mask, temperature, divergence, eps=1e-6):
    b, c = chunk_mask.shape
    out = np.zeros((b, c))
    for i in range(b):
        for j in range(c):
            if not chunk_mask[i, j]:
                continue
            a = min(float(np.sum(np.asarray(lt[i], np.float64)[t_ids[i] == j])), 0.0) / temperature - eps
            q_ = min(float(np.sum(np.asarray(ls[i], np.float64)[s_ids[i] == j])), 0.0) / temperature - eps
            p, q = np.exp(a), np.exp(q_)
            if divergence == "binary_kl":
                out[i, j] = p * np.log(p / q) + (1 - p) * np.log((1 - p) / (1 - q))
            elif divergence == "binary_ce":
                out[i, j] = -(p * np.log(q) + (1 - p) * np.log(1 - q))
            else:
                out[i, j] = q * np.log(q / p) + (1 - q) * np.log((1 - q) / (1 - p))
    return out


def loss_data(seed=0):
    rng = np.random.default_rng(seed)
    teacher = np.stack([offsets(["un", "believ", "able", " day", "!"]), offsets(["a", "b", "c", "d", "e"])])
    student = np.stack([offsets(["unbel", "iev", "able", " d", "ay!"]), offsets(["ab", "cd", "e", "", ""])])
    s_mask = np.array([[True] * 5, [True, True, True, False, False]])
    t_ids, s_ids, chunk_mask = L.alm_chunk_alignment(teacher, student, student_mask=s_mask)
    ls = np.log(rng.uniform(0.05, 0.95, size=s_ids.shape)).astype(np.float32)
    lt = np.log(rng.uniform(0.05, 0.95, size=t_ids.shape)).astype(np.float32)
    return ls, lt, s_ids, t_ids, chunk_mask


def reference_chunks(t_off, t_mask, s_off, s_mask):
    """The docstring's definition, token by token in plain Python: chunk ids per side and the count."""
    sides = [(t_off, t_mask), (s_off, s_mask)]
    real = [[i for i, (a, b) in enumerate(off) if m[i] and a < b] for off, m in sides]
    ends = sorted({int(t_off[i][1]) for i in real[0]} & {int(s_off[j][1]) for j in real[1]})
    ids = [[-1] * len(t_off), [-1] * len(s_off)]
    kept = 0
    for c, end in enumerate(ends):
        low = ends[c - 1] if c else -1
        spans = []
        for (off, _), tokens in zip(sides, real):
            members = sorted((int(off[i][0]), int(off[i][1]), i) for i in tokens if low < off[i][1] <= end)
            tiles = members and all(members[k + 1][0] == members[k][1] for k in range(len(members) - 1))
            spans.append((members[0][0], members[-1][1], [i for *_, i in members]) if tiles else None)
        if spans[0] is None or spans[1] is None:
            continue
        start = ends[c - 1] if c else spans[0][0]
        if spans[0][:2] == spans[1][:2] == (start, end):
            for side in (0, 1):
                for i in spans[side][2]:
                    ids[side][i] = kept
            kept += 1
    return np.array(ids[0]), np.array(ids[1]), kept


@st.composite
def tokenizations(draw):
    """Two tokenizations of one text of n bytes, with masked, empty, overlapping and out-of-order tokens."""
    n = draw(st.integers(1, 24))

    def side():
        cuts = sorted(draw(st.sets(st.integers(1, n - 1), max_size=n - 1))) if n > 1 else []
        bounds = [0, *cuts, n]
        off = [[a, b] for a, b in zip(bounds[:-1], bounds[1:])]
        for _ in range(draw(st.integers(0, 2))):
            i, kind = draw(st.integers(0, len(off) - 1)), draw(st.sampled_from(["overlap", "empty", "swap"]))
            if kind == "overlap":
                off[i][0] = max(0, off[i][0] - 1)
            elif kind == "empty":
                off[i][1] = off[i][0]
            else:
                j = draw(st.integers(0, len(off) - 1))
                off[i], off[j] = off[j], off[i]
        mask = draw(st.lists(st.booleans(), min_size=len(off), max_size=len(off)))
        return np.array(off, np.int64), np.array(mask) | (np.arange(len(off)) % 3 > 0)

    return side() + side()


@settings(max_examples=300)
@given(tokenizations())
def test_chunk_alignment_matches_the_definition_token_by_token(case):
    t_off, t_mask, s_off, s_mask = case
    t_ref, s_ref, count = reference_chunks(t_off, t_mask, s_off, s_mask)
    t_ids, s_ids, chunk_mask = L.alm_chunk_alignment(t_off, s_off, teacher_mask=t_mask, student_mask=s_mask)
    np.testing.assert_array_equal(t_ids[0], t_ref)
    np.testing.assert_array_equal(s_ids[0], s_ref)
    assert chunk_mask[0].sum() == count


@pytest.mark.parametrize("divergence", ["binary_kl", "binary_ce", "reverse_binary_kl"])
@pytest.mark.parametrize("temperature", [1.0, 100.0])
def test_alm_loss_matches_numpy(divergence, temperature):
    ls, lt, s_ids, t_ids, chunk_mask = loss_data()
    # Common ends 8, 12, 17 ("unbelievable", "able", " day!") and 2, 4, 5 ("ab", "cd", "e").
    np.testing.assert_array_equal(chunk_mask, [[True] * 3, [True] * 3])
    got = L.alm(ls, lt, s_ids, t_ids, chunk_mask, temperature=temperature, divergence=divergence, reduction="none")
    want = np_alm(ls, lt, s_ids, t_ids, chunk_mask, temperature, divergence)
    np.testing.assert_allclose(got, want, rtol=5e-4 if temperature == 100.0 else 2e-5, atol=1e-9)
    mean = L.alm(ls, lt, s_ids, t_ids, chunk_mask, temperature=temperature, divergence=divergence)
    np.testing.assert_allclose(mean, want[chunk_mask].mean(), rtol=5e-4 if temperature == 100.0 else 2e-5)


def test_equal_chunk_likelihoods_give_zero_binary_kl():
    # A byte-level teacher whose byte log-probabilities sum to each student token's log-probability.
    teacher = offsets(list("the cat"))
    student = offsets(["the", " cat"])
    t_ids, s_ids, chunk_mask = L.alm_chunk_alignment(teacher, student)
    ls = np.log(np.array([[0.3, 0.6]], np.float32))
    lt = np.array([[np.log(0.3) / 3] * 3 + [np.log(0.6) / 4] * 4], np.float32)
    np.testing.assert_allclose(L.alm(ls, lt, s_ids, t_ids, chunk_mask, temperature=1.0), 0.0, atol=1e-6)


def test_gradients_match_finite_differences_and_ce_and_kl_share_the_student_gradient():
    ls, lt, s_ids, t_ids, chunk_mask = loss_data(1)
    with jax.enable_x64(True):
        s64, t64 = ls.astype(np.float64), lt.astype(np.float64)

        def f(s, t, divergence, s_ids=s_ids, cm=chunk_mask):
            return L.alm(s, t, s_ids, t_ids, cm, temperature=2.0, divergence=divergence, reduction="sum")

        grad = jax.jit(jax.grad(f, argnums=(0, 1)), static_argnums=2)
        gs, gt = grad(s64, t64, "binary_kl")
        split = lambda v: (v[: s64.size].reshape(s64.shape), v[s64.size:].reshape(t64.shape))  # noqa: E731
        fd = central_differences(lambda v: f(*split(v), "binary_kl"), np.concatenate([s64.ravel(), t64.ravel()]))
        np.testing.assert_allclose(gs, split(fd)[0], rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(gt, split(fd)[1], rtol=1e-6, atol=1e-9)
        gs_ce, _ = grad(s64, t64, "binary_ce")
        np.testing.assert_allclose(gs_ce, gs, rtol=1e-10, atol=1e-13)
        # binary_ce − binary_kl is the teacher's binary entropy, per chunk.
        none = dict(temperature=2.0, reduction="none")
        diff = np.asarray(L.alm(s64, t64, s_ids, t_ids, chunk_mask, divergence="binary_ce", **none)
                          - L.alm(s64, t64, s_ids, t_ids, chunk_mask, divergence="binary_kl", **none))
        p = np.exp(np_alm_chunk(t64, t_ids, chunk_mask.shape[1]) / 2.0 - 1e-6)
        np.testing.assert_allclose(diff[chunk_mask], (-(p * np.log(p) + (1 - p) * np.log1p(-p)))[chunk_mask], rtol=1e-8)


def np_alm_chunk(lp, ids, c):
    return np.stack([[lp[i][ids[i] == j].sum() for j in range(c)] for i in range(lp.shape[0])])


def test_tokens_outside_chunks_and_masked_chunks_do_not_count():
    ls, lt, s_ids, t_ids, chunk_mask = loss_data(2)
    with jax.enable_x64(True):
        s64, t64 = ls.astype(np.float64), lt.astype(np.float64)
        f = jax.jit(jax.value_and_grad(lambda s, cm: L.alm(s, t64, s_ids, t_ids, cm)))
        value, grad = f(s64, chunk_mask)
        outside = s_ids < 0
        assert outside.any()
        value2, grad2 = f(np.where(outside, 123.0, s64), chunk_mask)  # garbage where no chunk holds the token
        np.testing.assert_allclose(value2, value, rtol=1e-12)
        np.testing.assert_allclose(grad2, grad, rtol=1e-12, atol=1e-15)
        np.testing.assert_array_equal(np.asarray(grad)[outside], 0.0)
        value3, grad3 = f(s64, np.zeros_like(chunk_mask))
        assert float(value3) == 0.0
        np.testing.assert_array_equal(grad3, 0.0)


def test_alm_rejects_bad_inputs():
    ls, lt, s_ids, t_ids, chunk_mask = loss_data()
    with pytest.raises(ValueError, match=r"student_chunk_ids must lie in \[-1, 3\)"):
        L.alm(ls, lt, np.where(s_ids == 0, 3, s_ids), t_ids, chunk_mask)
    with pytest.raises(ValueError, match="teacher_chunk_ids must have the shape"):
        L.alm(ls, lt, s_ids, t_ids[:, :3], chunk_mask)
    with pytest.raises(ValueError, match="must be integers"):
        L.alm(ls, lt, s_ids.astype(np.float32), t_ids, chunk_mask)
    with pytest.raises(ValueError, match="B = 2"):
        L.alm(ls[:1], lt, s_ids[:1], t_ids, chunk_mask)
    with pytest.raises(ValueError, match="temperature must lie in"):
        L.alm(ls, lt, s_ids, t_ids, chunk_mask, temperature=0.0)
    with pytest.raises(ValueError, match="divergence must be one of"):
        L.alm(ls, lt, s_ids, t_ids, chunk_mask, divergence="kl")
    with pytest.raises(ValueError, match="end offset is before its start"):
        L.alm_chunk_alignment(np.array([[3, 1]]), np.array([[0, 3]]))
    with pytest.raises(ValueError, match="same batch"):
        L.alm_chunk_alignment(np.zeros((2, 3, 2), np.int64), np.zeros((1, 3, 2), np.int64))
