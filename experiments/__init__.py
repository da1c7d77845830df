"""Reproducible runs of memjax models and optimizers from typed configs.

``python -m experiments.train [--config NAME] [--section.field VALUE ...]`` (see :mod:`experiments.train`)
from a clone; installed, this package is ``memjax_experiments`` behind ``memjax-train`` and
``memjax-memory`` (its modules import each other relatively, so both names work).

Modules, one concept each:
  config         frozen dataclasses of an experiment, validation, resume fingerprints
  recipes        one optimizer config class per recipe, with its fields and authors' defaults
  configs/       named experiments (``default``, ``sweep``, ``smoke``, ``quality``, ...), each a
                 module with ``CONFIG``
  data           built-in corpora (stdlib bytes, text, token files), synthetic tasks, resumable iterator
  sharding       the (data, fsdp) mesh; parameter shardings from logical axis names
  optimizers     optimizers by name (adamw, memjax galore), warmup + cosine, clipping, skipping
  trainer        train state and the compiled init / step / eval with explicit shardings
  checkpointing  orbax CheckpointManager: state + data position + fingerprints
  run            one run: memory report, the training loop and its hooks
  hooks          the loop's hooks: evaluation, metrics log, skipped-step guard, replay log,
                 checkpoints, progress bar
  report         the side-by-side table and the PNG plots
  provenance     config, seed, git commit and library versions of a run
  metrics        metrics.jsonl
"""
