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
import dataclasses
import io
import pathlib
import re
import sys
from collections.abc import Sequence

import tyro

from . import configs, recipes
from .config import Config, ConfigError, OptimizerConfig, resolve_model, validate

PROG = "python -m experiments.train"
_BOX = "│╭╮╰╯─┃━┏┓┗┛"
_RULE = set(_BOX) | {"-"}  # a section separator, boxed or plain (rich without a terminal)


def _one_line(tyro_output: str) -> str:
    """tyro's boxed error message as one line: its body, then its suggestions ("Perhaps you
    meant: --schedule.steps") as "; did you mean --schedule.steps?"."""
    lines = [line.strip().strip(_BOX).strip() for line in tyro_output.splitlines()]
    sections, current = [], []
    for text in lines[1:]:  # lines[0] is the box's title
        if text and set(text) <= _RULE:  # a separator between sections
            sections.append(current)
            current = []
        elif text:
            current.append(text)
    sections.append(current)
    sections = [section for section in sections if section]
    body = " ".join(sections[0]) if sections else "invalid command-line arguments"
    for section in sections[1:]:
        if section and section[0].startswith("Perhaps you meant"):
            flags = list(dict.fromkeys(t.split()[0] for t in section[1:] if t.startswith("--")))
            if flags:
                body += f"; did you mean {' or '.join(flags[:3])}?"
    return body


_OPTIMIZER_FLAG = re.compile(r"^--optimizers\.(\d+)\.([a-z0-9_-]+)(?:=(.*))?$")


def _with_recipes(base: Config, args: Sequence[str]) -> Config:
    """``base`` with the optimizer slots the command line names: ``--optimizers.N.name RECIPE``
    replaces slot N by that recipe at its defaults (unless it already is one), and a flag for
    slot N = the number of optimizers appends one (``--optimizers.2.name mezo`` on a config of
    two adds a third; adamw when no name is given)."""
    names, indices = {}, set()
    for i, arg in enumerate(args):
        match = _OPTIMIZER_FLAG.match(arg)
        if not match:
            continue
        index, field, value = int(match.group(1)), match.group(2), match.group(3)
        indices.add(index)
        if field == "name":
            names[index] = value if value is not None else (args[i + 1] if i + 1 < len(args)
                                                              else "")
    optimizers = list(base.optimizers)
    for index in sorted(indices):
        if index > len(optimizers):
            raise ConfigError(
                f"--optimizers.{index}.*: the config has {len(optimizers)} optimizer(s); add "
                f"new ones in order, from --optimizers.{len(optimizers)}.name RECIPE")
        name = names.get(index)
        if index < len(optimizers) and name in (None, optimizers[index].name):
            continue
        try:
            new = OptimizerConfig(name=name or "adamw")
        except ValueError as err:
            raise ConfigError(f"--optimizers.{index}.name: {err}") from None
        optimizers[index:index + 1] = [new]
    _check_slot_fields(optimizers, args)
    return dataclasses.replace(base, optimizers=tuple(optimizers))


def _check_slot_fields(optimizers: list[OptimizerConfig], args: Sequence[str]) -> None:
    """A flag naming another recipe's field (``--optimizers.0.rank`` on adamw) is a
    :class:`ConfigError` that says which recipes have it; typos are left to tyro, which
    suggests the closest flag."""
    for arg in args:
        match = _OPTIMIZER_FLAG.match(arg)
        if not match:
            continue
        index, field = int(match.group(1)), match.group(2).replace("-", "_")
        field = field[3:] if field.startswith("no_") else field
        optimizer = optimizers[index]
        if field in recipes.optimizer_fields(optimizer.name):
            continue
        owners = [n for n in recipes.RECIPE_CLASSES if field in recipes.optimizer_fields(n)]
        if owners:
            raise ConfigError(
                f"--optimizers.{index}.{match.group(2)}: optimizers.{index} is {optimizer.name}, "
                f"which has no {field} (recipes with it: {', '.join(owners)}); change the recipe "
                f"with --optimizers.{index}.name")


def _cli_type(base: Config) -> type:
    """:class:`Config` with ``optimizers`` typed as the tuple of ``base``'s recipe classes, so
    the command line (and ``--help``) shows each slot with its own recipe's fields only."""
    slots = tuple[tuple(type(o) for o in base.optimizers)]  # type: ignore[misc]
    namespace = {"__annotations__": {"optimizers": slots}, "optimizers": base.optimizers,
                 "__doc__": Config.__doc__, "__module__": Config.__module__,
                 "__qualname__": "Config"}
    return dataclasses.dataclass(frozen=True)(type("Config", (Config,), namespace))


def _plain(text: str) -> str:
    """Help text without reST markup: ``code`` -> code, :class:`x` -> x."""
    return re.sub(r":[a-z]+:`([^`]*)`", r"\1", text).replace("``", "")


def _fields(config: Config) -> dict:
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(Config)}


def program(default: str) -> str:
    """The name the user typed: a console script (``memjax-train``) or ``default``."""
    name = pathlib.Path(sys.argv[0]).name
    return name if name.startswith("memjax-") else default


def parse(argv: Sequence[str], *, prog: str = PROG, description: str | None = None) -> Config:
    """``[--config NAME] overrides...`` -> the resolved :class:`Config`.

    Raises:
      ConfigError: unknown config name, unknown field, or a value of the wrong type.
      SystemExit: ``--help`` (status 0).
    """
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config", default="default")
    known, rest = pre.parse_known_args(list(argv))
    base = _with_recipes(configs.load(known.config), rest)
    description = (f"{description or __doc__.splitlines()[0]}\n\n--config NAME picks the base "
                   f"experiment (default: default); available: {', '.join(configs.names())}.")
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            cli_type = _cli_type(base)
            out = tyro.cli(cli_type, default=cli_type(**_fields(base)), args=rest, prog=prog,
                           description=_plain(description), compact_help=True)
        return Config(**_fields(out))
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

    from . import data, report, run, sharding

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
    from . import memory, provenance

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
    from .hooks import RunStopped

    try:
        run_experiment(parse(sys.argv[1:] if argv is None else argv, prog=program(PROG)))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except RunStopped as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # the run said where it stopped and how to resume
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
