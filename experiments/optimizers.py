"""Optimizers by name, with the GaLore-style learning-rate schedule, clipping and step skipping.

Every optimizer is ``skip_nonfinite(chain(clip_by_global_norm, recipe(schedule)))``: a step with a
non-finite gradient changes neither the parameters nor the state. A recipe is one function in
:data:`RECIPES` from ``(OptimizerConfig, schedule)`` to an optax transform; plug in a memjax recipe
(fira, apollo, frugal, q_galore, mezo) by adding a function and its name to
:data:`experiments.config.OptimizerName`.

Parameters of the decoder LM carry a leading ``"layers"`` axis on the stacked blocks, so the
low-rank recipes see each block's matrix as its own ``(d, f)`` matrix (one batch axis); the
embedding, the head and the norms keep the full inner optimizer.
"""

from __future__ import annotations

from collections.abc import Callable

import optax

import memjax
from experiments.config import OptimizerConfig, ScheduleConfig

Recipe = Callable[[OptimizerConfig, optax.Schedule], optax.GradientTransformation]


def warmup_cosine(peak: float, cfg: ScheduleConfig) -> optax.Schedule:
    """Linear warmup from 0 over ``warmup_fraction`` of the steps, cosine to ``final_lr_fraction``."""
    warmup = int(cfg.warmup_fraction * cfg.steps)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=peak, warmup_steps=warmup,
        decay_steps=max(cfg.steps, warmup + 1), end_value=peak * cfg.final_lr_fraction)


def low_rank_labels(rank: int) -> Callable:
    """Matrix labels for stacked-layer LM parameters (one leading batch axis)."""
    return lambda params: memjax.optim.label_matrices(params, rank, num_batch_dims=1)


def adamw(cfg: OptimizerConfig, lr: optax.Schedule) -> optax.GradientTransformation:
    return optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay)


def galore(cfg: OptimizerConfig, lr: optax.Schedule) -> optax.GradientTransformation:
    return memjax.optim.galore(
        lr, rank=cfg.rank, update_proj_gap=cfg.update_proj_gap, scale=cfg.scale,
        proj_type=cfg.proj_type, projector=cfg.projector, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
        weight_decay=cfg.weight_decay, labels=low_rank_labels(cfg.rank), refresh=cfg.refresh,
        skip_nonfinite=False)


RECIPES: dict[str, Recipe] = {"adamw": adamw, "galore": galore}


def build(cfg: OptimizerConfig,
          schedule: ScheduleConfig) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The full optimizer of ``cfg`` and its learning-rate schedule (for logging)."""
    lr = warmup_cosine(cfg.learning_rate, schedule)
    parts = [optax.clip_by_global_norm(schedule.clip_norm)] if schedule.clip_norm > 0 else []
    parts.append(RECIPES[cfg.name](cfg, lr))
    return memjax.optim.skip_nonfinite(optax.chain(*parts)), lr
