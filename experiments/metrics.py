"""Metrics as JSON lines: one object per logged step (``"split": "train"`` or ``"val"``), and
optionally the same scalars as TensorBoard event files."""

from __future__ import annotations

import json
import pathlib


def append(path: pathlib.Path, records: list[dict]) -> None:
    """Appends ``records`` and flushes them to disk."""
    if records:
        with path.open("a") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)


def read(path: pathlib.Path) -> list[dict]:
    """Every record of ``path`` (none if it does not exist); a torn last line is ignored."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return records


def truncate(path: pathlib.Path, step: int) -> None:
    """Keeps only the records of steps ``<= step`` (a resumed run rewrites what follows)."""
    if not path.exists():
        return
    kept = [r for r in read(path) if r["step"] <= step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    tmp.replace(path)


class TensorBoard:
    """Writes every numeric field of the records as TensorBoard scalars ``<split>/<field>`` under
    ``directory`` (``pip install tensorboardX``; read them with ``tensorboard --logdir``)."""

    def __init__(self, directory: pathlib.Path):
        try:
            from tensorboardX import SummaryWriter
        except ImportError as err:
            raise ImportError("log.tensorboard needs tensorboardX: pip install tensorboardX") from err
        self._writer = SummaryWriter(str(directory))

    def append(self, records: list[dict]) -> None:
        for r in records:
            for key, value in r.items():
                if key not in ("step", "split") and isinstance(value, (int, float)) \
                        and not isinstance(value, bool):
                    self._writer.add_scalar(f"{r['split']}/{key}", value, r["step"])
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()
