"""Time one distillation train step, resnet32x4 -> resnet8x4 (CIFAR-100 shapes), jaxkd vs PyTorch.

    python benchmarks/distill_step.py                 # jaxkd, default XLA flags
    python benchmarks/distill_step.py --variants      # + XLA CPU flag variants, each in a fresh process
    python benchmarks/distill_step.py --variants --torch   # + the same step in PyTorch (pip install -e ".[bench]")

The step is the library's own ``jaxkd.make_train_step`` (teacher forward in eval mode under
stop_gradient, student forward/backward in train mode, ``ce + kd(temperature=4)``, SGD momentum 0.9
with weight decay 5e-4), batch 64 of 32x32x3 random images, 100 classes. Reported: compile time
(``lower().compile()``), the median ms/step over ``--steps`` individually timed steps after
``--warmup`` steps, examples/s, and the achieved FLOP/s (XLA's cost analysis of the step over the
step time) next to the machine's float32 matmul rate under ``jax.jit``: how far the step is from the
limit. ``benchmarks/torch_step.py`` times the identical step in PyTorch.
XLA flags are read when jax starts, so every variant runs in its own process.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
VARIANTS = {
    "default": "",
    "xnnpack": "--xla_cpu_use_xnnpack=true",
    "onednn": "--xla_cpu_use_onednn=true",
    # XLA:CPU's older element-wise emitters: compiles take about half the time (tests/conftest.py uses it).
    "legacy_emitters": "--xla_cpu_use_fusion_emitters=false",
    # Convolutions off YNNPACK (XLA:CPU's default for them): Eigen's, or oneDNN's through custom calls.
    "no_ynn": "--xla_cpu_experimental_ynn_fusion_type=",
    "onednn_custom_call": "--xla_cpu_experimental_ynn_fusion_type= --xla_cpu_experimental_onednn_custom_call=true",
}


def setup(batch_size: int, dtype: str = "float32", teacher_dtype: str | None = None):
    """The benchmark's networks, batch, train state and step (dtype: both networks' compute dtype;
    teacher_dtype: the frozen teacher's instead, parameters cast to it as well)."""
    import jax

    jax.config.update("jax_default_prng_impl", "rbg")  # faster init compile; not part of the timing
    import jax.numpy as jnp
    import numpy as np
    import optax

    import jaxkd
    from jaxkd import methods, models

    # Parameters and logits stay float32 whatever the compute dtype.
    teacher = models.get("resnet32x4", num_classes=100, dtype=jnp.dtype(teacher_dtype or dtype))
    student = models.get("resnet8x4", num_classes=100, dtype=jnp.dtype(dtype))
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.normal(size=(batch_size, 32, 32, 3)).astype(np.float32),
        "label": rng.integers(0, 100, size=batch_size).astype(np.int32),
    }
    key = jax.random.PRNGKey(0)
    teacher_vars = jax.jit(teacher.init)(key, batch["image"])
    if teacher_dtype is not None:
        teacher_vars = jaxkd.participants.cast_params(teacher_vars, teacher_dtype)
    tx = optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(0.05, momentum=0.9))
    state = jaxkd.create(student=student, teacher=teacher, teacher_variables=teacher_vars,
                         method=methods.ce() + methods.kd(temperature=4.0), tx=tx, sample_batch=batch, rng=key)
    return teacher, student, teacher_vars, batch, state, jaxkd.make_train_step()


def step_flops(batch_size: int, dtype: str = "float32") -> dict:
    """XLA's FLOP count of the lowered step, before any backend pass: the same network on every backend.

    Run on CPU (JAX_PLATFORMS=cpu) for a GPU's rows: there a lowered program has no cost analysis, and
    the compiled one hides its convolutions in cuDNN calls.
    """
    _, _, _, batch, state, step = setup(batch_size, dtype)
    cost = step.jitted.lower(state, batch).cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return {"flops": float(cost["flops"])}


def measure(batch_size: int, steps: int, warmup: int, dtype: str = "float32", teacher_dtype: str | None = None) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    teacher, student, teacher_vars, batch, state, step = setup(batch_size, dtype, teacher_dtype)
    device_batch = jax.device_put(batch)  # time the step, not the host-to-device copy

    start = time.perf_counter()
    lowered = step.jitted.lower(state, device_batch)
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start

    for _ in range(warmup):
        state, metrics = compiled(state, device_batch)
    jax.block_until_ready(state)
    # On CPU each step is timed alone. On an accelerator a step is a few ms and dispatch is asynchronous,
    # as in a training loop: there the time is that of `steps` steps issued back to back, over 5 blocks.
    blocks, per_block = (steps, 1) if jax.default_backend() == "cpu" else (5, steps)
    times = []
    for _ in range(blocks):
        start = time.perf_counter()
        for _ in range(per_block):
            state, metrics = compiled(state, device_batch)
        jax.block_until_ready((state, metrics))
        times.append((time.perf_counter() - start) / per_block)
    ms = 1000 * float(np.median(times))

    from conv_grad import median_ms  # benchmarks/ is this script's folder, first on sys.path

    def part_ms(fn, *args) -> float:
        """The median time of one jitted piece of the step (the same number of timed calls)."""
        return median_ms(jax.jit(fn), *args, repeats=steps)

    # Where the step's time goes: its pieces compiled on their own (XLA fuses across them in the step, so
    # they need not add up exactly).
    image = device_batch["image"]
    student_vars = state.student.variables()
    student_loss = lambda p: jnp.sum(student.apply({**student_vars, "params": p}, image, train=True).logits)
    parts = {
        "teacher forward": part_ms(lambda v, x: teacher.apply(v, x, train=False).logits, teacher_vars, image),
        "student forward": part_ms(lambda v, x: student.apply(v, x, train=True).logits, student_vars, image),
        "student forward + backward": part_ms(jax.grad(student_loss), student_vars["params"]),
    }
    cost = lowered.cost_analysis()  # see step_flops; None on a GPU
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return {
        "framework": "jaxkd",
        "flops": float(cost["flops"]) if cost else float("nan"),
        "jax_version": jax.__version__,
        "device": jax.devices()[0].device_kind,
        "dtype": dtype,
        "teacher_dtype": teacher_dtype or dtype,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "compile_s": compile_s,
        "ms_per_step": ms,
        "examples_per_s": batch_size / (ms / 1000),
        "loss": float(metrics["loss"]),
        "parts_ms": parts,
    }


def matmul_peak(n: int = 2048, repeats: int = 10, dtype: str = "float32") -> dict:
    """The machine's matmul rate under ``jax.jit`` (best of ``repeats``, default precision), in GFLOP/s."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.dtype(dtype))
    best = float("inf")
    # bfloat16: XLA:CPU's faster form accumulates and writes float32; the rate is the faster of the two.
    for f in (jax.jit(lambda x: x @ x), jax.jit(lambda x: jnp.dot(x, x, preferred_element_type=jnp.float32))):
        f(a).block_until_ready()
        for _ in range(repeats):
            start = time.perf_counter()
            f(a).block_until_ready()
            best = min(best, time.perf_counter() - start)
    return {"gflops": 2 * n**3 / best / 1e9}


def run_child(args: list[str], env_flags: str | None = None, python: str = sys.executable, **env_vars) -> dict:
    env = {**os.environ, **env_vars}
    if env_flags is not None:
        env["XLA_FLAGS"] = env_flags
    done = subprocess.run([python, *args], env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(args)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="compute dtype of both networks (parameters stay float32)")
    parser.add_argument("--teacher-dtype", default=None, choices=["float32", "bfloat16"],
                        help="the frozen teacher's compute and parameter dtype (default: --dtype)")
    parser.add_argument("--variants", action="store_true", help="also time the XLA CPU flag variants")
    parser.add_argument("--torch", action="store_true", help="also time benchmarks/torch_step.py")
    parser.add_argument("--torch-python", default=sys.executable, help="the interpreter that has torch")
    parser.add_argument("--json", action="store_true", help="(internal) measure once, print one JSON line")
    parser.add_argument("--peak", action="store_true", help="(internal) the matmul rate, one JSON line")
    parser.add_argument("--flops", action="store_true", help="(internal) the step's FLOP count, one JSON line")
    parser.add_argument("--peak-size", type=int, default=2048, help="(internal) the matmul's n")
    args = parser.parse_args()
    common = ["--batch-size", str(args.batch_size), "--steps", str(args.steps), "--warmup", str(args.warmup)]
    if args.json:
        print(json.dumps(measure(args.batch_size, args.steps, args.warmup, args.dtype, args.teacher_dtype)))
        return
    if args.flops:
        print(json.dumps(step_flops(args.batch_size, args.dtype)))
        return
    if args.peak:
        print(json.dumps(matmul_peak(args.peak_size, dtype=args.dtype)))
        return

    rows = []
    names = VARIANTS if args.variants else {"default": VARIANTS["default"]}
    for name, flags in names.items():
        r = run_child([os.path.abspath(__file__), "--json", *common, "--dtype", args.dtype,
                       *(["--teacher-dtype", args.teacher_dtype] if args.teacher_dtype else [])], env_flags=flags)
        rows.append((f"jaxkd ({name})", r))
    if args.torch:
        for extra, label in (([], "PyTorch"), (["--channels-last"], "PyTorch (channels_last)")):
            bf16 = ["--bf16"] if args.dtype == "bfloat16" else []
            r = run_child([os.path.join(HERE, "torch_step.py"), "--json", *common, *extra, *bf16],
                          python=args.torch_python)
            r["compile_s"] = r.get("first_step_s", float("nan"))
            rows.append((label, r))

    # The matmul rate of the step's precision (a bfloat16 step is compared to XLA's bfloat16 matmul rate).
    peak = run_child([os.path.abspath(__file__), "--peak", "--dtype", args.dtype])["gflops"]
    flops = rows[0][1]["flops"]  # the same step in every row: XLA's count of the default program
    torch_ms = min((r["ms_per_step"] for n, r in rows if n.startswith("PyTorch")), default=None)
    print(f"resnet32x4 -> resnet8x4 KD step, batch {args.batch_size}, 32x32x3, CPU ({os.cpu_count()} cores); "
          f"median of {args.steps} steps after {args.warmup} warm-up; {flops / 1e9:.1f} GFLOP per step (XLA's "
          f"cost analysis); {args.dtype} matmul peak under jax.jit (2048x2048): {peak:.0f} GFLOP/s")
    print("| implementation | compile / first step (s) | ms/step | examples/s | GFLOP/s (of peak) "
          "| step time vs best PyTorch |")
    print("|---|---|---|---|---|---|")
    for name, r in rows:
        ratio = f"{r['ms_per_step'] / torch_ms:.2f}x" if torch_ms else "n/a"
        rate = flops / (r["ms_per_step"] / 1000) / 1e9
        print(f"| {name} | {r['compile_s']:.1f} | {r['ms_per_step']:.0f} | {r['examples_per_s']:.0f} | "
              f"{rate:.0f} ({rate / peak:.0%}) | {ratio} |")
    parts = rows[0][1]["parts_ms"]
    print(f"\n{rows[0][0]}: its pieces compiled alone, ms (step {rows[0][1]['ms_per_step']:.0f}): "
          + ", ".join(f"{name} {ms:.0f}" for name, ms in parts.items()))


if __name__ == "__main__":
    main()
