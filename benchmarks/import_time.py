"""What ``import jaxkd`` costs on top of ``import jax``: fresh interpreters, median of several, with the modules
that take the most (``python -X importtime``).

    python benchmarks/import_time.py            # 5 fresh processes
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys

PROBE = ("import time; t0 = time.perf_counter(); import jax; t1 = time.perf_counter(); import jaxkd; "
         "t2 = time.perf_counter(); print(t1 - t0, t2 - t1)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--top", type=int, default=8, help="slowest modules to list (cumulative time)")
    args = parser.parse_args()
    jax_s, jaxkd_s = [], []
    for _ in range(args.runs):
        out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True).stdout
        a, b = map(float, out.split())
        jax_s.append(a)
        jaxkd_s.append(b)
    print("| import | median s | min s |\n|---|---|---|")
    print(f"| jax | {statistics.median(jax_s):.2f} | {min(jax_s):.2f} |")
    print(f"| jaxkd (after jax) | {statistics.median(jaxkd_s):.2f} | {min(jaxkd_s):.2f} |")
    # -X importtime: "import time: self | cumulative | name", in microseconds, on stderr.
    trace = subprocess.run([sys.executable, "-X", "importtime", "-c", "import jax; import jaxkd"],
                           capture_output=True, text=True, check=True).stderr
    rows = []
    for line in trace.splitlines():
        parts = line.split("|")
        if len(parts) == 3 and parts[0].startswith("import time:") and parts[1].strip().isdigit():
            name = parts[2].strip()
            top = name.split(".")[0]
            if name == top and top in ("jaxkd", "optax", "flax", "orbax", "chex", "einops") or top == "jaxkd":
                rows.append((int(parts[1]) / 1e6, name))
    print("\n| module (cumulative, first import) | s |\n|---|---|")
    for seconds, name in sorted(rows, reverse=True)[: args.top]:
        print(f"| {name} | {seconds:.2f} |")


if __name__ == "__main__":
    main()
