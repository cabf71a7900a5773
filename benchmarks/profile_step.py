"""Where the KD step's time goes, op by op: a ``jax.profiler`` trace joined with the compiled HLO.

    python benchmarks/profile_step.py                    # the frozen teacher's forward (resnet32x4, batch 64)
    python benchmarks/profile_step.py --what step        # the whole train step (ops overlap there: see below)
    python benchmarks/profile_step.py --torch            # + PyTorch's teacher forward, by torch.profiler

The program is run ``--repeats`` times under ``jax.profiler.trace``; every XLA op the CPU runtime
executes is an event in the Perfetto trace, named like the HLO instruction. Each instruction is looked
up in the compiled module's text: the convolutions and matrix products it holds (a fusion can hold
several) give its FLOPs (``2·|out|·|kernel|/C_out`` for a convolution, ``2·|out|·K`` for a dot). Rows
group the ops by what they compute (output map, channels, kernel, which of forward / input gradient /
kernel gradient), with the time per run, the share of the program and the GFLOP/s reached.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import math
import os
import re
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%(\S+) = (\w+)\[([\d,]*)\][^ ]* (\w[\w-]*)\((.*)$")


def parse_hlo(text: str) -> tuple[dict, dict, dict]:
    """Instructions (name -> opcode, shape, operands, attributes), computations (name -> its
    instruction names) and each fusion's called computation, from a compiled module's text."""
    instructions, computations, calls = {}, collections.defaultdict(list), {}
    computation = None
    for line in text.splitlines():
        header = re.match(r"^(?:ENTRY )?%(\S+) \(", line)
        if header and not line.startswith(" "):
            computation = header.group(1)
            continue
        m = _INSTRUCTION.match(line)
        if not m:
            continue
        name, _dtype, shape, opcode, rest = m.groups()
        operands = re.findall(r"%([\w.\-]+)", rest.split("), ")[0])
        instructions[name] = {"opcode": opcode, "shape": [int(d) for d in shape.split(",") if d],
                              "operands": operands, "rest": rest}
        computations[computation].append(name)
        called = re.search(r"calls=%([\w.\-]+)", rest)
        if called:
            calls[name] = called.group(1)
    return instructions, computations, calls


def describe(name: str, instructions: dict) -> tuple[float, str] | None:
    """FLOPs and a label for one convolution or dot instruction (None for anything else)."""
    ins = instructions[name]
    if ins["opcode"] == "convolution":
        labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", ins["rest"]).groups()
        lhs, rhs = (instructions[o]["shape"] for o in ins["operands"][:2])
        out_features = rhs[labels[1].index("o")]
        flops = 2 * math.prod(ins["shape"]) * math.prod(rhs) / out_features
        window = re.search(r"size=(\w+)", ins["rest"]).group(1)
        stride = re.search(r"stride=(\w+)", ins["rest"])
        spatial = [ins["shape"][labels[2].index(c)] for c in "01"]
        in_features = lhs[labels[0].index("f")]
        direction = "forward" if labels == ("b01f", "01io", "b01f") else f"conv {'_'.join(labels)}"
        if "transpose(" in ins["rest"] and direction == "forward":
            direction = "input gradient"
        text = (f"conv {window} {spatial[0]}x{spatial[1]} {in_features}->{ins['shape'][labels[2].index('f')]}"
                f"{' stride ' + stride.group(1) if stride else ''}")
        return flops, f"{text}, {direction}"
    if ins["opcode"] == "dot":
        lhs = instructions[ins["operands"][0]]["shape"]
        contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", ins["rest"]).group(1)
        k = math.prod(lhs[int(d)] for d in contracting.split(",") if d)
        return 2 * math.prod(ins["shape"]) * k, f"dot {'x'.join(map(str, lhs))} -> {'x'.join(map(str, ins['shape']))}"
    return None


def account(name: str, instructions: dict, computations: dict, calls: dict) -> tuple[float, str]:
    """FLOPs and a label of an executed op: the convolutions/dots it holds, or its opcode."""
    inner = computations.get(calls.get(name), [])
    found = [d for d in (describe(n, instructions) for n in [name, *inner]) if d]
    if not found:
        kind = instructions.get(name, {}).get("opcode", "?")
        return 0.0, f"{kind} (element-wise, reductions, copies)" if kind == "fusion" else kind
    labels = collections.Counter(label for _, label in found)
    label = " + ".join(f"{n}x {lab}" if n > 1 else lab for lab, n in labels.items())
    return sum(f for f, _ in found), label


def traced_ops(instructions: dict, run, repeats: int) -> tuple[dict, float | None]:
    """Per executed instruction of ``instructions``, ``(ms, executions)`` per run, and the program's median
    wall ms (None when the trace lacks it), from ``repeats`` traced calls of ``run()`` (which calls the
    compiled program once and waits for it) after one untraced call. An op inside a loop body executes
    once per iteration."""
    import jax
    import numpy as np

    run()  # not traced: the first call's one-time work
    with tempfile.TemporaryDirectory() as folder:
        with jax.profiler.trace(folder, create_perfetto_trace=True):
            for _ in range(repeats):
                run()
        trace = json.load(gzip.open(glob.glob(os.path.join(folder, "**", "*.json.gz"), recursive=True)[0]))
    events = [e for e in (trace["traceEvents"] if isinstance(trace, dict) else trace) if e.get("ph") == "X"]
    ops = collections.defaultdict(lambda: [0.0, 0.0])
    for e in events:
        if e["name"] in instructions:
            ops[e["name"]][0] += e["dur"] / 1000 / repeats
            ops[e["name"]][1] += 1 / repeats
    wall = [e["dur"] for e in events if e["name"] == "ThunkExecutor::Execute (wait for completion)"]
    return {name: tuple(v) for name, v in ops.items()}, (float(np.median(wall)) / 1000 if wall else None)


def profile_compiled(compiled, run, repeats: int) -> tuple[list, float]:
    """Rows ``(label, ops, ms per run, FLOPs)`` and the program's ms per run, from ``repeats`` traced
    calls of ``run()`` (which calls the compiled program once and waits for it)."""
    instructions, computations, calls = parse_hlo(compiled.as_text())
    ops, program_ms = traced_ops(instructions, run, repeats)
    rows = collections.defaultdict(lambda: [0, 0.0, 0.0])  # label -> ops, ms per run, FLOPs
    for name, (ms, _) in ops.items():
        flops, label = account(name, instructions, computations, calls)
        rows[label][0] += 1
        rows[label][1] += ms
        rows[label][2] += flops
    if program_ms is None:
        program_ms = sum(r[1] for r in rows.values())
    return sorted(((lab, *r) for lab, r in rows.items()), key=lambda r: -r[2]), program_ms


def profile_jax(what: str, batch: int, repeats: int) -> tuple[list, float]:
    import jax

    from distill_step import setup

    teacher, _, teacher_vars, batch_arrays, state, step = setup(batch)
    if what == "teacher":
        fn = jax.jit(lambda v, x: teacher.apply(v, x, train=False).logits)
        args = (teacher_vars, jax.device_put(batch_arrays["image"]))
    else:
        fn, args = step.jitted, (state, jax.device_put(batch_arrays))
    compiled = fn.lower(*args).compile()

    def run() -> None:
        nonlocal args
        out = jax.block_until_ready(compiled(*args))
        if what == "step":  # the step donates its state: the next call takes the new one
            args = (out[0], args[1])

    return profile_compiled(compiled, run, repeats)


def profile_torch(batch: int, repeats: int) -> tuple[list, float]:
    """PyTorch's teacher forward (channels_last, eval, no_grad) by torch.profiler, grouped the same way."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from torch_step import resnet32x4

    torch.set_num_threads(os.cpu_count())
    model = resnet32x4().to(memory_format=torch.channels_last).eval()
    x = torch.randn(batch, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        model(x)
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True, with_flops=True) as prof:
            for _ in range(repeats):
                model(x)
    rows = collections.defaultdict(lambda: [0, 0.0, 0.0])
    total_ms = 0.0
    for e in prof.key_averages(group_by_input_shape=True):
        if e.key not in ("aten::conv2d", "aten::linear"):  # top-level ops: their time includes children
            continue
        calls, flops = e.count // repeats, e.flops / repeats  # torch.profiler's own FLOP count (conv2d)
        if e.key == "aten::conv2d":
            (b, cin, _, _), (cout, _, kh, kw) = e.input_shapes[0], e.input_shapes[1]
            side = round((flops / calls / (2 * b * cout * cin * kh * kw)) ** 0.5)  # output map from FLOPs
            label = f"conv {kh}x{kw} {side}x{side} {cin}->{cout}, forward"
        else:
            (b, features), (classes, _) = e.input_shapes[0], e.input_shapes[1]
            label, flops = f"dot {b}x{features} -> {b}x{classes}", 2 * b * features * classes * calls
        rows[label][0] += calls
        rows[label][1] += e.cpu_time_total / 1000 / repeats
        rows[label][2] += flops
        total_ms += e.cpu_time_total / 1000 / repeats
    return sorted(((lab, *r) for lab, r in rows.items()), key=lambda r: -r[2]), total_ms


def print_table(title: str, rows: list, program_ms: float) -> None:
    print(f"\n{title}: {program_ms:.0f} ms per run")
    print("| ops | what they compute | ms per run | share | GFLOP | GFLOP/s |")
    print("|---|---|---|---|---|---|")
    for label, count, ms, flops in rows:
        rate = f"{flops / ms / 1e6:.0f}" if flops else ""
        gflop = f"{flops / 1e9:.2f}" if flops else ""
        print(f"| {count} | {label} | {ms:.1f} | {ms / program_ms:.0%} | {gflop} | {rate} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--what", choices=["teacher", "step"], default="teacher")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--torch", action="store_true", help="also profile PyTorch's teacher forward")
    args = parser.parse_args()
    rows, program_ms = profile_jax(args.what, args.batch_size, args.repeats)
    name = "teacher forward (resnet32x4, eval)" if args.what == "teacher" else "train step (ce + kd, SGD)"
    print_table(f"jaxkd {name}, batch {args.batch_size}, mean of {args.repeats} traced runs", rows, program_ms)
    if args.what == "step":
        print("\nIn the step, independent ops run at the same time on XLA's worker threads, so the op times add up to"
              " more than the step; and XLA:CPU runs a dot asynchronously: its event covers only the launch, its"
              " work is not in the table. The teacher's forward is one chain of ops: there the table is exact.")
    if args.torch:
        rows, total = profile_torch(args.batch_size, args.repeats)
        print_table(f"PyTorch teacher forward (channels_last, no_grad), batch {args.batch_size}, convolutions "
                    "and the fc layer only", rows, total)


if __name__ == "__main__":
    main()
