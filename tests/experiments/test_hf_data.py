"""Hugging Face data source, on local fixtures only (no network: offline mode, a temporary cache)."""

import json

import numpy as np
import pytest

datasets = pytest.importorskip("datasets")

from experiments import data, hf_data
from experiments.config import ConfigError, DataConfig

ROWS = ["first document: hello", "second, with UTF-8: caf\u00e9 \u2713", "third " * 40]
EXPECTED = b"\n".join(r.encode("utf-8") for r in ROWS)


@pytest.fixture(autouse=True)
def offline(tmp_path, monkeypatch):
    """Offline mode and a cache under tmp_path (``datasets.config`` is read at import, so patch it)."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")


@pytest.fixture
def jsonl(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"id": i, "text": r}) + "\n" for i, r in enumerate(ROWS)),
                    encoding="utf-8")
    return str(path)


def test_json_lines_file_gives_the_documents_bytes(jsonl):
    tokens = hf_data.load_hf_bytes("json", data_files=[jsonl])
    assert tokens.dtype == np.uint8 and tokens.tobytes() == EXPECTED


def test_saved_dataset_directory_gives_the_same_bytes(tmp_path):
    saved = tmp_path / "saved"
    datasets.Dataset.from_dict({"body": ROWS}).save_to_disk(str(saved))
    assert hf_data.is_saved_dataset(str(saved))
    assert hf_data.load_hf_bytes(str(saved), column="body").tobytes() == EXPECTED
    both = tmp_path / "saved_dict"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ROWS}),
                          "test": datasets.Dataset.from_dict({"text": ["x"]})}).save_to_disk(str(both))
    assert hf_data.load_hf_bytes(str(both), split="test").tobytes() == b"x"
    with pytest.raises(ValueError, match="split"):
        hf_data.load_hf_bytes(str(both), split="validation")


def test_missing_column_and_non_text_values_raise(jsonl):
    with pytest.raises(ValueError, match="column='body'"):
        hf_data.load_hf_bytes("json", data_files=[jsonl], column="body")
    with pytest.raises(TypeError, match="text"):
        hf_data.load_hf_bytes("json", data_files=[jsonl], column="id")
    assert hf_data.document_bytes(["a", None, b"b"]) == [b"a", b"b"]


def test_hf_source_is_deterministic_and_split_by_tail(jsonl):
    cfg = DataConfig(source="hf", hf_path="json", paths=(jsonl,), seq_len=16, batch_size=3,
                     val_fraction=0.2)
    a = data.make_source(cfg, vocab_size=256, num_val_batches=2, seed=0)
    b = data.make_source(cfg, vocab_size=256, num_val_batches=2, seed=0)
    corpus = data.split_tail(np.frombuffer(EXPECTED, np.uint8), 0.2)
    assert a.name == "hf" and a.fingerprint == b.fingerprint == data.fingerprint(*corpus)
    for step in (0, 5):
        x, y = a.train_batch(1, step), b.train_batch(1, step)
        np.testing.assert_array_equal(x.tokens, y.tokens)
        assert x.tokens.shape == (3, 16) and x.tokens.dtype == np.int32
        for row in x.tokens:  # every window is a piece of the train bytes
            assert bytes(row.astype(np.uint8)) in corpus.train.tobytes()
    assert not np.array_equal(a.train_batch(1, 0).tokens, a.train_batch(1, 1).tokens)
    for x, y in zip(a.val_batches, b.val_batches):
        np.testing.assert_array_equal(x.tokens, y.tokens)
        for row in x.tokens:
            assert bytes(row.astype(np.uint8)) in corpus.val.tobytes()


def test_hf_source_errors_are_config_errors(jsonl):
    with pytest.raises(ConfigError, match="hf_path"):
        data.make_source(DataConfig(source="hf"), vocab_size=256, num_val_batches=1, seed=0)
    with pytest.raises(ConfigError, match="column"):
        data.make_source(DataConfig(source="hf", hf_path="json", paths=(jsonl,), hf_column="nope"),
                         vocab_size=256, num_val_batches=1, seed=0)


def test_missing_datasets_package_says_how_to_install(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_datasets(name, *args, **kwargs):
        if name == "datasets":
            raise ImportError("No module named 'datasets'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    with pytest.raises(ImportError, match="pip install datasets"):
        hf_data.import_datasets()
