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
import time
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

import memjax
from experiments import checkpointing, metrics, optimizers, provenance, trainer
from experiments.config import (Config, ConfigError, OptimizerConfig, checkpoint_lm_config,
                                fingerprint_differences,
                                resume_fingerprint, to_json_dict)
from experiments.data import BatchIterator, DataSource, IteratorState
from memjax.models.lm import LMConfig

MB = 1e6


def run_dir(config: Config, optimizer: OptimizerConfig) -> pathlib.Path:
    return pathlib.Path(config.log.output_dir) / config.name / optimizer.display_name


def lm_config(config: Config, optimizer: OptimizerConfig | None = None) -> LMConfig:
    """The model of ``config`` (``max_length`` = ``data.seq_len``) as ``optimizer`` trains it
    (its ``weight_bits``: INT8 block weights); bad fields raise ConfigError."""
    m = config.model
    weights = {}
    if optimizer is not None and optimizer.weight_bits == 8:
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
    checkpoint that this config cannot continue (nothing is written)."""
    directory = run_dir(config, optimizer)
    latest = checkpointing.latest_meta(directory / "checkpoints")
    if latest is None:
        return 0
    step, meta = latest
    if not config.checkpoint.resume:
        raise ConfigError(
            f"{directory} already holds checkpoints (step {step}) and checkpoint.resume is False; "
            "choose another log.output_dir or name")
    diffs = fingerprint_differences(meta["fingerprint"], resume_fingerprint(config, optimizer))
    if diffs:
        more = f" (+{len(diffs) - 1} more)" if len(diffs) > 1 else ""
        raise ConfigError(
            f"checkpoint in {directory} is from an incompatible config: {diffs[0]}{more}; "
            "choose another log.output_dir or name")
    if meta["data_fingerprint"] != data_fingerprint:
        raise ConfigError(
            f"checkpoint in {directory} was trained on different data (fingerprint "
            f"{meta['data_fingerprint']}, now {data_fingerprint})")
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
        from experiments import hf_checkpoint

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


def _due(step: int, every: int, last: int) -> bool:
    return step == last or (every > 0 and step % every == 0)


def _write_provenance(directory: pathlib.Path, config: Config, optimizer: OptimizerConfig,
                      data_fingerprint: str, start: int) -> None:
    directory.mkdir(parents=True, exist_ok=True)
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


def _append_replay(log, entry):
    if log is None:
        log = memjax.optim.ReplayLog.empty(*entry.codes.shape)
    return log.append(entry)


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


def _train_records(host: list[dict], last_step: int, step_time: float, tokens_per_step: int,
                   warm: bool) -> list[dict]:
    first = last_step - len(host) + 1
    return [{"step": first + i, "split": "train", **h, "step_time": step_time,
             "tokens_per_s": tokens_per_step / step_time, "warm": warm} for i, h in enumerate(host)]


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
    from experiments import hf_checkpoint

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

    Metrics are fetched from the device only every ``log.log_every`` steps (and at evaluations
    and checkpoints), so steps are dispatched asynchronously in between; the step time of a
    record is the wall time of its window divided by the steps in it. Only process 0 writes
    files and prints; every process takes part in checkpointing.

    Returns:
      The run directory.
    """
    directory = run_dir(config, optimizer)
    label, s, d = optimizer.display_name, config.schedule, config.data
    steps = s.steps
    stop = min(steps, config.checkpoint.stop_after) if config.checkpoint.stop_after else steps
    start = check_resumable(config, optimizer, source.fingerprint)
    primary = jax.process_index() == 0
    if start >= stop:
        if primary:
            print(f"[{label}] already at step {start}; nothing to train")
        return directory
    if primary:
        _write_provenance(directory, config, optimizer, source.fingerprint, start)

    tr = build_trainer(config, optimizer, mesh)
    mem = memory_report(tr)
    if primary:
        provenance.write_json(directory / "memory.json", mem)
        print(format_memory(label, mem), flush=True)

    mngr = checkpointing.manager(directory / "checkpoints", config.checkpoint)
    state, position = _restore_or_init(tr, mngr, start, config.seed)
    metrics_path = directory / "metrics.jsonl"
    board = metrics.TensorBoard(directory / "tensorboard") if (
        config.log.tensorboard and primary) else None
    if primary:
        metrics.truncate(metrics_path, start)
    fingerprint = resume_fingerprint(config, optimizer)
    batches = BatchIterator(source, position)

    def to_device(batch):
        return trainer.to_device(trainer.micro_batches(batch, s.grad_accum), tr.batch_shardings)

    shared_seed = tr.kind == "shared_seed"
    replay_log = _load_replay_log(directory, start) if shared_seed else None
    val = [to_device(b) for b in source.val_batches]
    tokens_per_step = d.batch_size * d.seq_len
    bar = tqdm(total=steps, initial=start, desc=label, disable=not (config.log.progress and primary))
    pending, window_start, warm = [], time.perf_counter(), False
    try:
        for done in range(start + 1, stop + 1):
            state, step_metrics, record = tr.step(state, to_device(next(batches)))
            pending.append((step_metrics, record))
            eval_due = _due(done, config.eval.every, steps)
            ckpt_due = _due(done, config.checkpoint.every, stop)
            if not (eval_due or ckpt_due or _due(done, config.log.log_every, stop)):
                continue
            host = [trainer.host_metrics(m) for m, _ in pending]  # waits for the device
            if shared_seed:
                for _, record in pending:
                    replay_log = _append_replay(replay_log, trainer.replay_entry(record))
            step_time = (time.perf_counter() - window_start) / len(host)
            records = _train_records(host, done, step_time, tokens_per_step, warm)
            pending, warm = [], True
            if eval_due:
                val_loss = sum(float(tr.eval_loss(state.params, b)) for b in val) / len(val)
                records.append({"step": done, "split": "val", "loss": val_loss})
                if primary:
                    bar.write(f"[{label}] step {done}: validation loss {val_loss:.4f}")
            if primary:
                metrics.append(metrics_path, records)
                if board is not None:
                    board.append(records)
            if ckpt_due:
                if shared_seed and primary:  # written before the checkpoint starts
                    save_replay_log(directory / REPLAY_LOG, replay_log)
                checkpointing.save(mngr, done, state, {
                    "data": dataclasses.asdict(batches.state), "fingerprint": fingerprint,
                    "data_fingerprint": source.fingerprint})
            bar.update(len(host))
            bar.set_postfix(loss=f"{host[-1]['loss']:.3f}", tok_s=f"{tokens_per_step / step_time:,.0f}",
                            step_ms=f"{1e3 * step_time:.1f}")
            window_start = time.perf_counter()
        digest = trainer.params_digest(state.params)
        bar.write(f"[{label}] process {jax.process_index()}/{jax.process_count()}: step {stop}, "
                  f"params sha256 {digest}")
        if primary:
            provenance.write_json(directory / "final.json", {"step": stop, "params_sha256": digest})
        if config.checkpoint.export_hf and stop == steps:
            export_hf(config, optimizer, state.params, directory / "hf", primary)
    finally:
        if board is not None:
            board.close()
        bar.close()
        mngr.wait_until_finished()
        mngr.close()
    return directory
