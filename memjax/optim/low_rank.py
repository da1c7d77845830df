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

The static part (each leaf's matrix view, side, projector functions and refresh phase) is a
per-leaf plan computed once per tree structure, shapes and dtypes and reused by ``init``,
``update`` and every later trace. A projector is written once, for the left side of a matrix;
the right side is the left side of the transpose (:func:`memjax.optim.projectors.oriented`),
so a right-side basis is stored ``n x r``.

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

from memjax.optim import _checks, _rng, accounting
from memjax.optim import labels as labels_lib
from memjax.optim import projectors as proj_lib
from memjax.optim import residual as residual_lib

REFRESH_MODES = ("synchronous", "staggered")

ProjectorFactory = proj_lib.ProjectorFactory


class LowRankState(NamedTuple):
    """State of :func:`scale_by_low_rank`.

    Every field but ``count`` and ``inner_state`` is a pytree like the params, so the state of
    one leaf is found by its path; inside a recipe's chained state the fields are found by name,
    e.g. ``optax.tree.get(tx.init(params), "projector")["w"]`` (or the whole state with
    ``optax.tree.get(state, "LowRankState")``).

    Attributes:
      count: int32 scalar, steps taken.
      projector: pytree like the params; each low-rank leaf holds its projector state (a float
        basis ``m x r`` or ``n x r``, int32 indices or a raw PRNG key, with a leading batch axis
        for stacked leaves), every full-rank leaf an ``optax.MaskedNode()``.
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
        cost[side] = (accounting.state_bytes(jax.eval_shape(inner.init, low))
                      + accounting.state_bytes(jax.eval_shape(p.init, key)))
    std = proj_lib.side_for("std", m, n)
    return min(cost, key=lambda s: (cost[s], s != std))


class _LeafPlan(NamedTuple):
    """Static plan of one low-rank leaf: where its matrices are and how they are projected.

    Methods act on the whole leaf: a stack of ``batch`` matrices is vmapped (its refresh runs
    one slice after the other, :meth:`refresh`).
    """

    index: int  # position among all leaves (for PRNG keys)
    view: labels_lib.MatrixView
    side: str
    projector: proj_lib.Projector
    offset: int  # refresh phase in [0, update_proj_gap)

    @property
    def batch(self) -> int:
        return math.prod(self.view.batch_shape) if self.view.batched else 0

    def _vmap(self, fn):
        return jax.vmap(fn) if self.batch else fn

    def matrix(self, leaf: jax.Array) -> jax.Array:
        """The leaf as ``(m, n)`` (or ``(batch, m, n)``)."""
        return labels_lib.to_matrix(leaf, self.view)

    def leaf(self, matrix: jax.Array, like: jax.Array) -> jax.Array:
        """Inverse of :meth:`matrix`, in ``like``'s dtype."""
        return labels_lib.from_matrix(matrix, self.view).astype(like.dtype)

    def base_keys(self, seed: int) -> jax.Array:
        """Raw key data of each matrix: ``(2,)``, or ``(batch, 2)`` for a stack."""
        key = _rng.fold_in(jax.random.key(seed), self.index)
        if self.batch:
            return jax.vmap(lambda b: jax.random.key_data(_rng.fold_in(key, b)))(
                jnp.arange(self.batch))
        return jax.random.key_data(key)

    def step_keys(self, base: jax.Array, count) -> jax.Array:
        fold = lambda k: _rng.fold_in(jax.random.wrap_key_data(k), count)  # noqa: E731
        return self._vmap(fold)(base)

    def init_projector(self, base: jax.Array):
        """A placeholder projector state (replaced at ``t = 0``, which always refreshes)."""
        return self._vmap(self.projector.init)(self.step_keys(base, 0))

    def init_residual(self, residual, dtype):
        init = lambda _: residual.init((self.view.m, self.view.n), dtype)  # noqa: E731
        return self._vmap(init)(jnp.arange(max(self.batch, 1)))

    def low_zeros(self, dtype) -> jax.Array:
        return jnp.zeros(((self.batch,) if self.batch else ()) + self.projector.low_shape, dtype)

    def refresh(self, mat, pstate, keys):
        """A new projector state from the gradient. A stack refreshes one slice after the other
        (``lax.map``): a batched SVD would keep every slice's workspace at once (+11 GiB for a
        (32, 4096, 11008) leaf), and LAPACK runs the slices sequentially either way."""
        if not self.batch:
            return self.projector.refresh(mat, pstate, keys)
        return jax.lax.map(lambda a: self.projector.refresh(*a), (mat, pstate, keys))

    def down(self, mat, pstate) -> jax.Array:
        """``R = down(G)``: ``r x n`` (left) or ``m x r`` (right)."""
        return self._vmap(self.projector.down)(mat, pstate)

    def apply_residual(self, residual, mat, low, out, pstate, rstate):
        """The full update from the inner optimizer's ``out`` (a residual policy per matrix)."""

        def one(m, r, o, p, s):
            up = residual_lib.BackProjection(lambda x: self.projector.up(x, p),
                                             self.projector.orthonormal)
            return residual.apply(m, r, o, up, s)

        return self._vmap(one)(mat, low, out, pstate, rstate)


def _leaf_ranks(tree, labels, rank) -> list:
    """``(view, rank)`` per leaf, ``(None, None)`` for a full-rank leaf; ``rank`` an int or a
    callable of the view (``None``: keep the leaf full-rank)."""
    if not callable(rank):
        return [(v, None if v is None else rank)
                for v in labels_lib.resolve_labels(tree, labels, rank)]
    out = []
    paths = [labels_lib.path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
    for path, view in zip(paths, labels_lib.resolve_labels(tree, labels, 1)):
        r = None if view is None else rank(view)
        if r is not None:
            _checks.check_int(f"rank({path!r})", r, 1)
            if r > min(view.m, view.n):
                raise ValueError(f"rank({path!r})={r} exceeds the smaller side of its "
                                 f"{view.m}x{view.n} matrix.")
        out.append((None, None) if r is None else (view, r))
    return out


def _plan_tree(tree, labels, rank, proj_type, projector, inner, update_proj_gap, refresh):
    """One :class:`_LeafPlan` (or ``None`` for a full-rank leaf) per leaf of ``tree``."""
    views = _leaf_ranks(tree, labels, rank)
    num_low = sum(v is not None for v, _ in views)
    plans, j = [], 0
    for i, (leaf, (view, rank)) in enumerate(zip(jax.tree.leaves(tree), views)):
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
    return tuple(plans)


def _plan_cache(build):
    """``build(tree)`` memoised on the tree's structure, shapes and dtypes."""
    cache = {}

    def plan(tree):
        leaves, treedef = jax.tree.flatten(tree)
        key = (treedef, tuple((jnp.shape(x), jnp.result_type(x)) for x in leaves))
        if key not in cache:
            cache[key] = build(tree)
        return cache[key]

    return plan


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
    rank: int | Callable[[labels_lib.MatrixView], int | None],
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
      rank: subspace dimension ``r`` (>= 1), or a callable ``MatrixView -> int | None`` giving
        each labelled leaf its own rank (``None`` keeps that leaf full-rank; the default labels
        then keep every matrix with both sides >= 2), e.g.
        ``lambda v: None if v.m * v.n < 4096 else min(v.m, v.n) // 4``.
      update_proj_gap: refresh period ``T`` (>= 1) of each projector.
      inner: a gradient-only optax transform (default :func:`memjax.optim.scale_by_hf_adam`).
        It sees the projected gradients of matrix leaves and the raw gradients of the others.
      residual: the :class:`memjax.optim.residual.ResidualPolicy` building the full update
        (default :func:`memjax.optim.residual.drop` with ``scale``).
      scale: GaLore ``scale`` for the default residual policy (ignored if ``residual`` given).
      proj_type: ``"std"``, ``"reverse_std"``, ``"left"``, ``"right"`` or ``"min_state"``.
      projector: ``"svd"``, ``"dct"``, ``"random"`` or ``"power"`` (warm-started block power
        iteration, :func:`memjax.optim.power_projector`), or a factory
        ``(m, n, rank, side, dtype) -> Projector`` for a custom subspace (write it for the left
        side and wrap it with :func:`memjax.optim.projectors.oriented`). The plan, and so the
        factory's result, is reused across traces: a factory builds closures, not arrays.
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
    if not callable(rank):
        _checks.check_int("rank", rank, 1)
    _checks.check_int("update_proj_gap", update_proj_gap, 1)
    if not callable(projector):
        _checks.check_choice("projector", projector, proj_lib.PROJECTORS)
    _checks.check_choice("proj_type", proj_type, proj_lib.PROJ_TYPES)
    _checks.check_choice("refresh", refresh, REFRESH_MODES)
    if inner is None:
        from memjax.optim.adam import scale_by_hf_adam
        inner = scale_by_hf_adam()
    inner = optax.with_extra_args_support(inner)
    if residual is None:
        residual = residual_lib.drop(scale)

    plan = _plan_cache(lambda tree: _plan_tree(tree, labels, rank, proj_type, projector, inner,
                                               update_proj_gap, refresh))

    def init_fn(params):
        plans = plan(params)
        labels_lib.warn_if_nothing_projected(
            params, [None if lp is None else lp.view for lp in plans], labels,
            1 if callable(rank) else rank, "scale_by_low_rank")
        leaves, treedef = jax.tree.flatten(params)
        masked = optax.MaskedNode()
        keys = [masked if lp is None else lp.base_keys(seed) for lp in plans]
        per_leaf = lambda fn: treedef.unflatten(  # noqa: E731
            [masked if lp is None else fn(lp, x, k) for lp, x, k in zip(plans, leaves, keys)])
        proxies = [x if lp is None else lp.low_zeros(x.dtype) for lp, x in zip(plans, leaves)]
        return LowRankState(
            count=jnp.zeros([], jnp.int32),
            projector=per_leaf(lambda lp, x, k: lp.init_projector(k)),
            inner_state=inner.init(treedef.unflatten(proxies)),
            residual=per_leaf(lambda lp, x, k: lp.init_residual(residual, x.dtype)),
            keys=treedef.unflatten(keys),
        )

    def update_fn(updates, state, params=None, **extra_args):
        del params
        leaves, treedef = jax.tree.flatten(updates)
        plans = plan(updates)
        count = state.count
        pstates = treedef.flatten_up_to(state.projector)

        # Refresh due projectors and project every matrix leaf.
        mats, lows, dues = [], [], []
        for i, (g, lp, base) in enumerate(zip(leaves, plans,
                                              treedef.flatten_up_to(state.keys))):
            if lp is None:
                mats.append(None)
                lows.append(g)
                dues.append(False)
                continue
            mat = lp.matrix(g)
            due = (count % update_proj_gap) == lp.offset
            if lp.offset:
                due = jnp.logical_or(due, count == 0)
            keys = lp.step_keys(base, count)
            pstates[i] = jax.lax.cond(due, lambda m, p, k, lp=lp: lp.refresh(m, p, k),
                                      lambda m, p, k: p, mat, pstates[i], keys)
            mats.append(mat)
            lows.append(lp.down(mat, pstates[i]))
            dues.append(due)

        # The inner optimizer on the projected tree.
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

        # Back to the full space through the residual policy.
        rstates = treedef.flatten_up_to(state.residual)
        new_updates = []
        for i, (g, lp, mat, low, out) in enumerate(zip(leaves, plans, mats, lows, outs)):
            if lp is None:
                new_updates.append(out.astype(g.dtype))
                continue
            full, rstates[i] = lp.apply_residual(residual, mat, low, out, pstates[i], rstates[i])
            new_updates.append(lp.leaf(full, g))

        new_state = LowRankState(
            count=optax.safe_increment(count),
            projector=treedef.unflatten(pstates),
            inner_state=inner_state,
            residual=treedef.unflatten(rstates),
            keys=state.keys,
        )
        return treedef.unflatten(new_updates), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
