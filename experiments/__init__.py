"""Reproducible runs of memjax models and optimizers from typed configs.

``python -m experiments.train [--config NAME] [--section.field VALUE ...]`` (see :mod:`experiments.train`).

Modules, one concept each:
  config         frozen dataclasses of an experiment, validation, resume fingerprints
  configs/       named experiments (``default``, ``sweep``, ``smoke``), each a module with ``CONFIG``
  data           built-in corpora (stdlib bytes, text, token files), synthetic tasks, resumable iterator
  sharding       the (data, fsdp) mesh; parameter shardings from logical axis names
  optimizers     optimizers by name (adamw, memjax galore), warmup + cosine, clipping, skipping
  trainer        train state and the compiled init / step / eval with explicit shardings
  checkpointing  orbax CheckpointManager: state + data position + fingerprints
  run            one run: memory report, training loop, metrics, checkpoints
  report         the side-by-side table and the PNG plots
  provenance     config, seed, git commit and library versions of a run
  metrics        metrics.jsonl
"""
