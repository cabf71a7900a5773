"""Real tokenizers: a tokenizer.json trained here with the ``tokenizers`` library, wrapped as a jaxkd tokenizer
(ids as transformers' fast tokenizer gives them, byte lengths that add up to the text's UTF-8 bytes) and its
chat template rendered as transformers' ``apply_chat_template`` renders it."""

import json

import numpy as np
import pytest

from jaxkd.data import HFTokenizer, Tokenizer, count_byte_targets, pack_documents

tokenizers = pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")

TEXTS = ["Hello world, hello jax!", "Distillation moves knowledge from a teacher to a student.",
         "Café naïve – déjà vu 🙂 ok", "<|im_start|>user\nhi<|im_end|>"] * 4
SPECIALS = ["<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}{{ raise_exception('bad role') }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] | trim + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say  hi. "},
            {"role": "assistant", "content": "Hi – 🙂"}, {"role": "user", "content": "Again?"}]


def byte_level_bpe():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXTS, trainer)
    return tok


def metaspace_bpe():
    """A SentencePiece-style BPE (``▁`` for the space, ``<0xHH>`` byte-fallback tokens in the model's vocabulary,
    as LLaMA 2's tokenizer.json has them)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    trained = Tokenizer(models.BPE())
    trained.pre_tokenizer = pre_tokenizers.Metaspace()
    trained.train_from_iterator(TEXTS[:2], trainers.BpeTrainer(vocab_size=120))
    spec = json.loads(trained.to_str())["model"]
    vocab = {"<s>": 0, "</s>": 1, **{f"<0x{b:02X}>": 2 + b for b in range(256)}}
    for token in sorted(spec["vocab"], key=spec["vocab"].get):
        vocab.setdefault(token, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in spec["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens(["<s>", "</s>"])
    return tok


@pytest.fixture()
def checkpoint(tmp_path):
    byte_level_bpe().save(str(tmp_path / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": {"content": "</s>", "special": True}, "pad_token": "<pad>",
              "chat_template": CHAT_TEMPLATE}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    return tmp_path


def test_byte_level_tokenizer_matches_transformers_and_counts_bytes(checkpoint):
    tok = HFTokenizer.from_pretrained(checkpoint)
    assert isinstance(tok, Tokenizer) and tok.byte_level
    reference = transformers.PreTrainedTokenizerFast(tokenizer_file=str(checkpoint / "tokenizer.json"))
    assert tok.vocab_size == len(reference) == 300
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)
    lengths = tok.token_byte_lengths
    assert lengths.dtype == np.int32 and lengths.shape == (300,)
    assert all(lengths[i] == 0 for i in range(len(SPECIALS)))
    for text in TEXTS[:3] + ["🙂🙂 é", ""]:
        ids = tok.encode(text)
        assert ids.tolist() == reference.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text.encode("utf-8")          # byte-exact, multi-byte characters included
        assert tok.decode_text(ids) == reference.decode(ids.tolist())
        assert int(lengths[ids].sum()) == len(text.encode("utf-8"))
        ids2, starts, ends = tok.encode_with_offsets(text)
        assert ids2.tolist() == ids.tolist() and (ends[-1] if len(ends) else 0) == len(text.encode("utf-8"))
    # A token made of part of a character counts its own bytes: "🙂" is 4 bytes over one or more tokens.
    assert int(lengths[tok.encode("🙂")].sum()) == 4
    # Special tokens written in the text are not recognised by encode (no specials)... but by encode_chars.
    chat_ids, offsets = tok.encode_chars("<|im_start|>user")
    assert chat_ids[0] == 3 and offsets[0].tolist() == [0, 12]
    # Bits per byte's denominator counts the text bytes the targets stand for.
    packed = pack_documents([tok.encode(t) for t in TEXTS[:3]], 512, bos=tok.bos_id, eos=tok.eos_id, pad=tok.pad_id)
    first = packed["tokens"][0, 0]
    assert count_byte_targets(packed["tokens"], packed["mask"], lengths) == (
        sum(len(t.encode()) for t in TEXTS[:3]) - lengths[first])


def test_metaspace_byte_fallback_lengths():
    tok = HFTokenizer(metaspace_bpe(), special_tokens={"bos_token": "<s>", "eos_token": "</s>"})
    assert not tok.byte_level and tok.byte_fallback and tok.pad_id == tok.eos_id == 1
    for text in ("Hello world", "naïve ζ"):   # ï and ζ are in no training text: byte-fallback tokens
        ids = tok.encode(text)
        # "▁" stands for a space, also the one the pre-tokenizer adds before the first word.
        assert int(tok.token_byte_lengths[ids].sum()) == len((" " + text).encode())
        assert tok.decode(ids).decode("utf-8") == " " + text
        assert tok.decode_text(ids) == " " + text
    assert [tok.token_bytes(i) for i in tok.encode("ζ")] == [b" ", b"\xce", b"\xb6"]


def test_chat_template_renders_as_transformers(checkpoint):
    tok = HFTokenizer.from_pretrained(checkpoint)
    reference = transformers.PreTrainedTokenizerFast(
        tokenizer_object=byte_level_bpe(), chat_template=CHAT_TEMPLATE, bos_token="<s>", eos_token="</s>",
        pad_token="<pad>")
    for messages in (MESSAGES, MESSAGES[:3], MESSAGES[1:2]):
        for add_generation_prompt in (False, True):
            text = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
            expected = reference.apply_chat_template(messages, tokenize=False,
                                                     add_generation_prompt=add_generation_prompt)
            assert text == expected
            ids = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
            assert ids.tolist() == reference(expected, add_special_tokens=False)["input_ids"]
    assert text.startswith("<s><|im_start|>user\nSay  hi.<|im_end|>\n")
    with pytest.raises(Exception, match="bad role"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}])
    with pytest.raises(ValueError, match="no chat template"):
        HFTokenizer(byte_level_bpe()).apply_chat_template(MESSAGES)
