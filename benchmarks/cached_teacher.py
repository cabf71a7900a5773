"""Time the KD step with a live frozen teacher, with a cached one, and without a teacher (digits shapes).

    python benchmarks/cached_teacher.py                 # the table below
    python benchmarks/cached_teacher.py --onednn        # + the teacher's forward under XLA:CPU oneDNN options

The default experiment's shapes (``experiments/configs/digits.py``): resnet20 teacher -> resnet8 student,
batch 64 of 8x8x1 images, 10 classes, SGD momentum, the library's ``jaxkd.make_train_step``. Steps timed:

* student only: ``ce`` (no teacher): the floor a cached teacher aims at;
* live teacher: ``ce + kd(temperature=4)``, the teacher's forward inside the step;
* cached (fixed): the same method reading the teacher's logits from a fixed-view cache;
* cached (FKD): the same method reading FKD top-5 soft labels (marginal smoothing in the step);
* split teacher program: the teacher's forward compiled as its own program, its logits fed to the cached
  step (what a separately compiled teacher, e.g. with other compiler options, would cost).

The steps are timed round-robin (one step of each variant per round, ``--steps`` rounds, median per
variant) so that load from other processes hits every variant alike. The host side is timed apart: ms per
batch of the plain loader (``augment="shift"``) and of the cached loaders (the FKD one applies the stored
crop of the replayed view and gathers the soft labels), and the time to write each cache (the teacher once
over the split, times ``N`` views for FKD).

``--onednn`` times the teacher's forward alone compiled with per-compilation XLA:CPU options
(``jit(...).lower(...).compile(compiler_options=...)``): ``xla_cpu_use_onednn`` (oneDNN thunks for
matmul and convolution fusions), with and without YNNPACK's convolutions
(``xla_cpu_experimental_ynn_fusion_type=""``), and oneDNN's custom calls; whether the optimized
program differs from the default one is printed too (an option that rewrites nothing gives the same program).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import jax

jax.config.update("jax_default_prng_impl", "rbg")  # faster init compile; not part of the timing
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import jaxkd  # noqa: E402
from jaxkd import data, methods, models  # noqa: E402
from jaxkd.data.images import teacher_cache as tc  # noqa: E402

ONEDNN_OPTIONS = {
    "default": {},
    "xla_cpu_use_onednn": {"xla_cpu_use_onednn": True},
    "no YNNPACK convolutions (Eigen)": {"xla_cpu_experimental_ynn_fusion_type": ""},
    "no YNNPACK + xla_cpu_use_onednn": {"xla_cpu_experimental_ynn_fusion_type": "", "xla_cpu_use_onednn": True},
    "no YNNPACK + oneDNN custom calls": {"xla_cpu_experimental_ynn_fusion_type": "",
                                         "xla_cpu_experimental_onednn_custom_call": True},
}


def round_robin(fns: dict, rounds: int, warmup: int = 2) -> dict[str, float]:
    """Median ms of each ``fn()`` (which blocks until done), one call of each per round."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: 1000 * float(np.median(t)) for name, t in times.items()}


def setup(batch_size: int, num_examples: int, views: int, k: int, folder: str):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(num_examples, 8, 8, 1), dtype=np.uint8)
    labels = rng.integers(0, 10, size=num_examples).astype(np.int32)
    mean, std = data.channel_stats(images)
    teacher, student = models.get("resnet20", num_classes=10), models.get("resnet8", num_classes=10)
    teacher_vars = jax.jit(teacher.init)(jax.random.PRNGKey(1), np.zeros((1, 8, 8, 1), np.float32))
    common = dict(mean=mean, std=std, batch_size=256)
    start = time.perf_counter()
    fixed = tc.write_teacher_cache(os.path.join(folder, "fixed"), teacher, teacher_vars, images, kind="fixed", **common)
    fixed_s = time.perf_counter() - start
    start = time.perf_counter()
    fkd = tc.write_teacher_cache(os.path.join(folder, "fkd"), teacher, teacher_vars, images, kind="fkd",
                                 augment="shift", num_views=views, k=k, **common)
    fkd_s = time.perf_counter() - start
    loader_args = dict(batch_size=batch_size, mean=mean, std=std, seed=0, num_epochs=None)
    loaders = {
        "plain (augment='shift')": data.Loader(images, labels, augment="shift", **loader_args),
        "cached (fixed)": tc.CachedTeacherLoader(images, labels, cache=fixed, **loader_args),
        "cached (FKD)": tc.CachedTeacherLoader(images, labels, cache=fkd, **loader_args),
    }
    return teacher, student, teacher_vars, fixed, fkd, loaders, {"fixed": fixed_s, "FKD": fkd_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-examples", type=int, default=1297, help="the digits train split's size")
    parser.add_argument("--views", type=int, default=8, help="FKD's N stored views per image")
    parser.add_argument("--k", type=int, default=5, help="FKD's top-k")
    parser.add_argument("--steps", type=int, default=50, help="timed rounds")
    parser.add_argument("--onednn", action="store_true", help="also time the teacher forward under oneDNN options")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        teacher, student, teacher_vars, fixed, fkd, loaders, write_s = setup(
            args.batch_size, args.num_examples, args.views, args.k, folder)
        batches = {"fixed": next(loaders["cached (fixed)"]), "fkd": next(loaders["cached (FKD)"])}
        plain = {key: batches["fkd"][key] for key in ("image", "label")}
        tx = optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(0.05, momentum=0.9))
        key = jax.random.PRNGKey(0)
        student_vars = jax.jit(student.init)(key, plain["image"])
        kd = methods.parse("ce + kd(temperature=4)")
        step = jaxkd.make_train_step(donate=False)

        def state_of(method, participants, batch):
            return jaxkd.create(student=student, student_variables=student_vars, method=method, tx=tx,
                                participants=participants, sample_batch=batch, rng=key)

        live_teacher = jaxkd.Participant(teacher, teacher_vars, trains=False)
        cases = {
            "student only (ce)": (state_of(methods.parse("ce"), {}, plain), plain),
            "live teacher (ce + kd)": (state_of(kd, {"teacher": live_teacher}, plain), plain),
            "cached teacher, fixed (ce + kd)": (state_of(kd, {"teacher": tc.cached_teacher(fixed)}, batches["fixed"]),
                                                batches["fixed"]),
            "cached teacher, FKD top-5 (ce + kd)": (state_of(kd, {"teacher": tc.cached_teacher(fkd)}, batches["fkd"]),
                                                    batches["fkd"]),
        }
        device = {name: (state, jax.device_put(batch)) for name, (state, batch) in cases.items()}
        compile_s = {}
        for name, (state, batch) in device.items():
            start = time.perf_counter()
            jax.block_until_ready(step(state, batch))
            compile_s[name] = time.perf_counter() - start

        teacher_fwd = jax.jit(lambda v, x: teacher.apply(v, x, train=False).logits)
        cached_state, cached_batch = device["cached teacher, fixed (ce + kd)"]
        split_name = "split: teacher program + cached step"

        def split_step():
            logits = teacher_fwd(teacher_vars, cached_batch["image"])
            return jax.block_until_ready(step(cached_state, {**cached_batch, tc.LOGITS: logits}))

        fns = {name: (lambda s=state, b=batch: jax.block_until_ready(step(s, b)))
               for name, (state, batch) in device.items()}
        fns[split_name] = split_step
        ms = round_robin(fns, args.steps)
        host = round_robin({name: (lambda ld=loader: next(ld)) for name, loader in loaders.items()}, args.steps)

        floor = ms["student only (ce)"]
        print(f"digits shapes: resnet20 -> resnet8, batch {args.batch_size} of 8x8x1, 10 classes; CPU "
              f"({os.cpu_count()} cores), jax {jax.__version__}; median of {args.steps} round-robin rounds")
        print("| step | compile + first step (s) | ms/step | vs student only |")
        print("|---|---|---|---|")
        for name, value in ms.items():
            first = f"{compile_s[name]:.1f}" if name in compile_s else "n/a"
            print(f"| {name} | {first} | {value:.2f} | {value / floor:.2f}x |")
        print("\n| host batch | ms/batch |")
        print("|---|---|")
        for name, value in host.items():
            print(f"| {name} | {value:.3f} |")
        print(f"\ncache writes ({args.num_examples} images): fixed {write_s['fixed']:.1f} s, FKD "
              f"({args.views} views, top-{args.k}) {write_s['FKD']:.1f} s (teacher compile included)")

        if args.onednn:
            compiler_option_variants(teacher, teacher_vars, cached_batch["image"], args.steps)


def compiler_option_variants(teacher, teacher_vars, image, rounds: int) -> None:
    """The teacher's forward alone under each option set of :data:`ONEDNN_OPTIONS`."""
    fwd = jax.jit(lambda v, x: teacher.apply(v, x, train=False).logits)
    lowered = fwd.lower(teacher_vars, image)
    compiled, texts, outputs = {}, {}, {}
    for name, options in ONEDNN_OPTIONS.items():
        try:
            compiled[name] = lowered.compile(compiler_options=options)
        except Exception as err:  # an option this jaxlib does not know
            print(f"{name}: not compiled ({type(err).__name__}: {str(err)[:120]})")
            continue
        texts[name] = compiled[name].as_text()
        outputs[name] = np.asarray(compiled[name](teacher_vars, image))
    ms = round_robin({name: (lambda c=c: jax.block_until_ready(c(teacher_vars, image))) for name, c in
                      compiled.items()}, rounds)
    reference = outputs["default"]
    print("\n| teacher forward (resnet20, batch 64) | ms | vs default | same program as default "
          "| convolution ops / in YNN fusions / oneDNN mentions, in the program | max abs diff |")
    print("|---|---|---|---|---|---|")
    for name, value in ms.items():
        # (This function's name must not contain "onednn": it is in every op's metadata.)
        same = "yes" if texts[name] == texts["default"] else "no"
        text = texts[name].lower()
        diff = float(jnp.max(jnp.abs(outputs[name] - reference)))
        convs = f"{texts[name].count(' convolution(')} / {text.count('__ynn')} / {text.count('onednn')}"
        print(f"| {name} | {value:.2f} | {value / ms['default']:.2f}x | {same} | {convs} | {diff:.1e} |")


if __name__ == "__main__":
    main()
