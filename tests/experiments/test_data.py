"""Built-in data: determinism, splits, resumable iteration, file sources, synthetic tasks."""

import dataclasses

import numpy as np
import pytest

from experiments import data
from experiments.config import ConfigError, DataConfig

SMALL = DataConfig(source="stdlib", seq_len=32, batch_size=4, max_corpus_bytes=100_000)


def _source(cfg=SMALL, vocab=256, seed=0):
    return data.make_source(cfg, vocab_size=vocab, num_val_batches=2, seed=seed)


def test_stdlib_corpus_is_deterministic_and_byte_level():
    a, b = _source(), _source()
    assert a.fingerprint == b.fingerprint and a.vocab_size <= 256
    for step in (0, 7):
        np.testing.assert_array_equal(a.train_batch(0, step).tokens, b.train_batch(0, step).tokens)
    assert not np.array_equal(a.train_batch(0, 0).tokens, a.train_batch(0, 1).tokens)
    assert not np.array_equal(a.train_batch(0, 0).tokens, a.train_batch(1, 0).tokens)
    batch = a.train_batch(0, 3)
    assert batch.tokens.shape == (4, 32) and batch.tokens.dtype == np.int32
    assert batch.mask.shape == (4, 31) and np.all(batch.mask == 1)
    for x, y in zip(a.val_batches, b.val_batches):
        np.testing.assert_array_equal(x.tokens, y.tokens)


def test_pydoc_topics_are_part_of_the_corpus():
    from pydoc_data.topics import topics

    docs = data.stdlib_documents(10_000)
    assert docs[-len(topics):] == [topics[k].encode() for k in sorted(topics)]


def test_split_documents_is_disjoint_and_deterministic():
    docs = [bytes([65 + i]) * 3 for i in range(20)]
    corpus = data.split_documents(docs, val_fraction=0.25)
    assert corpus.val.tobytes() == b"\n".join(docs[3::4])
    assert corpus.train.tobytes() == b"\n".join(d for i, d in enumerate(docs) if (i + 1) % 4)


def test_every_window_is_visited_once_per_epoch():
    length, seq_len, batch = 1000, 10, 3
    w = data.num_windows(length, seq_len)
    starts = np.concatenate([data.window_starts(length, seq_len, batch, 5, s) for s in range(w // batch)])
    offsets = starts % seq_len
    assert len(set(offsets)) == 1  # one offset per epoch
    assert len(set(starts)) == len(starts) and starts.max() + seq_len <= length


def test_iterator_position_is_plain_data_and_resumes():
    source = _source()
    it = data.BatchIterator(source, data.IteratorState(seed=3, step=0))
    for _ in range(4):
        next(it)
    saved = dataclasses.asdict(it.state)
    expected = [next(it).tokens for _ in range(3)]
    resumed = data.BatchIterator(source, data.IteratorState(**saved))
    for e in expected:
        np.testing.assert_array_equal(next(resumed).tokens, e)
    assert saved == {"seed": 3, "step": 4}


def test_text_and_token_files(tmp_path):
    text = tmp_path / "a.txt"
    text.write_bytes(bytes(range(32, 127)) * 20)
    src = _source(DataConfig(source="text", paths=(str(text),), seq_len=16, batch_size=2))
    assert src.vocab_size <= 127 and src.train_batch(0, 0).tokens.shape == (2, 16)

    tokens = (np.arange(5000) * 7 % 1000).astype(np.uint16)
    np.save(tmp_path / "t.npy", tokens)
    tokens.tofile(tmp_path / "t.bin")
    tokens_cfg = lambda name: DataConfig(source="tokens", paths=(str(tmp_path / name),), seq_len=16, batch_size=2)  # noqa: E731
    npy, bin_ = _source(tokens_cfg("t.npy"), 1024), _source(tokens_cfg("t.bin"), 1024)
    assert npy.vocab_size == bin_.vocab_size == 1000 and npy.fingerprint == bin_.fingerprint
    np.testing.assert_array_equal(npy.train_batch(1, 2).tokens, bin_.train_batch(1, 2).tokens)
    with pytest.raises(ConfigError, match="no such file"):
        _source(DataConfig(source="text", paths=(str(tmp_path / "missing.txt"),)))


def test_selective_copy_answers_are_the_data_tokens_in_order():
    b = data.selective_copy(np.random.default_rng(0), 4, 32, 16, num_tokens=5)
    context = 32 - 1 - 5
    for row, mask in zip(b.tokens, b.mask):
        data_tokens = row[:context][row[:context] > 0]
        np.testing.assert_array_equal(data_tokens, row[context + 1:])
        assert row[context] == 1 and data_tokens.min() >= 2
        assert mask.sum() == 5 and np.all(mask[context:] == 1)


def test_mqar_answers_are_the_values_of_the_queried_keys():
    n, vocab = 4, 32
    b = data.mqar(np.random.default_rng(0), 3, 24, vocab, num_pairs=n)
    for row, mask in zip(b.tokens, b.mask):
        table = dict(zip(row[0:2 * n:2], row[1:2 * n:2]))
        assert len(table) == n
        for target in np.flatnonzero(mask):  # target index t predicts row[t + 1] from row[t]
            assert table[row[target]] == row[target + 1]
        assert mask.sum() == (24 - 2 * n) // 2


def test_synthetic_sources_are_seeded():
    cfg = DataConfig(source="mqar", seq_len=24, batch_size=2, num_kv_pairs=4)
    a, b = _source(cfg, 32, seed=1), _source(cfg, 32, seed=1)
    np.testing.assert_array_equal(a.train_batch(1, 9).tokens, b.train_batch(1, 9).tokens)
    np.testing.assert_array_equal(a.val_batches[0].tokens, b.val_batches[0].tokens)
    with pytest.raises(ConfigError, match="mqar"):
        _source(dataclasses.replace(cfg, num_kv_pairs=20), 32)
