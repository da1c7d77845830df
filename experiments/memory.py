"""The memory planner: the compiled memory of the exact step the trainer would run, shape-only.

``python -m experiments.memory --config NAME [overrides] [--json | --jsonl] [--plot PATH]``
builds, for every optimizer row of the config, the trainer's step
(:func:`experiments.trainer.build`: the same optimizer, clipping, non-finite guard, shardings and
donation) and compiles it on abstract shapes
(``jax.ShapeDtypeStruct``): nothing is allocated and no data is read, so a LLaMA-7B step is planned
on a laptop in seconds. XLA's buffer assignment (``compiled.memory_analysis()``) gives, per device::

    peak = arguments + outputs - aliased (donated) + temp

Each row reports the parameters, the optimizer state, the gradients the step materialises (the
whole tree for a gradient step, none for zeroth order, one layer's plus the leaves outside the
stack for a layerwise step), the temp and the peak, and the compile
seconds. ``--json`` prints one JSON document (the list of rows, for ``json.load``), ``--jsonl``
JSON Lines (one object per row as soon as it is compiled); ``--plot`` draws stacked bars
(parameters / optimizer state / gradients / activations and other temp), like Figure 1 of the
GaLore paper.

float32 on CPU is the honest figure: XLA:CPU upcasts bf16 dots, so bf16 steps measured on a CPU
overstate their memory (measure bf16 on a GPU).

:func:`at_preset` moves a config to a model preset of :data:`memjax.models.lm.PRESETS` at the
GaLore paper's setting (one 256-token sequence, float32, no remat, the authors' rank for that
size): the main job (``python -m experiments.train``) ends with its optimizers planned at LLaMA-1B
and LLaMA-7B this way.

Reference: Zhao et al., "GaLore", arXiv 2403.03507, Fig. 1 and Sec. 5.5 (LLaMA-7B memory).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
import time
from collections.abc import Sequence

from .config import Config, ConfigError, validate

GiB = 2**30

AUTHORS_RANK = {"llama_60m": 128, "llama_130m": 256, "llama_350m": 256, "llama_1b": 512,
                "llama_7b": 1024}
"""GaLore's rank per LLaMA size (paper, Sec. 5; REFERENCES.md)."""


def gradient_bytes(params, optimizer) -> int:
    """Bytes of the gradients a step of ``optimizer`` holds at once: the whole tree for a gradient
    step (float32 for INT8 weights), none for zeroth order, and for a layerwise step one
    layer's slice of the stack plus the leaves outside it (their gradient waits for the end
    of the backward pass)."""
    import jax

    from memjax.optim import state_bytes
    from memjax.optim.quantized_weights import float_shapes

    if optimizer.name == "mezo":
        return 0
    params = float_shapes(params)  # gradients are float, INT8 weights included
    if not optimizer.layerwise:
        return state_bytes(params)
    rest = state_bytes({k: v for k, v in params.items() if k != "blocks"})
    return rest + sum(state_bytes(x) // x.shape[0] for x in jax.tree.leaves(params["blocks"]))


def plan_row(config: Config, optimizer) -> dict:
    """Compiles ``optimizer``'s train step of ``config`` shape-only and reads its memory.

    Returns:
      ``{"label", "peak_bytes", "params_bytes", "optimizer_state_bytes", "grads_bytes",
      "temp_bytes", "argument_bytes", "output_bytes", "alias_bytes", "compile_seconds",
      "model", "batch_tokens"}``.
    """
    from . import run, sharding

    start = time.perf_counter()
    tr = run.build_trainer(config, optimizer, sharding.make_mesh(config.mesh))
    seconds = time.perf_counter() - start
    mem = run.memory_report(tr)
    step = mem["step"]
    m, d = config.model, config.data
    return {
        "label": optimizer.display_name,
        "peak_bytes": mem["step_peak_bytes"],
        "params_bytes": mem["param_bytes"],
        "optimizer_state_bytes": mem["opt_state_bytes"],
        "grads_bytes": gradient_bytes(tr.abstract_state.params, optimizer),
        "temp_bytes": step["temp"],
        "argument_bytes": step["argument"],
        "output_bytes": step["output"],
        "alias_bytes": step["alias"],
        "compile_seconds": round(seconds, 2),
        "model": f"d{m.d_model} L{m.num_layers} ffn{m.ffn_dim} vocab{m.vocab_size} {m.param_dtype}",
        "batch_tokens": d.batch_size * d.seq_len,
    }


def plan(config: Config, *, on_row=None) -> list[dict]:
    """:func:`plan_row` of every selected optimizer of ``config`` (``on_row(row)`` after each)."""
    validate(config)
    rows = []
    for optimizer in config.selected:
        rows.append(plan_row(config, optimizer))
        if on_row is not None:
            on_row(rows[-1])
    return rows


def at_preset(config: Config, preset: str, *, seq_len: int = 256, batch_size: int = 1,
              layerwise_rows: bool = True) -> Config:
    """``config`` with the model of ``memjax.models.lm.PRESETS[preset]``, float32, no remat, one
    ``batch_size x seq_len`` batch without accumulation (a preset's own shape: no
    ``model.init_from``), and every projected recipe at the
    authors' rank for that size (:data:`AUTHORS_RANK`; rows of other recipes unchanged). With
    ``layerwise_rows``, each gradient row that is not layerwise is followed by its layerwise twin
    (label ``<label>-layerwise``)."""
    from memjax.models.lm import PRESETS

    if preset not in PRESETS:
        raise ConfigError(f"unknown model preset {preset!r}; available: {', '.join(PRESETS)}")
    p = PRESETS[preset]
    model = dataclasses.replace(
        config.model, vocab_size=p.vocab_size, d_model=p.d_model, num_layers=p.num_layers,
        num_heads=p.num_heads, ffn_dim=p.ffn_dim, remat="none", dtype="float32",
        param_dtype="float32", tie_embeddings=p.tie_embeddings, init_from="")
    rank = AUTHORS_RANK.get(preset)
    optimizers = []
    for o in config.optimizers:
        o = dataclasses.replace(o, label=o.display_name, **(
            {"rank": rank} if rank is not None and hasattr(o, "rank") else {}))
        optimizers.append(o)
        if layerwise_rows and o.name != "mezo" and not o.layerwise:
            optimizers.append(dataclasses.replace(o, layerwise=True, label=f"{o.label}-layerwise"))
    optimizers = tuple(optimizers)
    return dataclasses.replace(
        config, model=model, optimizers=optimizers,
        data=dataclasses.replace(config.data, seq_len=seq_len, batch_size=batch_size,
                                 tokenizer=""),
        schedule=dataclasses.replace(config.schedule, grad_accum=1))


def table(rows: list[dict], title: str = "") -> str:
    """A markdown table of :func:`plan` rows; ratios are to the first row (the baseline)."""
    base = rows[0]["peak_bytes"] if rows else 1
    head = [f"{title}\n" if title else "",
            "| optimizer | params GiB | optimizer state GiB | gradients GiB | temp GiB | peak GiB "
            f"| peak / {rows[0]['label'] if rows else 'first'} | compile s |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]
    lines = [f"| {r['label']} | {r['params_bytes'] / GiB:.2f} | "
             f"{r['optimizer_state_bytes'] / GiB:.2f} | {r['grads_bytes'] / GiB:.2f} | "
             f"{r['temp_bytes'] / GiB:.2f} | {r['peak_bytes'] / GiB:.2f} | "
             f"{r['peak_bytes'] / base:.3f}x | {r['compile_seconds']:.1f} |" for r in rows]
    return "\n".join([h for h in head if h] + lines)


def plot(rows: list[dict], path: pathlib.Path, title: str = "") -> pathlib.Path:
    """Stacked bars per row: parameters, optimizer state, gradients, activations and other temp."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r["label"] for r in rows]
    parts = {
        "parameters": [r["params_bytes"] / GiB for r in rows],
        "optimizer state": [r["optimizer_state_bytes"] / GiB for r in rows],
        "gradients": [min(r["grads_bytes"], r["temp_bytes"]) / GiB for r in rows],
        "activations and other temp": [
            max(r["peak_bytes"] - r["params_bytes"] - r["optimizer_state_bytes"]
                - min(r["grads_bytes"], r["temp_bytes"]), 0) / GiB for r in rows],
    }
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(rows), 4.2))
    bottom = [0.0] * len(rows)
    for name, values in parts.items():
        ax.bar(labels, values, bottom=bottom, label=name)
        bottom = [b + v for b, v in zip(bottom, values)]
    for i, total in enumerate(bottom):
        ax.text(i, total, f"{total:.1f}", ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("GiB (compiled step, per device)")
    ax.set_title(title or "memory of one train step")
    ax.tick_params(axis="x", rotation=20)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def describe_config(config: Config) -> str:
    m, d = config.model, config.data
    return (f"{config.name}: d_model {m.d_model}, {m.num_layers} layers, ffn {m.ffn_dim}, vocab "
            f"{m.vocab_size}, {m.param_dtype}, remat {m.remat}, batch {d.batch_size} x {d.seq_len} "
            f"tokens, grad_accum {config.schedule.grad_accum}")


def main(argv: Sequence[str] | None = None) -> int:
    """The CLI; returns the exit status (2 on bad input)."""
    from . import train

    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--json", action="store_true")
    pre.add_argument("--jsonl", action="store_true")
    pre.add_argument("--plot", default="")
    known, rest = pre.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    machine = known.json or known.jsonl  # stdout is data only
    try:
        config = train.parse(rest, prog=train.program("python -m experiments.memory"),
                             description=__doc__.splitlines()[0] + " Extra flags: --json (one "
                             "JSON document: the list of rows), --jsonl (JSON Lines: one object "
                             "per row as it compiles), --plot PATH (stacked bars as PNG).")
        if not machine:
            print(f"# {describe_config(config)}", flush=True)
        emit = (lambda r: print(json.dumps(r), flush=True)) if known.jsonl else None
        rows = plan(config, on_row=emit)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if known.json:
        print(json.dumps(rows, indent=1))
    elif not machine:
        print(table(rows))
    if known.plot:
        path = plot(rows, pathlib.Path(known.plot), describe_config(config))
        if not machine:
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
