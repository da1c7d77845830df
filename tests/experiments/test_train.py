"""The trainer: exact resume (in process and after SIGKILL), sharding, accumulation, skipping, reports."""

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import pathlib
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.experimental.compilation_cache import compilation_cache
from jax.sharding import PartitionSpec as P

import memjax
from experiments import configs, metrics, optimizers, report, run, sharding, trainer
from experiments.config import LogConfig, MeshConfig, OptimizerConfig, ScheduleConfig
from experiments.data import Batch
from experiments.train import main, run_experiment
from memjax.models.lm import lm_preset, next_token_loss

STEPS = 40  # the smoke config's steps; checkpoints every 10, GaLore refreshes every 10
KILL_AFTER = 12
ROOT = pathlib.Path(__file__).resolve().parents[2]
CLI = ["--config", "smoke", "--log.no-progress", "--log.log-every", "1",
       "--mesh.data", "2", "--mesh.fsdp", "4"]


def _config(output_dir, **checkpoint):
    """The smoke experiment (AdamW + GaLore) on a 2 x 4 (data, fsdp) mesh; ``CLI`` gives the same."""
    base = configs.load("smoke")
    assert base.schedule.steps == STEPS
    return dataclasses.replace(
        base, mesh=MeshConfig(data=2, fsdp=4),
        checkpoint=dataclasses.replace(base.checkpoint, **checkpoint),
        log=LogConfig(output_dir=str(output_dir), log_every=1, progress=False, plots=False))


def _records(directory):
    return metrics.read(directory / "metrics.jsonl")


_CACHE_OPTIONS = {"jax_compilation_cache_dir": None, "jax_persistent_cache_min_compile_time_secs": 0.0}


@contextlib.contextmanager
def persistent_compilation_cache(path):
    """Test speed only: the runs below compile identical programs, so each compiles once."""
    saved = {name: getattr(jax.config, name) for name in _CACHE_OPTIONS}
    for name, value in {**_CACHE_OPTIONS, "jax_compilation_cache_dir": str(path)}.items():
        jax.config.update(name, value)
    compilation_cache.reset_cache()
    try:
        yield
    finally:
        for name, value in saved.items():
            jax.config.update(name, value)
        compilation_cache.reset_cache()


def _shared_dir(tmp_path_factory) -> pathlib.Path:
    """A directory shared by the pytest-xdist workers of this session (or this session's base)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    path = _shared_dir(tmp_path_factory) / "experiments_jax_cache"
    path.mkdir(exist_ok=True)
    return path


@pytest.fixture(autouse=True)
def _cache(cache_dir):
    with persistent_compilation_cache(cache_dir):
        yield


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache_dir):
    """The uninterrupted run, trained once per session (the first xdist worker to ask trains it)."""
    shared = _shared_dir(tmp_path_factory)
    config = _config(shared / "experiments_reference")
    with open(shared / "experiments_reference.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        done = shared / "experiments_reference.done"
        if not done.exists():
            with persistent_compilation_cache(cache_dir):
                run_experiment(config)
            done.touch()
    return config, {o.display_name: _records(run.run_dir(config, o)) for o in config.optimizers}


def _assert_same_records(records, expected):
    assert [r["step"] for r in records if r["split"] == "train"] == list(range(1, STEPS + 1))
    assert len(records) == len(expected)
    for got, ref in zip(records, expected):
        assert (got["step"], got["split"]) == (ref["step"], ref["split"])
        assert got["loss"] == ref["loss"], (got, ref)  # bit-identical
        if got["split"] == "train":
            assert got["grad_norm"] == ref["grad_norm"]


@pytest.mark.slow
def test_reference_run_learns_and_writes_its_files(reference):
    config, records = reference
    mem = {}
    for o in config.optimizers:
        train = [r for r in records[o.display_name] if r["split"] == "train"]
        assert [r["step"] for r in train] == list(range(1, STEPS + 1))
        assert train[-1]["loss"] < train[0]["loss"] - 1.0, o.display_name
        directory = run.run_dir(config, o)
        info = json.loads((directory / "run.json").read_text())
        assert info["seed"] == 0 and info["versions"]["jax"] == jax.__version__
        assert info["config"]["schedule"]["steps"] == STEPS and info["optimizer"]["name"] == o.name
        assert json.loads((directory / "config.json").read_text())["optimizer"] == info["optimizer"]
        mem[o.display_name] = json.loads((directory / "memory.json").read_text())
    assert mem["galore-svd"]["opt_state_bytes"] < mem["adamw"]["opt_state_bytes"]
    assert mem["adamw"]["param_bytes"] == mem["galore-svd"]["param_bytes"] > 0
    # INT8 block kernels (10240 entries): a byte per entry (3 saved), a float32 scale and a uint8
    # zero point per group of 128, a 2 x uint32 key per kernel (7)
    saved = mem["adamw"]["param_bytes"] - mem["q_galore-int8-layerwise"]["param_bytes"]
    assert saved == 3 * 10240 - 5 * 10240 // 128 - 8 * 7
    # the layerwise row takes the same updates (with the same exact clipping) on the 2 x 4 mesh
    # the same recipe state; the standard row's guard adds its int32 skip count
    assert mem["galore-svd"]["opt_state_bytes"] - mem["galore-svd-layerwise"]["opt_state_bytes"] == 4
    same, layerwise = (
        [r for r in records[label] if r["split"] == "train"]
        for label in ("galore-svd", "galore-svd-layerwise"))
    np.testing.assert_allclose([r["loss"] for r in layerwise], [r["loss"] for r in same],
                               rtol=1e-4)
    np.testing.assert_allclose([r["grad_norm"] for r in layerwise],
                               [r["grad_norm"] for r in same], rtol=1e-3)


@pytest.mark.slow
def test_stop_and_resume_is_bit_identical(reference, tmp_path, capsys):
    """GaLore, layerwise GaLore (the larger state: projectors, low-rank moments) and layerwise
    Q-GaLore over INT8 weights (the rounding keys are parameters) stop at 15, resume to 40."""
    config, expected = reference
    galore_only = lambda c: dataclasses.replace(c, optimizers=c.optimizers[1:])  # noqa: E731
    assert [o.display_name for o in galore_only(config).optimizers] == [
        "galore-svd", "galore-svd-layerwise", "q_galore-int8-layerwise"]
    stopped = galore_only(_config(tmp_path, stop_after=15))  # a refresh at 10, the next at 20
    run_experiment(stopped)
    assert _records(run.run_dir(stopped, stopped.optimizers[0]))[-1]["step"] == 15
    capsys.readouterr()
    run_experiment(galore_only(_config(tmp_path)))
    out = capsys.readouterr().out
    for o in stopped.optimizers:
        assert f"[{o.display_name}] resumed from step 15 (" in out  # also without a progress bar
        _assert_same_records(_records(run.run_dir(stopped, o)), expected[o.display_name])
        info = json.loads((run.run_dir(stopped, o) / "run.json").read_text())
        assert info["started_from_step"] == 15


@pytest.mark.slow
def test_resume_after_sigkill_reaches_the_same_losses(reference, tmp_path, cache_dir):
    """AdamW killed (SIGKILL) after step 12 resumes from its last complete checkpoint to the
    reference's losses. (One optimizer: the process boundary is what this tests; every other
    row's state resumes in process, in the test above.)"""
    config, expected = reference
    cmd = [sys.executable, "-m", "experiments.train", *CLI, "--log.output-dir", str(tmp_path),
           "--select", "adamw"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_COMPILATION_CACHE_DIR": str(cache_dir),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    first = run.run_dir(_config(tmp_path), config.optimizers[0]) / "metrics.jsonl"
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            recs = metrics.read(first)
            saved = first.parent / "checkpoints"
            committed = saved.is_dir() and any(p.name.isdigit() for p in saved.iterdir())
            if committed and recs and recs[-1]["step"] >= KILL_AFTER:
                break
            time.sleep(0.02)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    killed_at = metrics.read(first)[-1]["step"]
    assert KILL_AFTER <= killed_at < STEPS
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "WARNING:absl" not in done.stderr  # orbax's read-only notices are silenced
    assert "[adamw] resumed from step " in done.stdout
    _assert_same_records(metrics.read(first), expected["adamw"])
    assert [p.name for p in first.parents[1].iterdir() if p.is_dir()] == ["adamw"]
    info = json.loads((first.parent / "run.json").read_text())
    assert 10 <= info["started_from_step"] <= killed_at


def _digest(root):
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(root)).encode() + path.read_bytes())
    return h.hexdigest()


@pytest.mark.slow
@pytest.mark.parametrize("override, message", [
    (["--model.d-model", "48"], "incompatible config: model.d_model: saved 32, now 48"),
    (["--optimizers.1.rank", "4"], "incompatible config: optimizer.rank: saved 8, now 4"),
    (["--checkpoint.no-resume"], "already holds checkpoints"),
])
def test_incompatible_checkpoint_is_refused_and_left_untouched(reference, override, message, capsys):
    config, _ = reference
    root = pathlib.Path(config.log.output_dir)
    before = _digest(root)
    assert main([*CLI, "--log.output-dir", str(root), *override]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert "pass --checkpoint.overwrite to train it again from step 0" in err
    assert _digest(root) == before


@pytest.mark.slow
def test_report_table_and_plots(reference, tmp_path):
    config, _ = reference
    dirs = {o.display_name: run.run_dir(config, o) for o in config.optimizers}
    rows = [report.summarize(label, d) for label, d in dirs.items()]
    text = report.table(rows)
    assert "adamw" in text and "galore-svd" in text and "final val loss" in text
    assert all(r["steps"] == STEPS and np.isfinite(r["final_val_loss"]) for r in rows)
    for path in report.plot(dirs, rows, tmp_path):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_parameters_and_optimizer_state_are_sharded_by_logical_names():
    mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=4))
    _, params, logical = trainer.abstract_model(lm_preset("tiny"))
    p_sh = sharding.param_shardings(params, logical, (("embed", "fsdp"),), mesh)
    assert p_sh["blocks"]["mlp"]["up"]["kernel"].spec == P(None, "fsdp", None)
    assert p_sh["lm_head"]["kernel"].spec == P("fsdp", None)
    tx, _ = optimizers.build(OptimizerConfig(name="galore", rank=8), ScheduleConfig(steps=10))
    s_sh = memjax.optim.state_shardings(jax.eval_shape(tx.init, params), params, p_sh)
    shardings = [s for s in jax.tree.leaves(s_sh)]
    shapes = jax.tree.leaves(jax.eval_shape(tx.init, params))
    big = [s for s, x in zip(shardings, shapes) if x.size >= 256]
    assert big and not any(s.is_fully_replicated for s in big)


@pytest.mark.slow
def test_gradient_accumulation_matches_one_big_batch_and_nonfinite_steps_are_skipped():
    mesh = sharding.make_mesh(MeshConfig(data=-1, fsdp=1), jax.devices()[:1])
    lm = lm_preset("tiny", num_layers=1, max_length=16)
    tx, lr = optimizers.build(OptimizerConfig(name="adamw"), ScheduleConfig(steps=10))
    tr = trainer.build(lm, tx, lr, mesh=mesh, rules=(("embed", "fsdp"),), seed=0, micro_batch=4,
                       grad_accum=2, seq_len=16)
    tokens = np.asarray(jax.random.randint(jax.random.key(1), (8, 16), 0, 64), np.int32)
    state = tr.init()
    loss_fn = lambda p: next_token_loss(nnx.merge(tr.graphdef, p), jnp.asarray(tokens))  # noqa: E731
    loss, grads = jax.jit(jax.value_and_grad(loss_fn))(state.params)  # one batch of 8

    batch = Batch(tokens, np.ones((8, 15), np.float32))
    state, m, _ = tr.step(state, trainer.to_device(trainer.micro_batches(batch, 2), tr.batch_shardings))
    m = trainer.host_metrics(m)
    np.testing.assert_allclose(m["loss"], loss, rtol=1e-6)
    np.testing.assert_allclose(m["grad_norm"], optax.tree.norm(grads), rtol=1e-5)
    assert m["skipped"] == 0 and int(state.step) == 1

    bad = Batch(tokens, np.full((8, 15), np.nan, np.float32))
    before = jax.tree.map(np.asarray, (state.params, state.opt_state.inner_state))
    state, m, _ = tr.step(state, trainer.to_device(trainer.micro_batches(bad, 2), tr.batch_shardings))
    assert trainer.host_metrics(m)["skipped"] == 1
    jax.tree.map(np.testing.assert_array_equal, (state.params, state.opt_state.inner_state), before)
