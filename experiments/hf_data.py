"""Byte-level corpora from Hugging Face datasets (optional; needs ``pip install datasets``).

:func:`load_hf_bytes` reads one split of a dataset and returns its text column as bytes, the
documents (UTF-8 encoded) joined by ``b"\\n"`` exactly as :func:`experiments.data.read_text_files`
joins text files, so a vocabulary of 256 covers every token. The dataset comes from

* ``datasets.load_from_disk(path)`` when ``path`` is a directory written by ``save_to_disk``
  (it holds ``state.json`` or ``dataset_dict.json``);
* ``datasets.load_dataset(path, name, split=split, data_files=data_files)`` otherwise: a Hub
  dataset (needs network the first time, then the local cache), or a packaged builder on local
  files such as ``load_hf_bytes("json", data_files=["a.jsonl"])``.

As a :class:`experiments.data.DataSource`: ``DataConfig(source="hf", hf_path=..., hf_name=...,
hf_split=..., hf_column=..., paths=<data files>)``; the last ``val_fraction`` of the bytes is
validation (:func:`experiments.data.split_tail`).

Reference: Q. Lhoest et al., "Datasets: A Community Library for Natural Language Processing",
EMNLP 2021 (demo track), arXiv 2109.02846.
"""

from __future__ import annotations

import pathlib
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

SEPARATOR = b"\n"
_SAVED_MARKERS = ("state.json", "dataset_dict.json")


def import_datasets() -> Any:
    """The ``datasets`` package, or an ImportError that says how to install it."""
    try:
        import datasets
    except ImportError as e:
        raise ImportError(
            "the Hugging Face data source needs the `datasets` package: pip install datasets "
            "(or pip install 'memjax[hf]')") from e
    return datasets


def is_saved_dataset(path: str) -> bool:
    """Whether ``path`` is a directory written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``."""
    p = pathlib.Path(path)
    return p.is_dir() and any((p / marker).is_file() for marker in _SAVED_MARKERS)


def load_hf_split(path: str, name: str | None = None, split: str = "train", *,
                  data_files: Sequence[str] | None = None, cache_dir: str | None = None) -> Any:
    """One split of a dataset as a ``datasets.Dataset`` (see the module docstring for the sources).

    Raises:
      ImportError: ``datasets`` is not installed.
      ValueError: ``split`` is not one of a saved ``DatasetDict``'s splits.
    """
    datasets = import_datasets()
    if is_saved_dataset(path):
        loaded = datasets.load_from_disk(path)
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise ValueError(f"split={split!r} is not in the saved dataset {path!r}; it has "
                                 f"{sorted(loaded)}")
            return loaded[split]
        return loaded
    return datasets.load_dataset(path, name, split=split,
                                 data_files=list(data_files) if data_files else None,
                                 cache_dir=cache_dir)


def document_bytes(values: Iterable[Any]) -> list[bytes]:
    """Column values -> documents as bytes: ``str`` UTF-8 encoded, ``bytes`` kept, ``None`` dropped.

    Raises:
      TypeError: a value that is neither text nor bytes.
    """
    docs = []
    for value in values:
        if value is None:
            continue
        if isinstance(value, str):
            docs.append(value.encode("utf-8"))
        elif isinstance(value, bytes | bytearray):
            docs.append(bytes(value))
        else:
            raise TypeError(f"column values must be text, got {type(value).__name__}: {value!r:.60}")
    return docs


def dataset_bytes(dataset: Any, column: str = "text", *, batch_size: int = 1024) -> np.ndarray:
    """The ``column`` of a ``datasets.Dataset``, documents joined by ``b"\\n"``, as (T,) uint8.

    Raises:
      ValueError: ``column`` is not a column of ``dataset``, or it holds no text.
      TypeError: its values are not text.
    """
    if column not in dataset.column_names:
        raise ValueError(f"column={column!r} is not a column of the dataset; it has "
                         f"{dataset.column_names}")
    docs = []
    for rows in dataset.select_columns([column]).iter(batch_size=batch_size):
        docs.extend(document_bytes(rows[column]))
    if not docs:
        raise ValueError(f"column={column!r} holds no text")
    return np.frombuffer(SEPARATOR.join(docs), dtype=np.uint8)


def load_hf_bytes(path: str, name: str | None = None, split: str = "train", column: str = "text",
                  *, data_files: Sequence[str] | None = None,
                  cache_dir: str | None = None) -> np.ndarray:
    """A dataset's text as a byte-level token stream, (T,) uint8.

    Args:
      path: a Hub dataset name (``"roneneldan/TinyStories"``), a packaged builder (``"json"``,
        ``"csv"``, ``"text"``, ``"parquet"``) with ``data_files``, a local dataset directory, or a
        directory written by ``save_to_disk``.
      name: the dataset's configuration name (None: its default).
      split: which split to read.
      column: the text column.
      data_files: files for a packaged builder.
      cache_dir: the ``datasets`` cache (None: ``HF_DATASETS_CACHE``).

    Raises:
      ImportError: ``datasets`` is not installed.
      ValueError: a missing split or column, or a column without text.
      TypeError: a column whose values are not text.
    """
    return dataset_bytes(load_hf_split(path, name, split, data_files=data_files, cache_dir=cache_dir),
                         column)
