"""Metrics as JSON lines: one object per logged step (``"split": "train"`` or ``"val"``)."""

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
