"""Subspaces for low-rank gradient projection: small bundles of pure functions over one matrix.

A :class:`Projector` acts on one ``(m, n)`` gradient matrix ``G`` on a fixed *side*:

* ``"left"``:  ``P`` is ``(m, r)``, ``down(G) = P^T G`` is ``(r, n)``, ``up(L) = P L``;
* ``"right"``: ``P`` is ``(r, n)``, ``down(G) = G P^T`` is ``(m, r)``, ``up(L) = L P``.

What is stored between refreshes (the projector *state*) depends on the subspace:

============  =====================================================  ==========================
projector     refresh (every ``update_proj_gap`` steps)               state
============  =====================================================  ==========================
``"svd"``     thin SVD of ``G`` in float32, top-``r`` singular        ``P`` in the gradient dtype
              vectors with canonical signs (GaLore)
``"dct"``     ``S = G Q`` (or ``Q^T G``), ``Q`` the orthonormal       ``r`` int32 indices
              DCT-II basis (an FFT; ``Q`` is never built); keep
              the ``r`` columns of largest l1 norm
``"random"``  a fresh PRNG key; ``P = N(0, 1) / sqrt(r)`` regenerated  one raw PRNG key (uint32)
              from it on every use (APOLLO)
============  =====================================================  ==========================

FRUGAL's subspaces are factories with the same signature as :func:`make_projector` without the
name, passed as ``projector=`` to :func:`memjax.optim.scale_by_low_rank`:
:func:`orthogonal_projector` (an orthonormal random basis, one key stored) and
:func:`coordinate_projector` (``r`` random rows or columns, ``r`` int32 indices stored).

Singular vectors are defined up to sign and LAPACK, cuSOLVER and TPU SVDs choose differently.
Since the inner optimizer's moments survive a refresh, the sign changes the trajectory. memjax
makes the largest-magnitude entry of every singular vector positive, so runs agree across
backends.

References:
  Zhao et al., "GaLore", arXiv 2403.03507 (2024).
  Modoranu et al., "SVD-free low-rank adaptive gradient optimization", arXiv 2505.17967 (2025).
  Zhu et al., "APOLLO: SGD-like memory, AdamW-level performance", arXiv 2412.05270 (2024).
  Zmushko et al., "FRUGAL: Memory-Efficient Optimization by Reducing State Overhead for
  Scalable Training", arXiv 2411.07837 (2024).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import jax.scipy.fft  # the DCT refresh

from memjax.optim import _rng

PROJECTORS = ("svd", "dct", "random")
SIDES = ("left", "right")

PState = Any  # a small pytree of arrays


class Projector(NamedTuple):
    """Pure functions over one ``(m, n)`` matrix on a fixed side.

    Attributes:
      init: ``key -> PState``, a placeholder state with the final shapes and dtypes.
      refresh: ``(G (m, n), PState, key) -> PState``, a new subspace from the gradient.
      down: ``(G (m, n), PState) -> low`` with ``low`` ``(r, n)`` (left) or ``(m, r)`` (right).
      up: ``(low, PState) -> (m, n)``, back to the full space on the same side.
      low_shape: shape of ``down(G)``.
      orthonormal: ``P`` has orthonormal columns (left) / rows (right) in float32, so
        ``||up(L)|| = ||L||`` and ``up`` is the adjoint of ``down``; residual policies may then
        take norms in the low-rank space (:func:`memjax.optim.residual.fira`). ``False`` is
        always safe.
    """

    init: Callable[[jax.Array], PState]
    refresh: Callable[[jax.Array, PState, jax.Array], PState]
    down: Callable[[jax.Array, PState], jax.Array]
    up: Callable[[jax.Array, PState], jax.Array]
    low_shape: tuple[int, int]
    orthonormal: bool = False


def canonicalize_signs(vectors: jax.Array, axis: int) -> jax.Array:
    """Flips each vector so that its largest-magnitude entry is positive.

    Args:
      vectors: a matrix whose vectors run along ``axis`` (``axis=0``: columns of ``U``;
        ``axis=1``: rows of ``Vh``).
      axis: the axis along which each vector's entries lie.

    Returns:
      ``vectors`` with every vector multiplied by ``+1`` or ``-1``.
    """
    idx = jnp.argmax(jnp.abs(vectors), axis=axis, keepdims=True)
    pivot = jnp.take_along_axis(vectors, idx, axis=axis)
    return vectors * jnp.where(pivot < 0, -1.0, 1.0).astype(vectors.dtype)


def dct_basis(size: int, columns: jax.Array | None = None, dtype=jnp.float32) -> jax.Array:
    """Orthonormal DCT-II basis ``Q`` (``size x size``), or only the given columns of it.

    ``Q[i, j] = sqrt(2 / size) * c_j * cos(pi (2 i + 1) j / (2 size))`` with ``c_0 = 1/sqrt(2)``
    and ``c_j = 1`` otherwise, so ``Q^T Q = I``. Computed from ``iota`` in float32, so only the
    ``size x r`` slice that is used is ever built.

    Args:
      size: basis size ``k``.
      columns: optional int array ``(r,)`` of column indices; default all ``k`` columns.
      dtype: output dtype.

    Returns:
      ``(size, r)`` (or ``(size, size)``) array.
    """
    i = jnp.arange(size, dtype=jnp.float32)[:, None]
    j = jnp.arange(size, dtype=jnp.float32) if columns is None else columns.astype(jnp.float32)
    j = j[None, :]
    q = jnp.cos(jnp.pi * (2.0 * i + 1.0) * j / (2.0 * size)) * math.sqrt(2.0 / size)
    q = jnp.where(j == 0, q / math.sqrt(2.0), q)
    return q.astype(dtype)


def _exact(dtype) -> bool:
    """Orthonormal bases stay orthonormal to float32 rounding only in >= 32-bit dtypes."""
    return jnp.finfo(dtype).bits >= 32


def _matmul_down(g, p, side):
    return p.T @ g if side == "left" else g @ p.T


def _matmul_up(low, p, side):
    return p @ low if side == "left" else low @ p


def _svd(m: int, n: int, rank: int, side: str, dtype) -> Projector:
    p_shape = (m, rank) if side == "left" else (rank, n)

    def init(key):
        del key
        return jnp.zeros(p_shape, dtype)

    def refresh(g, p, key):
        del p, key
        u, _, vh = jnp.linalg.svd(g.astype(jnp.float32), full_matrices=False)
        if side == "left":
            new = canonicalize_signs(u[:, :rank], axis=0)
        else:
            new = canonicalize_signs(vh[:rank, :], axis=1)
        return new.astype(dtype)

    return Projector(init, refresh, lambda g, p: _matmul_down(g, p, side),
                     lambda low, p: _matmul_up(low, p, side), _low_shape(m, n, rank, side),
                     _exact(dtype))


def _dct(m: int, n: int, rank: int, side: str, dtype) -> Projector:
    size = m if side == "left" else n

    def init(key):
        del key
        return jnp.arange(rank, dtype=jnp.int32)

    def refresh(g, idx, key):
        del idx, key
        g32 = g.astype(jnp.float32)
        # Column scores: l1 norm of each column of S = G Q (right) or row of S = Q^T G (left).
        # S is the orthonormal DCT-II of G's rows (right) or columns (left): an FFT, O(mn log k)
        # instead of the O(mnk) matmul with the k x k basis, which is never built.
        axis = 0 if side == "left" else 1
        s = jax.scipy.fft.dct(g32, type=2, norm="ortho", axis=axis)
        scores = jnp.sum(jnp.abs(s), axis=1 - axis)
        return jax.lax.top_k(scores, rank)[1].astype(jnp.int32)

    def basis(idx):
        q = dct_basis(size, idx, dtype)  # (size, r)
        return q if side == "left" else q.T  # left: (m, r); right: (r, n)

    return Projector(init, refresh, lambda g, idx: _matmul_down(g, basis(idx), side),
                     lambda low, idx: _matmul_up(low, basis(idx), side),
                     _low_shape(m, n, rank, side), _exact(dtype))


def _random(m: int, n: int, rank: int, side: str, dtype) -> Projector:
    p_shape = (m, rank) if side == "left" else (rank, n)

    def init(key):
        return jax.random.key_data(key)

    def refresh(g, key_data, key):
        del g, key_data
        return jax.random.key_data(key)

    def matrix(key_data):
        p = _rng.normal(key_data, p_shape) / math.sqrt(rank)  # = jax.random.normal, fused
        return p.astype(dtype)

    return Projector(init, refresh, lambda g, s: _matmul_down(g, matrix(s), side),
                     lambda low, s: _matmul_up(low, matrix(s), side),
                     _low_shape(m, n, rank, side))


def _low_shape(m, n, rank, side):
    return (rank, n) if side == "left" else (m, rank)


_FACTORIES = {"svd": _svd, "dct": _dct, "random": _random}


def make_projector(name: str, m: int, n: int, rank: int, side: str, dtype=jnp.float32) -> Projector:
    """Builds the :class:`Projector` of subspace ``name`` for an ``(m, n)`` matrix.

    Args:
      name: ``"svd"``, ``"dct"`` or ``"random"``.
      m, n: matrix shape.
      rank: subspace dimension ``r``, ``1 <= r <= (m if side == "left" else n)``.
      side: ``"left"`` or ``"right"``.
      dtype: dtype of the gradient (and of a stored float projector).

    Raises:
      ValueError: unknown ``name`` or ``side``, or a ``rank`` out of range.
    """
    if name not in _FACTORIES:
        raise ValueError(f"projector={name!r} is unknown; choose one of {PROJECTORS}.")
    if side not in SIDES:
        raise ValueError(f"side={side!r} is unknown; choose one of {SIDES}.")
    size = m if side == "left" else n
    if not 1 <= rank <= size:
        raise ValueError(
            f"rank={rank} must be in [1, {size}] for a {m}x{n} matrix projected on the {side}.")
    return _FACTORIES[name](m, n, rank, side, dtype)


def orthogonal_projector(m: int, n: int, rank: int, side: str, dtype=jnp.float32) -> Projector:
    r"""FRUGAL's random subspace: an orthonormal basis regenerated from a stored key.

    With ``k = m`` (left) or ``n`` (right) and ``Q`` the ``k x r`` factor of the QR decomposition
    of a standard Gaussian ``k x r`` matrix drawn from the key (orthonormal columns,
    :math:`Q^T Q = I_r`), ``P = Q`` (left, ``m x r``) or ``P = Q^T`` (right, ``r x n``), and

    .. math::
      \mathrm{down}(G) = P^T G \text{ or } G P^T, \qquad \mathrm{up}(L) = P L \text{ or } L P.

    Unlike the Gaussian ``"random"`` projector, ``up(down(G))`` is an orthogonal projection, so
    ``G - up(down(G))`` is its complement (FRUGAL's state-free part). Only the key is stored
    (two uint32); ``P`` is rebuilt (one ``k x r`` QR) on every use.

    Args:
      m, n: matrix shape.
      rank: subspace dimension ``r <= k``.
      side: ``"left"`` or ``"right"``.
      dtype: dtype of the gradient (``P`` is cast to it).

    Returns:
      A :class:`Projector` whose state is raw PRNG key data.
    """
    size = m if side == "left" else n

    def matrix(key_data):
        g = _rng.normal(key_data, (size, rank))  # = jax.random.normal, fused
        q = jnp.linalg.qr(g)[0].astype(dtype)  # (size, rank), orthonormal columns
        return q if side == "left" else q.T

    def refresh(g, key_data, key):
        del g, key_data
        return jax.random.key_data(key)

    return Projector(
        jax.random.key_data, refresh,
        lambda g, s: _matmul_down(g, matrix(s), side),
        lambda low, s: _matmul_up(low, matrix(s), side),
        _low_shape(m, n, rank, side), _exact(dtype))


def coordinate_projector(m: int, n: int, rank: int, side: str, dtype=jnp.float32) -> Projector:
    """FRUGAL's coordinate subspace: ``rank`` random rows (left) or columns (right).

    At every refresh ``rank`` distinct indices ``i_1 < ... < i_r`` of ``range(m)`` (left) or
    ``range(n)`` (right) are drawn uniformly from the key; ``down(G) = G[idx, :]`` (``r x n``) or
    ``G[:, idx]`` (``m x r``) gathers them and ``up`` scatters into zeros, so ``up(down(G))`` keeps
    the chosen rows / columns of ``G`` and zeroes the rest. The gradient is not used.

    Args:
      m, n: matrix shape.
      rank: number of rows / columns ``r <= k``.
      side: ``"left"`` (rows) or ``"right"`` (columns).
      dtype: unused (indices carry no dtype); kept for the factory signature.

    Returns:
      A :class:`Projector` whose state is ``r`` sorted int32 indices.
    """
    del dtype
    size = m if side == "left" else n

    def refresh(g, idx, key):
        del g, idx
        return jnp.sort(jax.random.permutation(key, size)[:rank]).astype(jnp.int32)

    def down(g, idx):
        return g[idx, :] if side == "left" else g[:, idx]

    def up(low, idx):
        full = jnp.zeros((m, n), low.dtype)
        return full.at[idx, :].set(low) if side == "left" else full.at[:, idx].set(low)

    return Projector(lambda key: jnp.arange(rank, dtype=jnp.int32), refresh, down, up,
                     _low_shape(m, n, rank, side), True)


PROJ_TYPES = ("std", "reverse_std", "left", "right", "min_state")


def side_for(proj_type: str, m: int, n: int) -> str:
    """The GaLore side rules that do not depend on state sizes.

    ``"std"`` (the authors' default): right if ``m >= n`` (moments ``m x r``, ``P`` ``r x n``),
    else left; ``"reverse_std"`` the opposite; ``"left"`` / ``"right"`` fixed.
    ``"min_state"`` is resolved by the transform, which knows the inner optimizer.
    """
    if proj_type == "std":
        return "right" if m >= n else "left"
    if proj_type == "reverse_std":
        return "left" if m >= n else "right"
    if proj_type in SIDES:
        return proj_type
    raise ValueError(f"proj_type={proj_type!r} is unknown; choose one of {PROJ_TYPES}.")
