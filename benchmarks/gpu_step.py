"""The KD step of ``distill_step.py`` on a GPU: jaxkd vs PyTorch, float32 and bfloat16, batch 64 and 256.

    python benchmarks/gpu_step.py            # needs a CUDA GPU, jax[cuda] and torch with CUDA

Each row runs in its own process (``distill_step.py --json`` / ``torch_step.py --json --device cuda``).
A GPU step is timed as ``--steps`` steps issued back to back (asynchronous dispatch, as in a training
loop), the median over 5 blocks, after ``--warmup`` steps. bfloat16 is mixed precision in both:
float32 parameters and bf16 compute (jaxkd: the models' ``dtype``; PyTorch: ``torch.autocast``).
float32 convolutions run in TF32 on Ampere and later in both frameworks' defaults (JAX's default
precision; ``torch.backends.cudnn.allow_tf32``).

Model FLOP utilization (MFU) is the step's FLOPs (XLA's count of the lowered step) over its time,
against the chip's dense peak for the precision used: NVIDIA's datasheet figures for H100/H200 SXM
(bf16 989 TFLOP/s, TF32 495 TFLOP/s); against the matmul rate measured here (8192³ under ``jax.jit``)
too, which is the peak a real kernel reaches on this chip.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from distill_step import run_child  # noqa: E402

# Dense peak TFLOP/s by precision, NVIDIA H100 SXM / H200 datasheets (the same Hopper SXM compute).
DATASHEET_PEAK = {"H100": {"float32": 494.7, "bfloat16": 989.4}, "H200": {"float32": 494.7, "bfloat16": 989.4}}


def datasheet_peak(device: str, dtype: str) -> float | None:
    return next((peak[dtype] for name, peak in DATASHEET_PEAK.items() if name in device), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", default="64,256")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--only-jaxkd", action="store_true", help="skip PyTorch's rows")
    parser.add_argument("--jsonl", default=None, help="also append every measured row here, one JSON line each")
    args = parser.parse_args()
    step_script, torch_script = os.path.join(HERE, "distill_step.py"), os.path.join(HERE, "torch_step.py")

    def measured(script_args: list[str], **env) -> dict | None:
        try:
            return record(run_child(script_args, **env))
        except RuntimeError as error:  # one failed row (a missing package, out of memory) keeps the others
            print(error, file=sys.stderr, flush=True)
            return None

    def record(row: dict) -> dict:
        print(json.dumps(row), file=sys.stderr, flush=True)  # partial results survive a time-out
        if args.jsonl:
            with open(args.jsonl, "a") as f:
                f.write(json.dumps(row) + "\n")
        return row

    peaks = {dtype: (measured([step_script, "--peak", "--peak-size", "8192", "--dtype", dtype]) or {}).get("gflops")
             for dtype in args.dtypes.split(",")}
    rows = []
    for dtype in args.dtypes.split(","):
        for batch in (int(b) for b in args.batch_sizes.split(",")):
            common = ["--batch-size", str(batch), "--steps", str(args.steps), "--warmup", str(args.warmup)]
            # The step's FLOPs, counted on CPU (see distill_step.step_flops): every row of this batch and dtype.
            flops = (measured([step_script, "--flops", *common, "--dtype", dtype], JAX_PLATFORMS="cpu")
                     or {}).get("flops", float("nan"))
            jax_row = measured([step_script, "--json", *common, "--dtype", dtype])
            if jax_row:
                jax_row["flops"] = flops
                rows.append(("jaxkd", dtype, batch, jax_row))
            if dtype == "float32":  # the opt-in bf16 frozen teacher (config frozen_dtype), float32 student
                half = measured([step_script, "--json", *common, "--dtype", dtype, "--teacher-dtype", "bfloat16"])
                if half:
                    half["flops"] = flops
                    rows.append(("jaxkd (bf16 teacher)", dtype, batch, half))
            for extra, label in () if args.only_jaxkd else (([], "PyTorch"), (["--channels-last"], "PyTorch (channels_last)")):
                bf16 = ["--bf16"] if dtype == "bfloat16" else []
                r = measured([torch_script, "--json", "--device", "cuda", *common, *extra, *bf16])
                if r is None:
                    continue
                r["compile_s"] = r["first_step_s"]
                r["flops"] = flops
                rows.append((label, dtype, batch, r))

    if not rows:
        sys.exit("no row was measured")
    device = rows[0][3]["device"]
    versions = {k: next((r[k] for *_, r in rows if k in r), None) for k in ("jax_version", "torch_version")}
    per_example = next((r["flops"] / b for n, _, b, r in rows if n == "jaxkd"), float("nan"))
    print(f"GPU figures. resnet32x4 -> resnet8x4 KD step (ce + kd, SGD), 32x32x3, on {device}; "
          f"{per_example / 1e9:.2f} GFLOP per example (XLA's count); median of 5 blocks of {args.steps} steps "
          f"after {args.warmup} warm-up; jax {versions['jax_version']}"
          + (f", torch {versions['torch_version']}" if versions["torch_version"] else "") + "; "
          "matmul rate under jax.jit (8192³): "
          + ", ".join(f"{d} {g / 1e3:.0f} TFLOP/s" for d, g in peaks.items() if g))
    print("| implementation | dtype | batch | compile / first step (s) | ms/step | examples/s | TFLOP/s "
          "| MFU (datasheet peak) | of measured matmul rate | vs best PyTorch |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, dtype, batch, r in rows:
        torch_ms = [q["ms_per_step"] for n, d, b, q in rows if n.startswith("PyTorch") and (d, b) == (dtype, batch)]
        tflops = r["flops"] / (r["ms_per_step"] / 1000) / 1e12
        peak = datasheet_peak(device, dtype)
        mfu = f"{tflops / peak:.1%}" if peak else "n/a"
        of_matmul = f"{tflops * 1e3 / peaks[dtype]:.1%}" if peaks.get(dtype) else "n/a"
        versus = f"{r['ms_per_step'] / min(torch_ms):.2f}x" if torch_ms else "n/a"
        print(f"| {name} | {dtype} | {batch} | {r['compile_s']:.1f} | {r['ms_per_step']:.2f} | "
              f"{r['examples_per_s']:.0f} | {tflops:.1f} | {mfu} | {of_matmul} | {versus} |")

if __name__ == "__main__":
    main()
