"""Results table (mean ± std over seeds), its files, and the learning-curve plot of a run folder."""

from __future__ import annotations

import collections
import dataclasses
import json
import os
from typing import Any

import numpy as np


def _mean_std(values: list[float]) -> tuple[float, float]:
    a = 100.0 * np.asarray(values, np.float64)
    # Sample std (ddof=1), the usual convention for "mean ± std over n runs".
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0


def _mean_time(values: list[float | None] | None) -> float | None:
    known = [v for v in values or () if v is not None]
    return float(np.mean(known)) if known else None


def summarize(cfg, results: dict[str, list[float]], row_info: dict[str, tuple[str, str]], *, seconds: float,
              num_train: int, num_student_train: int, num_test: int,
              step_ms: dict[str, list[float | None]] | None = None) -> dict[str, Any]:
    """Rows of the results table (``row_info``: row -> (model, method)), and the table itself as Markdown.

    ``step_ms``: per run, each seed's steady-state train-step time in milliseconds (what the method costs
    per step, the whole step: forwards, loss, gradients, update); the table shows their mean."""
    step_ms = step_ms or {}
    baseline = results.get("scratch")
    base_mean = _mean_std(baseline)[0] if baseline else None
    rows = []
    for name, values in results.items():
        mean, std = _mean_std(values)
        is_teacher = name == "teacher" or name.startswith("teacher:")
        model, method = row_info[name]
        rows.append({
            "run": name,
            "model": model,
            "method": method,
            "top1_mean": mean,
            "top1_std": std,
            "seeds": len(values),
            "top1_per_seed": [100.0 * v for v in values],
            "delta_vs_scratch": None if (is_teacher or base_mean is None or "/" in name) else mean - base_mean,
            "ms_per_step": _mean_time(step_ms.get(name)),
        })
    timed = any(r["ms_per_step"] is not None for r in rows)
    header = "| run | model | method | top-1 (%) | Δ vs scratch |" + (" ms/step |" if timed else "")
    lines = [header, "|---|---|---|---|---|" + ("---|" if timed else "")]
    for r in rows:
        delta = "" if r["delta_vs_scratch"] is None else f"{r['delta_vs_scratch']:+.2f}"
        line = f"| {r['run']} | {r['model']} | `{r['method']}` | {r['top1_mean']:.2f} ± {r['top1_std']:.2f} | {delta} |"
        if timed:
            line += "" if r["ms_per_step"] is None else f" {r['ms_per_step']:.0f}"
            line += " |"
        lines.append(line)
    labeled = f"{num_student_train} labeled" if num_student_train != num_train else f"all {num_train}"
    caption = (
        f"{cfg.dataset}: teacher trained on {num_train} images for {cfg.teacher_steps} steps; student on "
        f"{labeled} images for {cfg.steps} steps; test top-1 on {num_test} images after the last step, "
        f"mean ± std over seeds {tuple(cfg.seeds)}."
    )
    return {
        "config": dataclasses.asdict(cfg),
        "rows": rows,
        "table": "\n".join(lines) + "\n\n" + caption,
        "seconds": seconds,
    }


def write(out_dir: str, summary: dict[str, Any]) -> None:
    """``results.json`` (written to a temporary file and renamed: a kill never leaves half a file) and
    ``results.md``."""
    tmp = os.path.join(out_dir, "results.json.tmp")
    with open(tmp, "w") as f:
        json.dump(summary, f, indent=2)
    os.replace(tmp, os.path.join(out_dir, "results.json"))
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(summary["table"] + f"\n\nWall time: {summary['seconds']:.0f} s.\n")
        if "time" in summary:  # experiments.timing: seconds by phase, compiling taken out of each
            from experiments.timing import describe

            f.write(f"Time by phase: {describe(summary['time'])}.\n")


def plot_learning_curves(metrics_path: str, png_path: str) -> None:
    """Two panels: training loss and test accuracy against step, mean over seeds (band: min–max)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loss = collections.defaultdict(lambda: collections.defaultdict(dict))
    acc = collections.defaultdict(lambda: collections.defaultdict(dict))
    with open(metrics_path) as f:
        for line in f:
            r = json.loads(line)
            if "test_accuracy" in r:
                acc[r["run"]][r["seed"]][r["step"]] = 100.0 * r["test_accuracy"]
            elif "loss" in r:
                loss[r["run"]][r["seed"]][r["step"]] = r["loss"]

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, series, ylabel in ((axes[0], loss, "train loss"), (axes[1], acc, "test top-1 (%)")):
        for run, by_seed in series.items():
            steps = sorted(set.intersection(*(set(v) for v in by_seed.values())))
            values = np.array([[by_seed[s][t] for t in steps] for s in by_seed])
            if ax is axes[0] and values.shape[1] > 100:  # trailing moving average of the noisy loss
                k = values.shape[1] // 50
                values = np.array([np.convolve(v, np.ones(k) / k, mode="valid") for v in values])
                steps = steps[k - 1:]
            line, = ax.plot(steps, values.mean(0), label=run)
            if values.shape[0] > 1:
                ax.fill_between(steps, values.min(0), values.max(0), color=line.get_color(), alpha=0.2)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
