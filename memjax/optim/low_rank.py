r"""The projected transform: an inner optimizer run in a low-rank subspace of each matrix.

For every leaf labelled as a matrix (see :mod:`memjax.optim.labels`), with gradient ``G``
(``m x n``) and step ``t`` (counted from 0):

.. math::
  P_t &= \mathrm{refresh}(G_t) \quad\text{if } t \bmod T = 0 \text{ (else } P_{t-1}) \\
  R_t &= \mathrm{down}(G_t; P_t) \qquad (m \times r \text{ or } r \times n) \\
  O_t &= \mathrm{inner}(R_t) \qquad \text{(e.g. Adam; its moments live in the subspace)} \\
  U_t &= \mathrm{residual}(G_t, R_t, O_t, \mathrm{up}(\cdot; P_t))

Every other leaf gets ``inner(G)`` unchanged. The inner moments are kept across refreshes
(never reset, never rotated), as the GaLore authors do; with ``reset_inner_on_refresh=True``
(FRUGAL) the inner state of each refreshed leaf is re-initialised at its refresh instead.
Refreshes run inside ``jax.jit`` under ``lax.cond``; with ``refresh="staggered"`` the refresh
of the ``j``-th of ``K`` matrices happens at steps ``t`` with ``t mod T = floor(j T / K)`` (and
at ``t = 0`` for all), so no step pays for every SVD at once.

The side of each projection (``proj_type``) follows the GaLore rules (``"std"``: project the
smaller dimension, moments ``r x max(m, n)``), or ``"min_state"``: the side that minimises the
inner state plus projector bytes, computed from the inner optimizer's own ``init``.

``projector`` names a subspace of :mod:`memjax.optim.projectors` or is a factory
``(m, n, rank, side, dtype) -> Projector`` (e.g. the INT4-stored SVD projector of
:mod:`memjax.optim.quantization`), so every subspace shares this one code path.

Sharding: under automatic (``AxisType.Auto``) meshes the transform runs on sharded parameters
and keeps its state sharded when jitted with :func:`memjax.optim.state_shardings`. Meshes with
explicit axes are not supported yet (SVD and the contracted projections would need
``out_sharding`` annotations).

Reference: Zhao et al., "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank
Projection", arXiv 2403.03507 (2024), Algorithm 2.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from memjax.optim import _rng
from memjax.optim import labels as labels_lib
from memjax.optim import projectors as proj_lib
from memjax.optim import residual as residual_lib

REFRESH_MODES = ("synchronous", "staggered")

ProjectorFactory = Callable[[int, int, int, str, Any], proj_lib.Projector]
"""``(m, n, rank, side, dtype) -> Projector``: a custom subspace for ``scale_by_low_rank``."""


class LowRankState(NamedTuple):
    """State of :func:`scale_by_low_rank`.

    Attributes:
      count: int32 scalar, steps taken.
      projector: pytree like the params; each low-rank leaf holds its projector state (a float
        ``P``, int32 indices or a raw PRNG key, with a leading batch axis for stacked leaves),
        every full-rank leaf an ``optax.MaskedNode()``.
      inner_state: the inner optimizer's state over the tree of projected (low-rank) and
        full-rank gradients.
      residual: pytree like the params with each residual policy's per-matrix state.
      keys: pytree like the params; each low-rank leaf holds the raw PRNG key data of each of its
        matrices (``(*batch, 2)`` uint32 for a stack), fixed at ``init``; a refresh at step ``t``
        draws from ``fold_in(key, t)``. Kept per matrix so that one matrix's slice of the state
        (a layerwise step, :func:`memjax.training.layerwise_step`) carries its own keys.
    """

    count: jax.Array
    projector: Any
    inner_state: optax.OptState
    residual: Any
    keys: Any = None


class _LeafPlan(NamedTuple):
    """Static plan for one low-rank leaf."""

    index: int  # position among all leaves (for PRNG keys)
    view: labels_lib.MatrixView
    side: str
    projector: proj_lib.Projector
    offset: int  # refresh phase in [0, update_proj_gap)

    @property
    def batch(self) -> int:
        return math.prod(self.view.batch_shape) if self.view.batched else 0


def _tree_bytes(tree) -> int:
    return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def _make_projector(projector, m, n, rank, side, dtype) -> proj_lib.Projector:
    if callable(projector):
        return projector(m, n, rank, side, dtype)
    return proj_lib.make_projector(projector, m, n, rank, side, dtype)


def _min_state_side(name, m, n, rank, dtype, inner) -> str:
    """The side whose inner state + projector state takes fewer bytes (ties: GaLore "std")."""
    key = jax.random.key(0)
    cost = {}
    for side in proj_lib.SIDES:
        if rank > (m if side == "left" else n):
            continue
        p = _make_projector(name, m, n, rank, side, dtype)
        low = jax.ShapeDtypeStruct(p.low_shape, dtype)
        cost[side] = (_tree_bytes(jax.eval_shape(inner.init, low))
                      + _tree_bytes(jax.eval_shape(p.init, key)))
    std = proj_lib.side_for("std", m, n)
    return min(cost, key=lambda s: (cost[s], s != std))


def _batched(fn, nbatch: int, in_axes):
    return jax.vmap(fn, in_axes=in_axes) if nbatch else fn


def _one_slice_at_a_time(fn, nbatch: int):
    """``fn`` over the leading batch axis of all its arguments, one slice after the other.

    For the refresh: a batched SVD (``vmap``) keeps the workspace of every slice at once (a copy of
    the input and ``Vh``: two more stacks of a (32, 4096, 11008) leaf, +11 GiB at LLaMA-7B);
    ``lax.map`` keeps one slice's. LAPACK runs the slices one after the other either way.
    """
    if not nbatch:
        return fn
    return lambda *args: jax.lax.map(lambda a: fn(*a), args)


class _Pair:
    """Current and freshly initialised value of one inner-state leaf (a pytree leaf)."""

    def __init__(self, current, fresh):
        self.current, self.fresh = current, fresh


def _select(flag, fresh, current):
    return current if flag is False else jnp.where(flag, fresh, current)


def _reset_inner(inner, inner_state, lows_tree, dues_tree, all_due):
    """Re-initialises the inner state of refreshed leaves (FRUGAL).

    Every copy of the (low-rank) parameter tree inside ``inner_state`` (moments, found with
    ``optax.tree_map_params``) takes its freshly initialised value where the leaf refreshed;
    the other fields (step counts) are re-initialised only when ``all_due``.
    """
    fresh = inner.init(jax.tree.map(jnp.zeros_like, lows_tree))
    pairs = jax.tree.map(_Pair, inner_state, fresh)
    return optax.tree_map_params(
        inner, lambda p, due: _select(due, p.fresh, p.current), pairs, dues_tree,
        transform_non_params=lambda p: _select(all_due, p.fresh, p.current))


def scale_by_low_rank(
    rank: int,
    update_proj_gap: int = 200,
    *,
    inner: optax.GradientTransformation | None = None,
    residual: residual_lib.ResidualPolicy | None = None,
    scale: float = 1.0,
    proj_type: str = "std",
    projector: str | ProjectorFactory = "svd",
    labels: labels_lib.Labels = None,
    refresh: str = "synchronous",
    seed: int = 0,
    reset_inner_on_refresh: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """Runs ``inner`` on low-rank projections of the matrix leaves; the composable building block.

    Args:
      rank: subspace dimension ``r`` (>= 1).
      update_proj_gap: refresh period ``T`` (>= 1) of each projector.
      inner: a gradient-only optax transform (default :func:`memjax.optim.scale_by_hf_adam`).
        It sees the projected gradients of matrix leaves and the raw gradients of the others.
      residual: the :class:`memjax.optim.residual.ResidualPolicy` building the full update
        (default :func:`memjax.optim.residual.drop` with ``scale``).
      scale: GaLore ``scale`` for the default residual policy (ignored if ``residual`` given).
      proj_type: ``"std"``, ``"reverse_std"``, ``"left"``, ``"right"`` or ``"min_state"``.
      projector: ``"svd"``, ``"dct"`` or ``"random"``, or a factory
        ``(m, n, rank, side, dtype) -> Projector`` for a custom subspace.
      labels: which leaves are matrices (see :func:`memjax.optim.labels.resolve_labels`);
        default :func:`memjax.optim.label_matrices` with ``rank``.
      refresh: ``"synchronous"`` or ``"staggered"``.
      seed: integer seed of the projectors' PRNG keys (``"random"`` draws a fresh key per refresh
        from ``fold_in(fold_in(key(seed), leaf_index), step)``; the ``b``-th matrix of a stacked
        leaf from ``fold_in(fold_in(fold_in(key(seed), leaf_index), b), step)``).
      reset_inner_on_refresh: re-initialise the inner state of each matrix leaf (all slices of
        a stacked leaf) at the steps where its projector refreshes, before the inner update (FRUGAL resets
        Adam at every subspace change). The inner state's other fields (its step count) are
        re-initialised only at steps where *every* leaf the inner optimizer sees refreshes, i.e.
        with ``refresh="synchronous"`` and no full-rank leaf; otherwise they are kept.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is a :class:`LowRankState`.
      Updates keep the gradients' dtypes.

    Raises:
      ValueError / TypeError: invalid arguments (at construction) or labels (at ``init``).
    """
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise TypeError(f"rank must be an int, got {type(rank).__name__}.")
    if rank < 1:
        raise ValueError(f"rank={rank} must be >= 1.")
    if isinstance(update_proj_gap, bool) or not isinstance(update_proj_gap, int):
        raise TypeError(f"update_proj_gap must be an int, got {type(update_proj_gap).__name__}.")
    if update_proj_gap < 1:
        raise ValueError(f"update_proj_gap={update_proj_gap} must be >= 1.")
    if not callable(projector) and projector not in proj_lib.PROJECTORS:
        raise ValueError(f"projector={projector!r} is unknown; choose one of {proj_lib.PROJECTORS}.")
    if proj_type not in proj_lib.PROJ_TYPES:
        raise ValueError(f"proj_type={proj_type!r} is unknown; choose one of {proj_lib.PROJ_TYPES}.")
    if refresh not in REFRESH_MODES:
        raise ValueError(f"refresh={refresh!r} is unknown; choose one of {REFRESH_MODES}.")
    if inner is None:
        from memjax.optim.adam import scale_by_hf_adam
        inner = scale_by_hf_adam()
    inner = optax.with_extra_args_support(inner)
    if residual is None:
        residual = residual_lib.drop(scale)

    def plan(tree) -> list[_LeafPlan | None]:
        views = labels_lib.resolve_labels(tree, labels, rank)
        leaves = jax.tree.leaves(tree)
        num_low = sum(v is not None for v in views)
        plans, j = [], 0
        for i, (leaf, view) in enumerate(zip(leaves, views)):
            if view is None:
                plans.append(None)
                continue
            if proj_type == "min_state":
                side = _min_state_side(projector, view.m, view.n, rank, leaf.dtype, inner)
            else:
                side = proj_lib.side_for(proj_type, view.m, view.n)
            p = _make_projector(projector, view.m, view.n, rank, side, leaf.dtype)
            offset = (j * update_proj_gap) // num_low if refresh == "staggered" else 0
            plans.append(_LeafPlan(i, view, side, p, offset))
            j += 1
        return plans

    def base_keys(lp: _LeafPlan) -> jax.Array:
        """Raw key data of each matrix of a leaf: ``(2,)``, or ``(batch, 2)`` for a stack."""
        key = _rng.fold_in(jax.random.key(seed), lp.index)
        if lp.batch:
            return jax.vmap(lambda b: jax.random.key_data(_rng.fold_in(key, b)))(
                jnp.arange(lp.batch))
        return jax.random.key_data(key)

    def leaf_keys(base: jax.Array, count) -> jax.Array:
        fold = lambda k: _rng.fold_in(jax.random.wrap_key_data(k), count)  # noqa: E731
        return jax.vmap(fold)(base) if base.ndim > 1 else fold(base)

    def init_fn(params):
        plans = plan(params)
        labels_lib.warn_if_nothing_projected(
            params, [None if lp is None else lp.view for lp in plans], labels, rank,
            "scale_by_low_rank")
        leaves, treedef = jax.tree.flatten(params)
        pstates, rstates, proxies, kstates = [], [], [], []
        for leaf, lp in zip(leaves, plans):
            if lp is None:
                pstates.append(optax.MaskedNode())
                rstates.append(optax.MaskedNode())
                kstates.append(optax.MaskedNode())
                proxies.append(leaf)
                continue
            kstates.append(base_keys(lp))
            # Placeholder projector: replaced at t = 0, which always refreshes.
            pstates.append(_batched(lp.projector.init, lp.batch, 0)(leaf_keys(kstates[-1], 0)))
            rinit = lambda _: residual.init((lp.view.m, lp.view.n), leaf.dtype)  # noqa: E731
            rstates.append(_batched(rinit, lp.batch, 0)(jnp.arange(max(lp.batch, 1))))
            low_shape = ((lp.batch,) if lp.batch else ()) + lp.projector.low_shape
            proxies.append(jnp.zeros(low_shape, leaf.dtype))
        return LowRankState(
            count=jnp.zeros([], jnp.int32),
            projector=treedef.unflatten(pstates),
            inner_state=inner.init(treedef.unflatten(proxies)),
            residual=treedef.unflatten(rstates),
            keys=treedef.unflatten(kstates),
        )

    def update_fn(updates, state, params=None, **extra_args):
        del params
        leaves, treedef = jax.tree.flatten(updates)
        plans = plan(updates)
        pstates = treedef.flatten_up_to(state.projector)
        rstates = treedef.flatten_up_to(state.residual)
        kstates = treedef.flatten_up_to(state.keys)
        count = state.count

        lows, mats, new_pstates, dues = [], [], [], []
        for g, lp, ps, base in zip(leaves, plans, pstates, kstates):
            if lp is None:
                lows.append(g)
                mats.append(None)
                new_pstates.append(ps)
                dues.append(False)
                continue
            mat = labels_lib.to_matrix(g, lp.view)
            due = (count % update_proj_gap) == lp.offset
            if lp.offset:
                due = jnp.logical_or(due, count == 0)
            keys = leaf_keys(base, count)
            refresh_fn = _one_slice_at_a_time(lp.projector.refresh, lp.batch)
            ps = jax.lax.cond(due, lambda m=mat, p=ps, k=keys: refresh_fn(m, p, k),
                              lambda p=ps: p)
            lows.append(_batched(lp.projector.down, lp.batch, 0)(mat, ps))
            mats.append(mat)
            new_pstates.append(ps)
            dues.append(due)

        inner_state = state.inner_state
        if reset_inner_on_refresh:
            low_dues = [d for d, lp in zip(dues, plans) if lp is not None]
            all_due = (jnp.all(jnp.stack(low_dues)) if low_dues and len(low_dues) == len(dues)
                       else False)
            inner_state = _reset_inner(inner, inner_state, treedef.unflatten(lows),
                                       treedef.unflatten(dues), all_due)
        outs, inner_state = inner.update(treedef.unflatten(lows), inner_state, None,
                                         **extra_args)
        outs = treedef.flatten_up_to(outs)

        new_updates, new_rstates = [], []
        for g, lp, mat, low, out, ps, rs in zip(leaves, plans, mats, lows, outs, new_pstates,
                                                rstates):
            if lp is None:
                new_updates.append(out.astype(g.dtype))
                new_rstates.append(rs)
                continue

            def apply(m, r, o, p, s, lp=lp):
                up = residual_lib.BackProjection(lambda x: lp.projector.up(x, p),
                                                 lp.projector.orthonormal)
                return residual.apply(m, r, o, up, s)

            full, rs = _batched(apply, lp.batch, 0)(mat, low, out, ps, rs)
            new_updates.append(labels_lib.from_matrix(full, lp.view).astype(g.dtype))
            new_rstates.append(rs)

        new_state = LowRankState(
            count=optax.safe_increment(count),
            projector=treedef.unflatten(new_pstates),
            inner_state=inner_state,
            residual=treedef.unflatten(new_rstates),
            keys=state.keys,
        )
        return treedef.unflatten(new_updates), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
