"""Train from a named config: ``python -m experiments.train [--config NAME] [--section.field VALUE ...]``.

With no arguments it runs the ``default`` experiment (a tiny LLaMA-style byte LM on the built-in
stdlib corpus, AdamW and GaLore side by side), prints a table and writes plots under
``runs/default/``. ``--config sweep`` runs every optimizer (section 9 of BENCHMARKS.md). Any field of
:class:`experiments.config.Config` can be overridden (``--schedule.steps 100``,
``--optimizers.1.rank 8``, ``--mesh.fsdp 4``); ``--help`` lists them. ``--config
runs/<name>/<label>/config.json`` re-runs one saved run from its resolved config (add
``--log.output-dir`` to write elsewhere); on CPU it reproduces the run's metrics exactly.

Bad input (an unknown config or field, a wrong type, a mesh that does not fit the devices or the
batch, a checkpoint written by an incompatible config) exits with status 2 and a one-line
``error: ...`` before anything is written.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import pathlib
import sys
from collections.abc import Sequence

import tyro

from experiments import configs
from experiments.config import Config, ConfigError, resolve_model, validate

PROG = "python -m experiments.train"
_BOX = "│╭╮╰╯─┃━┏┓┗┛"


def _one_line(tyro_output: str) -> str:
    """tyro's boxed error message (title, body, separator, help hints) as the body on one line."""
    lines = [line.strip().strip(_BOX).strip() for line in tyro_output.splitlines()]
    body = []
    for text in lines[1:]:  # lines[0] is the box's title
        if text and set(text) <= set(_BOX):
            break  # the separator before tyro's help hints
        if text:
            body.append(text)
    return " ".join(body) or "invalid command-line arguments"


def parse(argv: Sequence[str], *, prog: str = PROG, description: str | None = None) -> Config:
    """``[--config NAME] overrides...`` -> the resolved :class:`Config`.

    Raises:
      ConfigError: unknown config name, unknown field, or a value of the wrong type.
      SystemExit: ``--help`` (status 0).
    """
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config", default="default")
    known, rest = pre.parse_known_args(list(argv))
    base = configs.load(known.config)
    description = (f"{description or __doc__.splitlines()[0]}\n\n--config NAME picks the base "
                   f"experiment (default: default); available: {', '.join(configs.names())}.")
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            return tyro.cli(Config, default=base, args=rest, prog=prog, description=description)
    except SystemExit as exit_:
        if exit_.code in (0, None):
            sys.stderr.write(captured.getvalue())
            raise
        raise ConfigError(_one_line(captured.getvalue())) from None


def run_experiment(config: Config) -> list[dict]:
    """Trains every optimizer of ``config`` in turn, then prints and saves the comparison.

    Returns:
      The table rows (:func:`experiments.report.summarize`).
    """
    import jax

    from experiments import data, report, run, sharding

    config = resolve_model(config)
    validate(config)
    dist = config.distributed
    if dist.coordinator_address:
        jax.distributed.initialize(dist.coordinator_address, dist.num_processes, dist.process_id)
    primary = jax.process_index() == 0
    mesh = sharding.make_mesh(config.mesh)
    sharding.check_batch(mesh, config.data.batch_size, config.schedule.grad_accum)
    run.lm_config(config)
    source = data.make_source(config.data, vocab_size=config.model.vocab_size,
                              num_val_batches=config.eval.batches, seed=config.seed,
                              tokenizer=run.tokenizer_path(config))
    if source.vocab_size > config.model.vocab_size:
        raise ConfigError(f"data has token ids up to {source.vocab_size - 1} but model.vocab_size="
                          f"{config.model.vocab_size}")
    for optimizer in config.selected:  # every run directory is checked before any is written
        run.check_resumable(config, optimizer, source.fingerprint)

    if primary:
        print(f"experiment {config.name!r}: {len(config.selected)} optimizer(s), {config.schedule.steps} "
              f"steps, data {source.name} ({source.fingerprint}), mesh {dict(mesh.shape)} on "
              f"{jax.device_count()} {jax.devices()[0].platform} device(s) in {jax.process_count()} "
              "process(es)", flush=True)
    dirs = {o.display_name: run.train(config, o, mesh, source) for o in config.selected}
    if not primary:
        return []
    rows = [report.summarize(label, d) for label, d in dirs.items()]
    out_dir = pathlib.Path(config.log.output_dir) / config.name
    print("\n" + report.table(rows))
    written = [report.write_summary(rows, out_dir)]
    if config.log.plots:
        written += report.plot(dirs, rows, out_dir)
    for preset in config.memory_presets:
        written += _plan_at(config, preset, out_dir)
    print("wrote " + ", ".join(str(p) for p in written))
    return rows


def _plan_at(config: Config, preset: str, out_dir: pathlib.Path) -> list[pathlib.Path]:
    """Prints (and saves as JSON, and as a plot) the shape-only memory of ``config``'s optimizers
    at a model preset (:func:`experiments.memory.at_preset`); nothing is allocated."""
    from experiments import memory, provenance

    planned = memory.at_preset(config, preset)
    print(f"\nshape-only memory of one train step at {preset} "
          f"({memory.describe_config(planned)}; python -m experiments.memory):", flush=True)
    rows = memory.plan(planned)
    print(memory.table(rows))
    path = out_dir / f"memory_{preset}.json"
    provenance.write_json(path, rows)
    written = [path]
    if config.log.plots:
        written.append(memory.plot(rows, out_dir / f"memory_{preset}.png",
                                   memory.describe_config(planned)))
    return written


def main(argv: Sequence[str] | None = None) -> int:
    """The CLI; returns the exit status (2 on bad input)."""
    try:
        run_experiment(parse(sys.argv[1:] if argv is None else argv))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
