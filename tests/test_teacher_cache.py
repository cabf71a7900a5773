"""Tests of jaxkd.data.text.teacher_cache: the offline top-k teacher cache (array_record)."""

from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest

from jaxkd.data.text.teacher_cache import TopKCache, topk_tail_mass, write_topk_cache

T, K, V = 5, 3, 11


def _teacher_records(n: int, seed: int = 0, vocab: int = V, k: int = K):
    """Top-k of random full-vocabulary distributions, written from the definition in NumPy."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        logits = rng.normal(size=(T, vocab)) * 3
        log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        idx = np.argsort(-log_p, axis=-1, kind="stable")[:, :k]
        out.append((i, idx.astype(np.int32), np.take_along_axis(log_p, idx, -1).astype(np.float32)))
    return out


def test_round_trip_is_exact_random_access_and_batches(tmp_path):
    path = tmp_path / "teacher.arrayrecord"
    records = _teacher_records(4)
    assert write_topk_cache(path, iter(records), vocab_size=V) == 4
    cache = TopKCache(path, k=K, seq_len=T, vocab_size=V)
    assert len(cache) == 4 and (cache.k, cache.seq_len, cache.vocab_size) == (K, T, V)
    assert cache.log_prob_dtype == "float32"
    for i in (2, 0, 3, 1, -1):
        got = cache[i]
        _, idx, lp = records[i]
        assert got["topk_indices"].dtype == np.int32 and got["topk_log_probs"].dtype == np.float32
        np.testing.assert_array_equal(got["topk_indices"], idx)
        np.testing.assert_array_equal(got["topk_log_probs"], lp)  # bitwise
    batch = cache.batch(np.array([3, 1, 3]))
    assert batch["topk_indices"].shape == (3, T, K)
    np.testing.assert_array_equal(batch["topk_log_probs"][1], records[1][2])
    np.testing.assert_array_equal(batch["topk_indices"][2], records[3][1])
    with pytest.raises(IndexError, match="out of range"):
        cache[4]
    # The tail mass is 1 - sum exp(top-k log-probs).
    np.testing.assert_allclose(
        topk_tail_mass(cache[0]["topk_log_probs"]), 1 - np.exp(records[0][2].astype(np.float64)).sum(-1)
    )
    # A header, then one fixed-size record per sequence: 5*3 uint16 indices + 5*3 float32 values.
    from array_record.python.array_record_module import ArrayRecordReader

    reader = ArrayRecordReader(str(path), "readahead_buffer_size:0")
    assert reader.num_records() == 5
    header = json.loads(reader.read([0])[0])
    assert header["index_dtype"] == "<u2" and header["log_prob_dtype"] == "<f4"
    assert len(reader.read([1])[0]) == T * K * (2 + 4)
    reader.close()


def test_grain_source_and_pickling(tmp_path):
    import grain

    path = tmp_path / "c.ar"
    records = _teacher_records(5, seed=1)
    write_topk_cache(path, records, vocab_size=V)
    cache = TopKCache(path)
    copy = pickle.loads(pickle.dumps(cache))  # what a Grain worker process gets: the file reopened
    np.testing.assert_array_equal(copy[4]["topk_log_probs"], records[4][2])
    ds = grain.MapDataset.source(cache).batch(2)
    first = ds[0]
    np.testing.assert_array_equal(first["topk_indices"], np.stack([records[0][1], records[1][1]]))


def test_float16_values_within_documented_error_and_large_vocab_int32(tmp_path):
    records = _teacher_records(2, seed=2)
    write_topk_cache(tmp_path / "h.ar", records, vocab_size=V, log_prob_dtype="float16")
    cache = TopKCache(tmp_path / "h.ar")
    assert cache.log_prob_dtype == "float16"
    lp = records[1][2]
    got = cache[1]["topk_log_probs"]
    assert got.dtype == np.float32
    assert np.all(np.abs(got - lp) <= 2.0**-11 * np.abs(lp) + 3e-8)
    np.testing.assert_array_equal(cache[1]["topk_indices"], records[1][1])
    # Vocabularies beyond uint16 store int32 indices, still exact.
    big = 70_000
    idx = np.array([[69_999, 0, 65_536]] * T, np.int32)
    lp = np.log(np.full((T, K), 0.2, np.float32))
    write_topk_cache(tmp_path / "b.ar", [(0, idx, lp)], vocab_size=big)
    np.testing.assert_array_equal(TopKCache(tmp_path / "b.ar", vocab_size=big)[0]["topk_indices"], idx)


def test_mismatched_read_and_missing_file_raise(tmp_path):
    path = tmp_path / "c.ar"
    write_topk_cache(path, _teacher_records(2), vocab_size=V)
    with pytest.raises(ValueError, match=r"has k=3, expected k=4"):
        TopKCache(path, k=4)
    with pytest.raises(ValueError, match=r"has seq_len=5, expected seq_len=6"):
        TopKCache(path, seq_len=6)
    with pytest.raises(ValueError, match=r"has vocab_size=11, expected vocab_size=12"):
        TopKCache(path, vocab_size=12)
    with pytest.raises(FileNotFoundError, match="no top-k teacher cache at"):
        TopKCache(tmp_path / "missing.ar")
    # Another array_record file (not a cache) is refused.
    from array_record.python.array_record_module import ArrayRecordWriter

    other = ArrayRecordWriter(str(tmp_path / "other.ar"), "group_size:1")
    other.write(b"hello")
    other.close()
    with pytest.raises(ValueError, match="not a jaxkd top-k teacher cache"):
        TopKCache(tmp_path / "other.ar")


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda r: (2, r[1], r[2]), "expected index 1, got 2"),
        (lambda r: (1, r[1][:, :2], r[2][:, :2]), r"must both be \[T=5, k=3\]"),
        (lambda r: (1, np.full_like(r[1], 11), r[2]), r"must lie in \[0, vocab_size=11\)"),
        (lambda r: (1, np.zeros_like(r[1]), r[2]), "distinct within each position"),
        (lambda r: (1, r[1], r[2] + 5.0), "were logits passed instead"),
        (lambda r: (1, r[1], np.full_like(r[2], np.nan)), "NaN"),
        (lambda r: (1, r[1].astype(np.float32), r[2]), "must be integers"),
    ],
)
def test_writer_refuses_bad_records_and_leaves_nothing(tmp_path, mutate, match):
    first, second = _teacher_records(2)
    path = tmp_path / "bad.ar"
    # The bad record is the second: a half-written file would exist if the writer did not clean up.
    with pytest.raises(ValueError, match=match):
        write_topk_cache(path, [first, mutate(second)], vocab_size=V)
    assert os.listdir(tmp_path) == []


def test_writer_refuses_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="records is empty"):
        write_topk_cache(tmp_path / "e.ar", [], vocab_size=V)
    assert write_topk_cache(tmp_path / "e.ar", [], vocab_size=V, k=K, seq_len=T) == 0
    assert len(TopKCache(tmp_path / "e.ar")) == 0
    with pytest.raises(ValueError, match="log_prob_dtype"):
        write_topk_cache(tmp_path / "x.ar", _teacher_records(1), vocab_size=V, log_prob_dtype="bf16")
    with pytest.raises(ValueError, match="k must be <= vocab_size"):
        write_topk_cache(tmp_path / "x.ar", [], vocab_size=2, k=3, seq_len=T)


def test_text_loader_carries_the_rows_teacher_top_k(tmp_path):
    from jaxkd.data import TextLoader, pack_documents

    packed = pack_documents([np.arange(8), np.arange(3)], T)  # 15 tokens: 3 rows of 5
    records = _teacher_records(3, seed=3)
    write_topk_cache(tmp_path / "c.ar", records, vocab_size=V)
    cache = TopKCache(tmp_path / "c.ar", seq_len=T)
    loader = TextLoader(
        packed["tokens"], packed["mask"], batch_size=2, drop_remainder=False, with_index=True,
        teacher_cache=cache, seed=4, process_index=0, process_count=1,
    )
    padded = 0
    for batch in loader:
        for row, index in enumerate(batch["index"]):
            if batch["mask"][row].any():
                np.testing.assert_array_equal(batch["topk_indices"][row], records[index][1])
                np.testing.assert_array_equal(batch["topk_log_probs"][row], records[index][2])
            else:  # a padding row: distinct indices, zero mass
                padded += 1
                assert (batch["topk_log_probs"][row] == -np.inf).all()
                assert (np.sort(batch["topk_indices"][row], -1) == np.arange(K)).all()
    assert padded == 1
    with pytest.raises(ValueError, match="teacher_cache has 3 sequences, the tokens 2 rows"):
        TextLoader(packed["tokens"][:2], packed["mask"][:2], batch_size=1, teacher_cache=cache,
                   process_index=0, process_count=1)
