"""Fine-tuning a Hugging Face checkpoint through the trainer: ``--model.init-from``, its own
tokenizer (``--data.tokenizer checkpoint``; here one trained in the test on the built-in corpus),
and ``--checkpoint.export-hf``. The checkpoint is the LLaMA fixture of test_hf_checkpoint.py."""

import json
import pathlib
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from experiments import data
from experiments.config import ConfigError, resolve_model
from experiments.hf_checkpoint import load_pretrained
from experiments.train import parse, run_experiment
from memjax.models.lm import next_token_loss

FIXTURE = pathlib.Path(__file__).parent.parent / "fixtures" / "hf" / "llama_gqa"
CORPUS_BYTES = 60_000


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """The LLaMA fixture plus a 64-token BPE tokenizer trained on the built-in corpus."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    folder = tmp_path_factory.mktemp("ckpt")
    for file in FIXTURE.iterdir():
        shutil.copy(file, folder / file.name)
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=64, limit_alphabet=40, special_tokens=["<unk>"])
    docs = data.stdlib_documents(CORPUS_BYTES)
    tokenizer.train_from_iterator((d.decode("utf-8", "replace") for d in docs), trainer)
    assert tokenizer.get_vocab_size() <= 64
    tokenizer.save(str(folder / "tokenizer.json"))
    return folder


def args(checkpoint, out, *extra):
    return ["--model.init-from", str(checkpoint), "--data.tokenizer", "checkpoint",
            "--data.max-corpus-bytes", str(CORPUS_BYTES), "--data.seq-len", "16",
            "--data.batch-size", "8", "--schedule.steps", "3", "--eval.every", "0",
            "--eval.batches", "1", "--checkpoint.every", "0", "--log.no-progress",
            "--log.no-plots", "--memory-presets", "--log.output-dir", str(out), *extra]


@pytest.mark.slow
def test_fine_tune_a_checkpoint_with_its_tokenizer_then_export(checkpoint, tmp_path):
    config = parse(args(checkpoint, tmp_path, "--checkpoint.export-hf", "--select", "galore-svd",
                        "--optimizers.1.rank", "4", "--optimizers.1.update-proj-gap", "2"))
    assert [o.display_name for o in config.selected] == ["galore-svd"]
    run_experiment(config)
    run = tmp_path / "default" / "galore-svd"
    exported = run / "hf"
    assert sorted(p.name for p in exported.iterdir()) == ["config.json", "model.safetensors",
                                                          "tokenizer.json"]
    saved = json.loads((run / "config.json").read_text())
    assert saved["model"]["d_model"] == 32 and saved["model"]["vocab_size"] == 64
    # The exported model is the trained one: its validation loss is the run's last one.
    tuned, start = load_pretrained(exported), load_pretrained(checkpoint)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    val_loss = [r["loss"] for r in records if r["split"] == "val"][-1]
    source = data.make_source(config.data, vocab_size=64, num_val_batches=1, seed=0,
                              tokenizer=str(checkpoint / "tokenizer.json"))
    batch = source.val_batches[0]
    loss = lambda m: float(next_token_loss(m, jnp.asarray(batch.tokens),  # noqa: E731
                                           jnp.asarray(batch.mask)))
    np.testing.assert_allclose(loss(tuned), val_loss, rtol=1e-5)
    assert loss(tuned) < loss(start)  # it trained
    assert not np.array_equal(tuned.embed.embedding[...], start.embed.embedding[...])
    # Re-running from the run's saved config.json finds the finished run (same fingerprints).
    again = parse(["--config", str(run / "config.json"), "--log.output-dir", str(tmp_path)])
    assert again.model == resolve_model(config).model and again.data.tokenizer == "checkpoint"
    run_experiment(again)
    assert [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            ][-1] == 3


@pytest.mark.parametrize("extra, match", [
    (["--model.d-model", "48"], "model.d_model=48 disagrees with the checkpoint"),
    (["--optimizers.0.weight-bits", "8"], "weight_bits=8 with model.init_from"),
])
def test_inconsistent_settings_are_refused(checkpoint, tmp_path, extra, match):
    with pytest.raises(ConfigError, match=match):
        run_experiment(parse(args(checkpoint, tmp_path, *extra)))
    assert not any(tmp_path.iterdir())



@pytest.mark.slow
def test_every_recipe_trains_a_loaded_model(checkpoint, tmp_path):
    """The recipes of the sweep with their own code paths (GaLore as the layerwise step; FRUGAL's
    blocks; Q-GaLore's INT4 projector and 8-bit Adam; MeZO's zeroth-order step), two steps each
    on the LLaMA fixture with its tokenizer: every run trains and ends with a finite loss."""
    rows = ("adamw", "galore-svd-layerwise", "apollo_mini", "frugal-block", "q_galore", "mezo")
    config = parse(["--config", "sweep", "--model.init-from", str(checkpoint),
                    "--data.tokenizer", "checkpoint", "--data.max-corpus-bytes", str(CORPUS_BYTES),
                    "--data.seq-len", "16", "--data.batch-size", "8", "--schedule.steps", "2",
                    "--eval.every", "0", "--eval.batches", "1", "--checkpoint.every", "0",
                    "--log.no-progress", "--log.no-plots", "--optimizers.1.layerwise",
                    "--log.output-dir", str(tmp_path), "--select", *rows])
    summary = run_experiment(config)
    assert [r["optimizer"] for r in summary] == list(rows)
    assert all(r["steps"] == 2 and np.isfinite(r["final_val_loss"]) for r in summary)
