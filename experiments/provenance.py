"""What a run directory records about how it was made: resolved config, seed, git commit, versions."""

from __future__ import annotations

import importlib.metadata
import json
import pathlib
import platform
import subprocess
import sys

import jax

from .config import Config, OptimizerConfig, to_json_dict

PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "tyro")


def git_commit(cwd: pathlib.Path | None = None) -> str | None:
    """``HEAD``'s SHA (with ``-dirty`` if the work tree has changes), or ``None`` outside git."""
    cwd = cwd or pathlib.Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                             check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return sha + ("-dirty" if dirty else "")


def versions() -> dict[str, str | None]:
    """Installed versions of the libraries a run depends on, and Python's."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def run_info(config: Config, optimizer: OptimizerConfig, data_fingerprint: str) -> dict:
    """The run's resolved config and its environment, as JSON data."""
    return {
        "config": to_json_dict(config),
        "optimizer": to_json_dict(optimizer),
        "seed": config.seed,
        "git_commit": git_commit(),
        "versions": versions(),
        "data_fingerprint": data_fingerprint,
        "devices": [str(d) for d in jax.devices()],
        "process_count": jax.process_count(),
        "argv": sys.argv,
    }


def write_json(path: pathlib.Path, data: dict) -> None:
    """Writes ``data`` atomically (temporary file, then rename)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
