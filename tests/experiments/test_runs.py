"""How a run talks to its user: overwrite, a run that stops learning, Ctrl-C, the step-time note."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from experiments import metrics, report
from experiments.train import main

ROOT = pathlib.Path(__file__).resolve().parents[2]
ADAMW = ["--config", "smoke", "--select", "adamw", "--log.no-progress", "--log.no-plots"]


def _train(tmp_path, *args):
    return main([*ADAMW, "--log.output-dir", str(tmp_path), *args])


@pytest.mark.slow
def test_overwrite_trains_a_changed_run_again_from_step_0(tmp_path, capsys):
    run = tmp_path / "smoke" / "adamw"
    assert _train(tmp_path, "--schedule.steps", "6") == 0
    assert _train(tmp_path, "--schedule.steps", "8") == 2
    assert "--checkpoint.overwrite" in capsys.readouterr().err
    assert _train(tmp_path, "--schedule.steps", "8", "--checkpoint.overwrite") == 0
    records = metrics.read(run / "metrics.jsonl")
    assert [r["step"] for r in records if r["split"] == "train"] == list(range(1, 9))
    assert json.loads((run / "run.json").read_text())["started_from_step"] == 0
    assert "resumed" not in capsys.readouterr().out


@pytest.mark.slow
def test_consecutive_skipped_steps_stop_the_run(tmp_path, capsys):
    """A learning rate of 1e9 overflows every update from the first steps on: each step is
    skipped (parameters and state unchanged); after the limit the run ends with status 1, and
    no checkpoint is written while steps are skipped."""
    status = _train(tmp_path, "--optimizers.0.learning-rate", "1e9", "--schedule.steps", "200",
                    "--checkpoint.max-skipped-steps", "5", "--log.log-every", "5")
    err = capsys.readouterr().err
    assert status == 1 and err.startswith("error: [adamw] ") and err.count("\n") == 1, err
    assert "consecutive steps skipped up to step 10" in err and "lower the learning rate" in err
    assert "no checkpoint was written" in err
    train = [r for r in metrics.read(tmp_path / "smoke" / "adamw" / "metrics.jsonl")
             if r["split"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 11)) and train[-1]["skipped"] == 1
    assert not any((tmp_path / "smoke" / "adamw" / "checkpoints").glob("[0-9]*"))


def test_the_guard_vetoes_checkpoints_only_while_it_can_stop_the_run():
    from experiments import hooks

    checkpoint = hooks.Checkpoint(None, every=5, last=20, start=0, meta=dict)
    guard = hooks.SkipGuard(20, "adamw", checkpoint)
    checkpoint.guard = guard
    guard.streak = 3
    assert checkpoint._skipping(10) and not checkpoint._skipping(20)  # the last step: saved
    guard.limit = 0  # never stops the run: never vetoes
    assert not checkpoint._skipping(10)
    guard.limit, guard.streak = 20, 0
    assert not checkpoint._skipping(10)


@pytest.mark.slow
def test_ctrl_c_says_where_to_resume(tmp_path):
    cmd = [sys.executable, "-m", "experiments.train", *ADAMW, "--log.output-dir", str(tmp_path),
           "--schedule.steps", "100000", "--checkpoint.every", "5", "--log.log-every", "1"]
    proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run = tmp_path / "smoke" / "adamw"
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            saved = run / "checkpoints"
            if saved.is_dir() and any(p.name.isdigit() for p in saved.iterdir()):
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err[-2000:]
    (line,) = [line for line in err.splitlines() if "interrupted" in line]
    assert line.startswith("[adamw] interrupted at step ") and "run the same command to resume " \
        "from step " in line, line
    assert "Traceback" not in err


def test_step_time_note_warns_of_a_loaded_machine():
    row = {"optimizer": "adamw", "steps": 10, "final_val_loss": 1.0, "opt_state_mb": 1.0,
           "step_memory_mb": 2.0, "step_ms": 3.0, "max_load": 0.5}
    quiet = report.table([row])
    assert "median over the logged windows after the first" in quiet and "busy" not in quiet
    busy = report.table([row, {**row, "max_load": 4.0 * (os.cpu_count() or 1)}])
    assert "The machine was busy with other work while timing" in busy
