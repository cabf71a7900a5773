"""Tests of the text side of LM distillation: jaxkd.data.text (tokenizer, packing, bits per byte, loader, bpe,
stdlib_corpus)."""

from __future__ import annotations

import hashlib
import math
import os
import platform
import re
import sysconfig
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxkd.data import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    ByteTokenizer,
    TextLoader,
    bits_per_byte,
    count_byte_targets,
    pack_documents,
    token_byte_offsets,
)
from jaxkd.data.text import bpe as bpe_lib
from jaxkd.data.text import stdlib_corpus as sc
from jaxkd.data.text.bpe import BPETokenizer, pretokenize, train_bpe

B, E, P = BOS_ID, EOS_ID, PAD_ID

# ---------------------------------------------------------------- ByteTokenizer


def test_byte_tokenizer_ids_are_utf8_bytes_and_specials_follow():
    tok = ByteTokenizer()
    assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id) == (259, 256, 257, 258)
    ids = tok.encode("aé\n")
    assert ids.dtype == np.int32
    np.testing.assert_array_equal(ids, [0x61, 0xC3, 0xA9, 0x0A])  # é is C3 A9 in UTF-8
    np.testing.assert_array_equal(tok.encode(b"\xff\x00"), [255, 0])
    assert tok.decode([B, 0x61, 0xC3, 0xA9, E, P]) == "aé".encode()
    assert tok.decode([]) == b""
    np.testing.assert_array_equal(tok.token_byte_lengths, [1] * 256 + [0, 0, 0])
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 259\)"):
        tok.decode([0, 259])
    with pytest.raises(ValueError, match="text must be str or bytes"):
        tok.encode(3)


def test_byte_tokenizer_offsets_are_one_byte_each():
    ids, starts, ends = ByteTokenizer().encode_with_offsets("héllo")
    n = len("héllo".encode())
    np.testing.assert_array_equal(starts, np.arange(n))
    np.testing.assert_array_equal(ends, np.arange(1, n + 1))
    # Specials have empty spans inside a packed sequence.
    s, e = token_byte_offsets([B, 104, 105, E], ByteTokenizer())
    np.testing.assert_array_equal(s, [0, 0, 1, 2])
    np.testing.assert_array_equal(e, [0, 1, 2, 2])


# ---------------------------------------------------------------- packing


def test_pack_documents_layout_written_out():
    """BOS + ids + EOS per document, concatenated, cut into rows; the last row padded."""
    out = pack_documents([[1, 2, 3], [4], []], 4)
    np.testing.assert_array_equal(
        out["tokens"], [[B, 1, 2, 3], [E, B, 4, E], [B, E, P, P]]
    )
    np.testing.assert_array_equal(
        out["mask"], [[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0]]
    )
    assert out["tokens"].dtype == np.int32 and out["mask"].dtype == bool
    # Other specials are honoured; an exact fit has no padding row.
    out = pack_documents([np.array([7, 8], np.int64)], 4, bos=0, eos=9, pad=5)
    np.testing.assert_array_equal(out["tokens"], [[0, 7, 8, 9]])
    assert out["mask"].all()


def test_count_byte_targets_and_bits_per_byte_by_hand():
    out = pack_documents([[1, 2, 3], [4], []], 4)
    # Targets (mask[:, 1:] & mask[:, :-1]): row 0: 1 2 3 (3 bytes); row 1: B 4 E (1 byte; the first
    # token of a row, E, is never a target); row 2: E (0 bytes). Total 4.
    lengths = ByteTokenizer().token_byte_lengths
    assert count_byte_targets(out["tokens"], out["mask"], lengths) == 4
    assert bits_per_byte(8 * math.log(2), 4) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="num_bytes must be a positive number"):
        bits_per_byte(1.0, 0)
    with pytest.raises(ValueError, match="total_nats must be a finite number"):
        bits_per_byte(float("nan"), 3)


def test_pack_documents_refuses_bad_arguments():
    with pytest.raises(ValueError, match="seq_len"):
        pack_documents([[1]], 1)
    with pytest.raises(ValueError, match="docs is empty"):
        pack_documents([], 4)
    with pytest.raises(ValueError, match=r"docs\[1\] must be a 1-D sequence of integer ids"):
        pack_documents([[1], [[1, 2]]], 4)
    with pytest.raises(ValueError, match=r"docs\[0\] must be a 1-D sequence of integer ids"):
        pack_documents([np.array([0.5])], 4)


@settings(derandomize=True, deadline=None, max_examples=20)
@given(
    docs=st.lists(st.lists(st.integers(0, 255), max_size=9), min_size=1, max_size=5),
    seq_len=st.integers(2, 7),
)
def test_pack_documents_rows_are_the_stream(docs, seq_len):
    """The masked tokens, row after row, are exactly BOS d0 EOS BOS d1 EOS ...; padding only at the end."""
    out = pack_documents(docs, seq_len)
    stream = [t for d in docs for t in [B, *d, E]]
    n_rows = -(-len(stream) // seq_len)
    assert out["tokens"].shape == (n_rows, seq_len)
    flat_mask = out["mask"].ravel()
    assert flat_mask.sum() == len(stream) and flat_mask[: len(stream)].all()
    assert out["tokens"].ravel()[flat_mask].tolist() == stream
    assert (out["tokens"].ravel()[~flat_mask] == P).all()
    # Byte targets: every byte of the stream except those that start a row.
    starts = set(range(0, len(stream), seq_len))
    expected = sum(1 for i, t in enumerate(stream) if t < 256 and i not in starts)
    assert count_byte_targets(out["tokens"], out["mask"], ByteTokenizer().token_byte_lengths) == expected


# ---------------------------------------------------------------- BPE

_CODE_WORDS = ["def", "self", "return", "import", "value", "x", "(", ")", ":", "=", "1", "22", "_init_"]


def _code_corpus(n_lines: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    lines = []
    for _ in range(n_lines):
        indent = " " * int(rng.choice([0, 4, 8]))
        words = rng.choice(_CODE_WORDS, size=int(rng.integers(1, 6)))
        lines.append(indent + " ".join(words) + "\n")
    return ["".join(lines[i : i + 10]) for i in range(0, n_lines, 10)] + ["naïve ünïcode\n"]


def _reference_bpe(texts, vocab_size, min_frequency):
    """BPE written from the definition: recount every pair over all pre-tokens before each merge."""
    words = Counter(w for t in texts for w in re.findall(bpe_lib.PRETOKENIZE_PATTERN, t.encode()))
    seg = {w: list(w) for w in words}
    merges = []
    while 259 + len(merges) < vocab_size:
        counts = Counter()
        for w, toks in seg.items():
            for pair in zip(toks, toks[1:]):
                counts[pair] += words[w]
        if not counts:
            break
        best = min(counts, key=lambda p: (-counts[p], p))  # most frequent, then smallest ids
        if counts[best] < min_frequency:
            break
        new = 259 + len(merges)
        merges.append(best)
        for w, toks in seg.items():
            out, i = [], 0
            while i < len(toks):
                if i + 1 < len(toks) and (toks[i], toks[i + 1]) == best:
                    out.append(new)
                    i += 2
                else:
                    out.append(toks[i])
                    i += 1
            seg[w] = out
    return merges, seg


@pytest.fixture(scope="module")
def corpus():
    return _code_corpus(120, seed=0)


@pytest.fixture(scope="module")
def bpe(corpus):
    return train_bpe(corpus, 330)


def test_bpe_matches_recount_reference_merges_and_segmentation(corpus, bpe):
    merges, seg = _reference_bpe(corpus, 330, 2)
    assert list(bpe.merges) == [tuple(m) for m in merges]
    assert bpe.vocab_size == 259 + len(merges)
    for word, toks in seg.items():  # encoding a training pre-token gives training's segmentation
        assert bpe.encode(word).tolist() == toks
    # min_frequency stops early: the vocabulary is then smaller than asked.
    small = train_bpe(corpus, 10_000, min_frequency=50)
    ref, _ = _reference_bpe(corpus, 10_000, 50)
    assert list(small.merges) == [tuple(m) for m in ref] and small.vocab_size < 10_000


def test_bpe_tie_rule_smaller_first_then_second_id():
    # (a, b), (c, d) and (c, a) occur once each: ties go to the smallest first id, then second id.
    tok = train_bpe(["ab", "cd", "ca"], 262, min_frequency=1)
    assert tok.merges == ((97, 98), (99, 97), (99, 100))
    # Training is deterministic whatever the order of the texts.
    assert train_bpe(["ca", "cd", "ab"], 262, min_frequency=1) == tok


def test_bpe_round_trip_offsets_and_json(corpus, bpe):
    text = corpus[0] + "\xff\u20ac" + "    return self\n"
    ids, starts, ends = bpe.encode_with_offsets(text)
    raw = text.encode()
    assert ids.dtype == np.int32 and (ids < bpe.vocab_size).all() and (ids < 256).sum() < len(ids)
    assert bpe.decode(ids) == raw
    assert starts[0] == 0 and ends[-1] == len(raw) and (starts[1:] == ends[:-1]).all()
    for i, s, e in zip(ids, starts, ends):
        assert raw[s:e] == bpe.token_bytes(int(i))
    assert len(ids) < len(raw)  # merges compress
    # Specials keep the byte tokenizer's ids, are dropped by decode and span no bytes.
    assert bpe.decode([B, *ids.tolist(), E, P]) == raw
    assert bpe.token_byte_lengths[B] == 0
    again = BPETokenizer.from_json(bpe.to_json())
    assert again == bpe and again.encode(text).tolist() == ids.tolist()
    # No merges: exactly the byte tokenizer.
    np.testing.assert_array_equal(BPETokenizer([]).encode(text), ByteTokenizer().encode(text))


def test_bpe_refuses_bad_arguments_and_json(corpus):
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe(corpus, 258)
    with pytest.raises(ValueError, match="min_frequency"):
        train_bpe(corpus, 300, min_frequency=0)
    with pytest.raises(ValueError, match="single str"):
        train_bpe("abc", 300)
    with pytest.raises(ValueError, match="not a BPETokenizer JSON"):
        BPETokenizer.from_json('{"format": "other"}')
    with pytest.raises(ValueError, match="not a BPETokenizer JSON"):
        BPETokenizer.from_json("{")
    with pytest.raises(ValueError, match=r"merges\[0\].*special or not yet defined"):
        BPETokenizer([(97, 300)])
    with pytest.raises(ValueError, match=r"merges\[0\].*special or not yet defined"):
        BPETokenizer([(256, 97)])


@settings(derandomize=True, deadline=None, max_examples=20)
@given(data=st.binary(max_size=60))
def test_pretokens_tile_any_bytes_and_bpe_round_trips(data, bpe):
    assert b"".join(pretokenize(data)) == data
    ids, starts, ends = bpe.encode_with_offsets(data)
    assert bpe.decode(ids) == data
    assert (ends - starts == bpe.token_byte_lengths[ids]).all() and ends[-1:].sum() == len(data)


def test_byte_targets_agree_across_tokenizers(corpus, bpe):
    """In one row per document (BOS first), both tokenizers' byte targets are all the text's bytes."""
    text = corpus[1]
    counts = []
    for tok in (ByteTokenizer(), bpe):
        out = pack_documents([tok.encode(text)], 4096, bos=tok.bos_id, eos=tok.eos_id, pad=tok.pad_id)
        counts.append(count_byte_targets(out["tokens"], out["mask"], tok.token_byte_lengths))
    assert counts == [len(text.encode())] * 2


# ---------------------------------------------------------------- stdlib_corpus


def _split_by_formula(path: str) -> str:
    h = int.from_bytes(hashlib.sha256(path.encode()).digest()[:8], "big") % 100
    return "train" if h < 90 else "validation" if h < 95 else "test"


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A tiny library: a file in each split, a nested package, and everything that must be left out."""
    root = tmp_path_factory.mktemp("lib")
    names, need = [], {"train", "validation", "test"}
    i = 0
    while need or len(names) < 6:
        name = f"mod{i}.py"
        split = _split_by_formula(name)
        if split in need or len(names) < 6:
            need.discard(split)
            names.append(name)
        i += 1
    for j, name in enumerate(names):
        (root / name).write_text(f"# {name}\nx = {j}\n")
    (root / "pkg").mkdir()
    (root / "pkg" / "inner.py").write_bytes(b"s = '\xff not utf-8'\n")
    for excluded in ("site-packages", "__pycache__", ".hidden", "config-3.11-x86_64", "dist-packages"):
        (root / excluded).mkdir()
        (root / excluded / "skip.py").write_text("skipped = True\n")
    (root / "_sysconfigdata__linux.py").write_text("build = {}\n")
    (root / "notes.txt").write_text("not python\n")
    (root / "big.py").write_text("#" * 3000 + "\n")
    return root


def test_find_source_files_keeps_only_library_py_files(source):
    files = dict(sc.find_source_files(source, max_file_bytes=2048))
    expected = {p.name for p in source.glob("mod*.py")} | {"pkg/inner.py"}
    assert set(files) == expected
    assert files["pkg/inner.py"] == (source / "pkg" / "inner.py").stat().st_size
    assert "big.py" in dict(sc.find_source_files(source, max_file_bytes=None))
    empty = source.parent / "empty_lib"
    empty.mkdir(exist_ok=True)
    (empty / "site-packages").mkdir(exist_ok=True)
    (empty / "site-packages" / "a.py").write_text("")
    with pytest.raises(ValueError, match=f"source_dir '{re.escape(str(empty))}' has no .py files"):
        sc.find_source_files(empty)


def test_a_file_over_the_size_cap_is_skipped_with_a_warning_naming_it(tmp_path, caplog):
    (tmp_path / "small.py").write_text("x = 1\n")
    (tmp_path / "data.py").write_text("x = '" + "a" * (10 * 2**20) + "'\n")  # 10 MB on one line
    with caplog.at_level("WARNING", logger="jaxkd.data.text.stdlib_corpus"):
        files = dict(sc.find_source_files(tmp_path))
    assert set(files) == {"small.py"}
    warnings = [r.getMessage() for r in caplog.records if r.name == "jaxkd.data.text.stdlib_corpus"]
    assert len(warnings) == 1, warnings
    assert "skipped 1 file" in warnings[0] and "data.py" in warnings[0] and str(tmp_path) in warnings[0]
    assert f"max_file_bytes={sc.MAX_FILE_BYTES}" in warnings[0] and "10485767 bytes" in warnings[0]


def test_split_is_the_documented_hash_and_roughly_90_5_5():
    for path in ("os.py", "json/__init__.py", "test/test_os.py", "email/mime/text.py"):
        assert sc.split_of(path) == _split_by_formula(path)
    files = sc.find_source_files()  # the running interpreter's stdlib (a listing, nothing is read)
    assert sc.default_source_dir() == sysconfig.get_paths()["stdlib"]
    assert len(files) > 500
    assert not any(
        part in {"site-packages", "__pycache__"} for path, _ in files for part in path.split("/")
    )
    assert all(size <= sc.MAX_FILE_BYTES for _, size in files)
    share = Counter(sc.split_of(path) for path, _ in files)
    assert 0.85 < share["train"] / len(files) < 0.95
    assert 0.02 < share["validation"] / len(files) < 0.08 and 0.02 < share["test"] / len(files) < 0.08


@pytest.fixture(scope="module")
def prepared(source, tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    train = sc.stdlib_corpus_sequences("train", seq_len=16, data_dir=data_dir, source_dir=source)
    return data_dir, train


def test_builder_writes_array_record_splits_disjoint_by_file(source, prepared):
    data_dir, _ = prepared
    builder = sc.StdlibCorpus(data_dir=data_dir, source_dir=source)
    assert builder.is_prepared() and str(builder.info.file_format.value) == "array_record"
    assert builder.builder_config.name.startswith("custom_")
    seen = {}
    for split in ("train", "validation", "test"):
        data = builder.as_data_source(split=split)
        for i in range(len(data)):
            record = data[i]
            path = record["path"].decode()
            assert path not in seen  # each file in exactly one split
            seen[path] = split
            assert record["text"] == (source / path).read_bytes()  # raw bytes, even non-UTF-8
    assert seen == {p: _split_by_formula(p) for p, _ in sc.find_source_files(source)}


def test_sequences_are_the_files_packed_in_hash_order(source, prepared):
    data_dir, train = prepared
    paths = sorted(
        (p for p, _ in sc.find_source_files(source) if _split_by_formula(p) == "train"),
        key=lambda p: hashlib.sha256(p.encode()).digest(),
    )
    assert train.paths == tuple(paths) and train.num_documents == len(paths)
    expected = pack_documents([ByteTokenizer().encode((source / p).read_bytes()) for p in paths], 16)
    np.testing.assert_array_equal(train.tokens, expected["tokens"])
    np.testing.assert_array_equal(train["mask"], expected["mask"])
    assert train.num_text_bytes == sum((source / p).stat().st_size for p in paths)
    assert train.num_byte_targets == count_byte_targets(
        expected["tokens"], expected["mask"], ByteTokenizer().token_byte_lengths
    )
    texts = sc.stdlib_corpus_texts("train", data_dir=data_dir, source_dir=source)
    assert texts == [(p, (source / p).read_bytes()) for p in paths]
    # max_files takes a prefix of the same order; another tokenizer packs its own ids.
    two = sc.stdlib_corpus_sequences("train", seq_len=16, data_dir=data_dir, source_dir=source, max_files=2)
    assert two.paths == tuple(paths[:2])
    tok = BPETokenizer([(ord(" "), ord("="))])  # " =" in every "x = j"
    with_bpe = sc.stdlib_corpus_sequences(
        "train", seq_len=16, data_dir=data_dir, source_dir=source, tokenizer=tok
    )
    assert with_bpe.num_byte_targets <= train.num_text_bytes
    assert (with_bpe.tokens == 259).any() and with_bpe.mask.sum() < train.mask.sum()


def test_sequences_refuse_empty_split_bad_args_and_unwritable_dir(source, prepared, tmp_path):
    data_dir, _ = prepared
    with pytest.raises(ValueError, match="seq_len"):
        sc.stdlib_corpus_sequences("train", seq_len=1, data_dir=data_dir, source_dir=source)
    with pytest.raises(ValueError, match="max_files"):
        sc.stdlib_corpus_sequences("train", seq_len=8, data_dir=data_dir, source_dir=source, max_files=0)
    one = tmp_path / "one"
    one.mkdir()
    name = next(f"m{i}.py" for i in range(100) if _split_by_formula(f"m{i}.py") == "train")
    (one / name).write_text("a = 1\n")  # the only file, in train: validation is empty
    with pytest.raises(ValueError, match="no file of .* falls in split 'validation'"):
        sc.stdlib_corpus_sequences("validation", seq_len=8, data_dir=str(tmp_path / "d"), source_dir=one)
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="data_dir must be a writable directory"):
        sc.stdlib_corpus_sequences("train", seq_len=8, data_dir=str(blocker / "tfds"), source_dir=one)
    assert blocker.read_text() == "x"


def test_custom_config_follows_folder_contents_and_default_records_python(source, tmp_path):
    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / "a.py").write_text("a = 1\n")
    name = sc.StdlibCorpus(data_dir=str(tmp_path), source_dir=lib).builder_config.name
    assert sc.StdlibCorpus(data_dir=str(tmp_path), source_dir=lib).builder_config.name == name
    (lib / "b.py").write_text("b = 2\n")
    assert sc.StdlibCorpus(data_dir=str(tmp_path), source_dir=lib).builder_config.name != name
    default = sc.StdlibCorpus(data_dir=str(tmp_path))
    assert default.builder_config.python_version == platform.python_version()
    assert default.builder_config.name == "py" + platform.python_version().replace(".", "_")
    assert str(default.version) == "1.0.0" and not default.is_prepared()  # nothing built on init
    with pytest.raises(ValueError, match="either config or source_dir"):
        sc.StdlibCorpus(data_dir=str(tmp_path), source_dir=lib, config=default.builder_config.name)


def test_sequences_with_tfds_mock_data():
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(policy=tfds.testing.MockPolicy.USE_CODE, num_examples=3):
        out = sc.stdlib_corpus_sequences("train", seq_len=8, data_dir="/nonexistent/tfds", max_files=2)
    assert out.num_documents == 2 and out.tokens.shape[1] == 8
    assert out.tokens.dtype == np.int32 and out.mask.any()
    assert out.num_byte_targets == out.num_text_bytes - count_row_start_bytes(out)
    assert not os.path.exists("/nonexistent/tfds")


def count_row_start_bytes(packed) -> int:
    first = packed.tokens[:, 0][packed.mask[:, 0]]
    return int((first < 256).sum())


# ---------------------------------------------------------------- TextLoader


def test_text_loader_batches_resume_and_normalizer():
    out = pack_documents([np.arange(5), np.arange(7), np.arange(3), np.arange(2)], 4)
    n = out["tokens"].shape[0]
    loader = TextLoader(
        out["tokens"], out["mask"], batch_size=2, drop_remainder=False, seed=1, with_index=True,
        num_epochs=2, process_index=0, process_count=1,
    )
    batches = list(loader)
    steps = len(loader)
    assert steps == -(-n // 2) and len(batches) == 2 * steps
    for epoch in range(2):
        epoch_batches = batches[epoch * steps : (epoch + 1) * steps]
        rows = np.concatenate([b["index"][b["mask"].any(1)] for b in epoch_batches])
        assert sorted(rows.tolist()) == list(range(n))  # each row once per epoch
    for batch in batches:
        real = batch["mask"].any(1)
        np.testing.assert_array_equal(batch["tokens"][real], out["tokens"][batch["index"][real]])
        targets = (batch["mask"][:, 1:] & batch["mask"][:, :-1]).sum()
        np.testing.assert_allclose(batch["token_normalizer"], targets / 2)
    # Resume from a saved state: the same batches follow.
    again = TextLoader(
        out["tokens"], out["mask"], batch_size=2, drop_remainder=False, seed=1, with_index=True,
        num_epochs=2, process_index=0, process_count=1,
    )
    next(again), next(again)
    state = again.get_state()
    fresh = TextLoader(
        out["tokens"], out["mask"], batch_size=2, drop_remainder=False, seed=1, with_index=True,
        num_epochs=2, process_index=0, process_count=1,
    )
    fresh.set_state(state)
    for expected, got in zip(batches[2:], fresh):
        for key in expected:
            np.testing.assert_array_equal(expected[key], got[key])
    # Two processes: each gets its half, with the global batch's normalizer.
    halves = [
        TextLoader(out["tokens"], out["mask"], batch_size=2, seed=1, process_index=p, process_count=2)
        for p in range(2)
    ]
    whole = TextLoader(out["tokens"], out["mask"], batch_size=2, seed=1, process_index=0, process_count=1)
    for parts, single in zip(zip(*halves), whole):
        for key in single:
            np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), single[key])
    with pytest.raises(ValueError, match="mask must be bool"):
        TextLoader(out["tokens"], out["mask"].astype(int), batch_size=2, process_index=0, process_count=1)
