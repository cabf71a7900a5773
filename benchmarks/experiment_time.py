"""Whole-process time of the default experiment, run twice with one persistent compilation cache.

    python benchmarks/experiment_time.py                 # the default experiment (digits, 3 seeds)
    python benchmarks/experiment_time.py --set seeds="(0,)" --set steps=100 --set teacher_steps=100

Each run is ``python -m experiments.distill`` in a fresh process with a fresh run folder, timed from the
outside; both use the same empty-at-start compilation cache folder (``compilation_cache=<tmp>``), so the
first run compiles everything and the second loads it. The digits data set is prepared once beforehand
(not timed). Printed: one row per run, the whole-process wall time split into startup, imports and exit
(the process' time outside the experiment), then the experiment's own phases (``experiments.timing``:
data, setup — model initialization and state creation, batches — the input pipeline, train steps,
evaluation, logging, checkpoints, report — each with its compiling taken out, and compiling on its own),
and the programs compiled and loaded.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from experiments.timing import PHASES  # noqa: E402


def run_once(out: str, overrides: list[str], data_dir: str) -> dict:
    args = [sys.executable, "-m", "experiments.distill", "--out", out, "--set", f"data_dir={data_dir}"]
    for item in overrides:
        args += ["--set", item]
    start = time.perf_counter()
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"the experiment failed:\n{done.stderr[-4000:]}")
    with open(os.path.join(out, "results.json")) as f:
        summary = json.load(f)
    return {"wall": wall, **summary["time"], "compiles": summary["compiles"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override passed to both runs")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data_dir, cache = os.path.join(tmp, "tfds"), os.path.join(tmp, "xla")
        overrides = [*args.overrides, f"compilation_cache={cache}"]
        # Prepare the data set once, untimed: both runs then read it.
        subprocess.run([sys.executable, "-c", "import sys; from experiments import distill, config as c; "
                        "distill.load_data(c.apply_overrides(c.load('experiments/configs/digits.py'), sys.argv[1:]))",
                        f"data_dir={data_dir}", *args.overrides], cwd=ROOT, check=True, capture_output=True)
        rows = {name: run_once(os.path.join(tmp, name), overrides, data_dir) for name in ("first run", "second run")}
    phases = (*PHASES, "compile", "other")
    print("| run | whole process (s) | startup, imports, exit | " + " | ".join(phases)
          + " | programs compiled / loaded |")
    print("|---|---|---|" + "---|" * len(phases) + "---|")
    for name, r in rows.items():
        startup = r["wall"] - r["total"]
        cells = " | ".join(f"{r[p]:.1f}" for p in phases)
        print(f"| {name} | {r['wall']:.1f} | {startup:.1f} | {cells} | {r['compiles']['compiled']} / "
              f"{r['compiles']['loaded']} |")
    print(f"\nconfig overrides: {args.overrides or 'none (the default experiment)'}; seconds; 'startup, "
          "imports, exit' is the process' time outside the experiment (interpreter start, imports, argument "
          "parsing, printing, exit).")


if __name__ == "__main__":
    main()
