"""Which leaves of a parameter tree are matrices, and how to read them as matrices.

A low-rank optimizer needs, for every leaf, an answer to "is this a matrix I should project,
and if so which axes are its rows and columns?". The answer is a pytree with the structure of
the parameters whose leaves are :class:`MatrixDims` (project) or ``None`` (keep the full inner
optimizer). Axes named neither rows nor columns are *batch* axes: a stacked layer axis produced
by scan-over-layers is one, and every slice along it gets its own projector.

The default rule (:func:`label_matrices`) follows the GaLore authors: only the 2-D weights of
attention and MLP linears are projected; embeddings, heads/unembeddings, norms, biases and any
leaf whose smaller side is ``<= rank`` stay full. ``optax.contrib.muon`` projects every 2-D leaf
(embeddings included); memjax does not.

Reference: Zhao et al., "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank
Projection", arXiv 2403.03507 (2024), Sec. 4.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax

DEFAULT_EXCLUDE = r"embed|wte|wpe|head|norm|(^|_)ln(_|$)|bias|scale"
"""Regex matched against every path component (lower-cased): a match keeps the leaf full-rank."""

LabelTree = Any  # pytree of MatrixDims | None
Labels = LabelTree | Callable[[Any], LabelTree] | None


class MatrixDims(NamedTuple):
    """How to view a leaf as a (batch of) matrix ``(rows, cols)``.

    Attributes:
        reduction_axis: axis or axes flattened into the matrix rows ``m``.
        output_axis: axis or axes flattened into the matrix columns ``n``.

    Every other axis is a batch axis: a leaf of shape ``(L, d, f)`` with
    ``MatrixDims(1, 2)`` is a stack of ``L`` independent ``(d, f)`` matrices.
    Mirrors ``optax.contrib.MuonDimensionNumbers``.
    """

    reduction_axis: int | Sequence[int] = 0
    output_axis: int | Sequence[int] = 1


class MatrixView(NamedTuple):
    """A resolved :class:`MatrixDims` for one concrete shape (static, hashable).

    Attributes:
        perm: transpose taking the leaf to ``(*batch, *rows, *cols)``.
        batch_shape: shape of the batch axes, ``()`` for a plain matrix.
        m: number of rows (product of the reduction axes).
        n: number of columns (product of the output axes).
        shape: the original leaf shape.
    """

    perm: tuple[int, ...]
    batch_shape: tuple[int, ...]
    m: int
    n: int
    shape: tuple[int, ...]

    @property
    def batched(self) -> bool:
        return bool(self.batch_shape)

    @property
    def matrix_shape(self) -> tuple[int, ...]:
        """Canonical shape: ``(m, n)`` or ``(prod(batch), m, n)``."""
        if self.batched:
            return (math.prod(self.batch_shape), self.m, self.n)
        return (self.m, self.n)


def _axes(axis: int | Sequence[int], ndim: int, what: str, path: str) -> tuple[int, ...]:
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    if not axes:
        raise ValueError(f"labels: {what} of leaf '{path}' is empty; name at least one axis.")
    out = []
    for a in axes:
        if not isinstance(a, int) or not -ndim <= a < ndim:
            raise ValueError(
                    f"labels: {what}={axis!r} of leaf '{path}' is not a valid axis of a {ndim}-D leaf.")
        out.append(a % ndim)
    return tuple(out)


def matrix_view(shape: Sequence[int], dims: MatrixDims, path: str = "<leaf>") -> MatrixView:
    """Resolves ``dims`` against a concrete ``shape``.

    Raises:
        ValueError: if the leaf is not at least 2-D, or the axes are invalid or overlap.
    """
    shape = tuple(int(s) for s in shape)
    ndim = len(shape)
    if ndim < 2:
        raise ValueError(
                f"labels: leaf '{path}' has shape {shape} and is not a matrix; a low-rank label needs "
                "a leaf with at least 2 axes. Label it None to keep it full-rank.")
    rows = _axes(dims.reduction_axis, ndim, "reduction_axis", path)
    cols = _axes(dims.output_axis, ndim, "output_axis", path)
    if len(set(rows + cols)) != len(rows) + len(cols):
        raise ValueError(
                f"labels: leaf '{path}' has overlapping or repeated axes reduction_axis={rows} "
                f"output_axis={cols}.")
    batch = tuple(a for a in range(ndim) if a not in rows + cols)
    return MatrixView(
            perm=batch + rows + cols,
            batch_shape=tuple(shape[a] for a in batch),
            m=math.prod(shape[a] for a in rows),
            n=math.prod(shape[a] for a in cols),
            shape=shape,
    )


def to_matrix(x: jax.Array, view: MatrixView) -> jax.Array:
    """Leaf of shape ``view.shape`` -> canonical ``(m, n)`` or ``(b, m, n)``."""
    if view.perm != tuple(range(len(view.shape))):
        x = x.transpose(view.perm)
    return x.reshape(view.matrix_shape)


def from_matrix(x: jax.Array, view: MatrixView) -> jax.Array:
    """Inverse of :func:`to_matrix`."""
    permuted = tuple(view.shape[a] for a in view.perm)
    x = x.reshape(permuted)
    if view.perm != tuple(range(len(view.shape))):
        inverse = tuple(sorted(range(len(view.perm)), key=view.perm.__getitem__))
        x = x.transpose(inverse)
    return x


def path_str(path: Sequence[Any]) -> str:
    """``(DictKey('a'), GetAttrKey('b'), SequenceKey(0))`` -> ``'a/b/0'``."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def label_matrices(params: Any, rank: int, *, exclude: str | None = DEFAULT_EXCLUDE,
                                      num_batch_dims: int = 0) -> LabelTree:
    """The default rule: which leaves are projected.

    A leaf is labelled ``MatrixDims(num_batch_dims, num_batch_dims + 1)`` when it has exactly
    ``2 + num_batch_dims`` axes, no component of its path matches ``exclude``, and its smaller
    matrix side is ``> rank``; every other leaf is labelled ``None`` (full inner optimizer).

    Args:
        params: a pytree of arrays (or ``jax.ShapeDtypeStruct`` s).
        rank: the projection rank; leaves whose smaller side is ``<= rank`` stay full.
        exclude: regex searched in every lower-cased path component; ``None`` excludes nothing.
        num_batch_dims: leading batch axes, e.g. ``1`` for layers stacked by scan-over-layers.

    Returns:
        A pytree like ``params`` with ``MatrixDims`` or ``None`` leaves.
    """
    pattern = re.compile(exclude) if exclude else None

    def rule(path, leaf):
        shape = getattr(leaf, "shape", ())
        if len(shape) != 2 + num_batch_dims:
            return None
        if pattern is not None and any(pattern.search(c.lower()) for c in path_str(path).split("/")):
            return None
        if min(shape[num_batch_dims:]) <= rank:
            return None
        return MatrixDims(num_batch_dims, num_batch_dims + 1)

    return jax.tree_util.tree_map_with_path(rule, params)


def resolve_labels(params: Any, labels: Labels, rank: int) -> list[MatrixView | None]:
    """Resolves ``labels`` into one static :class:`MatrixView` (or ``None``) per leaf of ``params``.

    Args:
        params: the parameter (or gradient) pytree.
        labels: ``None`` (use :func:`label_matrices` with ``rank``); a callable ``params -> tree``;
            or a pytree with the structure of ``params`` whose leaves are ``MatrixDims``, ``None``,
            or ``bool`` (``True`` means a plain 2-D matrix).
        rank: the projection rank, checked against every labelled leaf.

    Returns:
        A list aligned with ``jax.tree_util.tree_leaves(params)``.

    Raises:
        ValueError: a labelled leaf is not a matrix, or ``rank`` exceeds its smaller side, or the
            label tree does not match ``params``.
    """
    if labels is None:
        tree = label_matrices(params, rank)
    elif callable(labels):
        tree = labels(params)
    else:
        tree = labels
    leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(params)
    try:
        label_leaves = treedef.flatten_up_to(tree)
    except (ValueError, TypeError) as e:
        raise ValueError(
                "labels: the label tree must have the structure of the parameters, with MatrixDims, "
                f"None or bool at each leaf ({e}).") from e
    views: list[MatrixView | None] = []
    for (path, leaf), label in zip(leaves_with_path, label_leaves):
        name = path_str(path)
        if label is None or label is False:
            views.append(None)
            continue
        if label is True:
            if len(leaf.shape) != 2:
                raise ValueError(
                        f"labels: leaf '{name}' has shape {tuple(leaf.shape)}; `True` labels only 2-D leaves. "
                        "Pass MatrixDims(reduction_axis, output_axis) to say which axes form the matrix.")
            label = MatrixDims()
        if not isinstance(label, MatrixDims):
            raise ValueError(f"labels: leaf '{name}' has label {label!r}; expected MatrixDims, None or bool.")
        view = matrix_view(leaf.shape, label, name)
        if rank > min(view.m, view.n):
            raise ValueError(
                    f"labels: rank={rank} exceeds the smaller side of leaf '{name}' viewed as a "
                    f"{view.m}x{view.n} matrix; lower `rank` or label this leaf None.")
        views.append(view)
    return views
