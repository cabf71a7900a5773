"""Real tokenizers: a Hugging Face ``tokenizer.json`` (the ``tokenizers`` library) as a jaxkd :class:`Tokenizer`,
with the checkpoint's chat template.

:class:`HFTokenizer` wraps a :class:`tokenizers.Tokenizer` (``tokenizer.json``) and reads the special tokens and
the chat template of the checkpoint's ``tokenizer_config.json`` (or ``chat_template.jinja``), so a
checkpoint directory gives everything packing, bits per byte, cross-tokenizer distillation and chat data need:

* ``encode`` / ``decode``: ids without added specials (``add_special_tokens=False``; packing adds ``BOS``/``EOS``,
  a chat template writes its own), and the bytes of the tokens;
* ``vocab_size``, ``pad_id``, ``bos_id``, ``eos_id`` (``None`` where the checkpoint has no such token, e.g. no
  ``BOS`` for Qwen; ``pad_id`` falls back to ``eos_id`` as transformers' users commonly set it);
* ``token_byte_lengths``: how many bytes of text each token stands for, 0 for special tokens. For byte-level
  BPE (GPT-2, LLaMA 3, Qwen: a ``ByteLevel`` pre-tokenizer or decoder) a vocabulary entry is written in GPT-2's
  printable alphabet for bytes (``Ġ`` is the space), mapped back here byte for byte, so a token holding part of
  a multi-byte character counts its bytes and no character is counted twice; for SentencePiece-style
  vocabularies (``▁`` for the space, ``<0xHH>`` byte-fallback tokens) ``▁`` is one byte and a fallback token
  one byte; added tokens that are not special count their text;
* :meth:`HFTokenizer.apply_chat_template`: the chat template (Jinja) rendered as transformers'
  ``PreTrainedTokenizerBase.apply_chat_template`` renders it (same sandboxed environment, ``trim_blocks`` and
  ``lstrip_blocks``, ``loopcontrols``, the ``tojson`` filter, ``raise_exception`` and ``strftime_now``; the
  special tokens as ``bos_token``, ``eos_token``, …). Needs ``jinja2`` (imported on first use).
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jaxkd.data.text.tokenizer import _as_ids, token_byte_offsets

__all__ = ["HFTokenizer", "byte_level_alphabet"]

_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


@functools.lru_cache(maxsize=1)
def byte_level_alphabet() -> dict[str, int]:
    """GPT-2's printable character for every byte, inverted (``{"Ġ": 32, "a": 97, …}``): how byte-level BPE
    vocabularies (``tokenizers``' ``ByteLevel``) write bytes (Radford et al., 2019, ``bytes_to_unicode``)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + extra)] = byte
            extra += 1
    return chars


def _has_type(node: Any, kind: str) -> bool:
    """Whether a tokenizer.json component (or any component of a Sequence of them) has ``type == kind``."""
    if isinstance(node, Mapping):
        return node.get("type") == kind or any(_has_type(v, kind) for v in node.values())
    if isinstance(node, list):
        return any(_has_type(v, kind) for v in node)
    return False


def _token_text(value: Any) -> str | None:
    """A special token of tokenizer_config.json: a string or an AddedToken dict ``{"content": …}``."""
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) else None


class HFTokenizer:
    """A ``tokenizers.Tokenizer`` (a checkpoint's ``tokenizer.json``) as a jaxkd tokenizer (see the module docstring).

    Args:
        tokenizer: a :class:`tokenizers.Tokenizer`.
        chat_template: the Jinja chat template (``None``: :meth:`apply_chat_template` raises).
        special_tokens: ``{"bos_token": "<s>", "eos_token": "</s>", "pad_token": …}`` (transformers' names),
            the token strings the chat template sees and ``bos_id``/``eos_id``/``pad_id`` come from.

    Use :meth:`from_pretrained` for a checkpoint directory (or a ``tokenizer.json`` path).
    """

    def __init__(self, tokenizer, *, chat_template: str | None = None,
                 special_tokens: Mapping[str, str | None] | None = None):
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.special_tokens = {k: v for k, v in dict(special_tokens or {}).items() if v is not None}
        unknown = sorted(set(self.special_tokens) - set(_SPECIAL_NAMES))
        if unknown:
            raise ValueError(f"special_tokens takes {list(_SPECIAL_NAMES)}, got {unknown}")
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values()) + 1 if vocab else 0
        ids = {}
        for name in ("bos_token", "eos_token", "pad_token"):
            text = self.special_tokens.get(name)
            if text is not None and tokenizer.token_to_id(text) is None:
                raise ValueError(f"{name} {text!r} is not in the tokenizer's vocabulary")
            ids[name] = None if text is None else int(tokenizer.token_to_id(text))
        self.bos_id, self.eos_id = ids["bos_token"], ids["eos_token"]
        self.pad_id = ids["pad_token"] if ids["pad_token"] is not None else self.eos_id
        spec = json.loads(tokenizer.to_str())
        self.byte_level = _has_type(spec.get("pre_tokenizer"), "ByteLevel") or _has_type(spec.get("decoder"), "ByteLevel")
        self.byte_fallback = bool((spec.get("model") or {}).get("byte_fallback")) or _has_type(spec.get("decoder"), "ByteFallback")
        self._token_bytes = self._all_token_bytes(vocab)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "HFTokenizer":
        """The tokenizer of a checkpoint directory (``tokenizer.json``, and ``tokenizer_config.json`` /
        ``chat_template.jinja`` when present), or of a ``tokenizer.json`` file alone. Local files only.

        Raises:
            FileNotFoundError: no ``tokenizer.json`` there.
        """
        from tokenizers import Tokenizer as _Tokenizer

        path = os.fspath(path)
        directory = path if os.path.isdir(path) else os.path.dirname(path)
        file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        if not os.path.isfile(file):
            raise FileNotFoundError(f"no tokenizer.json at {file}")
        config: dict[str, Any] = {}
        config_file = os.path.join(directory, "tokenizer_config.json")
        if os.path.isfile(config_file):
            with open(config_file, encoding="utf-8") as f:
                config = json.load(f)
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": "default", "template": …}, …]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
            template = named.get("default")
        jinja_file = os.path.join(directory, "chat_template.jinja")
        if template is None and os.path.isfile(jinja_file):
            with open(jinja_file, encoding="utf-8") as f:
                template = f.read()
        special = {name: _token_text(config.get(name)) for name in _SPECIAL_NAMES}
        return cls(_Tokenizer.from_file(file), chat_template=template, special_tokens=special)

    def __repr__(self) -> str:
        return f"HFTokenizer(vocab_size={self.vocab_size}, byte_level={self.byte_level})"

    def _all_token_bytes(self, vocab: Mapping[str, int]) -> list[bytes]:
        added = {int(i): t for i, t in self.tokenizer.get_added_tokens_decoder().items()}
        alphabet = byte_level_alphabet() if self.byte_level else None
        out = [b""] * self.vocab_size
        for token, i in vocab.items():
            if i in added:
                out[i] = b"" if added[i].special else added[i].content.encode("utf-8")
            elif alphabet is not None and all(c in alphabet for c in token):
                out[i] = bytes(alphabet[c] for c in token)
            elif self.byte_fallback and _BYTE_FALLBACK.fullmatch(token):
                out[i] = bytes([int(token[3:5], 16)])
            else:
                out[i] = token.replace("\u2581", " ").encode("utf-8")
        return out

    @property
    def token_byte_lengths(self) -> np.ndarray:
        """int32 ``[vocab_size]``: the bytes of text each token stands for (0 for special tokens)."""
        return np.array([len(b) for b in self._token_bytes], np.int32)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes token ``token_id`` stands for (``b""`` for a special token)."""
        return self._token_bytes[int(_as_ids([token_id], self.vocab_size, "token_id")[0])]

    def encode(self, text: str | bytes) -> np.ndarray:
        """int32 ids of ``text`` without added specials (a ``bytes`` text is decoded as UTF-8)."""
        if isinstance(text, (bytes, bytearray, memoryview)):
            text = bytes(text).decode("utf-8")
        if not isinstance(text, str):
            raise ValueError(f"text must be str or bytes, got {type(text).__name__}")
        return np.asarray(self.tokenizer.encode(text, add_special_tokens=False).ids, np.int32)

    def encode_with_offsets(self, text: str | bytes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(ids, byte_starts, byte_ends)``: each token's byte span *in the text*, from the running sums of the
        tokens' byte lengths (:func:`jaxkd.data.token_byte_offsets`).

        A SentencePiece-style tokenizer (``Metaspace``, or ``ByteLevel(add_prefix_space=True)``) spells the
        text with one space in front that the text does not have (``"▁Hello"`` for ``"Hello"``): the spans
        are shifted back by that byte, the first token's clipped to start at 0, so spans of two tokenizers of
        the same text line up byte for byte (cross-tokenizer chunks, :func:`jaxkd.data.text.cross_tokenizer.parallel_rows`).

        Raises:
            ValueError: the tokens spell other bytes than the text's (a special token's text written in it, which
                stands for no bytes; a normalizer that rewrites the text: lowercasing, NFKC …), so no span maps
                back onto the text.
        """
        ids = self.encode(text)
        starts, ends = token_byte_offsets(ids, self)
        data = text if isinstance(text, (bytes, bytearray, memoryview)) else text.encode("utf-8")
        spelled = self.decode(ids)
        if spelled == bytes(data):
            return ids, starts, ends
        if spelled == b" " + bytes(data):
            return ids, np.maximum(starts - 1, 0), np.maximum(ends - 1, 0)
        raise ValueError(f"the tokenizer's tokens spell {len(spelled)} bytes that differ from the text's {len(data)} "
                         f"(first at byte {next((i for i, (a, b) in enumerate(zip(spelled, data)) if a != b), min(len(spelled), len(data)))}): "
                         "special tokens written in the text, or a normalizer that rewrites it: token spans cannot be "
                         "mapped back onto the text")

    def encode_chars(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """``(ids int32 [n], char_offsets int64 [n, 2])``: the ids of ``text`` (special tokens written in it, as
        a rendered chat template writes them, are recognised) and each token's character span in ``text``."""
        encoding = self.tokenizer.encode(text, add_special_tokens=False)
        offsets = np.asarray(encoding.offsets, np.int64).reshape(-1, 2)
        return np.asarray(encoding.ids, np.int32), offsets

    def decode(self, ids) -> bytes:
        """The bytes of the tokens of ``ids``, special tokens dropped (a SentencePiece text keeps the space
        of its first ``▁``; :meth:`decode_text` is the ``tokenizers`` decoding)."""
        arr = _as_ids(ids, self.vocab_size)
        return b"".join(self._token_bytes[i] for i in arr.tolist())

    def decode_text(self, ids, skip_special_tokens: bool = True) -> str:
        """``tokenizers``' own decoding of ``ids`` (transformers' ``decode``)."""
        return self.tokenizer.decode([int(i) for i in np.asarray(ids).reshape(-1)],
                                     skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = False,
                            tools: Sequence[Mapping[str, Any]] | None = None, tokenize: bool = False,
                            **kwargs: Any) -> str | np.ndarray:
        """The conversation ``messages`` (``[{"role": …, "content": …}, …]``) rendered with the chat template, as
        transformers' ``apply_chat_template(messages, tokenize=False, add_generation_prompt=…)`` renders it;
        ``tokenize=True`` returns its ids instead (specials written by the template recognised). Extra
        keyword arguments reach the template as variables.

        Raises:
            ValueError: the tokenizer has no chat template, or a message is not a dict.
            jinja2.TemplateError: the template raised (``raise_exception``).
        """
        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat template (none in tokenizer_config.json or "
                             "chat_template.jinja; pass chat_template=)")
        messages = [dict(m) for m in messages] if all(isinstance(m, Mapping) for m in messages) else None
        if messages is None:
            raise ValueError("messages must be a list of {'role': ..., 'content': ...} dicts")
        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
        text = _compile(self.chat_template).render(
            messages=messages, tools=None if tools is None else [dict(t) for t in tools], documents=None,
            add_generation_prompt=add_generation_prompt, **{**self.special_tokens, **kwargs})
        return self.encode_chars(text)[0] if tokenize else text


@functools.lru_cache(maxsize=16)
def _compile(template: str):
    """The template compiled in transformers' chat-template environment (``_compile_jinja_template``)."""
    try:
        import jinja2
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as e:  # pragma: no cover - jinja2 ships with the docs tools
        raise ImportError("chat templates need jinja2 (pip install 'jinja2>=3.1.6')") from e
    from datetime import datetime

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)
