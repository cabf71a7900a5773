"""Chat and prompt-completion data in TRL's formats: local JSONL to token rows with completion-only loss masks.

Each line of a JSONL file is one example in one of the formats TRL's ``SFTTrainer`` / ``GKDTrainer`` read
(TRL's "Dataset formats" guide):

* **prompt-completion**, ``{"prompt": …, "completion": …}``: both strings (standard) or both message lists
  (conversational); only the completion is a target (TRL's ``completion_only_loss``, the default for this
  format; ``DataCollatorForCompletionOnlyLM`` of earlier TRL versions);
* **conversational**, ``{"messages": [{"role": …, "content": …}, …]}``: only the assistant turns are targets
  (TRL's ``assistant_only_loss=True``), each with what the chat template writes after its content (the
  end-of-turn token);
* **language modeling**, ``{"text": …}``: every token is a target.

A standard example is ``[BOS] + encode(prompt) + encode(completion) + [EOS]`` (``BOS`` when the tokenizer has
one; prompt and completion are encoded apart, so the boundary is exact; TRL appends ``EOS`` to the completion
the same way). A conversational one is the chat template's rendering (:meth:`jaxkd.data.HFTokenizer.apply_chat_template`),
tokenized once; a token is a target when its first character lies in an assistant part: the text the template
adds for message ``i`` after ``messages[:i]`` with the generation prompt (TRL renders the prompt with
``add_generation_prompt=True`` and the prompt plus completion without, and takes the rest as the completion).
A template that does not render conversations prefix by prefix (it rewrites earlier turns) is an error.

:func:`chat_rows` turns the examples into rows of ``seq_len`` — one example per row, right-padded, or packed
with segment ids (:mod:`jaxkd.data.text.packing`) by best-fit decreasing as TRL's ``packing_strategy="bfd"``,
never splitting an example; examples longer than ``seq_len`` are truncated (TRL's ``max_length``). The rows
carry :data:`jaxkd.batch.LOSS_MASK`; :class:`jaxkd.data.TextLoader` takes them as they are.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from jaxkd.batch import LOSS_MASK, MASK, POSITIONS, SEGMENT_IDS, TOKENS
from jaxkd.checks import check_int

__all__ = ["chat_example", "chat_rows", "read_jsonl"]

_FORMATS = ("'messages' (conversational), 'prompt' and 'completion' (prompt-completion) or 'text' "
            "(language modeling), TRL's dataset formats")


def read_jsonl(path: str | os.PathLike) -> list[tuple[dict[str, Any], str]]:
    """The records of a JSONL file with where each comes from: ``[(record, "file, line n"), …]`` (blank lines
    skipped).

    Raises:
        ValueError: a line that is not a JSON object (the message names the file and line).
    """
    path = os.fspath(path)
    out = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}, line {number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not JSON ({e})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
            out.append((record, where))
    return out


def _check_messages(messages: Any, key: str, where: str) -> list[dict[str, Any]]:
    if not isinstance(messages, list) or not all(
            isinstance(m, Mapping) and isinstance(m.get("role"), str) and "content" in m for m in messages):
        raise ValueError(f"{where}: {key!r} must be a list of {{'role', 'content'}} messages")
    return [dict(m) for m in messages]


def _template_ids(tokenizer, messages, spans_of, where: str) -> tuple[np.ndarray, np.ndarray]:
    """The rendering of ``messages`` tokenized once, and which tokens start in one of the character spans
    ``spans_of(render)`` returns."""
    if not hasattr(tokenizer, "apply_chat_template") or not hasattr(tokenizer, "encode_chars"):
        raise ValueError(f"{where}: conversational examples need a tokenizer with a chat template "
                         f"(jaxkd.data.HFTokenizer), got {type(tokenizer).__name__}")

    def render(msgs, add_generation_prompt=False):
        return tokenizer.apply_chat_template(msgs, add_generation_prompt=add_generation_prompt)

    text = render(messages)
    spans = spans_of(render, text)
    ids, offsets = tokenizer.encode_chars(text)
    starts = offsets[:, 0] if len(ids) else np.zeros((0,), np.int64)
    target = np.zeros(ids.shape, bool)
    for lo, hi in spans:
        target |= (starts >= lo) & (starts < hi)
    return ids.astype(np.int32), target


def _prefix_spans(pieces: Sequence[tuple[str, str]], text: str, where: str) -> list[tuple[int, int]]:
    """``[(len(before), len(upto))]`` for each ``(before, upto)`` rendering pair, checked to be prefixes."""
    spans = []
    for before, upto in pieces:
        if not (upto.startswith(before) and text.startswith(upto)):
            raise ValueError(f"{where}: the chat template does not render the conversation prefix by prefix "
                             "(an earlier turn changes when a later one is added), so the assistant tokens "
                             "cannot be told from the prompt")
        spans.append((len(before), len(upto)))
    return spans


def chat_example(record: Mapping[str, Any], tokenizer, *, where: str = "example") -> tuple[np.ndarray, np.ndarray]:
    """``(ids int32 [n], loss_mask bool [n])`` of one example in a TRL format (see the module docstring):
    ``loss_mask`` is True on the tokens that are targets (completion or assistant tokens).

    Raises:
        ValueError: a record without the expected keys, or of a format the tokenizer cannot render
            (``where`` names it in the message).
    """
    if not isinstance(record, Mapping):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        messages = _check_messages(record["messages"], "messages", where)

        def spans(render, text):
            pieces = [(render(messages[:i], add_generation_prompt=True), render(messages[: i + 1]))
                      for i, m in enumerate(messages) if m["role"] == "assistant"]
            return _prefix_spans(pieces, text, where)

        return _template_ids(tokenizer, messages, spans, where)
    if "prompt" in record and "completion" in record:
        prompt, completion = record["prompt"], record["completion"]
        if isinstance(prompt, str) and isinstance(completion, str):
            head = [] if getattr(tokenizer, "bos_id", None) is None else [tokenizer.bos_id]
            tail = [] if getattr(tokenizer, "eos_id", None) is None else [tokenizer.eos_id]
            p = np.concatenate([np.asarray(head, np.int64), np.asarray(tokenizer.encode(prompt), np.int64)])
            c = np.concatenate([np.asarray(tokenizer.encode(completion), np.int64), np.asarray(tail, np.int64)])
            ids = np.concatenate([p, c]).astype(np.int32)
            return ids, np.arange(ids.shape[0]) >= p.shape[0]
        if isinstance(prompt, list) and isinstance(completion, list):
            prompt = _check_messages(prompt, "prompt", where)
            completion = _check_messages(completion, "completion", where)

            def spans(render, text):
                return [(lo, len(text)) for lo, _ in _prefix_spans(
                    [(render(prompt, add_generation_prompt=True), text)], text, where)]

            return _template_ids(tokenizer, prompt + completion, spans, where)
        raise ValueError(f"{where}: 'prompt' and 'completion' must both be strings or both message lists, got "
                         f"{type(prompt).__name__} and {type(completion).__name__}")
    if "text" in record and isinstance(record["text"], str):
        head = [] if getattr(tokenizer, "bos_id", None) is None else [tokenizer.bos_id]
        tail = [] if getattr(tokenizer, "eos_id", None) is None else [tokenizer.eos_id]
        ids = np.concatenate([np.asarray(head, np.int64), np.asarray(tokenizer.encode(record["text"]), np.int64),
                              np.asarray(tail, np.int64)]).astype(np.int32)
        return ids, np.ones(ids.shape, bool)
    raise ValueError(f"{where}: expected {_FORMATS}; got keys {sorted(record)}")


def _pack_bfd(lengths: Sequence[int], seq_len: int) -> list[list[int]]:
    """Examples (by index) into rows of ``seq_len`` by best-fit decreasing: longest first, each into the
    fullest row it fits (ties: the earliest), a new row when none. Deterministic."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        fits = [r for r in range(len(rows)) if room[r] >= lengths[i]]
        if fits:
            r = min(fits, key=lambda r: (room[r], r))
        else:
            rows.append([])
            room.append(seq_len)
            r = len(rows) - 1
        rows[r].append(i)
        room[r] -= lengths[i]
    return rows


def chat_rows(examples: str | os.PathLike | Iterable[Mapping[str, Any]], tokenizer, seq_len: int, *,
              pack: bool = False, pad: int | None = None) -> dict[str, np.ndarray]:
    """Rows of ``seq_len`` tokens of chat / prompt-completion examples (a JSONL path or records) with their
    completion-only loss mask.

    Args:
        examples: a JSONL file (:func:`read_jsonl`) or an iterable of records, in TRL's formats.
        tokenizer: a jaxkd tokenizer; conversational examples need a chat template
            (:class:`jaxkd.data.HFTokenizer`).
        seq_len: tokens per row (``>= 2``); longer examples are truncated.
        pack: pack several examples per row (best-fit decreasing, never splitting one) with
            ``"segment_ids"`` and ``"positions"``; otherwise one example per row.
        pad: the id of padded positions (default the tokenizer's ``pad_id``, else 0; the mask says what
            is padding).

    Returns:
        ``{"tokens": int32 [N, seq_len], "mask": bool, "loss_mask": bool}`` (plus ``"segment_ids"`` and
        ``"positions"``, int32, with ``pack=True``): the input of :class:`jaxkd.data.TextLoader`.

    Raises:
        ValueError: an example without the expected keys (the message names the file and line), no
            examples, or a bad ``seq_len``.
    """
    check_int("seq_len", seq_len, low=2)
    if isinstance(examples, (str, os.PathLike)):
        records = read_jsonl(examples)
    else:
        records = [(record, f"examples[{i}]") for i, record in enumerate(examples)]
    if not records:
        raise ValueError("no examples")
    encoded = [chat_example(record, tokenizer, where=where) for record, where in records]
    encoded = [(ids[:seq_len], target[:seq_len]) for ids, target in encoded]
    pad = (getattr(tokenizer, "pad_id", None) or 0) if pad is None else pad
    check_int("pad", pad, low=0)
    groups = _pack_bfd([len(ids) for ids, _ in encoded], seq_len) if pack else [[i] for i in range(len(encoded))]
    n = len(groups)
    out = {TOKENS: np.full((n, seq_len), pad, np.int32), MASK: np.zeros((n, seq_len), bool),
           LOSS_MASK: np.zeros((n, seq_len), bool)}
    if pack:
        out[SEGMENT_IDS] = np.zeros((n, seq_len), np.int32)
        out[POSITIONS] = np.zeros((n, seq_len), np.int32)
    for r, group in enumerate(groups):
        at = 0
        for segment, i in enumerate(group, start=1):
            ids, target = encoded[i]
            k = len(ids)
            out[TOKENS][r, at : at + k] = ids
            out[MASK][r, at : at + k] = True
            out[LOSS_MASK][r, at : at + k] = target
            if pack:
                out[SEGMENT_IDS][r, at : at + k] = segment
                out[POSITIONS][r, at : at + k] = np.arange(k)
            at += k
    return out
