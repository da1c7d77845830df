"""Side-by-side summary of an experiment's runs: a table, ``summary.json`` and PNG plots.

Everything is read back from the run directories (``metrics.jsonl``, ``memory.json``), so a summary
of resumed or earlier runs is the same as one of runs trained in this process.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import statistics

from . import metrics

MB = 1e6
LOADED = 1.25
"""A load average above this many times the CPU count means other work competed for them."""


def summarize(label: str, directory: pathlib.Path) -> dict:
    """One table row of a run directory."""
    records = metrics.read(directory / "metrics.jsonl")
    train = [r for r in records if r["split"] == "train"]
    val = [r for r in records if r["split"] == "val"]
    timed = [r for r in train if r.get("warm")] or train
    mem = json.loads((directory / "memory.json").read_text()) if (directory / "memory.json").exists() else {}
    return {
        "optimizer": label,
        "steps": train[-1]["step"] if train else 0,
        "final_train_loss": train[-1]["loss"] if train else math.nan,
        "final_val_loss": val[-1]["loss"] if val else math.nan,
        "opt_state_mb": mem.get("opt_state_bytes", math.nan) / MB,
        "param_mb": mem.get("param_bytes", math.nan) / MB,
        "step_memory_mb": mem.get("step_peak_bytes", math.nan) / MB,
        "step_ms": 1e3 * statistics.median(r["step_time"] for r in timed) if timed else math.nan,
        "max_load": max((r.get("load", math.nan) for r in timed), default=math.nan),
    }


def table(rows: list[dict]) -> str:
    """A markdown table of :func:`summarize` rows, with a note on how step times were taken and
    a warning when the machine was loaded by other work while they were."""
    head = ("| optimizer | steps | final val loss | optimizer state MB | compiled step MB / device "
            "| step ms |\n|---|---:|---:|---:|---:|---:|")
    lines = [f"| {r['optimizer']} | {r['steps']} | {r['final_val_loss']:.4f} | {r['opt_state_mb']:.3f} "
             f"| {r['step_memory_mb']:.2f} | {r['step_ms']:.1f} |" for r in rows]
    note = ("step ms: median over the logged windows after the first (which holds the "
            "compilation), the same steps for every optimizer of a fresh run.")
    loads = [r["max_load"] for r in rows if math.isfinite(r.get("max_load", math.nan))]
    cpus = os.cpu_count() or 1
    if loads and max(loads) > LOADED * cpus:
        note += (f" The machine was busy with other work while timing (1-minute load average "
                 f"up to {max(loads):.1f} on {cpus} CPUs): compare step times with care.")
    return "\n".join([head, *lines, "", note])


def _smooth(values: list[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def plot(runs: dict[str, pathlib.Path], rows: list[dict], out_dir: pathlib.Path) -> list[pathlib.Path]:
    """``loss.png`` (train, smoothed, and validation curves) and ``memory.png`` (bars)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    for i, (label, directory) in enumerate(runs.items()):
        records = metrics.read(directory / "metrics.jsonl")
        train = [r for r in records if r["split"] == "train"]
        val = [r for r in records if r["split"] == "val"]
        color = f"C{i}"
        if train:
            window = max(1, len(train) // 30)
            ax.plot([r["step"] for r in train], _smooth([r["loss"] for r in train], window),
                    color=color, alpha=0.6, label=None if val else label)
        if val:
            ax.plot([r["step"] for r in val], [r["loss"] for r in val], "o--", color=color,
                    label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title("solid: train loss (smoothed); dashed: validation loss", fontsize="medium")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    fig.tight_layout()
    loss_png = out_dir / "loss.png"
    fig.savefig(loss_png, dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(max(9, 1.1 * len(rows)), 4.2))
    labels = [r["optimizer"] for r in rows]
    colors = [f"C{i}" for i in range(len(rows))]
    for ax, key, title in ((axes[0], "opt_state_mb", "optimizer state (MB)"),
                           (axes[1], "step_memory_mb", "compiled step memory (MB / device)")):
        ax.bar(labels, [r[key] for r in rows], color=colors)
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=40)
        for tick in ax.get_xticklabels():
            tick.set_horizontalalignment("right")
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    memory_png = out_dir / "memory.png"
    fig.savefig(memory_png, dpi=120)
    plt.close(fig)
    return [loss_png, memory_png]


def write_summary(rows: list[dict], out_dir: pathlib.Path) -> pathlib.Path:
    path = out_dir / "summary.json"
    path.write_text(json.dumps(rows, indent=2) + "\n")
    return path
