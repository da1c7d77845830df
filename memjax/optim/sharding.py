"""Optimizer-state shardings that follow the parameters' shardings.

Most optax states hold copies of the parameter tree (moments), so their shardings are the
parameters'. Low-rank states hold *smaller* copies: a ``(m, n)`` weight sharded on its rows has
moments ``(m, r)`` (rows kept: same sharding) or ``(r, n)`` (rows projected away). A state that
keeps none of the parameter's mesh axes is replicated on every device, which is exactly what a
memory-lean optimizer must avoid. :func:`state_shardings` maps each state leaf to the sharding of
the parameter it belongs to (found by tree path), dimension by dimension:

* a dimension of the same size as the parameter's dimension at the same position keeps that
  dimension's mesh axes;
* mesh axes of dimensions that shrank (``m -> r``) move to the largest remaining dimension that is
  unsharded and divisible by their size, so the state stays spread over the same devices;
* FRUGAL's block moment buffers (``mu`` and ``nu`` of :class:`memjax.optim.BlockState`,
  shared by the active matrices) have their rows split over the mesh axes the parameters are
  sharded on (in order of first use) when the row count is divisible by those axes' total size
  ``D``: each device holds ``1/D`` of them, the moments of its own shard of every matrix sharded
  on its leading axis;
* leaves that belong to no parameter (step counters, keys, indices) are replicated.

Pass the result as ``out_shardings`` of the jitted ``init`` and as in/out shardings of the jitted
update step.
"""

from __future__ import annotations

import math
from typing import Any

import jax
from jax.sharding import NamedSharding, PartitionSpec

from memjax.optim.block_adam import BlockState
from memjax.optim.labels import path_str


def _spec_entries(spec: PartitionSpec, ndim: int) -> list:
    entries = list(spec) + [None] * (ndim - len(spec))
    return entries[:ndim]


def _axes_of(entry) -> tuple:
    if entry is None:
        return ()
    return tuple(entry) if isinstance(entry, (tuple, list)) else (entry,)


def _follow(state_shape, param_shape, sharding: NamedSharding) -> NamedSharding:
    mesh = sharding.mesh
    if len(state_shape) != len(param_shape):
        return NamedSharding(mesh, PartitionSpec())
    entries = _spec_entries(sharding.spec, len(param_shape))
    out, dropped = [], []
    for s, p, e in zip(state_shape, param_shape, entries):
        if s == p:
            out.append(e)
        else:
            out.append(None)
            dropped.extend(_axes_of(e))
    if dropped:
        size = math.prod(mesh.shape[a] for a in dropped)
        free = [i for i, e in enumerate(out) if e is None and state_shape[i] % size == 0
                and state_shape[i] >= size]
        if free:
            i = max(free, key=lambda i: state_shape[i])
            out[i] = dropped[0] if len(dropped) == 1 else tuple(dropped)
    return NamedSharding(mesh, PartitionSpec(*out))


def _param_axes(shardings: list) -> tuple:
    """Mesh axes used by any parameter sharding, in order of first use."""
    axes = []
    for sh in shardings:
        for entry in sh.spec:
            axes.extend(a for a in _axes_of(entry) if a not in axes)
    return tuple(axes)


def _split_rows(shape, axes: tuple, mesh) -> NamedSharding:
    """Rows of a buffer over ``axes`` if their total size divides the row count, else replicated."""
    size = math.prod(mesh.shape[a] for a in axes)
    if not axes or not shape or shape[0] % size:
        return NamedSharding(mesh, PartitionSpec())
    return NamedSharding(mesh, PartitionSpec(axes[0] if len(axes) == 1 else axes))


def _block_state(state: BlockState, axes: tuple, mesh) -> BlockState:
    replicated = NamedSharding(mesh, PartitionSpec())
    return BlockState(replicated, replicated, _split_rows(state.mu.shape, axes, mesh),
                      _split_rows(state.nu.shape, axes, mesh))


def state_shardings(state: Any, params: Any, param_shardings: Any) -> Any:
    """Shardings for an optimizer state that follow the parameters' shardings.

    Args:
      state: the optimizer state, or its ``jax.eval_shape`` (only shapes are read).
      params: the parameters (or their shapes), same structure as ``param_shardings``.
      param_shardings: a pytree of ``jax.sharding.NamedSharding`` like ``params``.

    Returns:
      A pytree of ``NamedSharding`` with the structure of ``state``.
    """
    p_leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    s_leaves = jax.tree.leaves(param_shardings)
    if len(p_leaves) != len(s_leaves):
        raise ValueError("param_shardings must have the structure of params.")
    mesh = s_leaves[0].mesh if s_leaves else None
    table = {path_str(path): (leaf.shape, sh) for (path, leaf), sh in zip(p_leaves, s_leaves)}
    axes = _param_axes(s_leaves)

    def rule(path, leaf):
        if isinstance(leaf, BlockState):
            return _block_state(leaf, axes, mesh)
        parts = path_str(path).split("/")
        for start in range(len(parts)):
            hit = table.get("/".join(parts[start:]))
            if hit is not None:
                return _follow(tuple(leaf.shape), tuple(hit[0]), hit[1])
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree_util.tree_map_with_path(rule, state,
                                            is_leaf=lambda x: isinstance(x, BlockState))
