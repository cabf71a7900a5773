"""An int8 teacher and a LoRA student on the default LM run (experiments/configs/lm_stdlib.py), measured.

    python benchmarks/lora_int8.py                                   # about 30 min on a busy 2-core CPU
    python benchmarks/lora_int8.py --steps 50 --out runs/lora_int8   # shorter students

Token-level KD (``lm_ce + token_kd(divergence='forward_kl')``, the default run's KD row), one seed, the default
run's teacher (pretrained 600 steps, cached in ``<out>/teachers``), students trained ``--steps`` steps (the
default run trains 400; fewer keep this under a quarter of an hour on a 2-core CPU). Four runs that differ in
one setting each (:class:`experiments.lm_distill.LMExperiment`'s ``teacher_int8``, ``student_init_steps``,
``student_lora``):

1. ``float32 teacher``: the default run's KD student (fresh initialization);
2. ``int8 teacher``: the same, the teacher's matmul weights int8 weight-only (per output channel);
3. ``full fine-tune``: the student starts from its own architecture pretrained with ``lm_ce`` for
   ``--student-init-steps`` steps, then KD trains every weight;
4. ``LoRA fine-tune``: the same start, KD trains LoRA adapters only (``--lora-targets``, rank, alpha).

Printed as a Markdown table: the teacher's parameter bytes as the run holds them, its validation bits per byte
as held, the student's starting validation bits per byte (its pretrained base), how many of its parameters train
and its final validation bits per byte. Re-running with the same ``--out`` reuses the finished runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments.configs.lm_stdlib import get_config  # noqa: E402
from experiments.lm_distill import run_experiment  # noqa: E402
from experiments.runner import run_folder  # noqa: E402

KD = "lm_ce + token_kd(divergence='forward_kl')"


def runs(args) -> dict[str, dict]:
    base = dataclasses.replace(get_config(), name="lora_int8", methods={"token_kd": KD}, seeds=(0,),
                               steps=args.steps, eval_every=args.steps, out_dir=args.out, tensorboard=False)
    start = dict(student_init_steps=args.student_init_steps)
    lora = dict(targets=args.lora_targets, rank=args.rank, alpha=args.alpha)
    return {
        "float32 teacher": base,
        "int8 teacher": dataclasses.replace(base, teacher_int8=True),
        "full fine-tune": dataclasses.replace(base, **start),
        "LoRA fine-tune": dataclasses.replace(base, **start, student_lora=lora),
    }


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/lora_int8", help="runs and the cached teachers go here")
    parser.add_argument("--steps", type=int, default=200, help="each student's KD steps")
    parser.add_argument("--student-init-steps", type=int, default=200,
                        help="lm_ce steps of the fine-tuned students' starting weights")
    parser.add_argument("--lora-targets", default=".*attention/(query|value)|.*mlp/(up|down)")
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--alpha", type=float, default=8.0)
    args = parser.parse_args(argv)
    started = time.time()
    lines = ["| run | teacher params (bytes) | teacher val bpb (as held) | student start val bpb | "
             "student trained params | student val bpb |", "|---|---|---|---|---|---|"]
    for label, cfg in runs(args).items():
        out_dir = os.path.join(args.out, label.replace(" ", "_"))
        os.makedirs(out_dir, exist_ok=True)
        with run_folder(cfg, out_dir):
            summary = run_experiment(cfg, out_dir)
        rows = {r["run"]: r for r in summary["rows"]}
        start = f"{rows['student_base']['bpb_mean']:.4f}" if "student_base" in rows else "fresh init"
        lines.append(f"| {label} | {summary['teacher_param_bytes']['teacher']:,} | "
                     f"{summary['held_teacher_bpb']['teacher']:.4f} | {start} | "
                     f"{summary['student_trainable_params']:,} | {rows['token_kd']['bpb_mean']:.4f} |")
        print(lines[-1], file=sys.stderr)
    table = "\n".join(lines) + (
        f"\n\nTeacher {summary['config']['teacher']}, {summary['config']['teacher_steps']} steps; student "
        f"{summary['config']['student']}, {args.steps} KD steps of {summary['config']['batch_size']} rows, seed 0; "
        f"fine-tuned students start from {args.student_init_steps} lm_ce steps; LoRA rank {args.rank}, alpha "
        f"{args.alpha:g} on {args.lora_targets!r}. Wall time {(time.time() - started) / 60:.1f} min.")
    print(table)
    return table


if __name__ == "__main__":
    main()
