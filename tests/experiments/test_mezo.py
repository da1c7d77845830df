"""MeZO through the trainer: forward passes only, sharded over a (data, fsdp) mesh, exact resume."""

import dataclasses
import json

import jax
import numpy as np
import pytest

from experiments import configs, metrics, optimizers, run, trainer
from experiments.config import (
    CheckpointConfig,
    EvalConfig,
    LogConfig,
    MeshConfig,
    OptimizerConfig,
    ScheduleConfig,
)
from experiments.train import run_experiment

STEPS = 12


def _config(output_dir, stop_after=0, optimizers=None):
    base = configs.load("smoke")
    mezo = OptimizerConfig(name="mezo", learning_rate=1e-3, zo_eps=1e-3, zo_samples=2)
    return dataclasses.replace(
        base, optimizers=optimizers or (mezo,), mesh=MeshConfig(data=2, fsdp=4),
        schedule=ScheduleConfig(steps=STEPS, warmup_fraction=0.0),
        eval=EvalConfig(every=6, batches=2),
        checkpoint=CheckpointConfig(every=3, stop_after=stop_after),
        log=LogConfig(output_dir=str(output_dir), log_every=1, progress=False, plots=False))


def _records(config):
    return metrics.read(run.run_dir(config, config.optimizers[0]) / "metrics.jsonl")


@pytest.mark.slow
def test_mezo_trains_and_needs_less_memory_than_adamw(tmp_path):
    straight = _config(tmp_path / "straight")
    run_experiment(straight)
    expected = _records(straight)
    train = [r for r in expected if r["split"] == "train"]
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    assert all(np.isfinite(r["loss"]) and not r["skipped"] for r in train)
    lm = run.lm_config(straight)
    final = json.loads((run.run_dir(straight, straight.optimizers[0]) / "final.json").read_text())
    assert final["params_sha256"] != trainer.params_digest(trainer.initial_params(lm, straight.seed))

    # (exact resume of MeZO through the trainer: the shared-seed test below, which also resumes
    # its replay log)

    adamw = _config(tmp_path / "adamw", optimizers=(OptimizerConfig(name="adamw"),))
    run_experiment(dataclasses.replace(adamw, schedule=ScheduleConfig(steps=1)))
    mem = {c.optimizers[0].name: json.loads((run.run_dir(c, c.optimizers[0]) / "memory.json").read_text())
           for c in (straight, adamw)}
    assert mem["mezo"]["opt_state_bytes"] < 100
    assert mem["mezo"]["step_peak_bytes"] < mem["adamw"]["step_peak_bytes"]


@pytest.mark.slow
def test_shared_seed_mezo_resumes_exactly_and_a_worker_joins_by_replay(tmp_path):
    """8 data-parallel workers (mesh.fsdp = 1); the replay log is saved with every checkpoint."""
    shared = OptimizerConfig(name="mezo", learning_rate=1e-3, zo_shared_seed=True, weight_decay=0.1)

    def config(directory, stop_after=0):
        c = _config(directory, stop_after, optimizers=(shared,))
        return dataclasses.replace(c, mesh=MeshConfig(data=8, fsdp=1))

    straight = config(tmp_path / "straight")
    run_experiment(straight)
    expected = _records(straight)
    stopped = config(tmp_path / "resumed", stop_after=7)
    run_experiment(stopped)
    run_experiment(config(tmp_path / "resumed"))
    assert [(r["step"], r["split"], r["loss"]) for r in _records(stopped)] == \
        [(r["step"], r["split"], r["loss"]) for r in expected]

    directory = run.run_dir(straight, shared)
    log = run.load_replay_log(directory / "replay_log.npz")
    assert len(log) == STEPS and log.codes.shape == (STEPS, 8, 1)
    resumed_log = run.load_replay_log(run.run_dir(stopped, shared) / "replay_log.npz")
    for a, b in zip(log, resumed_log):
        np.testing.assert_array_equal(a, b)
    # a new worker: the initial parameters (from the seed) + the log = the trained parameters
    initial = trainer.initial_params(run.lm_config(straight), straight.seed)
    opt = optimizers.build(shared, straight.schedule)[0].make(None, jax.make_mesh((8,), ("data",)))
    joined = opt.replay(initial, log)
    final = json.loads((directory / "final.json").read_text())
    assert trainer.params_digest(joined) == final["params_sha256"]
