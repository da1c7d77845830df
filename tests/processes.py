"""Helpers for tests that start several JAX processes on localhost (``jax.distributed``)."""

import socket
import subprocess

FAST_COMPILE = "--xla_backend_optimization_level=0"
"""XLA:CPU's LLVM back end at -O0 in every test process: on this suite's small shapes compilation,
not arithmetic, is the time (the suite runs in about two thirds of the time at -O0). The HLO passes
and buffer assignment are untouched, so compiled memory is the same; reduction order may differ,
so no test may depend on one particular CPU's rounding."""


def xla_flags(*flags: str) -> str:
    """``XLA_FLAGS`` for a process a test starts: ``flags`` and :data:`FAST_COMPILE`."""
    return " ".join((*flags, FAST_COMPILE))


def free_port() -> int:
    """A TCP port on localhost that is free right now (for the coordinator address)."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def run_together(commands: list[list[str]], env: dict, timeout: float) -> list[str]:
    """Starts every command at once, waits for all, and returns their combined stdout/stderr.

    Any process still running when this returns (timeout, or an error while waiting) is killed.
    Fails the test, with the tail of its output, if a process exits with a non-zero code.
    """
    procs = [subprocess.Popen(cmd, env=env, text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT) for cmd in commands]
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]
    return outputs
