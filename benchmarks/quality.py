"""The training-quality study (BENCHMARKS.md, section 16): tuned AdamW against every low-rank method.

On the ``quality`` config (``experiments/configs/quality.py``: d_model 128, 4 layers, rank 32 = d / 4,
T = 200, warmup + cosine, the built-in corpus):

1. **Sweep**: AdamW and GaLore (SVD) at three peak learning rates each (factor 2 apart, centred on
   the main job's 3e-3 and the GaLore authors' 1e-2); a grid whose best rate is at an edge grows
   past it (half or twice that rate) until the best is inside, up to five rates.
2. **Methods** at the rate the sweep found plus their authors' relative setting: Fira, APOLLO,
   APOLLO-Mini and Q-GaLore take GaLore's rate (their authors train at GaLore's 1e-2), FRUGAL's
   state-full Adam takes AdamW's (its authors'), GaLore with the power projector and GaLore with
   the "momentum reset" (Adam moments zeroed at each refresh, arXiv 2505.22922) take GaLore's.
   With ``--ablations``, GaLore at its best rate with rank 64 (r / d = 0.5) and with T = 50.
3. **Seeds**: every method's best setting again with seed 1 (model init and data order).

Then the table (best validation loss, mean and spread over the two seeds, gap to tuned AdamW,
optimizer state, compiled step at this size and, from the memory planner, at LLaMA-1B, step
time) and the loss curves.

    python -m benchmarks.quality [--steps 1000] [--workers 2] [--out runs] [--ablations]

Every run is ``python -m experiments.train --config <run>.json`` in a subprocess (one XLA thread
each, ``--workers`` at a time), so the study is resumable: run the same command again and
finished runs are skipped, interrupted ones resume from their last checkpoint. Results go to
``<out>/quality-study/`` (``study.md``, ``study.json``, ``curves.png``). Not part of the tests.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import math
import os
import pathlib
import statistics
import subprocess
import sys

from experiments import configs, metrics, provenance, report
from experiments.config import Config, OptimizerConfig, to_json_dict

ADAMW_LRS = (1.5e-3, 3e-3, 6e-3)
GALORE_LRS = (5e-3, 1e-2, 2e-2)
SEEDS = (0, 1)
MB = 1e6


@dataclasses.dataclass(frozen=True)
class Run:
    """One training run of the study: a method, its optimizer and a seed."""

    method: str
    optimizer: OptimizerConfig
    seed: int

    @property
    def name(self) -> str:
        return f"quality-seed{self.seed}"


def _lr_tag(lr: float) -> str:
    return f"lr{lr:g}"


def sweep_runs(base: Config) -> list[Run]:
    """Phase 1: AdamW and GaLore at each learning rate of the grid, seed 0."""
    adamw, galore = base.optimizers
    runs = [Run("adamw", dataclasses.replace(adamw, learning_rate=lr,
                                             label=f"adamw-{_lr_tag(lr)}"), 0) for lr in ADAMW_LRS]
    runs += [Run("galore-svd", dataclasses.replace(galore, learning_rate=lr,
                                                   label=f"galore-svd-{_lr_tag(lr)}"), 0)
             for lr in GALORE_LRS]
    return runs


MAX_RATES = 5
"""A sweep grows past an edge to at most this many rates."""


def extend_at_edges(out: pathlib.Path, sweep: list[Run]) -> list[Run]:
    """For each swept method whose best rate is the smallest (largest) of its grid, a run at
    half (twice) that rate, up to :data:`MAX_RATES` rates: a best rate at the edge of a grid is
    no tuned rate."""
    new = []
    for method in ("adamw", "galore-svd"):
        runs = sorted((r for r in sweep if r.method == method),
                      key=lambda r: r.optimizer.learning_rate)
        best, _ = best_lr(out, runs)
        rates = [r.optimizer.learning_rate for r in runs]
        if len(rates) >= MAX_RATES or best not in (rates[0], rates[-1]):
            continue
        lr = rates[0] / 2 if best == rates[0] else rates[-1] * 2
        new.append(Run(method, dataclasses.replace(
            runs[0].optimizer, learning_rate=lr,
            label=f"{method}-{_lr_tag(lr)}"), 0))
    return new


def method_optimizers(base: Config, adamw_lr: float, galore_lr: float) -> dict[str, OptimizerConfig]:
    """Phase 2: every method at the swept rate plus its authors' relative setting."""
    galore = dataclasses.replace(base.optimizers[1], learning_rate=galore_lr)
    low_rank = dict(learning_rate=galore_lr, rank=galore.rank,
                    update_proj_gap=galore.update_proj_gap)
    return {
        "galore-power": dataclasses.replace(galore, projector="power", label="galore-power"),
        "galore-svd-reset": dataclasses.replace(galore, reset_inner_on_refresh=True,
                                                label="galore-svd-reset"),
        "fira": OptimizerConfig(name="fira", scale=0.25, label="fira", **low_rank),
        "apollo": OptimizerConfig(name="apollo", label="apollo", **low_rank),
        "apollo_mini": OptimizerConfig(name="apollo_mini", label="apollo_mini",  # rank 1
                                       learning_rate=galore_lr,
                                       update_proj_gap=galore.update_proj_gap),
        "frugal-block": OptimizerConfig(name="frugal", subspace="block", density=0.25,
                                        learning_rate=adamw_lr,
                                        update_proj_gap=galore.update_proj_gap,
                                        label="frugal-block"),
        "q_galore": OptimizerConfig(name="q_galore", scale=0.25, label="q_galore", **low_rank),
    }


def ablations(base: Config, galore_lr: float) -> dict[str, OptimizerConfig]:
    """``--ablations``: GaLore at its swept rate with twice the rank and a 4x shorter period."""
    galore = dataclasses.replace(base.optimizers[1], learning_rate=galore_lr)
    return {"ablation: galore-svd rank 64": dataclasses.replace(galore, rank=64,
                                                                label="galore-svd-r64"),
            "ablation: galore-svd T 50": dataclasses.replace(galore, update_proj_gap=50,
                                                             label="galore-svd-T50")}


def run_dir(out: pathlib.Path, run: Run) -> pathlib.Path:
    return out / run.name / run.optimizer.display_name


def run_config(base: Config, run: Run, out: pathlib.Path) -> dict:
    """The run's ``config.json`` (the format ``experiments.train --config PATH.json`` reads)."""
    config = dataclasses.replace(base, name=run.name, seed=run.seed, optimizers=(run.optimizer,),
                                 log=dataclasses.replace(base.log, output_dir=str(out),
                                                         plots=False, progress=False),
                                 memory_presets=())
    return {**to_json_dict(config), "optimizer": to_json_dict(run.optimizer)}


def train(base: Config, runs: list[Run], out: pathlib.Path, workers: int) -> None:
    """Trains ``runs`` (``workers`` subprocesses at a time, one XLA thread each); a finished run
    is skipped by the trainer itself, an interrupted one resumes."""
    plans = out / "quality-study" / "plans"
    plans.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "XLA_FLAGS": (os.environ.get("XLA_FLAGS", "") + " "
                                       "--xla_cpu_multi_thread_eigen=false "
                                       "intra_op_parallelism_threads=1").strip()}

    def one(run: Run) -> None:
        stem = f"{run.name}-{run.optimizer.display_name}"
        plan = plans / f"{stem}.json"
        plan.write_text(json.dumps(run_config(base, run, out), indent=1))
        with open(plans / f"{stem}.log", "a") as log:
            done = subprocess.run([sys.executable, "-m", "experiments.train", "--config", str(plan)],
                                  stdout=log, stderr=subprocess.STDOUT, env=env, check=False)
        status = "ok" if done.returncode == 0 else f"FAILED ({done.returncode}; see {plan})"
        print(f"  {stem}: {status}", flush=True)
        if done.returncode:
            raise RuntimeError(f"{stem} failed; log {plans / (stem + '.log')}")

    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        list(pool.map(one, runs))


def summarize(directory: pathlib.Path) -> dict:
    """Best and final validation loss, step time and memory of one run (the trainer's summary
    row, :func:`experiments.report.summarize`, plus the best validation loss)."""
    row = report.summarize(directory.name, directory)
    val = [r["loss"] for r in metrics.read(directory / "metrics.jsonl") if r["split"] == "val"]
    return {"best_val": min(val), "final_val": row["final_val_loss"], "step_ms": row["step_ms"],
            "opt_state_mb": row["opt_state_mb"], "step_mb": row["step_memory_mb"]}


def best_lr(out: pathlib.Path, runs: list[Run]) -> tuple[float, dict[float, float]]:
    """The swept rate with the lowest best validation loss, and every rate's loss."""
    losses = {r.optimizer.learning_rate: summarize(run_dir(out, r))["best_val"] for r in runs}
    return min(losses, key=losses.get), losses


def memory_at_1b(base: Config, optimizers: dict[str, OptimizerConfig]) -> dict[str, float]:
    """GiB of one compiled train step of each method at LLaMA-1B (the planner, shape-only)."""
    from experiments import memory

    config = dataclasses.replace(base, optimizers=tuple(
        dataclasses.replace(o, label=m.replace(": ", "-").replace(" ", "-"))
        for m, o in optimizers.items()))
    planned = memory.at_preset(config, "llama_1b", layerwise_rows=False)
    rows = memory.plan(planned)
    return {m: row["peak_bytes"] / memory.GiB for m, row in zip(optimizers, rows)}


def table(rows: list[dict]) -> str:
    head = ("| method | peak lr | best val loss, seed 0 / 1 | mean | gap to AdamW (nats) "
            "| optimizer state MB | step MB (this size) | step GiB (LLaMA-1B) | step ms |\n"
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    lines = []
    for r in rows:
        seeds = " / ".join(f"{v:.4f}" for v in r["best_val"])
        lines.append(f"| {r['method']} | {r['lr']:.1e} | {seeds} | {r['mean']:.4f} | "
                     f"{r['gap']:+.4f} | {r['opt_state_mb']:.2f} | {r['step_mb']:.1f} | "
                     f"{r['step_gib_1b']:.2f} | {r['step_ms']:.0f} |")
    return "\n".join([head, *lines])


def plot(curves: dict[str, pathlib.Path], path: pathlib.Path) -> pathlib.Path:
    """Validation loss (left) and smoothed training loss (right) of each method's seed-0 run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_val, ax_train) = plt.subplots(1, 2, figsize=(13, 5))
    for method, directory in curves.items():
        records = metrics.read(directory / "metrics.jsonl")
        val = [(r["step"], r["loss"]) for r in records if r["split"] == "val"]
        train = [(r["step"], r["loss"]) for r in records if r["split"] == "train"]
        style = "--" if method.startswith("ablation") else "-"
        ax_val.plot(*zip(*val), style, marker="o", ms=3, label=method)
        window = 50
        smooth = [statistics.fmean(v for _, v in train[max(0, i - window + 1):i + 1])
                  for i in range(len(train))]
        ax_train.plot([s for s, _ in train], smooth, style, label=method)
    for ax, title in ((ax_val, "validation loss"), (ax_train, "training loss (mean of 50 steps)")):
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats / byte)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    ax_val.set_ylim(top=min(3.0, ax_val.get_ylim()[1]))
    ax_train.set_ylim(top=min(3.0, ax_train.get_ylim()[1]))
    ax_val.legend(fontsize=8)
    fig.suptitle("quality study: d_model 128, 4 layers, rank 32, T 200, seed 0")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", default="runs")
    parser.add_argument("--ablations", action="store_true",
                        help="also GaLore at rank 64 and at T 50 (seed 0)")
    args = parser.parse_args(argv)
    out = pathlib.Path(args.out)
    base = configs.load("quality")
    base = dataclasses.replace(base, schedule=dataclasses.replace(base.schedule, steps=args.steps),
                               eval=dataclasses.replace(base.eval, every=100))

    sweep = sweep_runs(base)
    print(f"phase 1: {len(sweep)} sweep runs", flush=True)
    train(base, sweep, out, args.workers)
    while extended := extend_at_edges(out, sweep):  # a best rate at the grid's edge: go on
        print(f"phase 1, extended: {[r.optimizer.display_name for r in extended]}", flush=True)
        train(base, extended, out, args.workers)
        sweep += extended
    adamw_lr, adamw_losses = best_lr(out, [r for r in sweep if r.method == "adamw"])
    galore_lr, galore_losses = best_lr(out, [r for r in sweep if r.method == "galore-svd"])
    print(f"AdamW {adamw_losses} -> {adamw_lr}; GaLore {galore_losses} -> {galore_lr}", flush=True)

    best = {"adamw": next(r.optimizer for r in sweep if r.method == "adamw"
                          and r.optimizer.learning_rate == adamw_lr),
            "galore-svd": next(r.optimizer for r in sweep if r.method == "galore-svd"
                               and r.optimizer.learning_rate == galore_lr)}
    best.update(method_optimizers(base, adamw_lr, galore_lr))
    if args.ablations:
        best.update(ablations(base, galore_lr))
    rest = [Run(m, o, seed) for seed in SEEDS for m, o in best.items()
            if not (seed == 0 and m in ("adamw", "galore-svd"))
            and not (seed == 1 and m.startswith("ablation"))]
    print(f"phase 2: {len(rest)} runs (methods at the swept rates, second seeds, ablations)",
          flush=True)
    train(base, rest, out, args.workers)

    print("memory at LLaMA-1B (shape-only) ...", flush=True)
    at_1b = memory_at_1b(base, best)
    mean_adamw = None
    rows = []
    for method, optimizer in best.items():
        seeds = (0,) if method.startswith("ablation") else SEEDS
        runs = [summarize(run_dir(out, Run(method, optimizer, s))) for s in seeds]
        mean = statistics.fmean(r["best_val"] for r in runs)
        mean_adamw = mean if method == "adamw" else mean_adamw
        rows.append({"method": method, "label": optimizer.display_name,
                     "lr": optimizer.learning_rate, "best_val": [r["best_val"] for r in runs],
                     "final_val": [r["final_val"] for r in runs], "mean": mean,
                     "gap": mean - mean_adamw, "opt_state_mb": runs[0]["opt_state_mb"],
                     "step_mb": runs[0]["step_mb"], "step_gib_1b": at_1b[method],
                     "step_ms": statistics.fmean(r["step_ms"] for r in runs)})
    sweep_rows = {"adamw": adamw_losses, "galore-svd": galore_losses}
    study = out / "quality-study"
    provenance.write_json(study / "study.json", {"steps": args.steps, "rows": rows,
                                                 "sweep": {k: {str(lr): v for lr, v in d.items()}
                                                           for k, d in sweep_rows.items()}})
    text = table(rows)
    sweep_text = "\n".join(f"- {m}: " + ", ".join(f"{lr:.1e} -> {v:.4f}" for lr, v in d.items())
                           for m, d in sweep_rows.items())
    (study / "study.md").write_text(f"{text}\n\nlearning-rate sweep (best val loss, seed 0):\n"
                                    f"{sweep_text}\n")
    curves = {m: run_dir(out, Run(m, o, 0)) for m, o in best.items()}
    figure = plot(curves, study / "curves.png")
    print(f"\n{text}\n\n{sweep_text}\nwrote {study / 'study.md'}, {figure}")
    return 0 if all(math.isfinite(r["mean"]) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
