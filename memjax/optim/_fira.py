"""Fira (Chen et al., arXiv 2410.01623): GaLore plus the scaled, norm-limited residual."""

from __future__ import annotations

from typing import Any

import optax

from memjax.optim import labels as labels_lib
from memjax.optim import recipe
from memjax.optim import residual as residual_lib
from memjax.optim.low_rank import scale_by_low_rank


def fira(
    learning_rate: optax.ScalarOrSchedule,
    rank: int = 128,
    update_proj_gap: int = 200,
    scale: float = 0.25,
    proj_type: str = "std",
    projector: str = "svd",
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    gamma: float = 1.01,
    labels: labels_lib.Labels = None,
    refresh: str = "synchronous",
    *,
    paper_form: bool = False,
    inner: optax.GradientTransformation | None = None,
    weight_decay_mask: Any = None,
    seed: int = 0,
    skip_nonfinite: bool = True,
) -> optax.GradientTransformationExtraArgs:
    r"""Fira: GaLore plus the norm-scaled, norm-limited residual outside the subspace.

    For a matrix leaf (``"std"`` side, ``m >= n``) with :math:`P` the GaLore SVD projector,
    :math:`R = G P^T`, :math:`O = M / (\sqrt V + \epsilon)` Adam on ``R`` and the channel factor
    :math:`\phi_i = \lVert O_{i,:}\rVert / (\lVert R_{i,:}\rVert + 10^{-8})`:

    .. math::
      S = \mathrm{limit}_\gamma\big((G - \alpha R P) \odot \phi\big), \qquad
      W \leftarrow W - \eta_t\, \frac{\sqrt{1-b_2^t}}{1-b_1^t}\, (\alpha\, O P + S), \qquad
      W \leftarrow W - \eta_t \lambda W

    ``limit`` is the norm-growth limiter (:mod:`memjax.optim.limiter`). Other leaves get the same
    Adam step. Everything else as :func:`galore` (side rules, labels, refresh).

    Args:
      learning_rate: ``lr`` or an optax schedule.
      rank, update_proj_gap, scale, proj_type, projector: as :func:`galore` (``scale`` = the
        authors' ``alpha``; published 1B setting: rank 512, scale 0.0625).
      b1, b2, eps: Adam hyperparameters (code default eps 1e-6).
      weight_decay: decoupled weight decay, applied after the step.
      gamma: norm-growth limiter threshold.
      labels, refresh: as :func:`galore`.
      paper_form: residual ``G - up(R)`` (paper) instead of ``G - scale * up(R)`` (code).
      inner: replaces the inner Adam; its output is used as ``O`` (then no bias correction is
        applied after the residual: pass an optimizer whose output already includes it).
      weight_decay_mask, seed, skip_nonfinite: as :func:`galore`.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Example:
      >>> import jax.numpy as jnp, memjax
      >>> params = {"w": jnp.ones((64, 32))}
      >>> tx = memjax.optim.fira(1e-2, rank=8)
      >>> updates, state = tx.update(params, tx.init(params), params)
      >>> updates["w"].shape
      (64, 32)

    References:
      Chen et al., "Fira: Can We Achieve Full-rank Training of LLMs Under Low-rank Constraint?",
      arXiv 2410.01623 (2024).
    """
    inner, after = recipe.adam_direction(b1, b2, eps, inner)
    core = scale_by_low_rank(
        rank, update_proj_gap, inner=inner,
        residual=residual_lib.fira(scale, gamma, paper_form=paper_form),
        proj_type=proj_type, projector=projector, labels=labels, refresh=refresh, seed=seed)
    return recipe.finish(recipe.then(core, after), learning_rate, weight_decay,
                         weight_decay_mask, skip_nonfinite)
