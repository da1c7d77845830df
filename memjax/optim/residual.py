"""Residual policies: how a low-rank step becomes a full-size update.

Given the full gradient ``G`` (``m x n``), its projection ``R = down(G)``, the inner optimizer's
output ``O = inner(R)`` and the projector's ``up``, a policy returns the full update ``U`` and
its own (small) state. The projected transform (:mod:`memjax.optim.low_rank`) calls the policy
once per matrix, so every recipe shares one projection code path:

* :func:`drop` (GaLore): ``U = scale * up(O)``; the part of ``G`` outside the subspace is dropped.

Policies are pure functions of one matrix; batched leaves (stacked layers) are vmapped by the
caller.

Reference: Zhao et al., "GaLore", arXiv 2403.03507 (2024), Algorithm 2.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import optax

RState = Any


class ResidualPolicy(NamedTuple):
    """A residual policy.

    Attributes:
      init: ``(matrix_shape (m, n), dtype) -> RState``.
      apply: ``(G, R, O, up, RState) -> (U, RState)`` with ``up`` mapping a low-rank matrix back
        to ``(m, n)``; ``U`` has ``G``'s shape.
    """

    init: Callable[[tuple[int, int], Any], RState]
    apply: Callable[..., tuple[jax.Array, RState]]


def drop(scale: float = 1.0) -> ResidualPolicy:
    r"""GaLore: keep only the subspace, ``U = scale * up(inner(down(G)))``.

    Args:
      scale: the GaLore ``scale`` (alpha) applied to the back-projected update.
    """

    def init(shape, dtype):
        del shape, dtype
        return optax.MaskedNode()

    def apply(g, low_grad, low_update, up, state):
        del g, low_grad
        return scale * up(low_update), state

    return ResidualPolicy(init, apply)
