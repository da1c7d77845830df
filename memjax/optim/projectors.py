"""Subspaces for low-rank gradient projection: small bundles of pure functions over one matrix.

A :class:`Projector` acts on one ``(m, n)`` gradient matrix ``G`` on a fixed *side*, with a
basis ``B`` of ``r`` columns:

* ``"left"``:  ``B`` is ``(m, r)``, ``down(G) = B^T G`` is ``(r, n)``, ``up(L) = B L``;
* ``"right"``: ``B`` is ``(n, r)``, ``down(G) = G B`` is ``(m, r)``, ``up(L) = L B^T``.

Every subspace is written once, for the left side; the right side of ``G`` is the left side of
``G^T`` (:func:`oriented`).

What is stored between refreshes (the projector *state*) depends on the subspace:

============  =====================================================  ==========================
projector     refresh (every ``update_proj_gap`` steps)               state
============  =====================================================  ==========================
``"svd"``     thin SVD of ``G`` in float32, top-``r`` singular        ``P`` in the gradient dtype
              vectors with canonical signs (GaLore)
``"dct"``     ``S = G Q`` (or ``Q^T G``), ``Q`` the orthonormal       ``r`` int32 indices
              DCT-II basis (an FFT; ``Q`` is never built); keep
              the ``r`` columns of largest l1 norm
``"random"``  a fresh PRNG key; ``B = N(0, 1) / sqrt(r)`` regenerated  one raw PRNG key (uint32)
              from it on every use (APOLLO)
``"power"``   one block power step from the previous basis and a     ``B`` in the gradient dtype
              Rayleigh-Ritz step (:func:`power_projector`)
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

from memjax.optim import _checks, _rng

PROJECTORS = ("svd", "dct", "random", "power")
SIDES = ("left", "right")

PState = Any  # a small pytree of arrays

ProjectorFactory = Callable[[int, int, int, str, Any], "Projector"]
"""``(m, n, rank, side, dtype) -> Projector``: a subspace for one matrix on one side."""


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


# Every subspace below is written once, for the left side of an ``(m, n)`` matrix: a basis
# ``B`` (``m x r``), ``down(G) = B^T G`` (``r x n``), ``up(L) = B L``. The right side of an
# ``(m, n)`` matrix is the left side of its transpose (:func:`oriented`).


def _left(init, refresh, basis, m, n, rank, orthonormal) -> Projector:
    """A left projector whose ``down``/``up`` multiply by ``basis(state)`` (``m x r``)."""
    return Projector(init, refresh, lambda g, s: basis(s).T @ g, lambda low, s: basis(s) @ low,
                     (rank, n), orthonormal)


def _svd(m: int, n: int, rank: int, dtype) -> Projector:
    def refresh(g, p, key):
        del p, key
        u = jnp.linalg.svd(g.astype(jnp.float32), full_matrices=False)[0]
        return canonicalize_signs(u[:, :rank], axis=0).astype(dtype)

    return _left(lambda key: jnp.zeros((m, rank), dtype), refresh, lambda p: p, m, n, rank,
                 _exact(dtype))


def _dct(m: int, n: int, rank: int, dtype) -> Projector:
    def refresh(g, idx, key):
        del idx, key
        # Row scores of S = Q^T G: the l1 norm of each row of the orthonormal DCT-II of G's
        # columns, an FFT (O(mn log m) instead of the O(m^2 n) matmul with the m x m basis,
        # which is never built).
        s = jax.scipy.fft.dct(g.astype(jnp.float32), type=2, norm="ortho", axis=0)
        return jax.lax.top_k(jnp.sum(jnp.abs(s), axis=1), rank)[1].astype(jnp.int32)

    return _left(lambda key: jnp.arange(rank, dtype=jnp.int32), refresh,
                 lambda idx: dct_basis(m, idx, dtype), m, n, rank, _exact(dtype))


def _random(m: int, n: int, rank: int, dtype) -> Projector:
    def refresh(g, key_data, key):
        del g, key_data
        return jax.random.key_data(key)

    def basis(key_data):
        return (_rng.normal(key_data, (m, rank)) / math.sqrt(rank)).astype(dtype)  # fused

    return _left(jax.random.key_data, refresh, basis, m, n, rank, False)


POWER_ITERATIONS = 1
"""Block power iterations per warm-started refresh of the ``"power"`` projector."""
POWER_INIT_ITERATIONS = 8
"""Block power iterations of the ``"power"`` projector's first refresh (from a random start)."""
POWER_OVERSAMPLE = 0.5
"""Extra random columns of the ``"power"`` projector's iteration, as a fraction of the rank."""


def _oversampling(rank: int, oversample: float) -> int:
    return math.ceil(oversample * rank)


def power_projector(iterations: int = POWER_ITERATIONS,
                    init_iterations: int = POWER_INIT_ITERATIONS,
                    oversample: float = POWER_OVERSAMPLE):
    r"""The top-``r`` left singular subspace tracked by warm-started block power iteration.

    With ``B_0`` the stored basis (``m x r``, orthonormal columns), ``\Omega`` a fresh Gaussian
    ``m x p`` block (``p = ceil(oversample r)``, drawn from the refresh key) and
    ``\hat G = G / \|G\|_F``, one refresh runs ``q`` block power steps and a Rayleigh-Ritz
    step:

    .. math::
      Q_0 = [B_0, \Omega], \qquad Q_{i+1} = \mathrm{qr}(\hat G \hat G^T Q_i), \qquad
      B = \mathrm{signs}\big(Q_q W_{:, :r}\big), \quad
      (Q_q^T \hat G)(Q_q^T \hat G)^T = W \Lambda W^T

    (``W`` by decreasing eigenvalue; ``signs``: the largest-magnitude entry of every vector
    positive, as the ``"svd"`` projector). ``q = iterations`` from the previous basis, or
    ``q = init_iterations`` from a Gaussian ``Q_0`` the first time (the stored basis is still
    zero). Between GaLore refreshes the top subspace moves little, so one step recovers it at
    the cost of three ``m n (r + p)`` matmuls, an ``m (r + p)^2`` QR and an ``(r + p)``
    eigendecomposition, instead of a full SVD's ``O(m n min(m, n))``. The vectors come out
    ordered by singular value, like the SVD's, so the inner optimizer's moments keep their
    coordinates across refreshes. State: the basis, as ``"svd"``'s.

    Args:
      iterations: power steps per refresh after the first (>= 1).
      init_iterations: power steps of the first refresh (>= 1).
      oversample: extra random columns ``p`` as a fraction of the rank (>= 0; capped at
        ``m - r``).

    Returns:
      A factory ``(m, n, rank, side, dtype) -> Projector`` for ``projector=`` of
      :func:`memjax.optim.scale_by_low_rank` (``"power"`` is this factory with the defaults).

    Raises:
      TypeError: a non-int iteration count or a non-number ``oversample``.
      ValueError: an iteration count below 1 or a negative ``oversample``.

    Example:
      >>> import jax, jax.numpy as jnp, memjax
      >>> p = memjax.optim.make_projector("power", 32, 16, 4, "left")
      >>> g = jax.random.normal(jax.random.key(0), (32, 16))
      >>> basis = p.refresh(g, p.init(jax.random.key(1)), jax.random.key(2))
      >>> basis.shape, bool(jnp.allclose(basis.T @ basis, jnp.eye(4), atol=1e-5))
      ((32, 4), True)

    References:
      Halko, Martinsson & Tropp, "Finding structure with randomness", SIAM Review 53 (2011),
      Algorithms 4.4 and 5.1; Vogels et al., "PowerSGD", NeurIPS 2019 (warm-started power
      iteration of gradients).
    """
    _checks.check_int("iterations", iterations, 1)
    _checks.check_int("init_iterations", init_iterations, 1)
    if isinstance(oversample, bool) or not isinstance(oversample, (int, float)):
        raise TypeError(f"oversample must be a number, got {oversample!r}.")
    _checks.check_nonnegative("oversample", oversample)

    def left(m: int, n: int, rank: int, dtype) -> Projector:
        extra = min(_oversampling(rank, oversample), m - rank)

        def refresh(g, p, key):
            g32 = g.astype(jnp.float32)
            inv = 1.0 / (jnp.linalg.norm(g32) + jnp.finfo(jnp.float32).tiny)  # no overflow
            key_data = jax.random.key_data(key)

            def power_step(q):  # orthonormal basis of span(G G^T q)
                return jnp.linalg.qr(g32 @ ((g32.T @ q) * inv))[0]

            def rayleigh_ritz(q):
                # The top-r singular vectors of G within span(q): eigenvectors of the
                # (r + p) x (r + p) Gram matrix of q^T G (eigh: eigenvalues ascending).
                small = (q.T @ g32) * inv
                return q @ jnp.linalg.eigh(small @ small.T)[1][:, ::-1][:, :rank]

            def warm(p):
                q = p.astype(jnp.float32)
                if extra:
                    q = jnp.concatenate([q, _rng.normal(key_data, (m, extra))], axis=1)
                return jax.lax.fori_loop(0, iterations, lambda _, q: power_step(q), q)

            def cold(p):
                del p
                q = _rng.normal(key_data, (m, rank + extra))
                return jax.lax.fori_loop(0, init_iterations, lambda _, q: power_step(q), q)

            q = jax.lax.cond(jnp.any(p != 0), warm, cold, p)
            return canonicalize_signs(rayleigh_ritz(q), axis=0).astype(dtype)

        return _left(lambda key: jnp.zeros((m, rank), dtype), refresh, lambda p: p, m, n, rank,
                     _exact(dtype))

    return oriented(left)


def oriented(left: Callable[[int, int, int, Any], Projector]) -> ProjectorFactory:
    """A factory for both sides from one that projects on the left.

    ``left(m, n, rank, dtype)`` builds a projector of an ``(m, n)`` matrix on its left (basis
    ``m x r``, ``down(G) = B^T G``). The right side of ``G`` is the left side of ``G^T``:
    ``down(G) = (B^T G^T)^T = G B`` (``m x r``) and ``up(L) = (B L^T)^T = L B^T``, with the
    basis ``n x r``; XLA folds the transposes into the matmuls.

    Returns:
      A factory ``(m, n, rank, side, dtype) -> Projector``.
    """

    def factory(m: int, n: int, rank: int, side: str, dtype) -> Projector:
        if side == "left":
            return left(m, n, rank, dtype)
        p = left(n, m, rank, dtype)
        return Projector(p.init, lambda g, s, key: p.refresh(g.T, s, key),
                         lambda g, s: p.down(g.T, s).T, lambda low, s: p.up(low.T, s).T,
                         (m, rank), p.orthonormal)

    return factory


_FACTORIES = {"svd": oriented(_svd), "dct": oriented(_dct), "random": oriented(_random),
              "power": power_projector()}


def make_projector(name: str, m: int, n: int, rank: int, side: str, dtype=jnp.float32) -> Projector:
    """Builds the :class:`Projector` of subspace ``name`` for an ``(m, n)`` matrix.

    Args:
      name: ``"svd"``, ``"dct"``, ``"random"`` or ``"power"``.
      m, n: matrix shape.
      rank: subspace dimension ``r``, ``1 <= r <= (m if side == "left" else n)``.
      side: ``"left"`` or ``"right"``.
      dtype: dtype of the gradient (and of a stored float basis).

    Raises:
      ValueError: unknown ``name`` or ``side``, or a ``rank`` out of range.
    """
    _checks.check_choice("projector", name, PROJECTORS)
    check_side_and_rank(m, n, rank, side)
    return _FACTORIES[name](m, n, rank, side, dtype)


def check_side_and_rank(m: int, n: int, rank: int, side: str) -> None:
    """Raises a ``ValueError`` for an unknown ``side`` or a ``rank`` the side cannot hold."""
    _checks.check_choice("side", side, SIDES)
    size = m if side == "left" else n
    if not 1 <= rank <= size:
        raise ValueError(
            f"rank={rank} must be in [1, {size}] for a {m}x{n} matrix projected on the {side}.")


def _orthogonal(m: int, n: int, rank: int, dtype) -> Projector:
    def refresh(g, key_data, key):
        del g, key_data
        return jax.random.key_data(key)

    def basis(key_data):
        return jnp.linalg.qr(_rng.normal(key_data, (m, rank)))[0].astype(dtype)  # fused normal

    return _left(jax.random.key_data, refresh, basis, m, n, rank, _exact(dtype))


def orthogonal_projector(m: int, n: int, rank: int, side: str, dtype=jnp.float32) -> Projector:
    r"""FRUGAL's random subspace: an orthonormal basis regenerated from a stored key.

    With ``k = m`` (left) or ``n`` (right) and ``Q`` the ``k x r`` factor of the QR decomposition
    of a standard Gaussian ``k x r`` matrix drawn from the key (orthonormal columns,
    :math:`Q^T Q = I_r`),

    .. math::
      \mathrm{down}(G) = Q^T G \text{ or } G Q, \qquad \mathrm{up}(L) = Q L \text{ or } L Q^T.

    Unlike the Gaussian ``"random"`` projector, ``up(down(G))`` is an orthogonal projection, so
    ``G - up(down(G))`` is its complement (FRUGAL's state-free part). Only the key is stored
    (two uint32); ``Q`` is rebuilt (one ``k x r`` QR) on every use.

    Args:
      m, n: matrix shape.
      rank: subspace dimension ``r <= k``.
      side: ``"left"`` or ``"right"``.
      dtype: dtype of the gradient (``Q`` is cast to it).

    Returns:
      A :class:`Projector` whose state is raw PRNG key data.
    """
    check_side_and_rank(m, n, rank, side)
    return oriented(_orthogonal)(m, n, rank, side, dtype)


def _rows(m: int, n: int, rank: int, dtype) -> Projector:
    del dtype

    def refresh(g, idx, key):
        del g, idx
        return jnp.sort(jax.random.permutation(key, m)[:rank]).astype(jnp.int32)

    return Projector(lambda key: jnp.arange(rank, dtype=jnp.int32), refresh,
                     lambda g, idx: g[idx, :],
                     lambda low, idx: jnp.zeros((m, n), low.dtype).at[idx, :].set(low),
                     (rank, n), True)


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
    check_side_and_rank(m, n, rank, side)
    return oriented(_rows)(m, n, rank, side, dtype)


PROJ_TYPES = ("std", "reverse_std", "left", "right", "min_state")


def side_for(proj_type: str, m: int, n: int) -> str:
    """The GaLore side rules that do not depend on state sizes.

    ``"std"`` (the authors' default): right if ``m >= n`` (moments ``m x r``, basis ``n x r``),
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
