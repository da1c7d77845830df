"""One training run: one optimizer, one run directory, resumable.

Run directory (``<output_dir>/<experiment>/<optimizer label>/``)::

    config.json     resolved config of the experiment and this run's optimizer (+ seed)
    run.json        git commit, library versions, devices, data fingerprint, argv
    memory.json     parameter / optimizer-state bytes and the compiled step's memory
    metrics.jsonl   one line per step (train) and per evaluation (val)
    checkpoints/    orbax checkpoints (state + data position + fingerprints)
"""

from __future__ import annotations

import dataclasses
import functools
import os
import pathlib
import shutil
import sys
import time
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

import memjax
from . import checkpointing, hooks, metrics, optimizers, provenance, trainer
from .config import (Config, ConfigError, OptimizerConfig, checkpoint_lm_config,
                     fingerprint_differences, normalized_fingerprint, resume_fingerprint,
                     to_json_dict)
from .data import BatchIterator, DataSource, IteratorState
from memjax.models.lm import LMConfig

MB = 1e6


def run_dir(config: Config, optimizer: OptimizerConfig) -> pathlib.Path:
    return pathlib.Path(config.log.output_dir) / config.name / optimizer.display_name


def lm_config(config: Config, optimizer: OptimizerConfig | None = None) -> LMConfig:
    """The model of ``config`` (``max_length`` = ``data.seq_len``) as ``optimizer`` trains it
    (its ``weight_bits``: INT8 block weights); bad fields raise ConfigError."""
    m = config.model
    weights = {}
    if optimizer is not None and getattr(optimizer, "weight_bits", 32) == 8:
        weights = dict(weight_bits=8, weight_group_size=optimizer.weight_group_size,
                       weight_rounding=optimizer.weight_rounding)
    if m.init_from:  # the checkpoint's shape and attention options, this run's runtime fields
        return dataclasses.replace(checkpoint_lm_config(m), max_length=config.data.seq_len,
                                   remat=m.remat, dtype=m.dtype, **weights)
    try:
        return LMConfig(
            vocab_size=m.vocab_size, d_model=m.d_model, num_layers=m.num_layers,
            num_heads=m.num_heads, ffn_dim=m.ffn_dim, max_length=config.data.seq_len,
            mixer=m.mixer, remat=m.remat, tie_embeddings=m.tie_embeddings, dtype=m.dtype,
            param_dtype=m.param_dtype, **weights)
    except ValueError as err:
        raise ConfigError(f"model: {err}") from None


def check_resumable(config: Config, optimizer: OptimizerConfig, data_fingerprint: str) -> int:
    """The step a run will start from; raises :class:`ConfigError` if its directory holds a
    checkpoint that this config cannot continue (nothing is written). With
    ``checkpoint.overwrite`` a run always starts from step 0."""
    if config.checkpoint.overwrite:
        return 0
    directory = run_dir(config, optimizer)
    latest = checkpointing.latest_meta(directory / "checkpoints")
    if latest is None:
        return 0
    step, meta = latest
    way_out = ("pass --checkpoint.overwrite to train it again from step 0 (deleting its "
               "checkpoints), or choose another --name or --log.output-dir")
    if not config.checkpoint.resume:
        raise ConfigError(
            f"{directory} already holds checkpoints (step {step}) and checkpoint.resume is False; "
            f"{way_out}")
    diffs = fingerprint_differences(normalized_fingerprint(meta["fingerprint"]),
                                    resume_fingerprint(config, optimizer))
    if diffs:
        more = f" (+{len(diffs) - 1} more)" if len(diffs) > 1 else ""
        raise ConfigError(
            f"checkpoint in {directory} is from an incompatible config: {diffs[0]}{more}; "
            f"{way_out}")
    if meta["data_fingerprint"] != data_fingerprint:
        raise ConfigError(
            f"checkpoint in {directory} was trained on different data (fingerprint "
            f"{meta['data_fingerprint']}, now {data_fingerprint}); {way_out}")
    return step


def build_trainer(config: Config, optimizer: OptimizerConfig,
                  mesh: jax.sharding.Mesh) -> trainer.Trainer:
    """The compiled step (and init, eval) of ``optimizer`` in ``config`` on ``mesh``; nothing is
    allocated (the memory planner compiles exactly this)."""
    s, d = config.schedule, config.data
    tx, lr = optimizers.build(optimizer, s, fsdp=mesh.shape.get("fsdp", 1))
    lm = lm_config(config, optimizer)
    initial = None
    if config.model.init_from:
        from . import hf_checkpoint

        initial = functools.partial(hf_checkpoint.load_params, config.model.init_from, lm)
    return trainer.build(lm, tx, lr, mesh=mesh, rules=config.mesh.rules,
                         seed=config.seed, micro_batch=d.batch_size // s.grad_accum,
                         grad_accum=s.grad_accum, seq_len=d.seq_len,
                         kind=optimizers.step_kind(optimizer), clip_norm=s.clip_norm,
                         initial_params=initial)


def memory_report(tr: trainer.Trainer) -> dict:
    """Bytes of the parameters and the optimizer state (global), and the compiled step (per device)."""
    cm = tr.compiled_memory
    return {
        "param_bytes": memjax.optim.state_bytes(tr.abstract_state.params),
        "opt_state_bytes": memjax.optim.state_bytes(tr.abstract_state.opt_state),
        "step_peak_bytes": cm.peak,
        "step": cm._asdict(),
        "num_devices": jax.device_count(),
    }


def format_memory(label: str, mem: dict) -> str:
    s = mem["step"]
    return (f"[{label}] params {mem['param_bytes'] / MB:.2f} MB, optimizer state "
            f"{mem['opt_state_bytes'] / MB:.2f} MB, compiled step {mem['step_peak_bytes'] / MB:.2f} MB "
            f"per device (arguments {s['argument'] / MB:.2f}, outputs {s['output'] / MB:.2f}, "
            f"donated {s['alias'] / MB:.2f}, temporaries {s['temp'] / MB:.2f})")


def _write_provenance(directory: pathlib.Path, config: Config, optimizer: OptimizerConfig,
                      data_fingerprint: str, start: int) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    # re-running the saved config resumes the run: it must not overwrite it again
    config = dataclasses.replace(config, checkpoint=dataclasses.replace(config.checkpoint,
                                                                        overwrite=False))
    provenance.write_json(directory / "config.json",
                          {**to_json_dict(config), "optimizer": to_json_dict(optimizer)})
    provenance.write_json(directory / "run.json", {
        **provenance.run_info(config, optimizer, data_fingerprint), "started_from_step": start})


def _restore_or_init(tr: trainer.Trainer, mngr, start: int,
                     seed: int) -> tuple[trainer.TrainState, IteratorState]:
    """The state and data position at ``start`` (a checkpoint, or fresh when ``start`` is 0)."""
    if not start:
        return tr.init(), IteratorState(seed, 0)
    target = trainer.abstract_with_shardings(tr.abstract_state, tr.state_shardings)
    state, meta = checkpointing.restore(mngr, start, target)
    return state, IteratorState(**meta["data"])


REPLAY_LOG = "replay_log.npz"


def _load_replay_log(directory: pathlib.Path, start: int):
    """The shared-seed MeZO replay log of the first ``start`` steps (None when starting fresh)."""
    if not start:
        return None
    if not (directory / REPLAY_LOG).is_file():
        raise ConfigError(f"{directory / REPLAY_LOG} is missing: a shared-seed MeZO run cannot "
                          "resume without its replay log")
    log = load_replay_log(directory / REPLAY_LOG)
    if len(log) < start:
        raise ConfigError(f"{directory / REPLAY_LOG} has {len(log)} steps; the checkpoint is at "
                          f"step {start}")
    return memjax.optim.ReplayLog(*(a[:start] for a in log))


def save_replay_log(path: pathlib.Path, log) -> None:
    """Writes a :class:`memjax.optim.ReplayLog` as an ``.npz`` archive, atomically (a temporary
    file, then a rename)."""
    tmp = path.with_name("tmp-" + path.name)
    with open(tmp, "wb") as f:
        np.savez(f, **log._asdict())
    os.replace(tmp, path)


def load_replay_log(path: pathlib.Path):
    """The :class:`memjax.optim.ReplayLog` written by :func:`save_replay_log`."""
    with np.load(path) as f:
        return memjax.optim.ReplayLog(**{name: f[name] for name in memjax.optim.ReplayLog._fields})


def tokenizer_path(config: Config) -> str | None:
    """The tokenizer.json that tokenises the data (``data.tokenizer``), or None for bytes."""
    name = config.data.tokenizer
    if not name:
        return None
    path = pathlib.Path(config.model.init_from) / "tokenizer.json" if name == "checkpoint" \
        else pathlib.Path(name)
    if not path.is_file():
        raise ConfigError(f"data.tokenizer={name!r}: no such file {str(path)!r}")
    return str(path)


def export_hf(config: Config, optimizer: OptimizerConfig, params: Any, folder: pathlib.Path,
              primary: bool) -> None:
    """Writes the trained ``params`` as a Hugging Face checkpoint folder (with the tokenizer
    used, if any); every process gathers, process 0 writes."""
    from . import hf_checkpoint

    host = jax.tree.map(lambda x: np.asarray(x) if x.is_fully_addressable else np.asarray(
        multihost_utils.process_allgather(x, tiled=True)), params)
    if not primary:
        return
    hf_checkpoint.save_params(lm_config(config, optimizer), host, folder)
    tokenizer = tokenizer_path(config)
    if tokenizer is not None:
        shutil.copy(tokenizer, folder / "tokenizer.json")
    print(f"[{optimizer.display_name}] exported a Hugging Face checkpoint to {folder}", flush=True)


def train(config: Config, optimizer: OptimizerConfig, mesh: jax.sharding.Mesh,
          source: DataSource) -> pathlib.Path:
    """Trains (or resumes) one run to ``schedule.steps`` (or ``checkpoint.stop_after``).

    The loop dispatches steps and, every ``log.log_every`` steps and whenever a hook is due,
    fetches the window's metrics from the device (so steps run asynchronously in between) and
    passes it to the hooks (:func:`hooks_for`): evaluation, the metrics log, the skipped-step
    guard, the replay log, checkpoints, the progress bar. The step time of a record is the
    wall time of its window divided by its steps. Only process 0 writes files and prints; every
    process takes part in checkpointing.

    Returns:
      The run directory.

    Raises:
      hooks.RunStopped: ``checkpoint.max_skipped_steps`` consecutive skipped steps.
      KeyboardInterrupt: after saying at which step and from which checkpoint to resume.
    """
    directory = run_dir(config, optimizer)
    label, s = optimizer.display_name, config.schedule
    stop = min(s.steps, config.checkpoint.stop_after) if config.checkpoint.stop_after else s.steps
    start = check_resumable(config, optimizer, source.fingerprint)
    primary = jax.process_index() == 0
    if start >= stop:
        if primary:
            print(f"[{label}] already at step {start}; nothing to train")
        return directory
    if config.checkpoint.overwrite:
        if primary:
            _clear_run(directory)
        if jax.process_count() > 1:  # nobody opens the checkpoints before they are gone
            multihost_utils.sync_global_devices("memjax overwrite " + label)
    if primary:
        _write_provenance(directory, config, optimizer, source.fingerprint, start)

    tr = build_trainer(config, optimizer, mesh)
    mem = memory_report(tr)
    if primary:
        provenance.write_json(directory / "memory.json", mem)
        print(format_memory(label, mem), flush=True)

    mngr = checkpointing.manager(directory / "checkpoints", config.checkpoint)
    state, position = _restore_or_init(tr, mngr, start, config.seed)
    if primary:
        metrics.truncate(directory / "metrics.jsonl", start)
        if start:
            print(f"[{label}] resumed from step {start} ({directory / 'checkpoints'})", flush=True)
    batches = BatchIterator(source, position)

    def to_device(batch):
        return trainer.to_device(trainer.micro_batches(batch, s.grad_accum), tr.batch_shardings)

    bar = tqdm(total=s.steps, initial=start, desc=label,
               disable=not (config.log.progress and primary))
    hook_list = hooks_for(config, optimizer, tr, source, directory, mngr, bar, start, stop,
                          batches, primary, to_device)
    tokens_per_step = config.data.batch_size * config.data.seq_len
    try:
        with hooks.deferred_interrupt() as interrupted:
            state = _loop(tr, state, batches, to_device, hook_list, start, stop,
                          config.log.log_every, tokens_per_step, interrupted)
            digest = trainer.params_digest(state.params)
            bar.write(f"[{label}] process {jax.process_index()}/{jax.process_count()}: step "
                      f"{stop}, params sha256 {digest}")
            if primary:
                provenance.write_json(directory / "final.json",
                                      {"step": stop, "params_sha256": digest})
            if config.checkpoint.export_hf and stop == s.steps:
                export_hf(config, optimizer, state.params, directory / "hf", primary)
            if _any_process(interrupted()):  # during the last window: no next optimizer
                raise hooks.Interrupted(stop)
    except KeyboardInterrupt as err:
        if primary:
            checkpoint = next(h for h in hook_list if isinstance(h, hooks.Checkpoint))
            checkpoint.close()  # an asynchronous save in flight completes first
            where = f" at step {err.step}" if isinstance(err, hooks.Interrupted) else ""
            again = ("run it again without --checkpoint.overwrite" if config.checkpoint.overwrite
                     else "run the same command")
            resume = (f"{again} to resume from step {checkpoint.last}" if checkpoint.last
                      else "no checkpoint yet: the same command starts over")
            print(f"\n[{label}] interrupted{where}; {resume}", file=sys.stderr, flush=True)
        raise
    finally:
        for hook in reversed(hook_list):
            hook.close()
    return directory


def _loop(tr: trainer.Trainer, state: trainer.TrainState, batches: BatchIterator, to_device,
          hook_list: list[hooks.Hook], start: int, stop: int, log_every: int,
          tokens_per_step: int, interrupted) -> trainer.TrainState:
    """Steps ``start + 1 .. stop``; a window of metrics is fetched and handed to the hooks every
    ``log_every`` steps and whenever a hook is due. Ctrl-C stops it between steps; with several
    processes, at the end of a window, once every process has seen the same flag (they stop at
    the same step, or the others would wait in the next collective)."""
    pending, window_start, warm = [], time.perf_counter(), False
    single = jax.process_count() == 1
    for step in range(start + 1, stop + 1):
        if single and interrupted():
            raise hooks.Interrupted(step - 1)
        state, step_metrics, record = tr.step(state, to_device(next(batches)))
        pending.append((step_metrics, record))
        if not (hooks.due(step, log_every, stop) or any(h.due(step) for h in hook_list)):
            continue
        host = [trainer.host_metrics(m) for m, _ in pending]  # waits for the device
        step_time = (time.perf_counter() - window_start) / len(host)
        window = hooks.Window(step, state, host, [r for _, r in pending], step_time,
                              hooks.train_records(host, step, step_time, tokens_per_step, warm))
        for hook in hook_list:
            hook.on_window(window)
        pending, warm = [], True
        if not single and step < stop and _any_process(interrupted()):
            raise hooks.Interrupted(step)
        window_start = time.perf_counter()
    return state


def _any_process(flag: bool) -> bool:
    """``flag`` of any process (every process must call this at the same point)."""
    if jax.process_count() == 1:
        return flag
    return bool(np.max(multihost_utils.process_allgather(np.int32(flag))))


def hooks_for(config: Config, optimizer: OptimizerConfig, tr: trainer.Trainer,
              source: DataSource, directory: pathlib.Path, mngr, bar: tqdm, start: int,
              stop: int, batches: BatchIterator, primary: bool, to_device) -> list[hooks.Hook]:
    """The hooks of one run, in the order they see each window (evaluation first: it adds the
    val record the log writes; the guard before the checkpoint it may veto)."""
    label = optimizer.display_name
    fingerprint = resume_fingerprint(config, optimizer)

    def meta() -> dict:
        return {"data": dataclasses.asdict(batches.state), "fingerprint": fingerprint,
                "data_fingerprint": source.fingerprint}

    checkpoint = hooks.Checkpoint(mngr, config.checkpoint.every, stop, start, meta)
    guard = hooks.SkipGuard(config.checkpoint.max_skipped_steps, label, checkpoint)
    checkpoint.guard = guard
    say = bar.write if primary else (lambda text: None)
    out: list[hooks.Hook] = [hooks.Evaluation(
        tr, [to_device(b) for b in source.val_batches], config.eval.every, config.schedule.steps,
        say, label)]
    if primary:
        board = metrics.TensorBoard(directory / "tensorboard") if config.log.tensorboard else None
        out.append(hooks.MetricsLog(directory / "metrics.jsonl", board))
    out.append(guard)
    if tr.kind == "shared_seed":
        out.append(hooks.ReplayLog(_load_replay_log(directory, start), directory / REPLAY_LOG,
                                   checkpoint, primary, save_replay_log))
    out += [checkpoint, hooks.Progress(bar, config.data.batch_size * config.data.seq_len)]
    return out


def _clear_run(directory: pathlib.Path) -> None:
    """Removes a run's checkpoints, metrics and replay log (``checkpoint.overwrite``)."""
    shutil.rmtree(directory / "checkpoints", ignore_errors=True)
    shutil.rmtree(directory / "tensorboard", ignore_errors=True)
    for name in ("metrics.jsonl", REPLAY_LOG, "final.json"):
        (directory / name).unlink(missing_ok=True)
