"""One language-model distillation step, jaxkd against PyTorch + transformers + TRL's loss, in one run.

    pip install -e ".[bench]"
    python benchmarks/lm_step.py                    # the README's table: two shapes, float32 and bfloat16
    python benchmarks/lm_step.py --shapes default --precisions float32
    python benchmarks/lm_step.py --small            # a seconds-long smoke run
    python benchmarks/lm_step.py --profile --shapes default --betas 0   # jaxkd's step op by op

The step, the same on both sides: the frozen teacher's forward (eval, no gradient), the student's forward
and backward, the token-level loss over every next-token position, an AdamW update. The loss is TRL's
``GKDTrainer.generalized_jsd_loss`` (trl/experimental/gkd/gkd_trainer.py, imported, not rewritten) on the
PyTorch side and :func:`jaxkd.methods.token_kd` on jaxkd's: forward KL (``beta=0``) and the generalized
JSD (``beta=0.5``). Both sides hold *the same weights*: random ``Qwen2ForCausalLM`` models are written with
``save_pretrained`` and read by :func:`jaxkd.models.from_hf`, so the first step's losses agree (printed as
a check) and the parameter counts are equal by construction.

Shapes: ``default`` (Qwen2-style teacher d512 x 4 layers, student d256 x 2, vocabulary 8192, batch 8 x 256)
and ``large`` (the same models, vocabulary 32768, batch 4 x 1024: the logits dominate).

Precisions, matched: ``float32`` on both sides; ``bfloat16`` is jaxkd's mixed policy (float32 parameters
and AdamW state, bfloat16 activations and matmuls, float32 logits and loss: ``LMConfig(dtype=bfloat16,
param_dtype=float32)`` for both models) against PyTorch's ``torch.autocast("cpu", dtype=torch.bfloat16)``
around both forward passes, the logits cast to float32 for TRL's loss (float32 parameters and AdamW state).

Timing: both sides compiled/warmed first, then ``--blocks`` rounds, each a block of ``--steps`` jaxkd steps
then a block of PyTorch steps (alternating, so a slower or busier minute of the machine hits both), every
step timed alone; the table gives the median. FLOP/s use XLA's count of jaxkd's float32 step (the same
arithmetic as PyTorch's: same shapes, same operations), compared to the measured matmul rate of each
framework in that precision on this machine (a ``--peak-size`` square matmul, best of 10).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclasses.dataclass(frozen=True)
class Shapes:
    vocab: int = 8192
    teacher_d: int = 512
    teacher_layers: int = 4
    teacher_heads: int = 8
    student_d: int = 256
    student_layers: int = 2
    student_heads: int = 4
    kv_heads: int = 2
    batch: int = 8
    seq_len: int = 256


SHAPES = {"default": Shapes(), "large": Shapes(vocab=32768, batch=4, seq_len=1024)}
SMALL = Shapes(vocab=512, teacher_d=64, teacher_layers=2, teacher_heads=4, student_d=32, student_layers=1,
               student_heads=2, kv_heads=2, batch=2, seq_len=32)
PRECISIONS = ("float32", "bfloat16")


def qwen2_config(d: int, layers: int, heads: int, shapes: Shapes):
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=shapes.vocab, hidden_size=d, intermediate_size=int(8 * d / 3) // 64 * 64 or 4 * d,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=shapes.kv_heads,
                       max_position_embeddings=max(2 * shapes.seq_len, 64), tie_word_embeddings=True,
                       use_sliding_window=False, torch_dtype="float32")


def torch_models(shapes: Shapes, folder: str):
    """Random teacher and student, saved for jaxkd to read the same weights."""
    import torch
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(0)
    models = {}
    for name, (d, layers, heads) in {"teacher": (shapes.teacher_d, shapes.teacher_layers, shapes.teacher_heads),
                                     "student": (shapes.student_d, shapes.student_layers, shapes.student_heads)}.items():
        model = Qwen2ForCausalLM(qwen2_config(d, layers, heads, shapes)).float()
        model.config._attn_implementation = "sdpa"
        model.save_pretrained(os.path.join(folder, name))
        models[name] = model
    return models["teacher"], models["student"]


def torch_step_fn(teacher, student, beta: float, lr: float, precision: str):
    import contextlib

    import torch
    from trl.experimental.gkd import GKDTrainer

    teacher.eval()
    student.train()
    optimizer = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.0)
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if precision == "bfloat16" else contextlib.nullcontext

    def step(tokens, mask):
        with torch.no_grad(), autocast():
            teacher_logits = teacher(input_ids=tokens, attention_mask=mask).logits.float()
        with autocast():
            student_logits = student(input_ids=tokens, attention_mask=mask).logits
        student_logits = student_logits.float()
        labels = torch.where(mask[:, 1:].bool(), tokens[:, 1:], torch.full_like(tokens[:, 1:], -100))
        loss = GKDTrainer.generalized_jsd_loss(student_logits[:, :-1], teacher_logits[:, :-1], labels=labels,
                                               beta=beta)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step


def jax_step_fn(folder: str, batch, beta: float, lr: float, precision: str):
    import jax
    import jax.numpy as jnp
    import optax

    import jaxkd
    from jaxkd import methods
    from jaxkd.batch import with_token_normalizer
    from jaxkd.models import from_hf
    from jaxkd.models.lm import lm

    def load(name):
        model, variables = from_hf(os.path.join(folder, name))
        if precision == "bfloat16":  # float32 parameters, bfloat16 compute, float32 logits
            model = lm(dataclasses.replace(model.module.config, dtype=jnp.bfloat16, param_dtype=jnp.float32))
        return model, variables

    teacher, teacher_vars = load("teacher")
    student, student_vars = load("student")
    keys = ("tokens", "mask")
    batch = with_token_normalizer(batch)
    def token_kd(**kwargs):
        return methods.token_kd(divergence="generalized_jsd", beta=beta, **kwargs) if beta else methods.token_kd(**kwargs)

    method, unfused = token_kd(), token_kd(fused=False)
    state_participants = {"student": jaxkd.participants.student(student, student_vars, input=keys),
                          "teacher": jaxkd.participants.teacher(teacher, teacher_vars, input=keys)}
    state = jaxkd.create(participants=state_participants,
                         method=method, tx=optax.adamw(lr, weight_decay=0.0), sample_batch=batch,
                         rng=jax.random.PRNGKey(0))
    step = jaxkd.make_train_step()
    device_batch = jax.device_put(batch)
    lowered = step.jitted.lower(state, device_batch)
    start = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    # FLOPs from the same step with the logits materialized: XLA counts a loop's body once, and token_kd's
    # default takes the fused (chunked) path at these sizes; the arithmetic is the same.
    counted = jaxkd.create(participants=state_participants, method=unfused, tx=optax.adamw(lr, weight_decay=0.0),
                           sample_batch=batch, rng=jax.random.PRNGKey(0))
    cost = jaxkd.make_train_step().jitted.lower(counted, device_batch).cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return compiled, state, device_batch, compile_s, float(cost["flops"])


def matmul_rates(n: int, precision: str) -> dict:
    import jax
    import jax.numpy as jnp
    import torch

    def best(fn):
        fn()
        times = []
        for _ in range(10):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return 2 * n ** 3 / min(times) / 1e9

    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.dtype(precision))
    f = jax.jit(lambda x: x @ x)
    # bfloat16: XLA:CPU's fastest form is float32 accumulation written in float32 (what jaxkd's mixed
    # matmuls use, jaxkd.models.mixed_matmul); the rate is the faster of the two forms.
    wide = jax.jit(lambda x: jnp.dot(x, x, preferred_element_type=jnp.float32))
    t = torch.randn(n, n, dtype=getattr(torch, precision))
    return {"jax": max(best(lambda: f(a).block_until_ready()), best(lambda: wide(a).block_until_ready())),
            "torch": best(lambda: t @ t)}


def measure(shapes: Shapes, beta: float, blocks: int, steps: int, precision: str) -> list[dict]:
    import jax
    import numpy as np
    import torch

    torch.set_num_threads(os.cpu_count())
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, shapes.vocab, size=(shapes.batch, shapes.seq_len)).astype(np.int32)
    mask = np.ones_like(tokens, dtype=bool)
    with tempfile.TemporaryDirectory() as folder:
        teacher, student = torch_models(shapes, folder)
        compiled, state, device_batch, compile_s, flops = jax_step_fn(folder, {"tokens": tokens, "mask": mask},
                                                                      beta, lr=1e-4, precision=precision)
    torch_step = torch_step_fn(teacher, student, beta, lr=1e-4, precision=precision)
    t_tokens, t_mask = torch.from_numpy(tokens.astype(np.int64)), torch.from_numpy(mask.astype(np.int64))

    start = time.perf_counter()
    first_torch = float(torch_step(t_tokens, t_mask))
    torch_first_s = time.perf_counter() - start
    state, metrics = compiled(state, device_batch)
    first_jax = float(metrics["loss"])
    tolerance = 1e-3 if precision == "float32" else 3e-2  # bfloat16: 8-bit mantissas, rounded differently
    if abs(first_jax - first_torch) > tolerance * max(1.0, abs(first_torch)):
        raise RuntimeError(f"the first step's losses differ: jaxkd {first_jax}, PyTorch {first_torch}: not the same step")
    for _ in range(2):  # warm-up, untimed
        state, metrics = compiled(state, device_batch)
        torch_step(t_tokens, t_mask)
    jax.block_until_ready(state)

    times = {"jaxkd": [], "PyTorch": []}
    for _ in range(blocks):
        for _ in range(steps):
            start = time.perf_counter()
            state, metrics = compiled(state, device_batch)
            jax.block_until_ready((state, metrics))
            times["jaxkd"].append(time.perf_counter() - start)
        for _ in range(steps):
            start = time.perf_counter()
            torch_step(t_tokens, t_mask)
            times["PyTorch"].append(time.perf_counter() - start)
    first = {"jaxkd": compile_s, "PyTorch": torch_first_s}
    return [{"framework": name, "beta": beta, "precision": precision, "first_s": first[name],
             "ms": 1000 * statistics.median(ts),
             "flops": flops, "tokens": shapes.batch * shapes.seq_len, "first_loss": first_jax}
            for name, ts in times.items()]


def print_table(shapes: Shapes, rows: list[dict], peaks: dict) -> None:
    print(f"teacher Qwen2 d{shapes.teacher_d} x {shapes.teacher_layers}, student d{shapes.student_d} x "
          f"{shapes.student_layers}, GQA {shapes.kv_heads} kv heads, vocabulary {shapes.vocab}, batch {shapes.batch} "
          f"x {shapes.seq_len}; {rows[0]['flops'] / 1e9:.1f} GFLOP per step\n")
    print("| precision | loss | implementation | compile / first step (s) | ms/step | tokens/s "
          "| GFLOP/s (of its matmul rate) | step time vs PyTorch |")
    print("|---|---|---|---|---|---|---|---|")
    for precision in dict.fromkeys(r["precision"] for r in rows):
        for beta in dict.fromkeys(r["beta"] for r in rows):
            pair = {r["framework"]: r for r in rows if r["beta"] == beta and r["precision"] == precision}
            loss = "forward KL (β=0)" if beta == 0 else f"generalized JSD (β={beta})"
            for name in ("jaxkd", "PyTorch"):
                r = pair[name]
                rate = r["flops"] / (r["ms"] / 1000) / 1e9
                own = peaks[precision]["jax" if name == "jaxkd" else "torch"]
                print(f"| {precision} | {loss} | {name} | {r['first_s']:.1f} | {r['ms']:.0f} "
                      f"| {r['tokens'] / (r['ms'] / 1000):.0f} | {rate:.0f} ({100 * rate / own:.0f}%) "
                      f"| {r['ms'] / pair['PyTorch']['ms']:.2f}x |")
    print()


def profile(shapes: Shapes, beta: float, precision: str, repeats: int = 5) -> None:
    """Where jaxkd's step goes, op by op: the executed XLA ops of ``repeats`` traced steps (jax.profiler),
    grouped by what they compute (benchmarks/profile_step.py reads the trace and the compiled HLO). Ops run
    concurrently on the CPU's threads, so the groups' times add up to more than the step's wall time."""
    import collections
    import math

    import jax
    import numpy as np

    from profile_step import describe, parse_hlo, traced_ops

    rng = np.random.default_rng(0)
    tokens = rng.integers(0, shapes.vocab, size=(shapes.batch, shapes.seq_len)).astype(np.int32)
    with tempfile.TemporaryDirectory() as folder:
        torch_models(shapes, folder)
        compiled, state, batch, _, _ = jax_step_fn(folder, {"tokens": tokens, "mask": np.ones_like(tokens, bool)},
                                                   beta, lr=1e-4, precision=precision)
    instructions, computations, calls = parse_hlo(compiled.as_text())

    def run():
        nonlocal state
        state, metrics = compiled(state, batch)
        jax.block_until_ready((state, metrics))

    run()
    ops, wall_ms = traced_ops(instructions, run, repeats)
    groups = collections.defaultdict(lambda: [0.0, 0.0])  # group -> ms per step, FLOPs per step

    def group(name):
        ins = instructions[name]
        inner = [ins, *(instructions[n] for n in computations.get(calls.get(name), []))]
        found = [d for d in (describe(n, instructions) for n in [name, *computations.get(calls.get(name), [])]) if d]
        if found:
            return "matrix products", sum(f for f, _ in found)
        shape, ops = ins["shape"], {i["opcode"] for i in inner}
        if shapes.vocab in shape:
            return "element-wise / reductions over [tokens, vocabulary] (loss, logits)", 0.0
        if list(shape).count(shapes.seq_len) >= 2 or math.prod(shape) % (shapes.seq_len ** 2) == 0 and len(shape) >= 4:
            return "element-wise over [.., query, key] (attention masks, softmax)", 0.0
        if ops & {"copy", "transpose", "convert"} and not ops & {"exponential", "multiply", "add", "rsqrt"}:
            return "copies, transposes, dtype conversions", 0.0
        return "other element-wise (norms, RoPE, activations, AdamW)", 0.0

    for name, (ms, executions) in ops.items():
        label, flops = group(name)
        groups[label][0] += ms
        groups[label][1] += flops * executions  # a loop body's ops run once per iteration
    print(f"{precision}, {'forward KL' if beta == 0 else f'generalized JSD (β={beta})'}: "
          f"{wall_ms:.0f} ms per step (median of {repeats} traced)\n")
    print("| ops | ms per step (summed over threads) | GFLOP | GFLOP/s |")
    print("|---|---|---|---|")
    for label, (ms, flops) in sorted(groups.items(), key=lambda kv: -kv[1][0]):
        rate = f"{flops / ms / 1e6:.0f}" if flops else ""
        print(f"| {label} | {ms:.0f} | {flops / 1e9:.1f} | {rate} |" if flops else f"| {label} | {ms:.0f} | | |")
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="tiny shapes: a smoke run")
    parser.add_argument("--shapes", default="default,large", help=f"comma-separated, of {sorted(SHAPES)}")
    parser.add_argument("--precisions", default=",".join(PRECISIONS), help=f"comma-separated, of {PRECISIONS}")
    parser.add_argument("--betas", default="0,0.5", help="the generalized JSD's beta per loss (0: forward KL)")
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5, help="steps per block")
    parser.add_argument("--peak-size", type=int, default=2048)
    parser.add_argument("--profile", action="store_true",
                        help="instead: jaxkd's step op by op, per precision (the first shape and beta)")
    args = parser.parse_args()
    precisions = args.precisions.split(",")
    for p in precisions:
        if p not in PRECISIONS:
            parser.error(f"unknown precision {p!r}; valid: {', '.join(PRECISIONS)}")
    shapes = {"small": SMALL} if args.small else {}
    for name in ([] if args.small else args.shapes.split(",")):
        if name not in SHAPES:
            parser.error(f"unknown shape {name!r}; valid: {', '.join(sorted(SHAPES))}")
        shapes[name] = SHAPES[name]
    betas = [float(b) for b in args.betas.split(",")]
    if args.profile:
        for p in precisions:
            profile(next(iter(shapes.values())), betas[0], p)
        return
    import jax
    import torch

    start = time.perf_counter()
    peaks = {p: matmul_rates(args.peak_size, p) for p in precisions}
    results = {name: [row for p in precisions for beta in betas for row in measure(s, beta, args.blocks, args.steps, p)]
               for name, s in shapes.items()}
    print(f"jax {jax.__version__}, torch {torch.__version__}, {os.cpu_count()} CPU threads; "
          + "; ".join(f"{p} matmul rate: jax {peaks[p]['jax']:.0f}, torch {peaks[p]['torch']:.0f} GFLOP/s"
                      for p in precisions) + f"; {time.perf_counter() - start:.0f} s in all\n")
    for name, rows in results.items():
        print_table(shapes[name], rows, peaks)


if __name__ == "__main__":
    main()
