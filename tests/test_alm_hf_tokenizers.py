"""ALM between two real ``tokenizers`` tokenizers of different kinds: a byte-level BPE (GPT-2, Qwen, LLaMA 3) and
a SentencePiece-style Metaspace BPE with byte fallback (LLaMA 2, Mistral, Gemma), whose pieces spell one space
in front of the text. Token spans are checked against the ``tokenizers`` library's own character offsets; ALM
on the parallel rows against the NumPy reference."""

import jax
import numpy as np
import pytest

from jaxkd import methods
from jaxkd.data import HFTokenizer
from jaxkd.data.text.cross_tokenizer import ALM_CHUNK_NORMALIZER_KEY, ParallelBatches, parallel_rows
from tests.test_alm import np_alm
from tests.test_cross_tokenizer import jitted_loss, reference_token_log_probs
from tests.test_hf_tokenizer import byte_level_bpe, metaspace_bpe

pytest.importorskip("tokenizers")

TEXTS = ["Hello world, hello jax!", "Distillation moves knowledge from a teacher to a student.",
         "Café naïve – déjà vu 🙂 ok", "  two leading spaces, then words"]
BYTE_LEVEL = HFTokenizer(byte_level_bpe(), special_tokens={"bos_token": "<s>", "pad_token": "<pad>"})
METASPACE = HFTokenizer(metaspace_bpe(), special_tokens={"bos_token": "<s>", "eos_token": "</s>"})


@pytest.mark.parametrize("tok", [BYTE_LEVEL, METASPACE], ids=["byte_level", "metaspace"])
@pytest.mark.parametrize("text", TEXTS)
def test_spans_tile_the_text_and_equal_the_tokenizers_own_offsets(tok, text):
    ids, starts, ends = tok.encode_with_offsets(text)
    data = text.encode("utf-8")
    assert starts[0] == 0 and ends[-1] == len(data) and np.array_equal(starts[1:], ends[:-1])
    # The library's own offsets are characters; on an ASCII text a character is a byte.
    if text.isascii():
        offsets = np.asarray(tok.tokenizer.encode(text, add_special_tokens=False).offsets)
        np.testing.assert_array_equal(np.stack([starts, ends], 1), offsets)


def test_a_text_with_a_special_tokens_text_is_refused_by_name():
    with pytest.raises(ValueError, match="special tokens written in the text"):
        BYTE_LEVEL.encode_with_offsets("<|im_start|>user\nhi")


@pytest.fixture(scope="module", params=["byte_level_teacher", "metaspace_teacher"])
def rows(request):
    teacher, student = (BYTE_LEVEL, METASPACE) if request.param == "byte_level_teacher" else (METASPACE, BYTE_LEVEL)
    return teacher, student, parallel_rows(TEXTS, teacher, student, teacher_len=9, student_len=7)


def test_chunks_cover_the_same_bytes_of_the_text_on_both_sides(rows):
    teacher, student, data = rows
    assert len(data) > len(TEXTS) and data.alm_chunk_mask.any()
    for i in range(len(data)):
        t_ids, s_ids = data.tokens[i][data.mask[i]][1:], data.student_tokens[i][data.student_mask[i]][1:]
        # The rows' own bytes (the phantom SentencePiece space aside) are the same stretch of text.
        t_text, s_text = teacher.decode(t_ids), student.decode(s_ids)
        assert t_text.lstrip(b" ").endswith(s_text.lstrip(b" ")) or s_text.lstrip(b" ").endswith(t_text.lstrip(b" "))
        t_len = teacher.token_byte_lengths[data.tokens[i, 1:]] * data.mask[i, 1:]
        s_len = student.token_byte_lengths[data.student_tokens[i, 1:]] * data.student_mask[i, 1:]
        for c in np.flatnonzero(data.alm_chunk_mask[i]):
            # Equal byte counts per chunk, up to the one phantom space a document's first piece carries.
            t_bytes, s_bytes = t_len[data.alm_teacher_chunks[i] == c].sum(), s_len[data.alm_student_chunks[i] == c].sum()
            assert abs(int(t_bytes) - int(s_bytes)) <= 1 and t_bytes > 0 and s_bytes > 0


def test_alm_on_two_real_tokenizers_equals_the_numpy_reference(rows):
    teacher, student, data = rows
    batch = ParallelBatches(data, batch_size=4, shuffle=False).batch(0, 0)
    batch = {k: v for k, v in batch.items() if k not in (ALM_CHUNK_NORMALIZER_KEY, "token_normalizer")}  # a plain mean
    rng = np.random.default_rng(0)
    zs = rng.normal(size=(4, 7, student.vocab_size)).astype(np.float32)
    zt = (2 * rng.normal(size=(4, 9, teacher.vocab_size))).astype(np.float32)
    ls = reference_token_log_probs(zs, batch["student_tokens"], batch["student_mask"])
    lt = reference_token_log_probs(zt, batch["tokens"], batch["mask"])
    want = np_alm(ls, lt, batch["alm_student_chunks"], batch["alm_teacher_chunks"], batch["alm_chunk_mask"], 1.0,
                  "binary_kl")[batch["alm_chunk_mask"]].mean()
    got, metrics = jitted_loss(methods.alm(temperature=1.0))(zs, zt, batch)
    np.testing.assert_allclose(float(got), want, rtol=2e-5)
    assert float(metrics["chunks"]) == batch["alm_chunk_mask"].sum()
    assert np.isfinite(jax.device_get(got))
