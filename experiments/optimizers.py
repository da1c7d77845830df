"""Optimizers by name, with the GaLore-style learning-rate schedule, clipping and step skipping.

Every gradient optimizer is ``skip_nonfinite(chain(clip_by_global_norm, recipe(schedule)))``: a
step with a non-finite gradient changes neither the parameters nor the state. A ``layerwise`` row
takes the bare recipe: :func:`memjax.training.layerwise_step` clips and skips itself (a norm
pass), since no gradient tree exists for a chain to see. A recipe is one
function in :data:`RECIPES` from ``(OptimizerConfig, schedule)`` to an optax transform: adamw
(optax) and the memjax recipes galore, fira, apollo, apollo_mini, frugal and q_galore with their
authors' parameter names. Plug in another by adding a function here and its config class to
:mod:`experiments.recipes`. ``mezo`` is zeroth order (:func:`mezo`,
:func:`mezo_shared_seed`): no gradient, so no clipping; it skips non-finite steps itself.

Parameters of the decoder LM carry a leading ``"layers"`` axis on the stacked blocks; the recipes'
default labels (:func:`memjax.optim.label_matrices`) read each block's matrix as its own ``(d, f)``
matrix (leading axes are batch axes); the embedding, the head and the norms keep the full inner
optimizer. FRUGAL's ``subspace="block"`` treats each stacked leaf (one projection of every layer,
e.g. all ``mlp.up`` kernels) as one block.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import optax

import memjax
from .config import OptimizerConfig, ScheduleConfig

Recipe = Callable[[OptimizerConfig, optax.Schedule], optax.GradientTransformation]


def warmup_cosine(peak: float, cfg: ScheduleConfig) -> optax.Schedule:
    """Linear warmup from 0 over ``warmup_fraction`` of the steps, cosine to ``final_lr_fraction``."""
    warmup = int(cfg.warmup_fraction * cfg.steps)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=peak, warmup_steps=warmup,
        decay_steps=max(cfg.steps, warmup + 1), end_value=peak * cfg.final_lr_fraction)


def adam_8bit(cfg: OptimizerConfig) -> optax.GradientTransformation:
    """Adam with blockwise 8-bit moments (``adam_bits=8``)."""
    return memjax.optim.scale_by_adam_8bit(cfg.b1, cfg.b2, cfg.eps, cfg.block_size,
                                           min_8bit_size=cfg.min_8bit_size)


def adamw(cfg: OptimizerConfig, lr: optax.Schedule) -> optax.GradientTransformation:
    if cfg.adam_bits == 8:  # optax.adamw with the moments in 8 bits
        return optax.chain(adam_8bit(cfg), optax.add_decayed_weights(cfg.weight_decay),
                           optax.scale_by_learning_rate(lr))
    return optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay)


def _adam(cfg: OptimizerConfig) -> dict:
    return {"b1": cfg.b1, "b2": cfg.b2, "eps": cfg.eps, "weight_decay": cfg.weight_decay}


def _low_rank(cfg: OptimizerConfig, rank: int) -> dict:
    """Arguments shared by the projected recipes (the step skip is :func:`build`'s). The default
    labels project every attention and MLP matrix of the stacked blocks; ``adam_bits=8`` replaces
    the inner Adam with 8-bit moments."""
    inner = {"inner": adam_8bit(cfg)} if getattr(cfg, "adam_bits", 32) == 8 else {}
    return dict(rank=rank, update_proj_gap=cfg.update_proj_gap, scale=cfg.scale,
                proj_type=cfg.proj_type, refresh=cfg.refresh, skip_nonfinite=False,
                **inner, **_adam(cfg))


def galore(cfg: OptimizerConfig, lr: optax.Schedule) -> optax.GradientTransformation:
    return memjax.optim.galore(lr, projector=cfg.projector,
                               reset_inner_on_refresh=cfg.reset_inner_on_refresh,
                               **_low_rank(cfg, cfg.rank))


def fira(cfg: OptimizerConfig, lr: optax.Schedule) -> optax.GradientTransformation:
    return memjax.optim.fira(lr, projector=cfg.projector, gamma=cfg.gamma,
                             paper_form=cfg.paper_form, **_low_rank(cfg, cfg.rank))


def _apollo(cfg: OptimizerConfig) -> dict:
    return {"projector": cfg.projector, "scale_type": cfg.scale_type,
            "scale_front": cfg.scale_front, "limiter": cfg.limiter, "gamma": cfg.gamma}


def apollo(cfg: OptimizerConfig, lr: optax.Schedule) -> optax.GradientTransformation:
    return memjax.optim.apollo(lr, **_apollo(cfg), **_low_rank(cfg, cfg.rank))


def apollo_mini(cfg: OptimizerConfig, lr: optax.Schedule) -> optax.GradientTransformation:
    """APOLLO-Mini is rank 1 by definition: ``cfg.rank`` is not used."""
    return memjax.optim.apollo_mini(lr, **_apollo(cfg), **_low_rank(cfg, 1))


def frugal(cfg: OptimizerConfig, lr: optax.Schedule) -> optax.GradientTransformation:
    """Every stacked matrix is state-full in part (``density``): labels of rank 1."""
    return memjax.optim.frugal(
        lr, density=cfg.density, subspace=cfg.subspace, order=cfg.order,
        state_free=cfg.state_free, state_free_lr=cfg.state_free_lr,
        update_proj_gap=cfg.update_proj_gap, reset_state_on_refresh=cfg.reset_state_on_refresh,
        skip_nonfinite=False, **_adam(cfg))


def q_galore(cfg: OptimizerConfig, lr: optax.Schedule) -> optax.GradientTransformation:
    return memjax.optim.q_galore(
        lr, proj_bits=cfg.proj_bits, proj_group_size=cfg.proj_group_size,
        queue_size=cfg.queue_size, cos_threshold=cfg.cos_threshold, gamma_proj=cfg.gamma_proj,
        block_size=cfg.block_size, lazy=cfg.lazy, min_8bit_size=cfg.min_8bit_size,
        **_low_rank(cfg, cfg.rank))


RECIPES: dict[str, Recipe] = {
    "adamw": adamw, "galore": galore, "fira": fira, "apollo": apollo, "apollo_mini": apollo_mini,
    "frugal": frugal, "q_galore": q_galore}


def stacked_layer_axes(path: str, leaf) -> int:
    """Zeroth-order noise keys: the decoder's stacked blocks have one leading layer axis."""
    del leaf
    return 1 if path.startswith("blocks/") else 0


def mezo(cfg: OptimizerConfig, lr: optax.Schedule,
         chunk: int = memjax.optim.zeroth_order.CHUNK) -> memjax.optim.ZerothOrderTransformation:
    """MeZO with the perturbation applied inside the model's scan body (``at_use``).

    Not an optax transform: the trainer runs ``tx.step(loss, ...)``, forward passes only. Gradient
    clipping and the non-finite guard do not apply (a step with a non-finite loss is skipped by
    :func:`memjax.optim.mezo` itself). ``chunk`` is 0 on an FSDP mesh (sharded parameters).
    """
    return memjax.optim.mezo(lr, eps=cfg.zo_eps, n=cfg.zo_samples, weight_decay=cfg.weight_decay,
                             stacked_axes=stacked_layer_axes, at_use=True, chunk=chunk)


class SharedSeedMezo(NamedTuple):
    """MeZO over the data axis (``zo_shared_seed``): the trainer calls ``make(loss_fn, mesh)``,
    which returns a :class:`memjax.optim.shared_seed.SharedSeedZO`."""

    make: Callable[..., Any]


def mezo_shared_seed(cfg: OptimizerConfig, lr: optax.Schedule) -> SharedSeedMezo:
    """:func:`memjax.optim.mezo_shared_seed` with the perturbation applied inside the scan body;
    batches are ``(accumulation, batch, length)``, split over workers on axis 1."""
    return SharedSeedMezo(lambda loss_fn, mesh: memjax.optim.mezo_shared_seed(
        loss_fn, mesh, lr, eps=cfg.zo_eps, n=cfg.zo_samples, weight_decay=cfg.weight_decay,
        stacked_axes=stacked_layer_axes, at_use=True, batch_axis=1))


def step_kind(cfg: OptimizerConfig) -> str:
    """The kind of training step ``cfg`` takes (one of :data:`experiments.trainer.STEP_KINDS`)."""
    if cfg.name == "mezo":
        return "shared_seed" if cfg.zo_shared_seed else "zeroth_order"
    return "layerwise" if cfg.layerwise else "gradient"


def build(cfg: OptimizerConfig, schedule: ScheduleConfig,
          fsdp: int = 1) -> tuple[Any, optax.Schedule]:
    """The full optimizer of ``cfg`` and its learning-rate schedule (for logging).

    An optax transform (``skip_nonfinite(chain(clip, recipe))``); with ``layerwise`` the bare
    recipe (the layerwise step clips exactly and skips non-finite steps itself); for ``mezo`` a
    :class:`memjax.optim.ZerothOrderTransformation` (a :class:`SharedSeedMezo` with
    ``zo_shared_seed``). ``fsdp``: size of the mesh's fsdp axis (MeZO draws its noise unchunked
    when the parameters are sharded).
    """
    lr = warmup_cosine(cfg.learning_rate, schedule)
    if getattr(cfg, "layerwise", False):
        return RECIPES[cfg.name](cfg, lr), lr
    if cfg.name == "mezo" and cfg.zo_shared_seed:
        return mezo_shared_seed(cfg, lr), lr
    if cfg.name == "mezo":
        return mezo(cfg, lr, 0 if fsdp > 1 else memjax.optim.zeroth_order.CHUNK), lr
    parts = [memjax.optim.clip_by_global_norm(schedule.clip_norm)] if schedule.clip_norm > 0 else []
    parts.append(RECIPES[cfg.name](cfg, lr))
    return memjax.optim.skip_nonfinite(optax.chain(*parts)), lr
