"""Decoding-time fusion on the Python standard library's source code: proxy tuning and dynamic logits fusion
steer a larger base LM with small domain-tuned LMs, without training the large one (offline, 2 CPU cores).

    python -m experiments.lm_fusion                       # the default run (about 6 min on 2 cores)
    python -m experiments.lm_fusion --set base_steps=100 --set tune_steps=50

1. Data (:mod:`jaxkd.data.text.stdlib_corpus`, byte-tokenized, packed into rows of ``seq_len``): a *domain* is a
   top-level package of the standard library chosen by path (default ``encodings/`` and ``asyncio/``).
   The general text is the training split's files outside every domain; each domain's tuning text is its
   training-split files; its held-out text is its validation- and test-split files (the corpus' fixed
   split by file path). The general held-out text is the validation split outside the domains.
2. Models, cached in ``<out_dir>/fusion_models`` (keyed by their config; a re-run reuses them): a LARGE
   and a SMALL base LM, both trained with next-token cross-entropy on the general text for the same steps,
   batches and schedule; then one copy of the small base fine-tuned per domain (the experts).
3. Fused models (:mod:`jaxkd.models.fusion`), nothing trained:

   * proxy tuning (Liu et al., "Tuning Language Models by Proxy", COLM 2024):
     ``z_large + α (z_small tuned on d − z_small base)`` with the expert of the evaluated domain;
   * dynamic logits fusion (Fan et al., "On Giant's Shoulders: Effortless Weak to Strong by Dynamic Logits
     Fusion", NeurIPS 2024): ``z_large + Σ_t α_t (z_t − z_small base)`` with every expert, the weights
     searched at every position (the paper's KL-matching search over ``{0, 0.1, …, 2}``, one expert
     active at a time), so it has to find the right expert by itself.

4. Bits per byte of every model on each held-out set, scored by teacher forcing
   (:func:`jaxkd.models.fusion.fused_log_probs`: no sampling), printed as a Markdown table and written to
   ``results.md``/``results.json``, with the dynamic weights' mean per expert and a few greedy samples
   (:func:`jaxkd.models.fusion.fused_generate`, one KV cache per member) from held-out prompts.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
import time
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxkd import losses
from jaxkd.batch import MASK, TOKENS
from jaxkd.data import ByteTokenizer, PackedText, bits_per_byte, count_byte_targets, pack_documents
from jaxkd.data.text.stdlib_corpus import stdlib_corpus_texts
from jaxkd.inference import sum_over_batches
from jaxkd.models import fusion
from jaxkd.models import lm as lm_models
from jaxkd.precision import lm_config, policy
from experiments import config as config_lib
from experiments.lm_training import bpb_evaluator, padded_batches, pretrained_lm
from experiments.run_log import PreemptionFlag
from experiments.runner import Runner, entry_point, progress_bar, run_command
from experiments.timing import Phases


@dataclasses.dataclass(frozen=True)
class LMFusionExperiment:
    """One decoding-time fusion experiment (a config file's ``get_config()`` returns one).

    Attributes:
      name: the run folder's prefix.
      seq_len: tokens per packed row (every model's context).
      domains: top-level stdlib packages (folder names) tuned on and evaluated; excluded from the general text.
      max_general_files: general training files kept (a stable spread-out subset in sha256 order); None: all.
      max_eval_rows: rows scored per held-out set (evenly spaced over its packed rows, fixed across runs).
      large, small: :class:`jaxkd.models.lm.LMConfig` fields (besides ``vocab_size``/``max_len``).
      base_steps, base_lr: both base models' pretraining on the general text.
      tune_steps, tune_lr: each expert's fine-tuning of the small base on its domain.
      warmup_steps, weight_decay, batch_size: AdamW with linear warm-up and cosine decay, for every model.
      alpha: proxy tuning's weight.
      alpha_grid: dynamic logits fusion's candidate weights.
      prompt_bytes, new_tokens: greedy samples: a held-out file's first bytes, continued by that many tokens.
      seed: data order and initializations.
      out_dir: where run folders and cached models go.
      corpus_dir: a folder of ``.py`` files to read instead of the running interpreter's standard library
        (its top-level folders are the domains); None: the stdlib.
      compilation_cache: JAX's persistent compilation cache folder (:func:`jaxkd.compilation_cache.enable`).
      precision: every model's mixed-precision policy while it trains and scores (:func:`jaxkd.precision.policy`:
        ``"float32"`` or ``"bfloat16"``); part of each cached model's key.
    """

    name: str = "stdlib_fusion"
    seq_len: int = 128
    domains: tuple[str, ...] = ("encodings", "asyncio")
    max_general_files: int | None = 200
    max_eval_rows: int = 48
    large: Mapping[str, Any] = dataclasses.field(
        default_factory=lambda: dict(d_model=128, num_layers=4, num_heads=4, d_ff=384))
    small: Mapping[str, Any] = dataclasses.field(
        default_factory=lambda: dict(d_model=64, num_layers=2, num_heads=2, d_ff=192))
    base_steps: int = 300
    base_lr: float = 3e-3
    tune_steps: int = 150
    tune_lr: float = 1e-3
    warmup_steps: int = 30
    weight_decay: float = 0.01
    batch_size: int = 16
    alpha: float = 1.0
    alpha_grid: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(21))
    prompt_bytes: int = 40
    new_tokens: int = 80
    seed: int = 0
    checkpoint_every: int = 100
    tensorboard: bool = True
    out_dir: str = "runs"
    corpus_dir: str | None = None
    compilation_cache: str | None = "default"
    precision: str = "float32"


def check_domains(name: str, value: Any) -> None:
    if not value or len(set(value)) != len(value) or not all(isinstance(d, str) and d for d in value):
        raise ValueError(f"{name} must be distinct package names (folders of the corpus), got {name}={value!r}")


LMFusionExperiment.CHECKS = {
    **{name: config_lib.at_least(1) for name in
       ("base_steps", "tune_steps", "batch_size", "max_eval_rows", "prompt_bytes", "new_tokens")},
    "seq_len": config_lib.at_least(2), "warmup_steps": config_lib.at_least(0), "seed": config_lib.at_least(0),
    "checkpoint_every": config_lib.at_least(0), "max_general_files": config_lib.optional(config_lib.at_least(1)),
    "base_lr": config_lib.positive, "tune_lr": config_lib.positive, "weight_decay": config_lib.nonnegative,
    "domains": check_domains, "precision": config_lib.check_precision,
}


#: The default run's config file.
DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "lm_fusion.py")


# ----- data -----


def domain_of(path: str, domains: tuple[str, ...]) -> str | None:
    """The domain a corpus file belongs to: its top-level folder when that is one of ``domains``."""
    top, sep, _ = path.partition("/")
    return top if sep and top in domains else None


def pack(files: list[tuple[str, bytes]], seq_len: int) -> PackedText:
    """Byte-tokenized files packed into rows (``BOS`` file ``EOS`` …), as ``stdlib_corpus_sequences``."""
    if not files:
        raise ValueError("no files to pack: a domain or split is empty (choose another domain)")
    tok = ByteTokenizer()
    packed = pack_documents([tok.encode(t) for _, t in files], seq_len, bos=tok.bos_id, eos=tok.eos_id,
                                 pad=tok.pad_id)
    return PackedText(
        tokens=packed["tokens"], mask=packed["mask"],
        num_byte_targets=count_byte_targets(packed["tokens"], packed["mask"], tok.token_byte_lengths),
        num_documents=len(files), num_text_bytes=sum(len(t) for _, t in files), paths=tuple(p for p, _ in files))


def eval_set(data: PackedText, max_rows: int, batch_size: int) -> dict[str, Any]:
    """``max_rows`` rows evenly spaced over the packed rows (spread over the files), in batches padded with
    fully masked rows, and the number of bytes their targets stand for."""
    rows = np.unique(np.linspace(0, len(data) - 1, min(max_rows, len(data))).round().astype(int))
    batches = padded_batches(data.tokens[rows], data.mask[rows], batch_size)
    num_bytes = count_byte_targets(data.tokens[rows], data.mask[rows], ByteTokenizer().token_byte_lengths)
    return {"batches": batches, "num_bytes": num_bytes, "rows": len(rows)}


# ----- models -----


# ----- scoring -----


def first_member(logits: list) -> jax.Array:
    """The combine of a single model: its own logits."""
    return logits[0]


@jax.jit
def _target_nats(log_probs, tokens, mask):
    targets, target_mask = losses.next_token_targets(tokens, mask)
    picked = jnp.take_along_axis(log_probs[:, :-1], targets[..., None], axis=-1)[..., 0]
    return -jnp.sum(jnp.where(target_mask, picked, 0.0))


_fused_log_probs = jax.jit(fusion.fused_log_probs, static_argnums=1)


def fused_bpb(members, combine, rows: dict[str, Any]) -> float:
    """Bits per byte of the fused model ``(members, combine)`` over the held-out rows (teacher forcing)."""
    nats = sum_over_batches(
        lambda b: _target_nats(_fused_log_probs(members, combine, b[TOKENS], b[MASK]), b[TOKENS], b[MASK]),
        rows["batches"])
    return bits_per_byte(float(nats), rows["num_bytes"])


@functools.partial(jax.jit, static_argnums=1)
def _dlf_scores(members, combine, tokens, mask):
    """Dynamic logits fusion in one pass: the target nats, the weights ``[E]`` summed over the scored
    positions, and their count. (The fused log-probabilities are :func:`jaxkd.models.fusion.fused_log_probs`'
    by construction, tested; one pass instead of two, since the weight search is the costly part.)"""
    logits = fusion.member_logits(members, tokens, mask)
    fused, alphas = combine.weights(logits)  # [B, T, V], [B, T, E]
    targets, target_mask = losses.next_token_targets(tokens, mask)
    picked = jnp.take_along_axis(jax.nn.log_softmax(fused)[:, :-1], targets[..., None], axis=-1)[..., 0]
    nats = -jnp.sum(jnp.where(target_mask, picked, 0.0))
    alphas = jnp.where(target_mask[..., None], alphas[:, :-1], 0.0)  # position t predicts t + 1
    return nats, jnp.sum(alphas, axis=(0, 1)), jnp.sum(target_mask)


def dlf_bpb_and_weights(members, combine, rows) -> tuple[float, list[float]]:
    """Bits per byte of dynamic logits fusion on the held-out rows and its mean weight per expert."""
    nats, total, count = sum_over_batches(lambda b: _dlf_scores(members, combine, b[TOKENS], b[MASK]), rows["batches"])
    return bits_per_byte(float(nats), rows["num_bytes"]), [float(a) for a in np.asarray(total) / int(count)]


_fused_generate = jax.jit(fusion.fused_generate, static_argnums=1,
                          static_argnames=("max_new_tokens", "temperature", "top_k", "top_p", "eos_id"))


def _show(ids) -> str:
    tok = ByteTokenizer()
    ids = [int(i) for i in ids if int(i) < 256]  # specials dropped
    return tok.decode(ids).decode("utf-8", errors="replace")


# ----- the experiment -----


def run_experiment(cfg: LMFusionExperiment, out_dir: str) -> dict[str, Any]:
    start = time.time()
    data_dir = os.path.join(cfg.out_dir, "tfds")
    domains = tuple(cfg.domains)
    def files(split):
        return stdlib_corpus_texts(split, data_dir=data_dir, source_dir=cfg.corpus_dir)

    train_files = files("train")
    held_files = files("validation") + files("test")
    validation_paths = {p for p, _ in files("validation")}
    general_train = [f for f in train_files if domain_of(f[0], domains) is None][:cfg.max_general_files]
    general_held = [f for f in held_files if domain_of(f[0], domains) is None and f[0] in validation_paths]
    general = pack(general_train, cfg.seq_len)
    domain_train = {d: pack([f for f in train_files if domain_of(f[0], domains) == d], cfg.seq_len) for d in domains}
    domain_held_files = {d: [f for f in held_files if domain_of(f[0], domains) == d] for d in domains}
    held = {d: eval_set(pack(domain_held_files[d], cfg.seq_len), cfg.max_eval_rows, cfg.batch_size) for d in domains}
    held["general"] = eval_set(pack(general_held, cfg.seq_len), cfg.max_eval_rows, cfg.batch_size)
    for name, rows in held.items():
        print(f"held-out {name}: {rows['rows']} rows, {rows['num_bytes']} bytes", file=sys.stderr)

    vocab = ByteTokenizer().vocab_size
    models_policy = policy(cfg.precision)
    large_cfg = lm_config(models_policy, lm_models.LMConfig(vocab_size=vocab, max_len=cfg.seq_len, **cfg.large))
    small_cfg = lm_config(models_policy, lm_models.LMConfig(vocab_size=vocab, max_len=cfg.seq_len, **cfg.small))
    cache_root = os.path.join(cfg.out_dir, "fusion_models")
    phases = Phases()
    with PreemptionFlag() as preemption:
        runner = Runner(out_dir, progress=progress_bar(0, disable=True), preemption=preemption, phases=phases,
                        eval_every=max(cfg.base_steps, cfg.tune_steps), checkpoint_every=cfg.checkpoint_every,
                        tensorboard=cfg.tensorboard)
        try:
            def train(label, config, rows, steps, lr, held_rows, init=None, init_key=None):
                """A model trained (or reused) in ``<out_dir>/fusion_models``; held-out bpb at its last step."""
                evaluate = bpb_evaluator(lm_models.lm(config), held_rows["batches"])
                variables, directory = pretrained_lm(
                    runner, cache_root=cache_root, label=label, config=config, rows=rows, steps=steps, lr=lr,
                    warmup_steps=cfg.warmup_steps, weight_decay=cfg.weight_decay, batch_size=cfg.batch_size,
                    seed=cfg.seed, init_variables=init, init_key=init_key, evaluate_variables=evaluate)
                return variables, os.path.basename(directory)

            large_vars, _ = train("large base", large_cfg, general, cfg.base_steps, cfg.base_lr, held["general"])
            small_vars, small_key = train("small base", small_cfg, general, cfg.base_steps, cfg.base_lr,
                                          held["general"])
            experts = {d: train(f"small tuned on {d}", small_cfg, domain_train[d], cfg.tune_steps, cfg.tune_lr,
                                held[d], init=small_vars, init_key=small_key)[0] for d in domains}
        finally:
            runner.close()

    # Every fused model: (members, combine). Member order for fusion: large, small base, experts...
    large_m, small_m = (large_cfg, large_vars), (small_cfg, small_vars)
    expert_m = {d: (small_cfg, experts[d]) for d in domains}
    proxy = fusion.proxy_tuning(0, 1, 2, alpha=cfg.alpha)
    dlf_members = [large_m, small_m] + [expert_m[d] for d in domains]
    dlf = fusion.dynamic_logits_fusion(0, [(2 + i, 1) for i in range(len(domains))], alpha_grid=cfg.alpha_grid)
    models: dict[str, tuple[str, list, Any]] = {
        "large base": (f"{large_cfg.num_params / 1e6:.2f}M", [large_m], first_member),
        "small base": (f"{small_cfg.num_params / 1e6:.2f}M", [small_m], first_member),
    }
    for d in domains:
        models[f"small tuned on {d}"] = (f"{small_cfg.num_params / 1e6:.2f}M", [expert_m[d]], first_member)
    for d in domains:
        models[f"proxy tuning: large + {d} expert (α={cfg.alpha:g})"] = (
            "large + 2 small", [large_m, expert_m[d], small_m], proxy)
    # The paper's single-task setting (one expert, α searched per step) next to proxy tuning's fixed α.
    dlf_one = fusion.dynamic_logits_fusion(0, [(2, 1)], alpha_grid=cfg.alpha_grid)
    for d in domains:
        models[f"dynamic fusion: large + {d} expert"] = ("large + 2 small", [large_m, small_m, expert_m[d]], dlf_one)
    models[f"dynamic fusion: large + {len(domains)} experts"] = (f"large + {1 + len(domains)} small", dlf_members, dlf)

    print(f"data and models ready after {time.time() - start:.0f} s; scoring held-out text ...", file=sys.stderr)
    columns = list(domains) + ["general"]
    bpb: dict[str, dict[str, float]] = {}
    weights: dict[str, dict[str, list[float]]] = {}  # dynamic fusion's mean weight per expert
    for name, (_, members, combine) in models.items():
        tick = time.time()
        bpb[name] = {}
        for c in columns:
            if isinstance(combine, fusion.DynamicLogitsFusion):
                bpb[name][c], weights.setdefault(name, {})[c] = dlf_bpb_and_weights(members, combine, held[c])
            else:
                bpb[name][c] = fused_bpb(members, combine, held[c])
        print(f"  {name}: {time.time() - tick:.0f} s", file=sys.stderr)
    tick = time.time()

    # Greedy samples: one held-out prompt per domain, continued by the large base, its proxy-tuned version
    # (that domain's expert) and dynamic fusion with every expert.
    tok = ByteTokenizer()
    prompts = []
    for d in domains:
        # The domain's largest held-out file, from its first function definition after the middle (or the
        # first line after the middle when there is none).
        path, body = max(domain_held_files[d], key=lambda f: (len(f[1]), f[0]))
        begin = body.find(b"\n", len(body) // 2) + 1
        definition = body.find(b"\n    def ", begin)
        begin = begin if definition < 0 else definition + 1
        prompts.append((d, path, list(tok.encode(body[begin:begin + cfg.prompt_bytes]))))
    width = max(len(p) for _, _, p in prompts)
    prompt = np.full((len(prompts), width), tok.pad_id, np.int32)
    prompt_mask = np.zeros((len(prompts), width), bool)
    for i, (_, _, ids) in enumerate(prompts):  # left-padded
        prompt[i, width - len(ids):], prompt_mask[i, width - len(ids):] = ids, True
    new = min(cfg.new_tokens, cfg.seq_len - width)
    opts = dict(rng=jax.random.PRNGKey(cfg.seed), max_new_tokens=new, temperature=0.0, eos_id=tok.eos_id)
    samples = {"large base": _fused_generate([large_m], first_member, prompt, prompt_mask, **opts).new_tokens,
               f"dynamic fusion ({len(domains)} experts)":
                   _fused_generate(dlf_members, dlf, prompt, prompt_mask, **opts).new_tokens}
    proxy_rows = []
    for i, d in enumerate(domains):
        out = _fused_generate([large_m, expert_m[d], small_m], proxy, prompt, prompt_mask, **opts).new_tokens
        proxy_rows.append(np.asarray(out[i]))
    samples["proxy-tuned"] = np.stack(proxy_rows)
    print(f"  greedy samples: {time.time() - tick:.0f} s", file=sys.stderr)
    sample_text = []
    for i, (d, path, _) in enumerate(prompts):
        block = [f"**{d}** — prompt from held-out `{path}`:", "```", _show(prompt[i][prompt_mask[i]]) + "⟩", "```"]
        for name in ("large base", "proxy-tuned", f"dynamic fusion ({len(domains)} experts)"):
            block += [f"{name}:", "```", _show(np.asarray(samples[name])[i]), "```"]
        sample_text.append("\n".join(block))

    summary = summarize(cfg, models, bpb, weights, columns, held, seconds=time.time() - start,
                        num_general_rows=len(general), domain_rows={d: len(domain_train[d]) for d in domains})
    summary["samples"] = sample_text
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(summary, f, indent=2, ensure_ascii=False)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(summary["table"] + "\n\n## Greedy samples\n\n" + "\n\n".join(sample_text) + "\n")
    return summary


def summarize(cfg: LMFusionExperiment, models, bpb, weights, columns, held, *, seconds: float, num_general_rows: int,
              domain_rows: dict[str, int]) -> dict[str, Any]:
    header = "| model | params | " + " | ".join(f"{c} held-out" for c in columns) + " |"
    lines = [header, "|---|---|" + "---|" * len(columns)]
    for name, (params, _, _) in models.items():
        lines.append(f"| {name} | {params} | " + " | ".join(f"{bpb[name][c]:.4f}" for c in columns) + " |")
    sizes = ", ".join(f"{c}: {held[c]['num_bytes']} bytes" for c in columns)
    tuned = ", ".join(f"{d}: {n} rows" for d, n in domain_rows.items())
    alpha_lines = [f"Dynamic fusion's mean weight α per expert ({', '.join(cfg.domains)} for the "
                   f"{len(cfg.domains)}-expert model) over the scored positions:", "",
                   "| model | " + " | ".join(f"{c} held-out" for c in columns) + " |", "|---|" + "---|" * len(columns)]
    for name, by_column in weights.items():
        cells = (", ".join(f"{a:.2f}" for a in by_column[c]) for c in columns)
        alpha_lines.append(f"| {name} | " + " | ".join(cells) + " |")
    source = (f"Python {sys.version_info.major}.{sys.version_info.minor} standard library" if cfg.corpus_dir is None
              else f"The .py files of {cfg.corpus_dir}")
    caption = (
        f"Bits per byte (lower is better) on held-out files (the corpus' validation+test split of each domain's "
        f"package; the general column: validation files outside the domains; {sizes}), "
        f"scored by teacher forcing. {source}, "
        f"byte-level, rows of {cfg.seq_len} tokens. Base models: {cfg.base_steps} steps of {cfg.batch_size} rows on "
        f"general text ({num_general_rows} rows, domains excluded); experts: the small base tuned {cfg.tune_steps} "
        f"steps on each domain's training files ({tuned}). "
        f"Nothing fused is trained. Wall time {seconds / 60:.1f} min.")
    return {"config": dataclasses.asdict(cfg), "bpb": bpb, "dlf_mean_alpha": weights,
            "table": "\n".join(lines) + "\n\n" + caption + "\n\n" + "\n".join(alpha_lines), "seconds": seconds}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return run_command(argv, run_experiment, description=__doc__, config_type=LMFusionExperiment,
                       default_config=DEFAULT_CONFIG,
                       epilogue=lambda summary: "\n## Greedy samples\n\n" + "\n\n".join(summary["samples"]))


if __name__ == "__main__":
    # The importable module's classes, not __main__'s copies: config files import them from there.
    from experiments import lm_fusion

    entry_point(lm_fusion.main)
