"""Which slice of an optimizer's state belongs to one layer of a stack, read from the state itself.

Given an optax transform ``tx`` and parameters ``{stack: <leaves with a leading layer axis L>,
...rest}``, :func:`plan_stack` compares ``tx.init`` on abstract trees (``jax.eval_shape``; nothing
is allocated):

* For each stacked parameter leaf ``k``: ``init`` with leaf ``k`` cut to one layer ``(1, ...)``
  against ``init`` with it cut to two. The state leaves that change are ``k``'s; ``k`` is
  *separable* when each of them goes from ``(1, *s)`` to ``(2, *s)`` (and is ``(L, *s)`` in the
  whole state) with the same dtype: its state is a stack of per-layer states, and layer ``l``'s
  slice is ``[l:l+1]`` of each.
  Otherwise (e.g. a state that flattens a stack across layers, or labels that read one layer
  differently from the stack) ``k`` is *held*: its gradient is gathered layer by layer and it is
  updated with the leaves outside the stack.
* The *layer tree*: every separable stacked leaf cut to ``(1, ...)``, every other leaf a
  zero-size placeholder. Each part of its state is a per-layer slice, the whole-state part itself
  (shared parts, e.g. a step count: read, never written by a layer) or zeros of the
  placeholder's state.
* The *rest tree*: separable stacked leaves as placeholders, every other leaf whole. Each part
  of its state is the whole-state part, or zeros where the whole state is per layer.

The two states are matched part by part: where their tree structures differ (a leaf projected in
one and not in the other has e.g. a ``NormGrowthState`` in one and an ``optax.MaskedNode`` in the
other), the whole differing subtree is one part. Nothing here is specific to a recipe: any
transform whose state keeps a stacked leaf's layers on its leading axis is separable (optax's
adam, sgd, lion; every memjax recipe).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from memjax.optim import layouts
from memjax.optim.labels import NoProjectionWarning

SLICE, WHOLE, ZEROS = "slice", "whole", "zeros"


def _sds(x: Any) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x))


def abstract_init(tx: Any, tree: Any) -> Any:
    """``tx.init(tree)`` shape-only. A tree with stand-ins projects nothing by design, so the
    recipes' :class:`memjax.optim.NoProjectionWarning` is silenced here (no other warning)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NoProjectionWarning)
        return jax.eval_shape(tx.init, tree)


def placeholder(x: Any) -> jax.ShapeDtypeStruct:
    """A zero-size stand-in of a leaf that takes no part in an update (its rank, at least 1)."""
    return jax.ShapeDtypeStruct((0,) * max(jnp.ndim(x), 1), jnp.result_type(x))


def n_layers(x: Any, n: int) -> jax.ShapeDtypeStruct:
    """A stacked leaf with ``n`` layers."""
    return jax.ShapeDtypeStruct((n,) + tuple(jnp.shape(x)[1:]), jnp.result_type(x))


def one_layer(x: Any) -> jax.ShapeDtypeStruct:
    return n_layers(x, 1)


def _same(a: Any, b: Any) -> bool:
    return tuple(jnp.shape(a)) == tuple(jnp.shape(b)) and jnp.result_type(a) == jnp.result_type(b)


def _one_level(x: Any):
    children, treedef = jax.tree_util.tree_flatten(x, is_leaf=lambda y: y is not x)
    return children, treedef


class _Absent:
    """The side of a pair that a dict does not hold (its key is only in the other tree)."""


ABSENT = _Absent()
jax.tree_util.register_pytree_node(_Absent, lambda x: ((), None), lambda _, __: ABSENT)


def split_parts(a: Any, b: Any) -> tuple[list[tuple[Any, Any]], Callable[[list], Any]]:
    """The parts of two state trees, matched where their structures agree.

    Returns ``(pairs, rebuild_b)``: ``pairs`` lists ``(part of a, part of b)`` in depth-first
    order (a pair of leaves, or of whole subtrees where the structures differ; dicts are matched
    key by key, a key held by one tree only pairs its subtree with :data:`ABSENT`), and
    ``rebuild_b(parts)`` assembles a tree like ``b`` from one new part per pair.
    """
    if isinstance(a, dict) and isinstance(b, dict) and set(a) != set(b):
        keys = sorted(set(a) | set(b))
        pairs, builders, sizes = [], [], []
        for key in keys:
            p, f = split_parts(a.get(key, ABSENT), b.get(key, ABSENT))
            pairs += p
            builders.append((key, f))
            sizes.append(len(p))

        def rebuild_dict(parts):
            out, i = {}, 0
            for (key, f), n in zip(builders, sizes):
                if key in b:
                    out[key] = f(parts[i:i + n])
                i += n
            return out

        return pairs, rebuild_dict
    ca, ta = _one_level(a)
    cb, tb = _one_level(b)
    if jax.tree_util.treedef_is_leaf(ta) or jax.tree_util.treedef_is_leaf(tb) or ta != tb:
        return [(a, b)], lambda parts: parts[0]
    pairs, builders, sizes = [], [], []
    for x, y in zip(ca, cb):
        p, f = split_parts(x, y)
        pairs += p
        builders.append(f)
        sizes.append(len(p))

    def rebuild(parts):
        out, i = [], 0
        for f, n in zip(builders, sizes):
            out.append(f(parts[i:i + n]))
            i += n
        return tb.unflatten(out)

    return pairs, rebuild


def _part_leaves(part: Any) -> list:
    return jax.tree.leaves(part)


class PartPlan(NamedTuple):
    """How one part of a layer's (or the rest's) state is made from the whole state.

    ``leafwise``: the part has the whole part's structure; ``modes[i]`` says for its ``i``-th leaf
    ``"slice"`` (rows ``[l:l+1]`` of a per-layer stack), ``"whole"`` (the leaf itself) or
    ``"zeros"`` (zeros like ``template``'s leaf). Otherwise the part is ``template``'s zeros.
    ``first``: index of the part's first leaf among the whole state's leaves; ``first_other``
    among the leaves of the layer's (rest's) state.
    """

    leafwise: bool
    modes: tuple[str, ...]
    template: Any
    first: int
    first_other: int = 0  # index of the part's first leaf among the layer's (rest's) state leaves


class StackPlan(NamedTuple):
    """The static plan of a layerwise step (see the module docstring).

    Attributes:
      num_layers: ``L``.
      stacked: per parameter leaf (``jax.tree.leaves`` order), whether it is under the stack key.
      separable: per parameter leaf, whether it is updated layer by layer.
      layer_tree: per parameter leaf, the ``ShapeDtypeStruct`` it has in a layer's update.
      rest_tree: likewise for the update of the leaves outside the stack (and held ones).
      layer_parts / rest_parts: :class:`PartPlan` per part of the layer's / rest's state.
      per_layer: per leaf of the whole state (``jax.tree.leaves``), whether it is a stack of
        per-layer slices.
      layer_shared: per leaf of the whole state, whether it is shared by the layers and absent
        from the rest's update (e.g. the step count of a group of stacked leaves only): every
        layer reads its old value, and the new one is a layer's output.
      held_paths: the stacked leaves that are not separable (``keystr`` paths).
    """

    num_layers: int
    stacked: tuple[bool, ...]
    separable: tuple[bool, ...]
    layer_tree: tuple[jax.ShapeDtypeStruct, ...]
    rest_tree: tuple[jax.ShapeDtypeStruct, ...]
    layer_parts: tuple[PartPlan, ...]
    rest_parts: tuple[PartPlan, ...]
    per_layer: tuple[bool, ...]
    layer_shared: tuple[bool, ...]
    held_paths: tuple[str, ...]


def stacked_mask(params: Mapping, stack: str) -> list[bool]:
    """Per leaf of ``params`` (``jax.tree.leaves`` order), whether it lies under ``params[stack]``."""
    if not isinstance(params, Mapping) or stack not in params:
        keys = list(params) if isinstance(params, Mapping) else type(params).__name__
        raise ValueError(f"the parameters must be a dict holding the stacked layers under "
                         f"stack={stack!r}; got {keys}")
    return jax.tree.leaves({k: jax.tree.map(lambda _, k=k: k == stack, v) for k, v in params.items()})


def _changed_leaves(full: Any, other: Any) -> tuple[list[int], list[int]]:
    """Leaves of ``full`` that differ in ``other``: ``(in matching parts, in differing parts)``."""
    pairs, _ = split_parts(full, other)
    leafwise, whole_parts, j = [], [], 0
    for a, b in pairs:
        la, lb = _part_leaves(a), _part_leaves(b)
        n = len(la)
        if jax.tree.structure(a) == jax.tree.structure(b):
            leafwise += [j + i for i, (x, y) in enumerate(zip(la, lb)) if not _same(x, y)]
        else:
            whole_parts += list(range(j, j + n))
        j += n
    return leafwise, whole_parts


def _part_plans(full: Any, other: Any, leaf_mode: Callable[[int, Any, Any], str]
                ) -> tuple[PartPlan, ...]:
    plans, j, k = [], 0, 0
    for a, b in split_parts(full, other)[0]:
        la, lb = _part_leaves(a), _part_leaves(b)
        if jax.tree.structure(a) == jax.tree.structure(b):
            plans.append(PartPlan(True, tuple(leaf_mode(j + i, x, y) for i, (x, y) in
                                              enumerate(zip(la, lb))), b, j, k))
        else:
            plans.append(PartPlan(False, (), b, j, k))
        j += len(la)
        k += len(lb)
    return tuple(plans)


def plan_stack(tx: Any, params: Any, stack: str) -> StackPlan:
    """The :class:`StackPlan` of ``tx`` on ``params`` (arrays or ``ShapeDtypeStruct`` s).

    Shapes alone cannot see a state leaf whose shape is the same for one layer as for the stack
    but whose value mixes the layers (e.g. one quantization scale over a small stacked leaf): the
    layer update is traced (:mod:`memjax.training.dependence`) and a stacked leaf whose gradient
    reaches a state leaf that the layers share is held instead.
    """
    with layouts.declared_layer_axis((stack,), 0):
        return _plan_stack_held(tx, params, stack)


def _plan_stack_held(tx: Any, params: Any, stack: str) -> StackPlan:
    """:func:`plan_stack`, holding every stacked leaf whose gradient reaches shared state."""
    from memjax.training import dependence

    held: set[int] = set()
    while True:
        plan = _plan_stack(tx, params, stack, held)
        treedef = jax.tree.structure(params)
        grads = treedef.unflatten(list(plan.layer_tree))
        state = abstract_init(tx, grads)
        n = len(plan.layer_tree)
        deps = dependence.output_dependence(lambda g, s: tx.update(g, s, g)[1], n, grads, state)
        sep = {i for i, ok in enumerate(plan.separable) if ok}
        mixed = set()
        for part in plan.layer_parts:
            if part.leafwise:
                for i, mode in enumerate(part.modes):
                    if mode == WHOLE:
                        mixed |= deps[part.first_other + i] & sep
        if not mixed:
            return plan
        held |= mixed


def _plan_stack(tx: Any, params: Any, stack: str, held: set[int]) -> StackPlan:
    paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    leaves = [_sds(x) for _, x in paths_leaves]
    paths = [jax.tree_util.keystr(p) for p, _ in paths_leaves]
    stacked = stacked_mask(params, stack)
    sizes = {x.shape[0] for x, s in zip(leaves, stacked) if s and x.shape}
    if any(s and not x.shape for x, s in zip(leaves, stacked)) or len(sizes) != 1:
        raise ValueError(f"every leaf under {stack!r} must have the same leading layer axis; "
                         f"got leading sizes {sorted(sizes)}")
    (num_layers,) = sizes

    def init(tree_leaves) -> Any:
        return abstract_init(tx, treedef.unflatten(list(tree_leaves)))

    full = init(leaves)
    full_leaves = jax.tree.leaves(full)
    per_layer = [False] * len(full_leaves)
    separable = [False] * len(leaves)
    for k in (i for i, s in enumerate(stacked) if s and i not in held):
        # leaf k cut to one and to two layers: the state leaves that grow from (1, *s) to (2, *s)
        # are its per-layer leaves (compared with each other, not with the whole tree, so a stack
        # of one layer is read right too)
        one = init(one_layer(x) if i == k else x for i, x in enumerate(leaves))
        two = init(n_layers(x, 2) if i == k else x for i, x in enumerate(leaves))
        if _changed_leaves(full, one)[1] or _changed_leaves(full, two)[1]:
            continue  # one layer is treated differently from the stack (e.g. labelled by shape)
        a = dict(_indexed_leaves(full, one))
        b = dict(_indexed_leaves(full, two))
        changed = [j for j in a if not _same(a[j], b[j])]
        ok = all(a[j].dtype == b[j].dtype == full_leaves[j].dtype and a[j].shape[:1] == (1,)
                 and tuple(b[j].shape) == (2,) + tuple(a[j].shape[1:])
                 and tuple(full_leaves[j].shape) == (num_layers,) + tuple(a[j].shape[1:])
                 for j in changed)
        separable[k] = ok
        if ok:
            for j in changed:
                per_layer[j] = True

    layer_tree = [one_layer(x) if sep else placeholder(x) for x, sep in zip(leaves, separable)]
    rest_tree = [placeholder(x) if sep else x for x, sep in zip(leaves, separable)]

    def layer_mode(j, a, b):
        if per_layer[j]:
            if tuple(b.shape) != (1,) + tuple(a.shape[1:]) or b.dtype != a.dtype:
                raise ValueError(f"state leaf {j} is {a.shape} for the stack but {b.shape} for one "
                                 "layer")
            return SLICE
        return WHOLE if _same(a, b) else ZEROS

    def rest_mode(j, a, b):
        return ZEROS if per_layer[j] else (WHOLE if _same(a, b) else None)

    layer_parts = _part_plans(full, init(layer_tree), layer_mode)
    rest_parts = _part_plans(full, init(rest_tree), rest_mode)
    covered = [False] * len(full_leaves)
    for part in rest_parts:
        if part.leafwise:
            for i, mode in enumerate(part.modes):
                covered[part.first + i] = mode == WHOLE
    in_layer = [False] * len(full_leaves)
    for part in layer_parts:
        if part.leafwise:
            for i, mode in enumerate(part.modes):
                in_layer[part.first + i] = mode == WHOLE
    layer_shared = [in_layer[j] and not covered[j] and not per_layer[j]
                    for j in range(len(full_leaves))]
    lost = [j for j in range(len(full_leaves))
            if not (per_layer[j] or covered[j] or layer_shared[j])]
    if lost or any(None in p.modes for p in rest_parts):
        raise ValueError(
            "the optimizer's state of the leaves outside the stack changes when the stack's "
            "layer-separable leaves are left out (state leaves "
            f"{lost[:5]}); a layerwise step cannot update it. A leaf outside the stack that is "
            "treated by shape (e.g. projected as a matrix) must be excluded (labels=) or moved "
            "into the stack.")
    held = tuple(p for p, s, sep in zip(paths, stacked, separable) if s and not sep)
    return StackPlan(num_layers, tuple(stacked), tuple(separable), tuple(layer_tree),
                     tuple(rest_tree), layer_parts, rest_parts, tuple(per_layer),
                     tuple(layer_shared), held)


def _indexed_leaves(full: Any, other: Any):
    """``(index in full's leaves, other's leaf)`` for the leaves of matching parts."""
    j = 0
    for a, b in split_parts(full, other)[0]:
        la, lb = _part_leaves(a), _part_leaves(b)
        if jax.tree.structure(a) == jax.tree.structure(b):
            yield from ((j + i, y) for i, y in enumerate(lb))
        j += len(la)


def zeros(template: Any) -> Any:
    """Zeros like a tree of ``ShapeDtypeStruct`` s (or arrays)."""
    return jax.tree.map(lambda t: jnp.zeros(t.shape, t.dtype), template)


def build_state(parts: tuple[PartPlan, ...], full_state: Any, template_state: Any,
                slices: Mapping[int, jax.Array]) -> Any:
    """The state of a layer's (or the rest's) update, from the whole state.

    Args:
      parts: ``StackPlan.layer_parts`` or ``rest_parts``.
      full_state: the whole optimizer state (its per-layer leaves may be stale: they are taken
        from ``slices``).
      template_state: the abstract state of the layer's (rest's) update (for its structure).
      slices: whole-state leaf index -> that leaf's ``(1, ...)`` slice for this layer.
    """
    pairs, rebuild = split_parts(full_state, template_state)
    new = []
    for part, (a, _) in zip(parts, pairs):
        if not part.leafwise:
            new.append(zeros(part.template))
            continue
        la, treedef = jax.tree.flatten(a)
        lt = jax.tree.leaves(part.template)
        out = []
        for i, (mode, x, t) in enumerate(zip(part.modes, la, lt)):
            j = part.first + i
            out.append(slices[j] if mode == SLICE else x if mode == WHOLE
                       else jnp.zeros(t.shape, t.dtype))
        new.append(treedef.unflatten(out))
    return rebuild(new)


def read_state(parts: tuple[PartPlan, ...], full_state: Any, new_state: Any,
               mode: str) -> dict[int, jax.Array]:
    """Whole-state leaf index -> the leaf of ``new_state`` (a layer's or the rest's updated
    state) for every leaf of mode ``mode`` (``"slice"`` or ``"whole"``)."""
    pairs, _ = split_parts(full_state, new_state)
    out = {}
    for part, (_, b) in zip(parts, pairs):
        if part.leafwise:
            for i, (m, x) in enumerate(zip(part.modes, jax.tree.leaves(b))):
                if m == mode:
                    out[part.first + i] = x
    return out
