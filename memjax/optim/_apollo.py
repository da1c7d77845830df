"""APOLLO and APOLLO-Mini (Zhu et al., arXiv 2412.05270): the gradient scaled by a low-rank Adam."""

from __future__ import annotations

import functools
from typing import Any

import optax

from memjax.optim import labels as labels_lib
from memjax.optim import recipe
from memjax.optim import residual as residual_lib
from memjax.optim.low_rank import scale_by_low_rank


def apollo(
    learning_rate: optax.ScalarOrSchedule,
    rank: int = 256,
    update_proj_gap: int = 200,
    scale: float = 1.0,
    proj_type: str = "std",
    projector: str = "random",
    scale_type: str = "channel",
    scale_front: bool = False,
    limiter: bool = True,
    gamma: float = 1.01,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    labels: labels_lib.Labels = None,
    refresh: str = "synchronous",
    *,
    inner: optax.GradientTransformation | None = None,
    weight_decay_mask: Any = None,
    seed: int = 0,
    skip_nonfinite: bool = True,
) -> optax.GradientTransformationExtraArgs:
    r"""APOLLO: the raw gradient scaled channel-wise by a random-projection Adam.

    For a matrix leaf (``"std"`` side, ``m >= n``) with :math:`P` Gaussian ``N(0, 1/r)``
    (``r x n``, regenerated from a new seed every ``T`` steps; only the seed is stored),
    :math:`R = G P^T`, :math:`O = M / (\sqrt V + \epsilon)` Adam on ``R``:

    .. math::
      s_i = \frac{\lVert O_{i,:}\rVert}{\lVert R_{i,:}\rVert + 10^{-8}}, \qquad
      W \leftarrow W - \eta_t\, \frac{\sqrt{1-b_2^t}}{1-b_1^t}\,
      \mathrm{limit}_\gamma(G \odot s)\, \sqrt{\alpha}, \qquad W \leftarrow W - \eta_t\lambda W

    (tensor-wise :math:`s = \lVert O\rVert / (\lVert R\rVert + 10^{-8})` with
    ``scale_type="tensor"``; ``sqrt(scale)`` before the limiter with ``scale_front=True``). Only
    ``R``'s moments (``m x r``), the seed and one limiter scalar are stored per matrix; the update
    needs no back-projection. Other leaves get the same Adam step.

    Args:
      learning_rate: ``lr`` or an optax schedule.
      rank: projection rank (authors: about a quarter of the hidden size).
      update_proj_gap: projector refresh period ``T``.
      scale: APOLLO ``scale``; the update is multiplied by ``sqrt(scale)``.
      proj_type: GaLore side rule (``"std"``).
      projector: ``"random"`` (APOLLO) or ``"svd"`` (the authors' SVD option), or ``"dct"`` /
        ``"power"``.
      scale_type: ``"channel"`` or ``"tensor"``.
      scale_front: multiply by ``sqrt(scale)`` before the limiter.
      limiter: use the norm-growth limiter (authors: ``disable_nl=False``).
      gamma: limiter threshold.
      b1, b2, eps, weight_decay, labels, refresh, inner, weight_decay_mask, seed,
        skip_nonfinite: as :func:`fira`.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Example:
      >>> import jax.numpy as jnp, memjax
      >>> params = {"w": jnp.ones((64, 32))}
      >>> tx = memjax.optim.apollo(1e-2, rank=8)
      >>> updates, state = tx.update(params, tx.init(params), params)
      >>> updates["w"].shape
      (64, 32)

    References:
      Zhu et al., "APOLLO: SGD-like Memory, AdamW-level Performance", arXiv 2412.05270 (2024).
    """
    inner, after = recipe.adam_direction(b1, b2, eps, inner)
    core = scale_by_low_rank(
        rank, update_proj_gap, inner=inner,
        residual=residual_lib.apollo(scale, scale_type, limiter=limiter, gamma=gamma,
                                     scale_front=scale_front),
        proj_type=proj_type, projector=projector, labels=labels, refresh=refresh, seed=seed)
    return recipe.finish(recipe.then(core, after), learning_rate, weight_decay,
                         weight_decay_mask, skip_nonfinite)



apollo_mini = functools.partial(apollo, rank=1, scale=128.0, scale_type="tensor")
apollo_mini.__name__ = apollo_mini.__qualname__ = "apollo_mini"
apollo_mini.__module__ = __name__
apollo_mini.__doc__ = r"""APOLLO-Mini: :func:`apollo` with a rank-1 random projection, tensor-wise scaling.

Per matrix only two ``m x 1`` moments, a seed and one limiter scalar are stored (SGD-like
memory); the defaults are the authors' (rank 1, ``scale_type="tensor"``, ``scale=128``).
``functools.partial(apollo, rank=1, scale=128.0, scale_type="tensor")``: every argument as
:func:`apollo` (pass them by keyword). Over INT8 weights (groups of 128, stochastic rounding:
:mod:`memjax.optim.quantized_weights`) this is Q-APOLLO-Mini.

Example:
  >>> import jax.numpy as jnp, optax, memjax
  >>> params = {"w": jnp.ones((64, 32))}
  >>> tx = memjax.optim.apollo_mini(1e-2)
  >>> optax.tree.get(tx.init(params), "mu")["w"].shape  # the moments, found by name
  (64, 1)

References:
  Zhu et al., "APOLLO: SGD-like Memory, AdamW-level Performance", arXiv 2412.05270 (2024).
"""
__test__ = {"apollo_mini": apollo_mini.__doc__}  # doctest does not look inside partials
