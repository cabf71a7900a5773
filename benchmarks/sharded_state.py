"""Sharded train states on simulated devices: a large frozen teacher's memory, and step time per mesh.

    python benchmarks/sharded_state.py                  # both parts (a few minutes on 2 CPU cores)
    python benchmarks/sharded_state.py --part a         # only the teacher-memory table
    python benchmarks/sharded_state.py --part b --steps 5 --batch-size 32   # a smaller step table

The script sets ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` itself, before jax is imported
(any flags already in ``XLA_FLAGS`` are kept), so the host CPU appears as 8 devices. Those 8 "devices"
share the host's cores and its RAM: part (b) measures the overhead of splitting a step (per-device
programs, collectives, smaller matmuls), not a speed-up. On 2 cores, 8 devices cannot run faster than
1. The numbers tell what sharding costs here, not what it gains on real accelerators.

(a) **Creating the state of a large frozen teacher.** A ~200M-parameter MLP teacher (hidden sizes
    ``--teacher-hidden``, default 3 x 9216 over 32x32x3 inputs: 198.3M parameters, 793 MB = 756 MiB in float32)
    and a tiny MLP student, ``ce + kd``, built by ``jaxkd.create(..., participants={"teacher":
    Participant(teacher, teacher_vars, trains=False, rules=...)}, mesh=make_mesh({"data": 1, "fsdp": 8}))``
    with the teacher's rules ``Rules.replicated()`` vs ``Rules.fsdp_default()``. Reported: the
    teacher's parameter bytes on the fullest device (``jaxkd.sharding.per_device_bytes``), their sum
    over the 8 devices, and the process's peak resident memory (``ru_maxrss``) after ``create`` and
    after one train step. Each variant runs in a fresh subprocess so the peaks do not mix.

    The teacher's variables are host NumPy float32 arrays (what a checkpoint restore yields), filled
    directly in float32 (no float64 temporary), so making them costs exactly their size, 756 MiB. The
    "host teacher only" row makes them and stops: its peak is the floor under every other row
    (interpreter + jax + the host copy). Because the simulated devices live in the same process, their
    buffers count towards the same RSS: the replicated teacher adds 8 copies (6052 MiB) on top of that
    floor, the fsdp teacher adds one (each device holds 1/8). On real accelerators the device bytes
    column is what matters, and the host copy can be dropped as soon as ``create`` returns.

(b) **Step time per mesh.** ``ce + kd(T=4)`` with a resnet8x4 student and a resnet32x4 teacher
    (CIFAR-100 shapes, global batch ``--batch-size``, default 64, of 32x32x3), ``jaxkd.make_train_step(mesh=...)``
    over ``make_mesh({"data": n}, devices=jax.devices()[:n])`` for n = 1, 2, 4, 8 and over
    ``make_mesh({"fsdp": 8})`` (teacher, student and optimizer state sharded by the default fsdp rule).
    Reported: the step's first call (compile + one step), and the median step time over ``--steps``
    steps after ``--warmup`` warm-up steps, each synchronized with ``jax.block_until_ready``. All meshes
    live in one process (the device count is fixed when jax starts); each is compiled and warmed up,
    then the timed steps go round-robin over the meshes, one step each per round, so a change in the
    background load of a shared machine affects every row alike.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

VARIANTS = ("baseline", "host_teacher", "replicated", "fsdp")
LABELS = {
    "baseline": "jax + 8 devices, no teacher",
    "host_teacher": "host NumPy teacher only (no create)",
    "replicated": "create, teacher Rules.replicated()",
    "fsdp": "create, teacher Rules.fsdp_default()",
}


def peak_rss_mb() -> float:
    """This process's peak resident memory in MB (``ru_maxrss`` is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def memory_child(variant: str, hidden: tuple[int, ...], batch_size: int) -> dict:
    """Part (a), one variant, in this (fresh) process."""
    import jax

    jax.config.update("jax_default_prng_impl", "rbg")
    import numpy as np
    import optax

    import jaxkd
    from jaxkd import methods, models, participants, sharding

    out: dict = {"variant": variant, "devices": jax.device_count()}
    if variant == "baseline":
        jax.block_until_ready(jax.numpy.zeros(()) + 1)  # start the backend, as the others do
        out["peak_create_mb"] = peak_rss_mb()
        return out

    teacher = models.get("mlp", num_classes=10, hidden_sizes=hidden)
    student = models.get("mlp", num_classes=10, hidden_sizes=(32,))
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.normal(size=(batch_size, 32, 32, 3)).astype(np.float32),
        "label": rng.integers(0, 10, size=batch_size).astype(np.int32),
    }
    abstract = jax.eval_shape(teacher.init, jax.random.key(0), batch["image"])

    def host_leaf(leaf):  # float32 straight from the generator: no float64 temporary
        scale = 1.0 / np.sqrt(leaf.shape[0]) if leaf.ndim == 2 else 0.0
        return rng.standard_normal(leaf.shape, dtype=np.float32) * np.float32(scale)

    start = time.perf_counter()
    teacher_vars = jax.tree.map(host_leaf, abstract)
    out["host_fill_s"] = time.perf_counter() - start
    out["teacher_params"] = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(teacher_vars))
    out["host_teacher_mb"] = sum(x.nbytes for x in jax.tree.leaves(teacher_vars)) / 2**20
    if variant == "host_teacher":
        out["peak_create_mb"] = peak_rss_mb()
        return out

    rules = sharding.Rules.replicated() if variant == "replicated" else sharding.Rules.fsdp_default()
    mesh = sharding.make_mesh({"data": 1, "fsdp": 8})
    start = time.perf_counter()
    state = jaxkd.create(
        participants={
            "student": participants.Participant(student, None, trains=True),
            "teacher": participants.Participant(teacher, teacher_vars, trains=False, rules=rules),
        },
        method=methods.ce() + methods.kd(temperature=4.0),
        tx=optax.sgd(0.05, momentum=0.9),
        sample_batch=batch,
        rng=jax.random.key(0),
        mesh=mesh,
    )
    jax.block_until_ready(state)
    out["create_s"] = time.perf_counter() - start
    out["peak_create_mb"] = peak_rss_mb()
    per_device = sharding.per_device_bytes(state.frozen["teacher"])
    out["teacher_max_device_mb"] = max(per_device.values()) / 2**20
    out["teacher_all_devices_mb"] = sum(per_device.values()) / 2**20
    out["student_max_device_kb"] = max(sharding.per_device_bytes(state.trained["student"]).values()) / 2**10

    step = jaxkd.make_train_step(mesh=mesh)
    start = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready((state, metrics))
    out["first_step_s"] = time.perf_counter() - start
    out["loss"] = float(metrics["loss"])
    out["peak_step_mb"] = peak_rss_mb()
    return out


def step_times(batch_size: int, steps: int, warmup: int, meshes: list[str]) -> list[dict]:
    """Part (b): every mesh in this process, one after the other."""
    import jax

    jax.config.update("jax_default_prng_impl", "rbg")  # faster init compile; not part of the timing
    import numpy as np
    import optax

    import jaxkd
    from jaxkd import methods, models, sharding

    teacher = models.get("resnet32x4", num_classes=100)
    student = models.get("resnet8x4", num_classes=100)
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.normal(size=(batch_size, 32, 32, 3)).astype(np.float32),
        "label": rng.integers(0, 100, size=batch_size).astype(np.int32),
    }
    key = jax.random.key(0)
    teacher_vars = jax.device_get(jax.jit(teacher.init)(key, batch["image"]))  # host copy, placed by create
    tx = optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(0.05, momentum=0.9))

    def timed(step, state, batch):
        start = time.perf_counter()
        state, metrics = step(state, batch)
        jax.block_until_ready((state, metrics))
        return state, metrics, time.perf_counter() - start

    # Build, compile and warm up every mesh first; then time the meshes round-robin, one step each per
    # round, so a change in the background load of a shared machine hits every row alike.
    runs = {}
    for spec in meshes:
        axis, n = spec.split("=")
        n = int(n)
        mesh = sharding.make_mesh({axis: n}, devices=jax.devices()[:n])
        state = jaxkd.create(student=student, teacher=teacher, teacher_variables=teacher_vars,
                             method=methods.ce() + methods.kd(temperature=4.0), tx=tx, sample_batch=batch,
                             rng=key, mesh=mesh)
        step = jaxkd.make_train_step(mesh=mesh)
        device_batch = sharding.shard_batch(batch, mesh)  # time the step, not the host-to-device copy
        state, metrics, compile_s = timed(step, state, device_batch)  # the first call compiles
        for _ in range(warmup):
            state, metrics, _ = timed(step, state, device_batch)
        runs[spec] = {"n": n, "step": step, "state": state, "batch": device_batch, "compile_s": compile_s,
                      "times": [], "metrics": metrics}
        print(f"  {spec}: compiled in {compile_s:.1f} s", file=sys.stderr, flush=True)
    for _ in range(steps):
        for run in runs.values():
            run["state"], run["metrics"], seconds = timed(run["step"], run["state"], run["batch"])
            run["times"].append(seconds)

    rows = []
    for spec, run in runs.items():
        n, measured, state = run["n"], run["times"], run["state"]
        rows.append({
            "mesh": spec, "devices": n, "per_device_batch": batch_size // n,
            "compile_s": run["compile_s"], "ms_per_step": 1000 * float(np.median(measured)),
            "min_ms": 1000 * min(measured), "max_ms": 1000 * max(measured),
            "student_max_device_mb": max(sharding.per_device_bytes(state.trained["student"]).values()) / 2**20,
            "teacher_max_device_mb": max(sharding.per_device_bytes(state.frozen["teacher"]).values()) / 2**20,
            "loss": float(run["metrics"]["loss"]),
        })
    return rows


def run_child(args: list[str]) -> dict:
    """Runs this script with ``args`` in a fresh interpreter; returns its last stdout line as JSON."""
    done = subprocess.run([sys.executable, os.path.abspath(__file__), *args], check=True,
                          capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def part_a(args) -> None:
    hidden = tuple(args.teacher_hidden)
    rows = []
    for variant in VARIANTS:
        start = time.perf_counter()
        r = run_child(["--child", variant, "--teacher-hidden", *map(str, hidden),
                       "--memory-batch", str(args.memory_batch)])
        r["wall_s"] = time.perf_counter() - start
        rows.append(r)
    info = next(r for r in rows if "teacher_params" in r)
    print(f"\n### (a) Frozen teacher state: MLP {hidden} over 32x32x3 -> 10 classes, "
          f"{info['teacher_params'] / 1e6:.1f}M parameters ({info['host_teacher_mb']:.0f} MiB float32); "
          f"student MLP (32,); ce + kd; mesh data=1 x fsdp=8 (simulated CPU devices); "
          f"batch {args.memory_batch}; each row a fresh process\n")
    print("| variant | teacher MiB, fullest device | teacher MiB, all 8 devices | peak RSS after create (MiB) "
          "| peak RSS after 1 step (MiB) | create (s) | first step incl. compile (s) |")
    print("|---|---|---|---|---|---|---|")
    fmt = lambda r, k, f: format(r[k], f) if k in r else "—"  # noqa: E731
    for r in rows:
        print(f"| {LABELS[r['variant']]} | {fmt(r, 'teacher_max_device_mb', '.1f')} | "
              f"{fmt(r, 'teacher_all_devices_mb', '.0f')} | {r['peak_create_mb']:.0f} | "
              f"{fmt(r, 'peak_step_mb', '.0f')} | {fmt(r, 'create_s', '.1f')} | {fmt(r, 'first_step_s', '.1f')} |")
    base, host = rows[0]["peak_create_mb"], rows[1]["peak_create_mb"]
    print(f"\nThe host NumPy teacher costs {host - base:.0f} MiB over the bare process ({base:.0f} MiB). "
          "The simulated devices share the process's RAM, so the rows above it add the teacher's "
          "device buffers (8 copies replicated, 1 copy in total under fsdp) to that floor.")


def part_b(args) -> None:
    meshes = ["data=1", "data=2", "data=4", "data=8", "fsdp=8"]
    start = time.perf_counter()
    rows = step_times(args.batch_size, args.steps, args.warmup, meshes)
    total = time.perf_counter() - start
    one = rows[0]["ms_per_step"]
    load = os.getloadavg()[0]
    print(f"\n### (b) ce + kd(T=4) step, resnet32x4 teacher -> resnet8x4 student, 100 classes, global batch "
          f"{args.batch_size} of 32x32x3; median of {args.steps} steps after {args.warmup} warm-up "
          f"(+ 1 compiling call); {os.cpu_count()} host cores shared by the simulated devices "
          f"(1-min load average {load:.1f} at the end; part took {total:.0f} s); steps timed round-robin over "
          "the meshes\n")
    print("| mesh | devices | examples per device | first call: compile + step (s) | median ms/step | min–max ms | "
          "vs 1 device | student MiB / device | teacher MiB / device |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mesh']} | {r['devices']} | {r['per_device_batch']} | {r['compile_s']:.1f} | "
              f"{r['ms_per_step']:.0f} | {r['min_ms']:.0f}–{r['max_ms']:.0f} | {r['ms_per_step'] / one:.2f}x | "
              f"{r['student_max_device_mb']:.2f} | {r['teacher_max_device_mb']:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("a", "b", "both"), default="both")
    parser.add_argument("--teacher-hidden", type=int, nargs="+", default=[9216, 9216, 9216])
    parser.add_argument("--memory-batch", type=int, default=16, help="(a) batch size (a multiple of 8)")
    parser.add_argument("--batch-size", type=int, default=64, help="(b) global batch size (a multiple of 8)")
    parser.add_argument("--steps", type=int, default=10, help="(b) timed steps per mesh")
    parser.add_argument("--warmup", type=int, default=2, help="(b) untimed steps after the compiling call")
    parser.add_argument("--child", choices=VARIANTS, help="(internal) run one part (a) variant, print JSON")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(memory_child(args.child, tuple(args.teacher_hidden), args.memory_batch)))
        return
    print(f"XLA_FLAGS={os.environ['XLA_FLAGS']}")
    if args.part in ("a", "both"):
        part_a(args)
    if args.part in ("b", "both"):
        part_b(args)


if __name__ == "__main__":
    main()
