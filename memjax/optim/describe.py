"""What an optimizer will do to every leaf, and the state bytes each leaf costs, before training.

:func:`describe` initialises the transform on abstract shapes (``jax.eval_shape``: nothing is
allocated, so a 7B tree is described on a laptop) and reads the state it would hold:

* every subtree of the state with the parameters' structure (Adam's ``mu``, a low-rank
  transform's projectors, ...) charges each of its leaves to the parameter at the same position;
  what is left (step counts, shared buffers) is reported as ``shared``;
* a leaf is ``projected`` when a :class:`memjax.optim.LowRankState` holds a projector for it;
  its side and rank are read from the low-rank moments (``left``: ``r x n``; ``right``:
  ``m x r``, for the matrix ``m x n``);
* FRUGAL's blockwise mode (:class:`memjax.optim.BlockState`) marks its matrices
  ``block`` (their moments live in the shared buffers).

Example:
  >>> import jax.numpy as jnp, memjax
  >>> params = {"embed": jnp.zeros((100, 32)), "blocks": {"up": jnp.zeros((4, 32, 64))}}
  >>> d = memjax.optim.describe(memjax.optim.galore(1e-2, rank=8), params)
  >>> [(r.path, r.treatment, r.side, r.rank) for r in d.rows]
  [('blocks/up', 'projected', 'left', 8), ('embed', 'full', '', 0)]
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import optax

from memjax.optim import accounting
from memjax.optim import labels as labels_lib
from memjax.optim import layouts as layouts_lib
from memjax.optim.block_adam import BlockState
from memjax.optim.low_rank import LowRankState


class LeafDescription(NamedTuple):
    """One parameter leaf.

    Attributes:
      path: ``/``-joined path.
      shape: the leaf's shape.
      treatment: ``"projected"``, ``"block"`` (FRUGAL blocks) or ``"full"``.
      side: ``"left"`` / ``"right"`` for projected leaves ('' when unknown or not projected).
      rank: projection rank (0 when not projected or unknown).
      state_bytes: optimizer-state bytes charged to this leaf.
      param_bytes: the leaf's own bytes.
      matrix: how ``labels`` read the leaf: layer and batch axes, then ``rows x cols``
        (``"layers=8 | 512 x 4*64"``); ``""`` for a leaf they do not read as a matrix.
      reason: for a full leaf, why (``"excluded by name (DEFAULT_EXCLUDE)"``, ``"one axis"``,
        ``"not float (int32)"``, ``"smaller side 8 <= rank 16"``, ``"labelled None"``).
    """

    path: str
    shape: tuple[int, ...]
    treatment: str
    side: str
    rank: int
    state_bytes: int
    param_bytes: int
    matrix: str = ""
    reason: str = ""


class Description(NamedTuple):
    """:func:`describe`'s result; ``str()`` is a table.

    Attributes:
      rows: one :class:`LeafDescription` per parameter leaf, in tree order.
      shared_bytes: state bytes not charged to any one leaf (counts, shared buffers).
      total_state_bytes: all optimizer-state bytes.
    """

    rows: list[LeafDescription]
    shared_bytes: int
    total_state_bytes: int

    @property
    def num_projected(self) -> int:
        return sum(r.treatment == "projected" for r in self.rows)

    def __str__(self) -> str:
        width = max([len(r.path) for r in self.rows] + [4])
        mwidth = max([len(r.matrix) for r in self.rows] + [6])
        lines = [f"{'leaf':<{width}}  {'shape':<20} {'matrix':<{mwidth}} {'treatment':<10} "
                 f"{'side':<5} {'rank':>5} {'state MB':>10}  why full"]
        for r in self.rows:
            lines.append(f"{r.path:<{width}}  {str(r.shape):<20} {r.matrix:<{mwidth}} "
                         f"{r.treatment:<10} {r.side:<5} {r.rank or '':>5} "
                         f"{r.state_bytes / 1e6:>10.3f}  {r.reason}".rstrip())
        params = sum(r.param_bytes for r in self.rows)
        lines.append(f"{self.num_projected} of {len(self.rows)} leaves projected; state "
                     f"{self.total_state_bytes / 1e6:.3f} MB ({self.shared_bytes} B shared) = "
                     f"{self.total_state_bytes / max(params, 1):.3f}x the parameters' bytes")
        return "\n".join(lines)


def _is_bare_leaf(treedef) -> bool:
    return treedef.num_leaves == 1 and treedef.num_nodes == 1


def _param_shaped(node, treedef) -> bool:
    """Whether ``node`` has the parameters' structure (leaves may be subtrees or MaskedNodes)."""
    if _is_bare_leaf(treedef):
        return False  # every node would match a bare-array tree
    try:
        treedef.flatten_up_to(node)
    except (ValueError, TypeError):
        return False
    return True


def _split(state: Any, treedef) -> tuple[list[list[Any]], list[Any]]:
    """The state's parameter-shaped subtrees (each flattened per parameter leaf), and the rest."""
    shaped, rest = [], []
    for node in jax.tree.leaves(state, is_leaf=lambda x: _param_shaped(x, treedef)):
        if _param_shaped(node, treedef):
            shaped.append(treedef.flatten_up_to(node))
        else:
            rest.append(node)
    return shaped, rest


def _charges(state: Any, treedef) -> tuple[list[int], int]:
    """Bytes of ``state`` per parameter leaf, and the rest."""
    shaped, rest = _split(state, treedef)
    per_leaf = [sum(accounting.state_bytes(sub[i]) for sub in shaped)
                for i in range(treedef.num_leaves)]
    shared = accounting.state_bytes(rest)
    if _is_bare_leaf(treedef):
        return [shared], 0
    return per_leaf, shared


def _low_rank_info(state: Any, treedef, shapes) -> dict[int, tuple[str, int]]:
    """``{leaf index: (side, rank)}`` of the leaves some :class:`LowRankState` projects;
    ``shapes[i]`` is the leaf's ``(m, n)`` matrix (or its own shape when not known)."""
    out = {}
    is_lr = lambda x: isinstance(x, LowRankState)  # noqa: E731
    for node in jax.tree.leaves(state, is_leaf=is_lr):
        if not is_lr(node):
            continue
        # The first parameter-shaped subtree of the inner state holds the low-rank moments.
        shaped, _ = _split(node.inner_state, treedef)
        for i, p in enumerate(treedef.flatten_up_to(node.projector)):
            if isinstance(p, optax.MaskedNode):
                continue
            side, rank, shape = "", 0, shapes[i]
            lows = [tuple(sub[i].shape) for sub in shaped if hasattr(sub[i], "shape")]
            if lows and len(lows[0]) >= 2 and len(shape) >= 2:
                (a, b), (m, n) = lows[0][-2:], shape[-2:]
                if a == m and b < n:
                    side, rank = "right", b
                elif b == n and a < m:
                    side, rank = "left", a
            out[i] = (side, int(rank))
    return out


def describe(tx: optax.GradientTransformation, params: Any,
             labels: labels_lib.Labels = None) -> Description:
    """Every leaf's treatment under ``tx``, the matrix it is read as, and the optimizer-state
    bytes it costs.

    Args:
      tx: any optax transform (a memjax recipe, a chain around one, ``optax.adamw``...).
      params: the parameters (arrays or ``jax.ShapeDtypeStruct`` s; nothing is allocated).
      labels: the labels ``tx`` was built with, for the ``matrix`` and ``reason`` columns
        (default: the default rule, :func:`memjax.optim.label_matrices`).

    Returns:
      A :class:`Description`; ``print(describe(tx, params))`` shows the table.
    """
    from memjax.optim.quantized_weights import float_shapes

    params = float_shapes(params)  # INT8 weights: described as the float leaves tx sees
    state = jax.eval_shape(tx.init, params)
    leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(params)
    shapes = [tuple(getattr(x, "shape", ())) for _, x in leaves_with_path]
    per_leaf, shared = _charges(state, treedef)
    # FRUGAL's block mode: its matrices hold no state of their own (the shared buffers do), while
    # every other leaf keeps its full Adam moments.
    has_blocks = any(isinstance(x, BlockState) for x in jax.tree.leaves(
        state, is_leaf=lambda x: isinstance(x, BlockState)))
    matrices, sides = _matrices(params, labels)
    projected = _low_rank_info(state, treedef, [s or shape for s, shape in zip(sides, shapes)])
    ranks = [r for _, r in projected.values() if r]
    reasons = (labels_lib.full_reasons(params, ranks[0] if ranks else None) if labels is None
               else [None] * len(shapes))  # explicit labels: their None is the reason
    rows = []
    for i, (path, leaf) in enumerate(leaves_with_path):
        side, rank = projected.get(i, ("", 0))
        treatment = ("projected" if i in projected
                     else "block" if has_blocks and per_leaf[i] == 0 else "full")
        reason = "" if treatment != "full" else reasons[i] or "labelled None"
        rows.append(LeafDescription(labels_lib.path_str(path), shapes[i], treatment, side, rank,
                                    per_leaf[i], accounting.state_bytes(leaf), matrices[i],
                                    reason))
    return Description(rows, shared, accounting.state_bytes(state))


def _matrices(params: Any, labels: labels_lib.Labels) -> tuple[
        list[str], list[tuple[int, int] | None]]:
    """Per leaf, the matrix ``labels`` (default: the default rule) read, as text (``""``: none)
    and as ``(m, n)`` (``None``)."""
    leaves = jax.tree.leaves(params)
    if labels is None:
        found = layouts_lib.layouts(params)
        return ([lay.describe(x.shape) if lay else "" for lay, x in zip(found, leaves)],
                [lay.sides(x.shape) if lay else None for lay, x in zip(found, leaves)])
    label_leaves = jax.tree_util.tree_structure(params).flatten_up_to(
        labels_lib.label_tree(params, labels))
    text, mn = [], []
    for label, x in zip(label_leaves, leaves):
        label = labels_lib.as_matrix_dims(label)
        label = labels_lib.MatrixDims() if label is True else label
        view = labels_lib.matrix_view(x.shape, label) if isinstance(
            label, labels_lib.MatrixDims) else None
        batch = "*".join(map(str, view.batch_shape)) if view else ""
        text.append("" if view is None else (f"batch={batch} | " if batch else "")
                    + f"{view.m} x {view.n}")
        mn.append(None if view is None else (view.m, view.n))
    return text, mn
