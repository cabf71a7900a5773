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


# Chat / prompt-completion JSONL (TRL's formats) with completion-only loss masks.

def write_jsonl(path, records, raw=()):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
        for line in raw:
            f.write(line + "\n")
    return path


def test_standard_prompt_completion_and_text_rows_with_byte_tokens(tmp_path):
    from jaxkd.batch import LOSS_MASK, MASK, TOKENS
    from jaxkd.data import ByteTokenizer, chat_rows

    path = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "ab", "completion": "cde"}, {"text": "xy"}])
    rows = chat_rows(path, ByteTokenizer(), 8)
    np.testing.assert_array_equal(rows[TOKENS], [[257, 97, 98, 99, 100, 101, 258, 256],
                                                 [257, 120, 121, 258, 256, 256, 256, 256]])
    np.testing.assert_array_equal(rows[MASK].sum(1), [7, 4])
    np.testing.assert_array_equal(rows[LOSS_MASK], [[0, 0, 0, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0, 0, 0]])
    from jaxkd.batch import batch_target_mask
    # Targets: c, d, e, EOS of the first row; x, y, EOS of the second.
    assert int(batch_target_mask(rows).sum()) == 4 + 3


def test_conversational_prompt_completion_matches_trl_and_messages_mask_assistant_turns(checkpoint, tmp_path):
    from jaxkd.batch import LOSS_MASK, MASK, POSITIONS, SEGMENT_IDS, TOKENS
    from jaxkd.data import TextLoader, chat_example, chat_rows

    tok = HFTokenizer.from_pretrained(checkpoint)
    reference = transformers.PreTrainedTokenizerFast(
        tokenizer_object=byte_level_bpe(), chat_template=CHAT_TEMPLATE, bos_token="<s>", eos_token="</s>",
        pad_token="<pad>")
    prompt, completion = MESSAGES[:2], MESSAGES[2:3]
    ids, target = chat_example({"prompt": prompt, "completion": completion}, tok)
    # TRL's SFTTrainer: the prompt rendered with the generation prompt, then prompt + completion; the rest
    # of the ids is the completion.
    prompt_ids = reference.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True,
                                               return_dict=False)
    full_ids = reference.apply_chat_template(prompt + completion, tokenize=True, return_dict=False)
    assert ids.tolist() == list(full_ids)
    assert target.tolist() == [False] * len(prompt_ids) + [True] * (len(full_ids) - len(prompt_ids))
    assert reference.decode(ids[target].tolist()) == "Hi – 🙂<|im_end|>\n"

    conversation = MESSAGES + [{"role": "assistant", "content": "Hi again"}]
    ids, target = chat_example({"messages": conversation}, tok)
    assert reference.decode(ids[target].tolist()) == "Hi – 🙂<|im_end|>\nHi again<|im_end|>\n"
    assert ids.tolist() == reference.apply_chat_template(conversation, tokenize=True, return_dict=False)

    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": conversation}, {"prompt": prompt, "completion": completion},
                                                 {"prompt": "Q:", "completion": " A"}])
    examples = [chat_example(r, tok) for r in ({"messages": conversation}, {"prompt": prompt, "completion": completion},
                                                {"prompt": "Q:", "completion": " A"})]
    assert [len(ids) for ids, _ in examples] == [90, 58, 6]
    rows = chat_rows(path, tok, 96, pack=True)   # best-fit decreasing: [90 + 6], [58]
    np.testing.assert_array_equal(rows[MASK].sum(1), [96, 58])
    np.testing.assert_array_equal(rows[TOKENS][0], np.concatenate([examples[0][0], examples[2][0]]))
    np.testing.assert_array_equal(rows[LOSS_MASK][1, :58], examples[1][1])
    np.testing.assert_array_equal(rows[SEGMENT_IDS][:, [0, 57, 58, 89, 90, 95]], [[1, 1, 1, 1, 2, 2], [1, 1, 0, 0, 0, 0]])
    np.testing.assert_array_equal(rows[POSITIONS][0, [0, 89, 90, 95]], [0, 89, 0, 5])
    unpacked = chat_rows(path, tok, 64)             # one example per row, truncated to 64
    np.testing.assert_array_equal(unpacked[MASK].sum(1), [64, 58, 6])
    batch = next(iter(TextLoader(rows, batch_size=rows[TOKENS].shape[0], shuffle=False)))
    assert LOSS_MASK in batch and SEGMENT_IDS in batch


def test_a_line_without_the_expected_keys_names_the_file_and_line(checkpoint, tmp_path):
    from jaxkd.data import ByteTokenizer, chat_rows

    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "completion": "b"}], raw=["", '{"question": "a"}'])
    with pytest.raises(ValueError, match=r"bad\.jsonl, line 3: expected 'messages'.*got keys \['question'\]"):
        chat_rows(path, ByteTokenizer(), 8)
    path = write_jsonl(tmp_path / "broken.jsonl", [], raw=["{not json"])
    with pytest.raises(ValueError, match=r"broken\.jsonl, line 1: not JSON"):
        chat_rows(path, ByteTokenizer(), 8)
    path = write_jsonl(tmp_path / "roles.jsonl", [{"messages": [{"content": "x"}]}])
    with pytest.raises(ValueError, match=r"roles\.jsonl, line 1: 'messages' must be a list"):
        chat_rows(path, HFTokenizer.from_pretrained(checkpoint), 8)
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": MESSAGES}])
    with pytest.raises(ValueError, match=r"chat\.jsonl, line 1: conversational examples need a tokenizer"):
        chat_rows(path, ByteTokenizer(), 8)
