"""A small byte-level BPE tokenizer, learned from texts in pure Python.

Byte-pair encoding (Sennrich, Haddow & Birch, 2016, "Neural Machine Translation of Rare Words with
Subword Units") on bytes, as GPT-2 does it (Radford et al., 2019, "Language Models are Unsupervised
Multitask Learners"; openai/gpt-2 ``src/encoder.py``): the text is first split into pre-tokens by a
regular expression, merges never cross a pre-token, and every pre-token starts as its UTF-8 bytes.

Vocabulary
    ``0..255``: the bytes.  ``256, 257, 258``: ``PAD``, ``BOS``, ``EOS`` (the ids of
    :class:`jaxkd.data.ByteTokenizer`, so a BPE without merges *is* the byte tokenizer).  Merge
    ``r`` (0-based, in the order learned) creates token ``259 + r``.  ``vocab_size = 259 + #merges``.

Pre-tokens (:data:`PRETOKENIZE_PATTERN`)
    GPT-2's pattern, on bytes and with ASCII classes: ``" ?[A-Za-z_]+| ?[0-9]+| ?[^\\sA-Za-z0-9_]+|
    \\s+(?!\\S)|\\s+"``.  Differences from GPT-2, both for source code: ``_`` counts as a letter (so
    ``__init__`` is one pre-token), and the English contractions (``'s``, ``'t``, ...) are not split
    off (GPT-2 turns the string ``'self'`` into ``'s`` + ``elf``).  Non-ASCII bytes fall in the
    punctuation class.  The pre-tokens cover the text exactly (every byte belongs to one).

Training (:func:`train_bpe`)
    The pre-tokens of all texts are counted once; each merge takes the most frequent adjacent pair of
    tokens over all pre-tokens (weighted by their counts), and **ties go to the pair with the smaller
    first id, then the smaller second id**.  Training stops after ``vocab_size - 259`` merges or when no
    pair occurs ``min_frequency`` times.  Pair counts are kept up to date incrementally: a merge
    rewrites only the pre-tokens that contain the pair and adjusts the counts of the pairs they held
    (a heap with lazy deletion finds the next best pair), instead of recounting every pair per merge.

Encoding
    Each pre-token is encoded by repeatedly merging the adjacent pair of lowest rank (left to right for
    repeated pairs) until none is a learned merge: the segmentation training produced for that
    pre-token.  Results are cached per pre-token.
"""

from __future__ import annotations

import heapq
import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence

import numpy as np

from jaxkd.checks import check_int
from jaxkd.data.text.tokenizer import BOS_ID, EOS_ID, NUM_BYTES, PAD_ID, _as_bytes, _as_ids, token_byte_offsets

__all__ = ["BPETokenizer", "PRETOKENIZE_PATTERN", "pretokenize", "train_bpe"]

#: The pre-tokenizer (a ``bytes`` regular expression); see the module docstring.
PRETOKENIZE_PATTERN = rb" ?[A-Za-z_]+| ?[0-9]+| ?[^\sA-Za-z0-9_]+|\s+(?!\S)|\s+"
_PRETOKENIZE = re.compile(PRETOKENIZE_PATTERN)
#: The first merged token's id: after the 256 bytes and PAD, BOS, EOS.
FIRST_MERGE_ID = NUM_BYTES + 3
_FORMAT = "jaxkd.byte_bpe"
_CACHE_LIMIT = 1 << 18  # pre-tokens cached by encode before the cache is cleared


def pretokenize(text: str | bytes) -> list[bytes]:
    """The pre-tokens of ``text`` (its UTF-8 bytes), in order; they concatenate to the text."""
    return _PRETOKENIZE.findall(_as_bytes(text))


def _merge_word(tokens: list[int], a: int, b: int, new: int) -> list[int]:
    """``tokens`` with every non-overlapping ``(a, b)``, left to right, replaced by ``new``."""
    out = []
    i, n = 0, len(tokens)
    while i < n:
        if i + 1 < n and tokens[i] == a and tokens[i + 1] == b:
            out.append(new)
            i += 2
        else:
            out.append(tokens[i])
            i += 1
    return out


class BPETokenizer:
    """A byte-level BPE (see the module docstring); build it with :func:`train_bpe` or :meth:`from_json`.

    Attributes:
        merges: the learned merges ``(left_id, right_id)``, merge ``r`` making token ``259 + r``.
        vocab_size: ``259 + len(merges)``.
        pad_id, bos_id, eos_id: 256, 257, 258.
    """

    pad_id = PAD_ID
    bos_id = BOS_ID
    eos_id = EOS_ID

    def __init__(self, merges: Sequence[tuple[int, int]]):
        merges = [tuple(m) for m in merges]
        token_bytes: list[bytes] = [bytes([i]) for i in range(NUM_BYTES)] + [b"", b"", b""]
        for r, merge in enumerate(merges):
            new = FIRST_MERGE_ID + r
            if len(merge) != 2 or not all(
                isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in merge
            ):
                raise ValueError(f"merges[{r}] must be a pair of integer ids, got {merge!r}")
            a, b = int(merge[0]), int(merge[1])
            for t in (a, b):
                if not (0 <= t < new) or NUM_BYTES <= t < FIRST_MERGE_ID:
                    raise ValueError(
                        f"merges[{r}] = {merge!r} refers to id {t}, which is a special or not yet"
                        f" defined (merge {r} creates id {new})"
                    )
            token_bytes.append(token_bytes[a] + token_bytes[b])
        self.merges: tuple[tuple[int, int], ...] = tuple((int(a), int(b)) for a, b in merges)
        self.vocab_size = FIRST_MERGE_ID + len(self.merges)
        self._token_bytes = tuple(token_bytes)
        self._ranks = {m: r for r, m in enumerate(self.merges)}
        self._cache: dict[bytes, tuple[int, ...]] = {}
        lengths = np.array([len(t) for t in token_bytes], np.int32)
        lengths.flags.writeable = False
        self._lengths = lengths

    def __repr__(self) -> str:
        return f"BPETokenizer(vocab_size={self.vocab_size})"

    def __eq__(self, other) -> bool:
        return isinstance(other, BPETokenizer) and self.merges == other.merges

    def __hash__(self) -> int:
        return hash(self.merges)

    # ------------------------------------------------------------ vocabulary

    @property
    def token_byte_lengths(self) -> np.ndarray:
        """int32 ``[vocab_size]``: bytes each token stands for (0 for the specials); read-only."""
        return self._lengths

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes token ``token_id`` stands for (``b""`` for a special)."""
        check_int("token_id", token_id, low=0)
        if token_id >= self.vocab_size:
            raise ValueError(f"token_id must lie in [0, {self.vocab_size}), got token_id={token_id}")
        return self._token_bytes[token_id]

    # ------------------------------------------------------------ encoding

    def _encode_word(self, word: bytes) -> tuple[int, ...]:
        cached = self._cache.get(word)
        if cached is not None:
            return cached
        tokens = list(word)
        ranks = self._ranks
        while len(tokens) > 1:
            best, best_rank = None, None
            for pair in zip(tokens, tokens[1:]):
                r = ranks.get(pair)
                if r is not None and (best_rank is None or r < best_rank):
                    best, best_rank = pair, r
            if best is None:
                break
            tokens = _merge_word(tokens, best[0], best[1], FIRST_MERGE_ID + best_rank)
        result = tuple(tokens)
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache.clear()
        self._cache[word] = result
        return result

    def encode(self, text: str | bytes) -> np.ndarray:
        """int32 ``[n]``: the tokens of ``text`` (a ``str`` is UTF-8 encoded); no specials added."""
        ids: list[int] = []
        for word in pretokenize(text):
            ids.extend(self._encode_word(word))
        return np.asarray(ids, np.int32)

    def encode_with_offsets(self, text: str | bytes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(ids, byte_starts, byte_ends)``: token ``i`` is bytes ``starts[i]:ends[i]`` of the UTF-8 text.

        The spans tile the text: ``starts[0] = 0``, ``starts[i + 1] = ends[i]``, ``ends[-1] = len``.
        """
        ids = self.encode(text)
        starts, ends = token_byte_offsets(ids, self)
        return ids, starts, ends

    def decode(self, ids) -> bytes:
        """The bytes of ``ids`` concatenated, specials dropped.

        Raises:
            ValueError: an id outside ``[0, vocab_size)`` or ``ids`` not 1-D.
        """
        arr = _as_ids(ids, self.vocab_size)
        return b"".join(self._token_bytes[i] for i in arr.tolist())

    # ------------------------------------------------------------ serialization

    def to_json(self) -> str:
        """The tokenizer as JSON: the format, the pre-tokenizer pattern and the merges."""
        return json.dumps(
            {
                "format": _FORMAT,
                "version": 1,
                "pretokenize_pattern": PRETOKENIZE_PATTERN.decode("ascii"),
                "specials": {"pad": PAD_ID, "bos": BOS_ID, "eos": EOS_ID},
                "merges": [list(m) for m in self.merges],
            }
        )

    @classmethod
    def from_json(cls, text: str) -> BPETokenizer:
        """The tokenizer :meth:`to_json` wrote.

        Raises:
            ValueError: not JSON of this format, another pre-tokenizer or special ids, or invalid merges.
        """
        try:
            data = json.loads(text)
        except (TypeError, json.JSONDecodeError) as e:
            raise ValueError(f"not a BPETokenizer JSON: {e}") from None
        if not isinstance(data, dict) or data.get("format") != _FORMAT or data.get("version") != 1:
            raise ValueError(
                f"not a BPETokenizer JSON (expected format {_FORMAT!r} version 1), got"
                f" format={data.get('format') if isinstance(data, dict) else None!r}"
            )
        if data.get("pretokenize_pattern") != PRETOKENIZE_PATTERN.decode("ascii"):
            raise ValueError(
                f"the JSON's pretokenize_pattern {data.get('pretokenize_pattern')!r} differs from"
                f" this version's {PRETOKENIZE_PATTERN.decode('ascii')!r}: its merges would encode"
                " differently"
            )
        if data.get("specials") != {"pad": PAD_ID, "bos": BOS_ID, "eos": EOS_ID}:
            raise ValueError(f"unexpected special ids {data.get('specials')!r}")
        merges = data.get("merges")
        if not isinstance(merges, list):
            raise ValueError(f"merges must be a list of pairs, got {type(merges).__name__}")
        return cls(merges)


def train_bpe(
    texts: Iterable[str | bytes], vocab_size: int, *, min_frequency: int = 2
) -> BPETokenizer:
    """Learns a byte-level BPE of at most ``vocab_size`` tokens from ``texts`` (deterministic).

    Each step merges the most frequent adjacent pair (counted over the pre-tokens of all texts); ties
    go to the pair with the smallest first id, then the smallest second id.  See the module docstring.

    Args:
        texts: the training texts (``str`` are UTF-8 encoded).
        vocab_size: the largest vocabulary, an integer ``>= 259`` (256 bytes, 3 specials, the merges).
        min_frequency: stop when the best pair occurs fewer times than this (an integer ``>= 1``); the
            vocabulary is then smaller than ``vocab_size``.

    Returns:
        A :class:`BPETokenizer` with ``vocab_size - 259`` merges or fewer.
    """
    check_int("vocab_size", vocab_size, low=FIRST_MERGE_ID)
    check_int("min_frequency", min_frequency, low=1)
    if isinstance(texts, (str, bytes)):
        raise ValueError("texts must be an iterable of texts, got a single str/bytes")
    counts: Counter[bytes] = Counter()
    for text in texts:
        counts.update(pretokenize(text))
    # Words in a fixed order (first by bytes), so every structure below is built deterministically.
    words = sorted(w for w in counts if len(w) > 1)
    word_tokens = [list(w) for w in words]
    word_counts = [counts[w] for w in words]

    pair_counts: dict[tuple[int, int], int] = {}
    pair_words: dict[tuple[int, int], set[int]] = {}
    for w, tokens in enumerate(word_tokens):
        c = word_counts[w]
        for pair in zip(tokens, tokens[1:]):
            pair_counts[pair] = pair_counts.get(pair, 0) + c
            pair_words.setdefault(pair, set()).add(w)
    # Max-heap by count, ties by the smaller (first, second) id: entries (-count, first, second).
    # Entries go stale when a count changes; a popped entry is used only if its count is current.
    heap = [(-c, a, b) for (a, b), c in pair_counts.items()]
    heapq.heapify(heap)

    merges: list[tuple[int, int]] = []
    num_merges = vocab_size - FIRST_MERGE_ID
    while len(merges) < num_merges and heap:
        neg, a, b = heapq.heappop(heap)
        if pair_counts.get((a, b)) != -neg:
            continue  # stale
        if -neg < min_frequency:
            break
        new = FIRST_MERGE_ID + len(merges)
        merges.append((a, b))
        changed: dict[tuple[int, int], int] = {}
        for w in sorted(pair_words.pop((a, b))):
            tokens = word_tokens[w]
            merged = _merge_word(tokens, a, b, new)
            if len(merged) == len(tokens):
                continue  # the pair left this word by an earlier merge (sets are pruned lazily)
            c = word_counts[w]
            for pair in zip(tokens, tokens[1:]):
                changed[pair] = changed.get(pair, 0) - c
            for pair in zip(merged, merged[1:]):
                changed[pair] = changed.get(pair, 0) + c
                if pair not in pair_words:
                    pair_words[pair] = set()
                pair_words[pair].add(w)
            word_tokens[w] = merged
        for pair, delta in changed.items():
            if delta == 0:
                continue
            count = pair_counts.get(pair, 0) + delta
            if count > 0:
                pair_counts[pair] = count
                heapq.heappush(heap, (-count, pair[0], pair[1]))
            else:
                pair_counts.pop(pair, None)
                pair_words.pop(pair, None)
        pair_counts.pop((a, b), None)
    return BPETokenizer(merges)
