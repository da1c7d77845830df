"""Two processes on localhost (``jax.distributed.initialize``, CPU collectives over gloo) train one
data-parallel run; both must end with bit-identical parameters, and only process 0 writes logs."""

import os
import pathlib
import re
import sys

import pytest

from experiments import metrics
from tests.processes import free_port, run_together, xla_flags

ROOT = pathlib.Path(__file__).resolve().parents[2]
STEPS = 6


@pytest.mark.slow
def test_two_processes_hold_identical_params(tmp_path):
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "XLA_FLAGS": xla_flags(), "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "-m", "experiments.train", "--config", "smoke", "--select", "galore-svd",
           "--mesh.data", "2", "--schedule.steps", str(STEPS), "--eval.every", "0",
           "--checkpoint.every", "3", "--log.no-progress", "--log.output-dir", str(tmp_path),
           "--distributed.coordinator-address", f"localhost:{port}", "--distributed.num-processes", "2"]
    outputs = run_together([[*cmd, "--distributed.process-id", str(i)] for i in range(2)], env,
                           timeout=300)
    digests = [re.findall(rf"process {i}/2: step {STEPS}, params sha256 (\w+)", out)
               for i, out in enumerate(outputs)]
    assert digests[0] and digests[0] == digests[1], outputs
    assert "| galore-svd |" in outputs[0] and "| galore-svd |" not in outputs[1]
    run_dir = tmp_path / "smoke" / "galore-svd"
    train = [r["step"] for r in metrics.read(run_dir / "metrics.jsonl") if r["split"] == "train"]
    assert train == list(range(1, STEPS + 1))
    assert sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()) == [3, 6]
