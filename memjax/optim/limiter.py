r"""Fira's norm-growth limiter: an update may not grow its norm by more than ``gamma`` per step.

For a sequence of updates :math:`S_t` of one matrix, with the stored (already limited) norm
:math:`n_{t-1}` of the previous step:

.. math::
  \ell_t = \max\!\Big(\frac{\lVert S_t\rVert}{n_{t-1} + 10^{-8}},\ \gamma\Big) \Big/ \gamma,
  \qquad S_t \leftarrow S_t / \ell_t, \qquad n_t = \lVert S_t \rVert / \ell_t

so :math:`\lVert S_t\rVert \le \gamma\,(n_{t-1} + 10^{-8})`: if the norm ratio exceeds ``gamma``
the update is rescaled to norm ``gamma * n_{t-1}`` (the ``1e-8`` guards a zero previous norm, as
in the authors' code), otherwise it is unchanged. The first step is never limited; it only
records its norm. The state is one float32 scalar per matrix; a negative value means "no
previous step".

Fira applies the limiter to its scaled residual, APOLLO to its scaled raw gradient; both use
this module (:func:`limit_norm_growth`); :func:`scale_by_norm_growth_limit` is the same limiter
as a standalone optax transform applied to every leaf.

References:
  Chen et al., "Fira: Can We Achieve Full-rank Training of LLMs Under Low-rank Constraint?",
  arXiv 2410.01623 (2024), Sec. 4.3 (norm-growth limiter).
  Zhu et al., "APOLLO: SGD-like Memory, AdamW-level Performance", arXiv 2412.05270 (2024).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

LIMITER_EPS = 1e-8
"""Added to the previous norm in the ratio (authors' code)."""


class NormGrowthState(NamedTuple):
    """Per-matrix state of the limiter.

    Attributes:
      norm: float32 scalar, the limited norm of the previous update; ``-1`` before the first step.
    """

    norm: jax.Array


def init_norm_growth() -> NormGrowthState:
    """The state before the first step (no previous norm: the first step is not limited)."""
    return NormGrowthState(jnp.full([], -1.0, jnp.float32))


def _check_gamma(gamma) -> None:
    if isinstance(gamma, (int, float)) and not gamma >= 1.0:
        raise ValueError(f"gamma={gamma} must be >= 1 (the allowed norm growth per step).")


def limit_norm_growth(update: jax.Array, state: NormGrowthState,
                      gamma: float = 1.01) -> tuple[jax.Array, NormGrowthState]:
    r"""Rescales ``update`` so that its norm grows by at most ``gamma`` over the previous step.

    Args:
      update: one matrix (any shape); its Frobenius norm is limited.
      state: the :class:`NormGrowthState` of this matrix.
      gamma: the largest allowed ratio ``||S_t|| / ||S_{t-1}||`` (Fira: 1.01).

    Returns:
      ``(limited update, new state)``; the update keeps its dtype, the norm is computed in float32.

    Example:
      >>> import jax.numpy as jnp
      >>> from memjax.optim.limiter import init_norm_growth, limit_norm_growth
      >>> s = init_norm_growth()
      >>> u, s = limit_norm_growth(jnp.ones(4), s)          # first step: unchanged, norm 2
      >>> u, s = limit_norm_growth(10 * jnp.ones(4), s)     # norm 20 -> 2 * 1.01
      >>> round(float(jnp.linalg.norm(u)), 4)
      2.02
    """
    norm = jnp.sqrt(jnp.sum(jnp.square(update.astype(jnp.float32))))
    factor, state = norm_growth_factor(norm, state, gamma)
    limited = (update.astype(jnp.float32) / factor).astype(update.dtype)
    return limited, state


def norm_growth_factor(norm: jax.Array, state: NormGrowthState,
                       gamma: float = 1.01) -> tuple[jax.Array, NormGrowthState]:
    r"""The limiter's divisor :math:`\ell_t` for an update whose norm is already known.

    :func:`limit_norm_growth` is ``update / factor`` with ``factor`` from here. Callers that can
    compute :math:`\lVert S_t \rVert` without forming ``S_t`` (APOLLO:
    :math:`\lVert G \odot s \rVert` from the channel norms of ``G``) use this directly, so the
    scaled update is never materialized and fuses into the parameter update.

    Args:
      norm: float32 scalar, :math:`\lVert S_t \rVert`.
      state: the :class:`NormGrowthState` of this matrix.
      gamma: the largest allowed norm growth per step.

    Returns:
      ``(factor, new state)``: divide the update by ``factor`` (float32 scalar, ``>= 1``).
    """
    norm = jnp.asarray(norm, jnp.float32)
    prev = state.norm
    first = prev < 0
    ratio = norm / (jnp.maximum(prev, 0.0) + LIMITER_EPS)
    factor = jnp.where(first, 1.0, jnp.maximum(ratio, gamma) / gamma)
    return factor, NormGrowthState((norm / factor).astype(jnp.float32))


class ScaleByNormGrowthLimitState(NamedTuple):
    """State of :func:`scale_by_norm_growth_limit`: one :class:`NormGrowthState` per leaf."""

    norms: optax.Updates


def scale_by_norm_growth_limit(gamma: float = 1.01) -> optax.GradientTransformation:
    """The norm-growth limiter on every leaf of the updates (each leaf is one "matrix").

    Args:
      gamma: the largest allowed norm growth per step (>= 1).

    Returns:
      An ``optax.GradientTransformation``.
    """
    _check_gamma(gamma)

    def init_fn(params):
        return ScaleByNormGrowthLimitState(jax.tree.map(lambda _: init_norm_growth().norm, params))

    def update_fn(updates, state, params=None):
        del params
        leaves, treedef = jax.tree.flatten(updates)
        norms = treedef.flatten_up_to(state.norms)
        out = [limit_norm_growth(u, NormGrowthState(n), gamma) for u, n in zip(leaves, norms)]
        return (treedef.unflatten([u for u, _ in out]),
                ScaleByNormGrowthLimitState(treedef.unflatten([s.norm for _, s in out])))

    return optax.GradientTransformation(init_fn, update_fn)
