"""A jaxkd language model scored by EleutherAI's lm-evaluation-harness (``lm-eval``), the harness distilled
students are usually reported with.

:class:`JaxkdLM` is an ``lm_eval`` model (a ``TemplateLM``, the base class of lm-eval's own ``HFLM``) that
answers the harness's three request types the way ``lm_eval/models/huggingface.py`` (``HFLM``) answers them
(EleutherAI/lm-evaluation-harness, v0.4.13):

* ``loglikelihood((context, continuation))`` → ``(sum_t log p(cont_t | context, cont_<t), is_greedy)``:
  context and continuation are tokenized whole and split at the context's token count (trailing spaces of
  the context move to the continuation); an empty context is the prefix token (``BOS``, else ``EOS``);
  the input is the last ``max_length + 1`` tokens minus the last one; ``is_greedy`` says every continuation
  token is the argmax of its logits;
* ``loglikelihood_rolling((text,))`` → the log-likelihood of the whole text, each token scored once, over
  lm-eval's disjoint windows of ``max_length`` tokens (``lm_eval.utils.get_rolling_token_windows`` with
  ``context_len=1``, the first window conditioned on the prefix token);
* ``generate_until((context, gen_kwargs))`` → greedy continuation with the KV cache
  (:func:`jaxkd.models.lm.prefill`, :func:`jaxkd.models.lm.decode_step`) of at most ``max_gen_toks`` tokens
  (default 256), stopped at the checkpoint's EOS ids, decoded and cut at the first of the ``until`` strings
  (and the EOS token's text), the context left-truncated to ``max_length - max_gen_toks`` tokens. The
  compiled loop ends once every row of the batch has emitted a stop id; the ``until`` strings are applied
  to the decoded text, so a row that wrote one keeps decoding until then (its text is the same as
  transformers' ``generate`` with lm-eval's stopping criteria gives).

Compiles are bounded: requests are sorted by length, batched ``batch_size`` at a time (the last batch
filled with copies of its first row) and padded to a power-of-two length (at least 16, at most
``max_length``), so a run compiles at most ``log2(max_length)`` scoring programs and one generation program
per (prompt length bucket, ``max_gen_toks``).

Importing this module imports ``lm_eval`` (the ``eval`` extra: ``pip install 'jaxkd[eval]'``); ``import
jaxkd`` does not. It registers the model name ``"jaxkd"`` with lm-eval, so after ``import
jaxkd.lm_eval_adapter`` ``lm_eval.simple_evaluate(model="jaxkd", model_args="pretrained=DIR,batch_size=8",
...)`` loads a Hugging Face checkpoint directory, and ``python -m jaxkd.lm_eval_adapter`` is lm-eval's own
command line with that model registered::

    python -m jaxkd.lm_eval_adapter --model jaxkd --model_args pretrained=path/to/checkpoint,batch_size=8 \\
        --tasks lambada_openai,hellaswag
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax.core import meta

try:
    from lm_eval import utils as lm_eval_utils
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "jaxkd.lm_eval_adapter needs EleutherAI's lm-evaluation-harness: pip install 'jaxkd[eval]' "
        "(or pip install 'lm-eval>=0.4.13')"
    ) from error

from jaxkd.checks import check_int
from jaxkd.data.text.hf_tokenizer import HFTokenizer
from jaxkd.models.base import Model
from jaxkd.models.lm import LMConfig, decode_step, prefill

__all__ = ["JaxkdLM", "length_bucket"]

#: The shortest padded length: shorter requests share one compiled program.
MIN_BUCKET = 16
#: lm-eval's default number of generated tokens (``HFLM.max_gen_toks``).
DEFAULT_MAX_GEN_TOKS = 256


def length_bucket(length: int, cap: int) -> int:
    """The padded length of a batch whose longest row has ``length`` tokens: the next power of two, at least
    :data:`MIN_BUCKET`, at most ``cap`` (``length <= cap``)."""
    length, cap = check_int("length", length, low=1), check_int("cap", cap, low=1)
    if length > cap:
        raise ValueError(f"length {length} exceeds the cap {cap}")
    return min(cap, max(MIN_BUCKET, 1 << (length - 1).bit_length()))


def _score(apply: Callable, variables: Any, tokens, mask, targets, target_mask):
    """``(sum log p(targets) over target_mask [B], all(argmax == targets) over target_mask [B])`` for inputs
    ``tokens [B, T]`` (right-padded, ``mask``) whose next tokens are ``targets [B, T]``."""
    logits = apply(variables, {"tokens": tokens, "mask": mask}, train=False).logits
    log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(log_p, targets[..., None], axis=-1)[..., 0]
    total = jnp.sum(jnp.where(target_mask, picked, 0.0), axis=1)
    greedy = jnp.all(jnp.where(target_mask, jnp.argmax(logits, axis=-1) == targets, True), axis=1)
    return total, greedy


def _greedy_generate(params: Any, tokens, mask, *, config: LMConfig, vocab_size: int, stop_ids: tuple[int, ...],
                     max_new_tokens: int):
    """Greedy tokens ``[B, max_new_tokens]`` after the left-padded prompts ``tokens [B, P]`` (``mask``), with
    the KV cache; a row that emitted one of ``stop_ids`` repeats it, and the loop ends once every row has
    (``lax.while_loop``: no step is spent after that). Logits are cut to the first ``vocab_size`` entries."""
    batch, prompt_len = tokens.shape
    logits, cache = prefill(params, config, tokens, mask, cache_len=prompt_len + max_new_tokens)
    stops = jnp.asarray(stop_ids, jnp.int32)

    def pick(logits, done):
        token = jnp.argmax(logits[:, :vocab_size], axis=-1).astype(jnp.int32)
        token = jnp.where(done, stops[0], token)
        return token, done | jnp.isin(token, stops)

    token, done = pick(logits[:, -1], jnp.zeros((batch,), bool))  # left padding: the last slot is real
    # Slots the loop never writes (it ended early) hold a stop token: the text is cut at the first one anyway.
    out = jnp.full((batch, max_new_tokens), stops[0], jnp.int32).at[:, 0].set(token)

    def cond(state):
        i, _, _, done, _ = state
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(state):
        i, cache, token, done, out = state
        logits, cache = decode_step(params, config, token, cache)
        token, done = pick(logits, done)
        return i + 1, cache, token, done, out.at[:, i].set(token)

    return jax.lax.while_loop(cond, body, (jnp.asarray(1), cache, token, done, out))[4]


def _checkpoint_eos_ids(path: str | os.PathLike) -> tuple[int, ...]:
    """The EOS ids ``transformers``' ``generate`` stops at: ``generation_config.json``'s ``eos_token_id``, else
    ``config.json``'s (an int or a list, as Llama 3 lists two); ``()`` when neither names one."""
    for name in ("generation_config.json", "config.json"):
        file = os.path.join(path, name)
        if os.path.isfile(file):
            with open(file, encoding="utf-8") as f:
                eos = json.load(f).get("eos_token_id")
            if eos is not None:
                return tuple(int(i) for i in (eos if isinstance(eos, list) else [eos]))
    return ()


@register_model("jaxkd")
class JaxkdLM(TemplateLM):
    """A jaxkd language model as an lm-eval ``LM`` (see the module docstring for what each request returns).

    Args:
      model: a jaxkd language model (:func:`jaxkd.models.lm.lm`, :func:`jaxkd.models.from_hf`, maybe wrapped
        by :func:`jaxkd.models.vocab.truncate_vocab`): ``model.apply`` scores, ``model.module.config`` (an
        :class:`~jaxkd.models.lm.LMConfig`) decodes with the KV cache.
      variables: its variables (``{"params": ...}``, boxed or not; on any device or mesh).
      tokenizer: an :class:`~jaxkd.data.HFTokenizer` (a checkpoint's ``tokenizer.json``; its ``tokenizers``
        post-processor adds ``BOS`` as transformers' fast tokenizer does), or any jaxkd tokenizer with
        ``encode``, ``decode`` and ``bos_id``/``eos_id`` (e.g. the :class:`~jaxkd.data.ByteTokenizer`).
      batch_size: requests per compiled call (an integer ``>= 1``).
      max_length: the longest input, in tokens (default: the model's ``max_len``; at most that).
      add_bos_token: as ``HFLM``'s: ``None`` keeps the tokenizer's default (an ``HFTokenizer`` adds what its
        post-processor adds; other tokenizers add nothing), ``True``/``False`` forces it.
      stop_token_ids: the ids generation stops at (default: the tokenizer's ``eos_id``;
        :meth:`from_pretrained` reads the checkpoint's generation config as ``transformers`` does).
      max_gen_toks: the default number of generated tokens when a request does not say.

    Raises:
      ValueError: a model without an ``LMConfig``, a bad ``batch_size``/``max_length``/``max_gen_toks``, a
        tokenizer with neither ``BOS`` nor ``EOS`` (no prefix for an empty context), stop ids outside the
        vocabulary.
    """

    def __init__(self, model: Model, variables: Any, tokenizer: Any, *, batch_size: int = 8,
                 max_length: int | None = None, add_bos_token: bool | None = None,
                 stop_token_ids: Sequence[int] | None = None, max_gen_toks: int = DEFAULT_MAX_GEN_TOKS):
        super().__init__()
        config = getattr(getattr(model, "module", None), "config", None)
        if not isinstance(model, Model) or not isinstance(config, LMConfig):
            raise ValueError(f"model must be a jaxkd language model (jaxkd.models.lm.lm or from_hf) whose "
                             f"model.module.config is an LMConfig, got {type(model).__name__}")
        self.model, self.config, self.tokenizer = model, config, tokenizer
        self.variables = meta.unbox(variables)
        self._batch_size = check_int("batch_size", batch_size, low=1)
        self._max_length = config.max_len if max_length is None else check_int("max_length", max_length, low=1)
        if self._max_length > config.max_len:
            raise ValueError(f"max_length={self._max_length} exceeds the model's max_len={config.max_len}")
        self._max_gen_toks = check_int("max_gen_toks", max_gen_toks, low=1)
        if add_bos_token is not None and not isinstance(add_bos_token, bool):
            raise ValueError(f"add_bos_token must be None, True or False, got {add_bos_token!r}")
        self.add_bos_token = add_bos_token
        bos, eos = getattr(tokenizer, "bos_id", None), getattr(tokenizer, "eos_id", None)
        if bos is None and eos is None:
            raise ValueError(f"tokenizer {tokenizer!r} has neither bos_id nor eos_id: lm-eval conditions an empty "
                             f"context on one of them")
        self._bos_id, self._eos_id = bos, eos
        self.vocab_size = model.vocab_size or config.vocab_size
        stops = tuple(int(i) for i in (stop_token_ids if stop_token_ids is not None else
                                       ([] if eos is None else [eos])))
        if any(not 0 <= i < self.vocab_size for i in stops):
            raise ValueError(f"stop_token_ids must lie in [0, {self.vocab_size}), got {list(stops)}")
        self.stop_token_ids = stops
        self._prefix_text = self.tok_decode([self.prefix_token_id], skip_special_tokens=False)
        self._score = jax.jit(functools.partial(_score, model.apply))
        self._generate = jax.jit(
            functools.partial(_greedy_generate, config=config, vocab_size=self.vocab_size,
                              stop_ids=stops or (self.eot_token_id,)),
            static_argnames="max_new_tokens")

    @classmethod
    def from_pretrained(cls, pretrained: str | os.PathLike, *, dtype: Any = None, **kwargs) -> JaxkdLM:
        """A Hugging Face checkpoint directory (:func:`jaxkd.models.from_hf`, its ``tokenizer.json`` as an
        :class:`~jaxkd.data.HFTokenizer`), stopping generation at its generation config's EOS ids.
        ``kwargs``: the constructor's keywords."""
        from jaxkd.models.hf import from_hf

        model, variables = from_hf(pretrained, dtype=dtype)
        kwargs.setdefault("stop_token_ids", _checkpoint_eos_ids(pretrained) or None)
        return cls(model, variables, HFTokenizer.from_pretrained(pretrained), **kwargs)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> JaxkdLM:
        """``model_args="pretrained=DIR,batch_size=8,max_length=2048,dtype=bfloat16"`` (lm-eval's string form):
        :meth:`from_pretrained`. lm-eval's ``batch_size`` (``additional_config``) applies unless given here."""
        args = lm_eval_utils.simple_parse_args_string(arg_string)
        return cls.create_from_arg_obj(args, additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None) -> JaxkdLM:
        """:meth:`create_from_arg_string` from a dict."""
        args = dict(arg_dict)
        if "pretrained" not in args:
            raise ValueError(f"model_args must name the checkpoint directory as pretrained=..., got {sorted(args)}")
        extra = {k: v for k, v in (additional_config or {}).items() if k == "batch_size" and v is not None}
        for key, value in extra.items():
            args.setdefault(key, value)
        for key in ("batch_size", "max_length", "max_gen_toks"):
            if key in args:
                args[key] = int(args[key])
        return cls.from_pretrained(args.pop("pretrained"), **args)

    # --- what lm-eval asks of a model ---------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        """``EOS`` (``HFLM``: the tokenizer's ``eos_token_id``); ``BOS`` for a tokenizer without one."""
        return self._eos_id if self._eos_id is not None else self._bos_id

    @property
    def prefix_token_id(self) -> int:
        """What an empty context and the first rolling window are conditioned on: ``BOS``, else ``EOS`` (HFLM)."""
        return self._bos_id if self._bos_id is not None else self._eos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def tokenizer_name(self) -> str:
        return type(self.tokenizer).__name__

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs) -> list[int]:
        """Token ids of ``string`` as ``HFLM.tok_encode``: ``add_special_tokens`` (else ``add_bos_token``, else
        the tokenizer's default), never a second ``BOS`` before a text that starts with the prefix token's text."""
        if add_special_tokens is None:
            add_special_tokens = self.add_bos_token
            if self._prefix_text and string.startswith(self._prefix_text):
                add_special_tokens = False
        if isinstance(self.tokenizer, HFTokenizer):
            flag = True if add_special_tokens is None else add_special_tokens  # transformers' default
            ids = list(self.tokenizer.tokenizer.encode(string, add_special_tokens=flag).ids)
        else:
            ids = [int(i) for i in self.tokenizer.encode(string)]
            if add_special_tokens and self._bos_id is not None:
                ids = [self._bos_id] + ids
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of ``tokens`` (``tokenizers``' decoding for an ``HFTokenizer``; UTF-8 of the bytes otherwise)."""
        tokens = [int(tokens)] if np.ndim(tokens) == 0 else [int(t) for t in tokens]
        if isinstance(self.tokenizer, HFTokenizer):
            return self.tokenizer.decode_text(tokens, skip_special_tokens=skip_special_tokens)
        return self.tokenizer.decode(tokens).decode("utf-8", errors="replace")

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """``(log-likelihood, is_greedy)`` of each ``(request, context_ids, continuation_ids)``."""
        rows = []
        for _, context, continuation in requests:
            if not context or not continuation:
                raise ValueError(f"a loglikelihood request needs context and continuation tokens, got "
                                 f"{len(context)} and {len(continuation)}")
            if len(continuation) > self.max_length:
                raise ValueError(f"a continuation of {len(continuation)} tokens exceeds max_length={self.max_length}")
            whole = (list(context) + list(continuation))[-(self.max_length + 1):]  # left-truncated as HFLM
            rows.append((whole[:-1], whole[1:], len(continuation)))
        results: list[tuple[float, bool]] = [(0.0, False)] * len(rows)
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            length = length_bucket(len(rows[chunk[0]][0]), self.max_length)
            shape = (self.batch_size, length)
            tokens, targets = np.zeros(shape, np.int32), np.zeros(shape, np.int32)
            mask, target_mask = np.zeros(shape, bool), np.zeros(shape, bool)
            for row, i in enumerate(chunk + [chunk[0]] * (self.batch_size - len(chunk))):
                inputs, next_tokens, cont_len = rows[i]
                n = len(inputs)
                tokens[row, :n], targets[row, :n], mask[row, :n] = inputs, next_tokens, True
                target_mask[row, n - cont_len:n] = True
            total, greedy = jax.device_get(self._score(self.variables, tokens, mask, targets, target_mask))
            for row, i in enumerate(chunk):
                results[i] = (float(total[row]), bool(greedy[row]))
        for (request, _, _), answer in zip(requests, results):
            if request is not None:
                self.cache_hook.add_partial("loglikelihood", request, answer)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each text's log-likelihood over lm-eval's disjoint ``max_length`` windows (see the module docstring)."""
        windows, owners = [], []
        for index, (text,) in enumerate(request.args for request in requests):
            pieces = lm_eval_utils.get_rolling_token_windows(
                token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1)
            for context, continuation in map(lm_eval_utils.make_disjoint_window, pieces):
                windows.append((None, context, continuation))
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (log_likelihood, _) in zip(owners, self._loglikelihood_tokens(windows)):
            totals[owner] += log_likelihood
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations cut at the ``until`` strings (see the module docstring). Only greedy decoding:
        ``do_sample=True`` or a positive ``temperature`` raise ``ValueError``."""
        eos_text = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        results: list[str] = [""] * len(requests)
        groups: dict[str, list[int]] = {}
        for index, request in enumerate(requests):  # one generation setting per batch, as HFLM groups them
            groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(index)
        for indices in groups.values():
            kwargs = normalize_gen_kwargs(requests[indices[0]].args[1], self.max_gen_toks)
            if kwargs.get("do_sample") or float(kwargs.get("temperature") or 0.0) > 0.0:
                raise ValueError(f"JaxkdLM generates greedily only; got gen_kwargs {requests[indices[0]].args[1]}")
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
            max_new = check_int("max_gen_toks", kwargs.pop("max_gen_toks"), low=1)
            max_context = self.max_length - max_new
            if max_context < 1:
                raise ValueError(f"max_gen_toks={max_new} leaves no room for a context in max_length={self.max_length}")
            # An empty context (no BOS added) is the prefix token, as for loglikelihood.
            prompts = {i: self.tok_encode(requests[i].args[0], left_truncate_len=max_context) or [self.prefix_token_id]
                       for i in indices}
            order = sorted(indices, key=lambda i: -len(prompts[i]))
            for start in range(0, len(order), self.batch_size):
                chunk = order[start:start + self.batch_size]
                length = length_bucket(len(prompts[chunk[0]]), max_context)
                tokens = np.full((self.batch_size, length), self.eot_token_id, np.int32)
                mask = np.zeros((self.batch_size, length), bool)
                for row, i in enumerate(chunk + [chunk[0]] * (self.batch_size - len(chunk))):
                    # Left padding: every row's last real token sits in the last slot.
                    tokens[row, -len(prompts[i]):], mask[row, -len(prompts[i]):] = prompts[i], True
                new = np.asarray(jax.device_get(self._generate(self.variables["params"], tokens, mask,
                                                               max_new_tokens=max_new)))
                for row, i in enumerate(chunk):
                    results[i] = postprocess_generated_text(self.tok_decode(self._until_stop(new[row])), until, None)
                    self.cache_hook.add_partial("generate_until", requests[i].args, results[i])
        return results

    def _until_stop(self, tokens: np.ndarray) -> list[int]:
        """``tokens`` up to and including the first stop id (what ``transformers`` keeps before its padding)."""
        tokens = [int(t) for t in tokens]
        for position, token in enumerate(tokens):
            if token in self.stop_token_ids:
                return tokens[:position + 1]
        return tokens


def main() -> None:
    """lm-eval's command line (``lm-eval run ...``) with ``--model jaxkd`` registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
