"""Orbax checkpoints of a run: train state (params, optimizer state, PRNG) + JSON metadata.

A checkpoint holds two items: ``state`` (the :class:`experiments.trainer.TrainState`, restored with
the run's shardings, so a run may resume on a different mesh) and ``meta`` (JSON: the data
iterator's position, the config fingerprint the checkpoint was written with, the data's
fingerprint). Saves are asynchronous and atomic (orbax writes to a temporary directory and renames
it once complete), so a run killed at any moment resumes from its last complete checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
import pathlib
from collections.abc import Iterator
from typing import Any

import orbax.checkpoint as ocp

from .config import CheckpointConfig

ITEMS = ("state", "meta")


def manager(directory: pathlib.Path, cfg: CheckpointConfig) -> ocp.CheckpointManager:
    """A ``CheckpointManager`` keeping ``cfg.max_to_keep`` checkpoints under ``directory``."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=cfg.max_to_keep, enable_async_checkpointing=cfg.async_save, create=True)
    return ocp.CheckpointManager(directory.absolute(), options=options, item_names=ITEMS)


def save(mngr: ocp.CheckpointManager, step: int, state: Any, meta: dict) -> None:
    """Starts saving ``state`` and ``meta`` as checkpoint ``step`` (returns before it is written)."""
    mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                            meta=ocp.args.JsonSave(meta)))


def restore(mngr: ocp.CheckpointManager, step: int, target: Any) -> tuple[Any, dict]:
    """``(state, meta)`` of checkpoint ``step``; ``target`` gives shapes, dtypes and shardings."""
    out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                     meta=ocp.args.JsonRestore()))
    return out.state, out.meta


def latest_meta(directory: pathlib.Path) -> tuple[int, dict] | None:
    """``(step, meta)`` of the newest complete checkpoint, or ``None``; reads and writes nothing else."""
    if not directory.is_dir():
        return None
    with _quiet_absl():  # the options themselves warn that read-only implies no saving
        options = ocp.CheckpointManagerOptions(create=False, read_only=True)
    with _quiet_absl(), ocp.CheckpointManager(directory.absolute(), options=options,
                                              item_names=ITEMS) as mngr:
        step = mngr.latest_step()
        if step is None:
            return None
        return step, mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta


@contextlib.contextmanager
def _quiet_absl() -> Iterator[None]:
    """Silences orbax's warnings that a read-only manager is read-only."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
