"""Built-in data that needs no network, and a deterministic, resumable batch iterator.

Sources (``DataConfig.source``):

* ``"stdlib"``: a byte-level corpus (vocabulary 256) made of this Python's own standard-library
  sources (sorted ``*.py`` files under ``sysconfig.get_paths()["stdlib"]``, tests and
  site-packages excluded, capped at ``max_corpus_bytes``) plus the ``pydoc_data`` topics.
  Every ``round(1 / val_fraction)``-th document is held out for validation.
* ``"text"``: user text files read as bytes; the last ``val_fraction`` of the bytes is validation.
* ``"tokens"``: pre-tokenised ``.npy`` arrays or raw ``.bin`` files (``token_dtype``, e.g. uint16 as
  written by nanoGPT); the last ``val_fraction`` of the tokens is validation.
* ``"hf"``: the text column of a Hugging Face dataset (``hf_path``, ``hf_name``, ``hf_split``,
  ``hf_column``; ``paths`` are the data files of a packaged builder such as ``"json"``) as bytes,
  documents joined by newlines (:mod:`experiments.hf_data`, needs ``datasets``); the last
  ``val_fraction`` of the bytes is validation.
* ``"selective_copy"`` (Gu and Dao 2023, arXiv 2312.00752, Sec. 3.1) and ``"mqar"``
  (multi-query associative recall; Arora et al. 2023, arXiv 2312.04927): generated from the seed;
  the loss mask covers only the answer tokens.

A training batch is a pure function of ``(seed, step)``: corpus sources cut the token stream into
windows of ``seq_len`` tokens and visit them in a fresh permutation (with a fresh start offset)
every epoch; synthetic sources draw from ``numpy.random.default_rng([seed, split, step])``. The
iterator's position is therefore plain data, :class:`IteratorState`, which goes into checkpoints.
Validation batches are fixed (the first windows of the held-out split).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import pathlib
import sysconfig
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np

from .config import ConfigError, DataConfig

_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})
_TRAIN, _VAL = 0, 1


class Batch(NamedTuple):
    """One batch. ``tokens``: (B, L) int32; ``mask``: (B, L - 1) float32 weights of the targets
    ``tokens[:, 1:]`` (all ones for corpora)."""

    tokens: np.ndarray
    mask: np.ndarray


class Corpus(NamedTuple):
    """A token stream split in two. ``train`` / ``val``: 1-D integer arrays."""

    train: np.ndarray
    val: np.ndarray


@dataclasses.dataclass(frozen=True)
class DataSource:
    """Batches of one source.

    Attributes:
      name: the source's name.
      vocab_size: the smallest vocabulary holding every token.
      fingerprint: a short hash of the underlying data (corpora) or of the generator settings.
      train_batch: ``(seed, step) -> Batch``, a pure function.
      val_batches: the fixed validation batches.
    """

    name: str
    vocab_size: int
    fingerprint: str
    train_batch: Callable[[int, int], Batch]
    val_batches: tuple[Batch, ...]


@dataclasses.dataclass(frozen=True)
class IteratorState:
    """Position of a :class:`BatchIterator`: the next batch is ``train_batch(seed, step)``."""

    seed: int
    step: int


class BatchIterator:
    """Iterates ``source.train_batch(seed, step)`` for ``step = state.step, state.step + 1, ...``.

    ``state`` is plain data (save it with ``dataclasses.asdict``, restore with ``IteratorState(**d)``).
    """

    def __init__(self, source: DataSource, state: IteratorState):
        self.source = source
        self.state = state

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> Batch:
        batch = self.source.train_batch(self.state.seed, self.state.step)
        self.state = dataclasses.replace(self.state, step=self.state.step + 1)
        return batch


# ----------------------------------------------------------------------------- corpora


def stdlib_documents(max_bytes: int) -> list[bytes]:
    """Sorted standard-library ``*.py`` files up to ``max_bytes``, then the pydoc topics."""
    from pydoc_data.topics import topics

    docs, total = [], 0
    for path in _stdlib_files():
        text = path.read_bytes()
        if total + len(text) > max_bytes:
            break
        docs.append(text)
        total += len(text)
    docs.extend(topics[key].encode("utf-8") for key in sorted(topics))
    return docs


@functools.lru_cache(maxsize=1)
def _stdlib_files() -> tuple[pathlib.Path, ...]:
    """The standard library's ``*.py`` files in a fixed order (the directory walk, about a second,
    once per process)."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    return tuple(sorted(
        (p for p in root.rglob("*.py") if not _SKIP_DIRS & set(p.relative_to(root).parts[:-1])),
        key=lambda p: p.relative_to(root).as_posix()))


def split_documents(docs: Sequence[bytes], val_fraction: float) -> Corpus:
    """Every ``round(1 / val_fraction)``-th document (1-based) goes to validation."""
    period = max(2, round(1 / val_fraction))
    train = [d for i, d in enumerate(docs) if (i + 1) % period]
    val = [d for i, d in enumerate(docs) if not (i + 1) % period]
    as_array = lambda ds: np.frombuffer(b"\n".join(ds), dtype=np.uint8)  # noqa: E731
    return Corpus(as_array(train), as_array(val))


def split_tail(tokens: np.ndarray, val_fraction: float) -> Corpus:
    """The last ``val_fraction`` of a stream is validation."""
    cut = len(tokens) - max(1, int(len(tokens) * val_fraction))
    return Corpus(tokens[:cut], tokens[cut:])


def read_text_files(paths: Sequence[str]) -> np.ndarray:
    """The bytes of ``paths``, joined by newlines, as uint8."""
    return np.frombuffer(b"\n".join(pathlib.Path(p).read_bytes() for p in paths), dtype=np.uint8)


def read_token_files(paths: Sequence[str], bin_dtype: str) -> np.ndarray:
    """Concatenated 1-D token arrays from ``.npy`` files or raw ``.bin`` files of ``bin_dtype``."""
    arrays = []
    for p in paths:
        if p.endswith(".npy"):
            arrays.append(np.load(p, mmap_mode="r").reshape(-1))
        else:
            arrays.append(np.memmap(p, dtype=np.dtype(bin_dtype), mode="r"))
    tokens = arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
    if not np.issubdtype(tokens.dtype, np.integer):
        raise ConfigError(f"token files must hold integers, got {tokens.dtype}")
    return tokens


def read_hf_dataset(cfg: DataConfig) -> np.ndarray:
    """The ``cfg.hf_column`` text of a Hugging Face dataset as uint8 bytes (see :mod:`experiments.hf_data`)."""
    from . import hf_data

    if not cfg.hf_path:
        raise ConfigError("data.source='hf' needs data.hf_path")
    try:
        return hf_data.load_hf_bytes(cfg.hf_path, cfg.hf_name or None, cfg.hf_split, cfg.hf_column,
                                     data_files=cfg.paths or None)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"data (hf_path={cfg.hf_path!r}): {e}") from e


def fingerprint(*arrays: np.ndarray) -> str:
    """First 16 hex digits of the sha256 of the arrays' bytes (read in chunks)."""
    h = hashlib.sha256()
    for a in arrays:
        h.update(str((a.dtype.str, a.shape)).encode())
        for start in range(0, len(a), 1 << 24):
            h.update(np.ascontiguousarray(a[start:start + (1 << 24)]).tobytes())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------- windows


@functools.lru_cache(maxsize=8)
def _epoch_order(seed: int, epoch: int, num_windows: int, seq_len: int) -> tuple[np.ndarray, int]:
    rng = np.random.default_rng([seed, _TRAIN, epoch])
    return rng.permutation(num_windows), int(rng.integers(0, seq_len))


def num_windows(length: int, seq_len: int) -> int:
    """Windows of ``seq_len`` tokens available in every epoch (whatever its start offset)."""
    return (length - seq_len + 1) // seq_len


def window_starts(length: int, seq_len: int, batch_size: int, seed: int, step: int) -> np.ndarray:
    """Start positions of the ``batch_size`` windows of training batch ``step``.

    Window ``p = step * batch_size + i`` is window ``perm_e[p mod W]`` of epoch ``e = p // W``,
    where epoch ``e`` shifts every window by ``offset_e`` in ``[0, seq_len)``.
    """
    w = num_windows(length, seq_len)
    positions = step * batch_size + np.arange(batch_size)
    starts = np.empty(batch_size, np.int64)
    for epoch in np.unique(positions // w):
        perm, offset = _epoch_order(seed, int(epoch), w, seq_len)
        sel = positions // w == epoch
        starts[sel] = offset + perm[positions[sel] % w] * seq_len
    return starts


def gather_windows(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> Batch:
    """(B,) start positions -> a :class:`Batch` of (B, seq_len) windows, mask all ones."""
    idx = starts[:, None] + np.arange(seq_len)[None, :]
    windows = np.asarray(tokens[idx], dtype=np.int32)
    return Batch(windows, np.ones((len(starts), seq_len - 1), np.float32))


def corpus_source(name: str, corpus: Corpus, cfg: DataConfig, num_val_batches: int) -> DataSource:
    """A :class:`DataSource` over a :class:`Corpus`."""
    L, B = cfg.seq_len, cfg.batch_size
    if num_windows(len(corpus.train), L) < 1 or len(corpus.val) < L:
        raise ConfigError(
            f"data: the {name} corpus ({len(corpus.train)} train / {len(corpus.val)} validation "
            f"tokens) is too short for data.seq_len={L}")
    train = corpus.train

    def train_batch(seed: int, step: int) -> Batch:
        return gather_windows(train, window_starts(len(train), L, B, seed, step), L)

    n_val = num_windows(len(corpus.val) + L - 1, L)  # offset 0: windows 0, L, 2L, ...
    val = tuple(
        gather_windows(corpus.val, (np.arange(i * B, (i + 1) * B) % n_val) * L, L)
        for i in range(num_val_batches)
    )
    vocab = int(max(corpus.train.max(), corpus.val.max())) + 1
    return DataSource(name, vocab, fingerprint(corpus.train, corpus.val), train_batch, val)


# ----------------------------------------------------------------------------- synthetic


def selective_copy(rng: np.random.Generator, batch: int, seq_len: int, vocab: int,
                   num_tokens: int) -> Batch:
    """Selective copying: ``num_tokens`` data tokens (ids >= 2) scattered among blanks (0), then
    a separator (1), then the data tokens in order; only the answers are scored.

    Layout of each row (``C = seq_len - 1 - num_tokens``): ``[context (C) | 1 | answers]``.
    """
    k, context = num_tokens, seq_len - 1 - num_tokens
    if k < 1 or context < k or vocab < 3:
        raise ConfigError(
            f"selective_copy needs 1 <= num_tokens_to_copy <= (seq_len - 1) / 2 and vocab_size >= 3, "
            f"got num_tokens_to_copy={k}, seq_len={seq_len}, vocab_size={vocab}")
    data = rng.integers(2, vocab, (batch, k))
    positions = np.sort(np.argsort(rng.random((batch, context)), axis=1)[:, :k], axis=1)
    tokens = np.zeros((batch, seq_len), np.int32)
    np.put_along_axis(tokens[:, :context], positions, data, axis=1)
    tokens[:, context] = 1
    tokens[:, context + 1:] = data
    mask = np.zeros((batch, seq_len - 1), np.float32)
    mask[:, context:] = 1.0
    return Batch(tokens, mask)


def mqar(rng: np.random.Generator, batch: int, seq_len: int, vocab: int, num_pairs: int) -> Batch:
    """Multi-query associative recall: ``k1 v1 ... kn vn`` then queries ``q a q a ...`` where each
    ``q`` is one of the keys and ``a`` its value; keys are in ``[1, vocab/2)``, values in
    ``[vocab/2, vocab)``, 0 pads; only the answers ``a`` are scored."""
    n, half = num_pairs, vocab // 2
    num_queries = (seq_len - 2 * n) // 2
    if n < 1 or num_queries < 1 or half - 1 < n:
        raise ConfigError(
            f"mqar needs num_kv_pairs >= 1, seq_len >= 2 * num_kv_pairs + 2 and "
            f"vocab_size / 2 > num_kv_pairs, got num_kv_pairs={n}, seq_len={seq_len}, "
            f"vocab_size={vocab}")
    keys = np.argsort(rng.random((batch, half - 1)), axis=1)[:, :n] + 1
    values = rng.integers(half, vocab, (batch, n))
    which = rng.integers(0, n, (batch, num_queries))
    tokens = np.zeros((batch, seq_len), np.int32)
    tokens[:, 0:2 * n:2], tokens[:, 1:2 * n:2] = keys, values
    q_start = 2 * n
    tokens[:, q_start:q_start + 2 * num_queries:2] = np.take_along_axis(keys, which, axis=1)
    tokens[:, q_start + 1:q_start + 2 * num_queries:2] = np.take_along_axis(values, which, axis=1)
    mask = np.zeros((batch, seq_len - 1), np.float32)
    mask[:, q_start:q_start + 2 * num_queries:2] = 1.0  # target index of each answer
    return Batch(tokens, mask)


def synthetic_source(cfg: DataConfig, vocab: int, num_val_batches: int, seed: int) -> DataSource:
    """A :class:`DataSource` generating ``cfg.source`` batches from ``(seed, split, step)``."""
    if cfg.source == "selective_copy":
        make = functools.partial(selective_copy, num_tokens=cfg.num_tokens_to_copy)
    else:
        make = functools.partial(mqar, num_pairs=cfg.num_kv_pairs)

    def batch_at(seed_: int, split: int, step: int) -> Batch:
        return make(np.random.default_rng([seed_, split, step]), cfg.batch_size, cfg.seq_len, vocab)

    batch_at(seed, _TRAIN, 0)  # validates the settings now
    val = tuple(batch_at(seed, _VAL, i) for i in range(num_val_batches))
    tag = hashlib.sha256(repr((cfg.source, cfg.num_tokens_to_copy, cfg.num_kv_pairs, vocab)).encode())
    return DataSource(cfg.source, vocab, tag.hexdigest()[:16],
                      lambda s, step: batch_at(s, _TRAIN, step), val)


# ----------------------------------------------------------------------------- entry point


def tokenize(corpus: Corpus, tokenizer_json: str) -> Corpus:
    """The UTF-8 text of a byte corpus encoded by a Hugging Face ``tokenizer.json`` (no special
    tokens added), int32 token ids; train and validation encoded separately."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(tokenizer_json)

    def encode(data: np.ndarray) -> np.ndarray:
        text = np.asarray(data, np.uint8).tobytes().decode("utf-8", errors="replace")
        return np.asarray(tokenizer.encode(text, add_special_tokens=False).ids, np.int32)

    return Corpus(encode(corpus.train), encode(corpus.val))


def make_source(cfg: DataConfig, *, vocab_size: int, num_val_batches: int, seed: int,
                tokenizer: str | None = None) -> DataSource:
    """The :class:`DataSource` named by ``cfg.source``.

    Args:
      cfg: the data config.
      vocab_size: the model's vocabulary (synthetic tasks use all of it).
      num_val_batches: validation batches to prepare.
      seed: the run's seed (fixes the synthetic validation set).
      tokenizer: a ``tokenizer.json`` that tokenises the text sources (None: bytes).

    Raises:
      ConfigError: missing files, or data that does not fit the settings.
    """
    if cfg.source in ("selective_copy", "mqar"):
        return synthetic_source(cfg, vocab_size, num_val_batches, seed)
    encode = (lambda corpus: corpus) if tokenizer is None else (
        lambda corpus: tokenize(corpus, tokenizer))
    if cfg.source == "hf":
        return corpus_source("hf", encode(split_tail(read_hf_dataset(cfg), cfg.val_fraction)), cfg,
                             num_val_batches)
    missing = [p for p in cfg.paths if not pathlib.Path(p).is_file()]
    if missing:
        raise ConfigError(f"data.paths: no such file {missing[0]!r}")
    if cfg.source == "stdlib":
        corpus = encode(split_documents(stdlib_documents(cfg.max_corpus_bytes), cfg.val_fraction))
    elif cfg.source == "text":
        corpus = encode(split_tail(read_text_files(cfg.paths), cfg.val_fraction))
    else:
        corpus = split_tail(read_token_files(cfg.paths, cfg.token_dtype), cfg.val_fraction)
    return corpus_source(cfg.source, corpus, cfg, num_val_batches)
