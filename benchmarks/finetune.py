"""Fine-tuning a checkpoint pre-trained here, reloaded through the Hugging Face format.

1. Pre-train the main job's byte-level LM (d 64, 2 layers; ``experiments/configs/default.py``)
   with AdamW for ``--pretrain-steps`` steps on the built-in corpus (the first 4 MB of the
   standard library's sources, ``data.max_corpus_bytes``) and export it with
   ``--checkpoint.export-hf``.
2. Write a held-out text: ``--heldout-bytes`` of the standard-library sources that come *after*
   those 4 MB (the model never saw them; codec and HTML-entity tables are skipped).
3. Fine-tune the exported folder (``--model.init-from``, i.e. ``load_pretrained``) on that text
   with AdamW, GaLore, APOLLO-Mini, FRUGAL (block) and MeZO, the sweep's settings
   (``experiments/configs/sweep.py``), ``--steps`` steps each, and print the table: validation
   loss on the held-out text before and after, optimizer state and compiled step memory.

    python -m benchmarks.finetune [--pretrain-steps 300] [--steps 200] [--out /tmp/memjax-ft]

Nothing is downloaded. Run by hand (minutes on 2 CPU cores); not part of the tests.
"""

from __future__ import annotations

import argparse
import pathlib
import sysconfig

from experiments import data
from experiments.train import parse, run_experiment

ROWS = ("adamw", "galore-svd", "apollo_mini", "frugal-block", "mezo")
PRETRAIN_BYTES = 4_000_000


def heldout_text(path: pathlib.Path, size: int) -> pathlib.Path:
    """The standard-library sources that follow the corpus' first ``PRETRAIN_BYTES`` (in the
    corpus' order: sorted relative paths, tests skipped), up to ``size`` bytes, in one file. Data
    tables, not code, are skipped: the ``encodings`` package's codecs and ``html/entities.py``."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    pretrained = data.stdlib_documents(PRETRAIN_BYTES)
    seen = set(pretrained)
    out, total = [], 0
    for file in sorted(root.rglob("*.py"), key=lambda p: p.relative_to(root).as_posix()):
        parts = file.relative_to(root).parts
        if data._SKIP_DIRS & set(parts[:-1]) or parts[0] == "encodings" or parts == (
                "html", "entities.py"):
            continue
        text = file.read_bytes()
        if text in seen:
            continue
        out.append(text)
        total += len(text)
        if total >= size:
            break
    path.write_bytes(b"\n".join(out))
    return path


def start_loss(config, checkpoint: pathlib.Path) -> float:
    """Validation loss of the checkpoint itself, reloaded by ``load_pretrained``, on the
    fine-tuning run's validation batches."""
    import jax.numpy as jnp

    from experiments.hf_checkpoint import load_pretrained
    from memjax.models.lm import next_token_loss

    model = load_pretrained(checkpoint)
    source = data.make_source(config.data, vocab_size=256, num_val_batches=config.eval.batches,
                              seed=config.seed)
    losses = [float(next_token_loss(model, jnp.asarray(b.tokens), jnp.asarray(b.mask)))
              for b in source.val_batches]
    return sum(losses) / len(losses)


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pretrain-steps", type=int, default=300)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--heldout-bytes", type=int, default=400_000)
    ap.add_argument("--out", default="/tmp/memjax-ft")
    opts = ap.parse_args(argv)
    out = pathlib.Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    common = ["--log.no-plots", "--memory-presets", "--checkpoint.every", "0"]

    pretrain = out / "pretrain"
    run_experiment(parse(["--select", "adamw", "--schedule.steps", str(opts.pretrain_steps),
                          "--checkpoint.export-hf", "--log.output-dir", str(pretrain),
                          *common]))
    checkpoint = pretrain / "default" / "adamw" / "hf"

    text = heldout_text(out / "heldout.txt", opts.heldout_bytes)
    config = parse([
        "--config", "sweep", "--model.init-from", str(checkpoint), "--data.source", "text",
        "--data.paths", str(text), "--schedule.steps", str(opts.steps),
        "--eval.every", str(max(1, opts.steps // 4)), "--log.output-dir", str(out / "finetune"),
        "--name", "finetune", "--select", *ROWS, *common])
    before = start_loss(config, checkpoint)
    rows = run_experiment(config)
    print(f"\nheld-out validation loss of the pre-trained checkpoint: {before:.4f}\n")
    print("| optimizer | steps | val loss before | val loss after | change | optimizer state MB "
          "| compiled step MB / device | step ms |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['optimizer']} | {r['steps']} | {before:.4f} | {r['final_val_loss']:.4f} | "
              f"{r['final_val_loss'] - before:+.4f} | {r['opt_state_mb']:.3f} | "
              f"{r['step_memory_mb']:.2f} | {r['step_ms']:.1f} |")
    return rows


if __name__ == "__main__":
    main()
