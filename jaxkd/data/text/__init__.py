"""Text for language-model distillation: tokenizers, packing, bits per byte, batches, corpora and teacher caches.

* :mod:`~jaxkd.data.text.tokenizer` — the tokenizer contract and the byte tokenizer (ids, specials, byte spans);
* :mod:`~jaxkd.data.text.bpe` — a small byte-level BPE, learned in pure Python;
* :mod:`~jaxkd.data.text.hf_tokenizer` — a checkpoint's ``tokenizer.json`` and chat template (:class:`~jaxkd.data.HFTokenizer`);
* :mod:`~jaxkd.data.text.chat` — chat and prompt-completion JSONL (TRL's formats) as rows with completion-only loss masks;
* :mod:`~jaxkd.data.text.packing` — documents packed into rows of ``seq_len``;
* :mod:`~jaxkd.data.text.bits_per_byte` — the bytes of text the targets stand for, and bits per byte;
* :mod:`~jaxkd.data.text.loader` — the :class:`~jaxkd.data.TextLoader` of packed rows;
* :mod:`~jaxkd.data.text.teacher_cache` — offline top-k teacher signals in array_record;
* :mod:`~jaxkd.data.text.cross_tokenizer` — parallel rows of one text under two tokenizers (ALM);
* :mod:`~jaxkd.data.text.stdlib_corpus` — the Python standard library's source as a TFDS data set.

The public names of the first eight are exported from :mod:`jaxkd.data`; the last two are imported on demand
(the corpus loads tensorflow_datasets).
"""
