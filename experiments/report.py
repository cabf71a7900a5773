"""Every experiment's report: the results table (mean ± std over seeds, Δ against a baseline run), its files\n(``results.json``, ``results.md``) and the curves of a run folder's ``metrics.jsonl``."""

from __future__ import annotations

import collections
import dataclasses
import json
import os
from typing import Any

import numpy as np

from experiments.run_log import read_records


@dataclasses.dataclass(frozen=True)
class Metric:
    """A column of a results table: the per-seed result entry ``key``, shown as ``title`` (``value * scale``
    with ``digits`` decimals, mean ± sample std over seeds), in the JSON rows as ``<name>_mean``,
    ``<name>_std``, ``<name>_per_seed`` (scaled)."""

    key: str
    name: str
    title: str
    scale: float = 1.0
    digits: int = 4


@dataclasses.dataclass
class Row:
    """One run of a results table: its leading cells (``{"model": ..., "method": ...}``, in column order; the
    ``method`` cell, a spec, is shown as code), one
    result per seed (``{metric key: value}``), each seed's steady-state ms per step (None where unknown),
    whether it gets a Δ against the baseline run, and extra JSON entries."""

    run: str
    cells: dict[str, str]
    per_seed: list[dict[str, float]]
    ms_per_step: list[float | None] = dataclasses.field(default_factory=list)
    compare: bool = True
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


def _mean_std(values: list[float]) -> tuple[float, float]:
    a = np.asarray(values, np.float64)
    # Sample std (ddof=1), the usual convention for "mean ± std over n runs".
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0


def _mean_time(values: list[float | None] | None) -> float | None:
    known = [v for v in values or () if v is not None]
    return float(np.mean(known)) if known else None


def summarize(rows: list[Row], metrics: list[Metric], *, baseline: str | None, caption: str,
              seconds: float) -> dict[str, Any]:
    """The results table (Markdown: the rows' cells, every metric's mean ± std over seeds and its Δ against
    the ``baseline`` run's mean, ms/step where any run was timed) and its JSON rows. A run without a metric's
    entry (a teacher-student distance of a run without a teacher) leaves its cells empty, and a metric the
    baseline run lacks has no Δ column."""
    base = next((r for r in rows if r.run == baseline), None)
    base_means = {m.key: _mean_std([m.scale * s[m.key] for s in base.per_seed])[0] for m in metrics
                  if base and all(m.key in s for s in base.per_seed)}
    cell_names = list(rows[0].cells) if rows else []
    timed = any(_mean_time(r.ms_per_step) is not None for r in rows)
    delta_title = f"Δ vs {baseline}"
    # A metric the baseline run was not scored by (a teacher-student distance; the baseline has no teacher) has
    # no Δ column.
    with_delta = {m.key: not base or m.key in base_means for m in metrics}
    header = (["run", *cell_names] + [t for m in metrics for t in (m.title, delta_title)[:1 + with_delta[m.key]]]
              + (["ms/step"] if timed else []))
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    json_rows = []
    for row in rows:
        entry: dict[str, Any] = {"run": row.run, **row.cells, "seeds": len(row.per_seed)}
        cells = [row.run, *(f"`{row.cells[c]}`" if c == "method" else row.cells[c] for c in cell_names)]
        for m in metrics:
            if not all(m.key in s for s in row.per_seed):  # a column this run was not scored by (no teacher)
                cells += ["", ""][:1 + with_delta[m.key]]
                continue
            values = [m.scale * s[m.key] for s in row.per_seed]
            mean, std = _mean_std(values)
            delta = (mean - base_means[m.key] if row.compare and m.key in base_means and row.run != baseline
                     else None)
            entry.update({f"{m.name}_mean": mean, f"{m.name}_std": std, f"{m.name}_per_seed": values,
                          f"{m.name}_delta_vs_{baseline}": delta})
            cells += [f"{mean:.{m.digits}f} ± {std:.{m.digits}f}" if len(values) > 1 else f"{mean:.{m.digits}f}",
                      "" if delta is None else f"{delta:+.{m.digits}f}"][:1 + with_delta[m.key]]
        entry["ms_per_step"] = _mean_time(row.ms_per_step)
        if timed:
            cells.append("" if entry["ms_per_step"] is None else f"{entry['ms_per_step']:.0f}")
        entry.update(row.extra)
        json_rows.append(entry)
        lines.append("| " + " | ".join(cells) + " |")
    return {"rows": json_rows, "table": "\n".join(lines) + "\n\n" + caption, "seconds": seconds}


def write_json(path: str, value: Any, *, default: Any = None) -> None:
    """``value`` as JSON at ``path``, written to a temporary file and renamed (a kill never leaves half a file);
    ``default`` as in :func:`json.dump` (``str``: write what JSON cannot represent as its text)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(value, f, indent=2, default=default)
    os.replace(path + ".tmp", path)


def write(out_dir: str, summary: dict[str, Any]) -> None:
    """``results.json`` (written to a temporary file and renamed: a kill never leaves half a file) and
    ``results.md``."""
    write_json(os.path.join(out_dir, "results.json"), summary)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(summary["table"] + f"\n\nWall time: {summary['seconds']:.0f} s.\n")
        if "time" in summary:  # experiments.timing: seconds by phase, compiling taken out of each
            from experiments.timing import describe

            f.write(f"Time by phase: {describe(summary['time'])}.\n")


def plot_curves(metrics_path: str, png_path: str, panels: list[tuple[str, str]], *, log_scale: tuple[str, ...] = (),
                smooth: tuple[str, ...] = ()) -> None:
    """One panel per ``(record key, axis label)``: that key of ``metrics.jsonl``'s records against step, mean
    over seeds per run (band: min–max). Keys in ``smooth`` (a noisy train loss) are shown as a trailing
    moving average when long; keys in ``log_scale`` on a log axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {key: collections.defaultdict(lambda: collections.defaultdict(dict)) for key, _ in panels}
    for r in read_records(metrics_path):
        for key, _ in panels:
            if isinstance(r.get(key), (int, float)):
                series[key][r["run"]][r["seed"]][r["step"]] = r[key]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, (key, label) in zip(axes[0], panels):
        for run, by_seed in series[key].items():
            steps = sorted(set.intersection(*(set(v) for v in by_seed.values())))
            values = np.array([[by_seed[s][t] for t in steps] for s in by_seed])
            if key in smooth and values.shape[1] > 100:
                k = values.shape[1] // 50
                values = np.array([np.convolve(v, np.ones(k) / k, mode="valid") for v in values])
                steps = steps[k - 1:]
            line, = ax.plot(steps, values.mean(0), label=run, marker="o" if values.shape[1] < 30 else None,
                            markersize=3)
            if values.shape[0] > 1:
                ax.fill_between(steps, values.min(0), values.max(0), color=line.get_color(), alpha=0.2)
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if key in log_scale:
            ax.set_yscale("log")
    axes[0][-1].legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
