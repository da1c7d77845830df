r"""Residual policies: how a low-rank step becomes a full-size update.

Given the full gradient ``G`` (``m x n``), its projection ``R = down(G)``, the inner optimizer's
output ``O = inner(R)`` and the projector's ``up``, a policy returns the full update ``U`` and
its own (small) state. The projected transform (:mod:`memjax.optim.low_rank`) calls the policy
once per matrix, so every recipe shares one projection code path:

* :func:`drop` (GaLore): ``U = scale * up(O)``; the part of ``G`` outside the subspace is dropped.
* :func:`fira` (Fira): ``U = scale * up(O) + limit((G - scale * up(R)) * phi)``, the residual
  rescaled column-wise by how much the inner optimizer rescales the subspace.
* :func:`apollo` (APOLLO / APOLLO-Mini): ``U = limit(G * s) * sqrt(scale)``, the *raw* gradient
  rescaled channel- or tensor-wise; ``up`` is never called.
* :func:`state_free` (FRUGAL): ``U = up(O) + lr_ratio * f(G - up(R))`` with ``f = sign`` (signSGD)
  or the identity (SGD) on the state-free residual.

``limit`` is Fira's norm-growth limiter (:mod:`memjax.optim.limiter`, one float32 scalar of state
per matrix). Policies are pure functions of one matrix; batched leaves (stacked layers) are
vmapped by the caller.

The scaling factors of Fira and APOLLO are ratios of norms of ``O`` and ``R``. The authors compute
them from ``O = M / (sqrt(V) + eps)`` *without* Adam's bias correction (which their code folds into
the step size afterwards); the :func:`memjax.optim.fira` and :func:`memjax.optim.apollo` recipes
arrange exactly that, so the limiter sees the same sequence of norms as the authors' code.

References:
  Zhao et al., "GaLore", arXiv 2403.03507 (2024), Algorithm 2.
  Chen et al., "Fira", arXiv 2410.01623 (2024).
  Zhu et al., "APOLLO", arXiv 2412.05270 (2024).
  Zmushko et al., "FRUGAL: Memory-Efficient Optimization by Reducing State Overhead for Scalable
  Training", arXiv 2411.07837 (2024).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from memjax.optim import limiter as limiter_lib

RState = Any

NORM_EPS = 1e-8
"""Added to ``||R||`` in the scaling factors of Fira and APOLLO (authors' code)."""

SCALE_TYPES = ("channel", "tensor")
STATE_FREE_MODES = ("sign", "sgd")


class BackProjection(NamedTuple):
    """The ``up`` handed to :attr:`ResidualPolicy.apply`: callable, plus what it may assume.

    Attributes:
      fn: ``low -> (m, n)``.
      orthonormal: ``fn`` is an isometry and the adjoint of the ``down`` that produced ``R``
        (:attr:`memjax.optim.Projector.orthonormal`). Plain callables count as ``False``.
    """

    fn: Callable[[jax.Array], jax.Array]
    orthonormal: bool = False

    def __call__(self, low: jax.Array) -> jax.Array:
        return self.fn(low)


class ResidualPolicy(NamedTuple):
    """A residual policy.

    Attributes:
      init: ``(matrix_shape (m, n), dtype) -> RState``.
      apply: ``(G, R, O, up, RState) -> (U, RState)`` with ``up`` mapping a low-rank matrix back
        to ``(m, n)`` (:func:`memjax.optim.scale_by_low_rank` passes a :class:`BackProjection`,
        which also says whether ``up`` is orthonormal); ``U`` has ``G``'s shape.
    """

    init: Callable[[tuple[int, int], Any], RState]
    apply: Callable[..., tuple[jax.Array, RState]]


def _no_state(shape, dtype):
    del shape, dtype
    return optax.MaskedNode()


def _limiter_state(shape, dtype):
    del shape, dtype
    return limiter_lib.init_norm_growth()


def _norm(x, axis=None):
    x = x.astype(jnp.float32)
    return jnp.sqrt(jnp.sum(x * x, axis=axis, keepdims=axis is not None))


def _scaled_norm(g32: jax.Array, s: jax.Array) -> jax.Array:
    """``||G * s||`` for a scalar or a ``(1, n)`` / ``(m, 1)`` factor ``s``, without forming it."""
    if s.ndim == 0:
        return _norm(g32) * s
    axis = 0 if s.shape[0] == 1 else 1  # reduce over the axis s is broadcast along
    return _norm(_norm(g32, axis) * s)


def _along_kept_dim(phi: jax.Array, low_shape, shape) -> bool:
    """Whether the channel factor ``phi`` varies along the dimension the projection keeps.

    The kept dimension has the same size in ``R`` and ``G``, the projected one differs; when
    ``R`` has ``G``'s shape the two cannot be told apart.
    """
    varies = 1 if phi.shape[0] == 1 else 0
    return low_shape[varies] == shape[varies] and low_shape[1 - varies] != shape[1 - varies]


def channel_scaling(low_update: jax.Array, low_grad: jax.Array,
                    shape: tuple[int, int]) -> jax.Array:
    r"""Fira/APOLLO channel-wise factor ``||O|| / (||R|| + 1e-8)`` broadcastable to ``shape``.

    The authors reduce the ``(rows, cols)`` low-rank matrices along dim 0 if ``rows < cols``,
    else along dim 1, and broadcast the result over ``G``: for the GaLore ``"std"`` side this is
    the non-projected dimension (one factor per row of ``G`` when projecting on the right, per
    column when projecting on the left). Where the authors' choice would not broadcast against
    ``G`` (non-``"std"`` sides), the non-projected dimension is used.

    Args:
      low_update: ``O`` (``rows x cols``).
      low_grad: ``R``, same shape.
      shape: ``(m, n)`` of ``G``.

    Returns:
      float32 ``(1, cols)`` or ``(rows, 1)``.
    """
    rows, cols = low_grad.shape
    m, n = shape
    axis = 0 if rows < cols else 1
    if axis == 0 and cols != n:
        axis = 1
    elif axis == 1 and rows != m:
        axis = 0
    return _norm(low_update, axis) / (_norm(low_grad, axis) + NORM_EPS)


def tensor_scaling(low_update: jax.Array, low_grad: jax.Array) -> jax.Array:
    """APOLLO-Mini's tensor-wise factor ``||O|| / (||R|| + 1e-8)`` (a float32 scalar)."""
    return _norm(low_update) / (_norm(low_grad) + NORM_EPS)


def drop(scale: float = 1.0) -> ResidualPolicy:
    r"""GaLore: keep only the subspace, ``U = scale * up(inner(down(G)))``.

    Args:
      scale: the GaLore ``scale`` (alpha) applied to the back-projected update.
    """

    def apply(g, low_grad, low_update, up, state):
        del g, low_grad
        return scale * up(low_update), state

    return ResidualPolicy(_no_state, apply)


def fira(scale: float = 1.0, gamma: float = 1.01, paper_form: bool = False) -> ResidualPolicy:
    r"""Fira: the residual outside the subspace, rescaled like the subspace and norm-limited.

    With :math:`\psi(R) = O` the inner optimizer's output and the channel factor
    :math:`\phi = \lVert O \rVert / (\lVert R \rVert + 10^{-8})` (see :func:`channel_scaling`):

    .. math::
      S = (G - \alpha\, \mathrm{up}(R)) \odot \phi, \qquad
      S \leftarrow \mathrm{limit}_\gamma(S), \qquad U = \alpha\, \mathrm{up}(O) + S

    The authors' code subtracts the *scaled* back-projection ``alpha * up(R)`` (the default);
    ``paper_form=True`` uses the paper's ``G - up(R)``.

    ``phi`` scales the dimension the projection keeps, so it commutes with ``up`` and the update
    takes one back-projection,
    :math:`U = G \odot \phi / \ell + \mathrm{up}(\alpha O - c\, R \odot \phi / \ell)`
    (``c`` the coefficient of ``up(R)`` in ``S``); the limiter's norm takes a second one, unless
    ``up`` is an orthonormal projector's (:class:`BackProjection` ``orthonormal``): then it is
    :math:`\lVert S \rVert^2 = \lVert G \odot \phi \rVert^2 - (2c - c^2) \lVert R \odot \phi \rVert^2`,
    so no ``m x n`` residual is formed at all.

    Args:
      scale: the GaLore/Fira ``scale`` (alpha).
      gamma: norm-growth limiter threshold (>= 1).
      paper_form: residual ``G - up(R)`` instead of the code's ``G - scale * up(R)``.

    Returns:
      A :class:`ResidualPolicy` with one float32 scalar of state per matrix.
    """
    limiter_lib._check_gamma(gamma)

    coef = 1.0 if paper_form else scale

    def apply(g, low_grad, low_update, up, state):
        phi = channel_scaling(low_update, low_grad, g.shape)
        g32 = g.astype(jnp.float32)
        if not _along_kept_dim(phi, low_grad.shape, g.shape):
            # Degenerate rank (low-rank side as large as G, e.g. a square matrix at full rank):
            # the projected dimension cannot be told from the shapes; use the definition.
            back = up(low_grad).astype(jnp.float32)
            s_t, state = limiter_lib.limit_norm_growth((g32 - coef * back) * phi, state, gamma)
            return scale * up(low_update).astype(jnp.float32) + s_t, state
        # phi scales the dimension the projection keeps, so it commutes with up:
        # S = G phi - coef up(R phi) and U = G (phi / l) + up(scale O - (coef / l) R phi).
        r_phi = low_grad.astype(jnp.float32) * phi
        if getattr(up, "orthonormal", False):
            # up is an isometry and the adjoint of down (R = down(G)), hence
            # ||S||^2 = ||G phi||^2 - (2 coef - coef^2) ||R phi||^2: no m x n residual is formed.
            sq = (_scaled_norm(g32, phi) ** 2
                  - (2.0 * coef - coef * coef) * jnp.sum(r_phi * r_phi))
            norm = jnp.sqrt(jnp.maximum(sq, 0.0))
        else:
            norm = _norm(g32 * phi - coef * up(r_phi.astype(low_grad.dtype)).astype(jnp.float32))
        limit, state = limiter_lib.norm_growth_factor(norm, state, gamma)
        low = scale * low_update.astype(jnp.float32) - (coef / limit) * r_phi
        full = up(low.astype(low_update.dtype)).astype(jnp.float32)
        return g32 * (phi / limit) + full, state

    return ResidualPolicy(_limiter_state, apply)


def apollo(scale: float = 1.0, scale_type: str = "channel", limiter: bool = True,
           gamma: float = 1.01, scale_front: bool = False) -> ResidualPolicy:
    r"""APOLLO: the raw gradient rescaled by the low-rank optimizer's scaling factor.

    .. math::
      s = \frac{\lVert O_j \rVert}{\lVert R_j \rVert + 10^{-8}} \text{ (channel } j\text{) or }
      \frac{\lVert O \rVert}{\lVert R \rVert + 10^{-8}} \text{ (tensor)}, \qquad
      U = \mathrm{limit}_\gamma(G \odot s) \cdot \sqrt{\alpha}

    As in the authors' code the factor ``sqrt(scale)`` multiplies the update *after* the limiter
    (``scale_front=False``, the default) or *before* it (``scale_front=True``, recommended by the
    authors for APOLLO-Mini's large ``scale``); only the stored norm differs, since the limiter is
    scale-equivariant. The update never uses ``up``: APOLLO needs no back-projection.

    Args:
      scale: APOLLO ``scale`` (alpha); the update is multiplied by ``sqrt(scale)``.
      scale_type: ``"channel"`` (APOLLO) or ``"tensor"`` (APOLLO-Mini).
      limiter: apply the norm-growth limiter (the authors' ``disable_nl=False``).
      gamma: norm-growth limiter threshold (>= 1).
      scale_front: apply ``sqrt(scale)`` before the limiter.

    Returns:
      A :class:`ResidualPolicy` (one float32 scalar of state per matrix if ``limiter``).
    """
    if scale_type not in SCALE_TYPES:
        raise ValueError(f"scale_type={scale_type!r} is unknown; choose one of {SCALE_TYPES}.")
    if isinstance(scale, (int, float)) and scale < 0:
        raise ValueError(f"scale={scale} must be >= 0 (the update is multiplied by sqrt(scale)).")
    limiter_lib._check_gamma(gamma)
    root = math.sqrt(scale) if isinstance(scale, (int, float)) else jnp.sqrt(scale)

    def apply(g, low_grad, low_update, up, state):
        del up
        g32 = g.astype(jnp.float32)
        if scale_type == "channel":
            s = channel_scaling(low_update, low_grad, g.shape)
        else:
            s = tensor_scaling(low_update, low_grad)
        factor = root if scale_front else 1.0
        if limiter:
            # ||G * s|| from the channel norms of G (or ||G||), so G * s is never formed: the
            # update below stays one broadcast multiply that fuses into the parameter update.
            norm = _scaled_norm(g32, s) * factor
            limit, state = limiter_lib.norm_growth_factor(norm, state, gamma)
            factor = factor / limit
        if not scale_front:
            factor = factor * root
        return g32 * (s * factor), state

    return ResidualPolicy(_limiter_state if limiter else _no_state, apply)


def state_free(mode: str = "sign", lr_ratio: float = 1.0) -> ResidualPolicy:
    r"""FRUGAL: a state-free update of the residual outside the state-full subspace.

    .. math::
      U = \mathrm{up}(O) + \rho\, f(G - \mathrm{up}(R)), \qquad
      f = \mathrm{sign} \text{ (signSGD) or } f = \mathrm{id} \text{ (SGD)}

    The outer learning rate ``lr_t`` multiplies the whole ``U``, so the state-free part moves with
    step size ``rho * lr_t``: ``rho`` (``lr_ratio``) is the FRUGAL authors' ``inactive_lr_scale``,
    a ratio to the main learning rate that follows its schedule.

    Args:
      mode: ``"sign"`` (signSGD, FRUGAL's default) or ``"sgd"``.
      lr_ratio: state-free learning rate as a multiple of the main one (>= 0).

    Returns:
      A stateless :class:`ResidualPolicy`.
    """
    if mode not in STATE_FREE_MODES:
        raise ValueError(f"mode={mode!r} is unknown; choose one of {STATE_FREE_MODES}.")
    if isinstance(lr_ratio, (int, float)) and lr_ratio < 0:
        raise ValueError(f"lr_ratio={lr_ratio} must be >= 0.")

    def apply(g, low_grad, low_update, up, state):
        resid = g.astype(jnp.float32) - up(low_grad).astype(jnp.float32)
        free = jnp.sign(resid) if mode == "sign" else resid
        return up(low_update).astype(jnp.float32) + lr_ratio * free, state

    return ResidualPolicy(_no_state, apply)
