"""Which leaves of a parameter tree are matrices, and how to read them as matrices.

A low-rank optimizer needs, for every leaf, an answer to "is this a matrix I should project,
and if so which axes are its rows and columns?". The answer is a pytree with the structure of
the parameters whose leaves are :class:`MatrixDims` (project) or ``None`` (keep the full inner
optimizer). Axes named neither rows nor columns are *batch* axes: a stacked layer axis produced
by scan-over-layers is one, and every slice along it gets its own projector.

The default rule (:func:`label_matrices`) follows the GaLore authors' choice of layers: the
weights of attention and MLP linears are projected; embeddings, heads/unembeddings, norms,
biases and any leaf whose smaller side is ``<= rank`` stay full. Which axes of a leaf are layer
axes and how the others group into the matrix the layer multiplies by is read from the tree by
:mod:`memjax.optim.layouts` (memjax's LM, Flax NNX and linen stacks and ``LinearGeneral`` /
``DenseGeneral`` kernels, MaxText's scanned layout, equinox). ``optax.contrib.muon`` projects
every 2-D leaf (embeddings included); memjax does not.

Reference: Zhao et al., "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank
Projection", arXiv 2403.03507 (2024), Sec. 4.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax

from memjax.optim import layouts as layouts_lib
from memjax.optim.layouts import is_float, path_words

DEFAULT_EXCLUDE = (r"embed|embeds|embedding|embeddings|embedder|wte|wpe|head|unembed|"
                   r"unembedding|logits|"
                   r"norm|layernorm|rmsnorm|groupnorm|batchnorm|ln|bias|biases|scale|scales")
"""Words that keep a leaf full-rank (embeddings, heads, norms, biases, norm scales).

Every path component is lower-cased and split into words at every character that is not a letter
(``input_layernorm`` -> ``input``, ``layernorm``; ``ln_1`` -> ``ln``; ``lm_head`` -> ``lm``,
``head``; MaxText's ``logits_dense`` -> ``logits``, ``dense``; Gemma's ``embedder``); a leaf is
excluded when the regex matches a whole word or a whole component. Words, not substrings:
``multihead`` or ``upscale`` are neither a head nor a scale. With this default, a top-level
component in :data:`TOP_LEVEL_HEADS` is excluded too."""

TOP_LEVEL_HEADS = ("output",)
"""Top-level modules that are the LM head by convention (LLaMA's original ``output``), kept full
by the default rule. Only at the top: ``attention/output/dense`` (BERT) is a hidden matrix."""

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
    return "/".join(layouts_lib.path_keys(path))


class RuleDims(MatrixDims):
    """A :class:`MatrixDims` chosen by a rule (:func:`label_matrices`), not by hand.

    The recipe keeps such a leaf full-rank when its smaller matrix side is ``<= rank`` (a
    projection would not be smaller than the matrix), where a hand-written ``MatrixDims`` with a
    rank larger than the matrix is an error. ``rule_rank`` is the rank the rule was given (``None``:
    none); :func:`resolve_labels` raises if it differs from the recipe's rank.
    """

    rule_rank: int | None

    def __new__(cls, reduction_axis, output_axis, rule_rank=None):
        self = super().__new__(cls, reduction_axis, output_axis)
        self.rule_rank = rule_rank
        return self


def excluded(path: str, exclude: str | None) -> bool:
    """Whether a ``/``-joined ``path`` has a component or word matching ``exclude`` in full
    (with :data:`DEFAULT_EXCLUDE`, also whether its first component is in
    :data:`TOP_LEVEL_HEADS`)."""
    if not exclude:
        return False
    if exclude == DEFAULT_EXCLUDE and path.split("/")[0].lower() in TOP_LEVEL_HEADS:
        return True
    pattern = re.compile(exclude)
    for component in path.split("/"):
        if pattern.fullmatch(component.lower()) or any(
                pattern.fullmatch(w) for w in path_words(component)):
            return True
    return False


def label_matrices(params: Any, rank: int | None = None, *,
                   exclude: str | None = DEFAULT_EXCLUDE,
                   num_batch_dims: int | None = None,
                   logical_axes: Any = None) -> LabelTree:
    """The default rule: which leaves are projected, and which of their axes form the matrix.

    A floating leaf with at least two non-layer axes whose path has no excluded word
    (:data:`DEFAULT_EXCLUDE`: embeddings, heads, norms, biases, scales) is a (batch of) matrix;
    every other leaf is ``None`` (the full inner optimizer). Which axes are layers and how the
    others group into ``rows x cols`` is read from the tree (:mod:`memjax.optim.layouts`):

    * layer axes from names (``logical_axes``) or from structure (a subtree whose leaves all
      share one size at position 0 or 1: memjax's LM, ``nnx.vmap``, linen ``nn.scan``, equinox
      ``filter_vmap``, MaxText's ``param_scan_axis`` 1 and 0); each layer its own matrix;
    * two matrix axes are ``(rows, cols)``: flax ``(in, out)``, equinox ``(out, in)`` alike;
    * three or more (``LinearGeneral`` / ``DenseGeneral`` kernels) are grouped around the model
      width: ``(d, heads, hd)`` is ``d x heads*hd``, ``(heads, hd, d)`` is ``heads*hd x d``, a
      fused ``(2, d, f)`` is two ``d x f`` matrices; without a width axis (convolutions) the
      last two axes, the leading ones batch.

    The recipe later keeps full-rank any labelled leaf whose smaller side is ``<= rank`` (see
    :class:`RuleDims`). :func:`memjax.optim.describe` shows every leaf's matrix and why a leaf
    stayed full; :class:`MatrixDims` (or optax's dimension numbers) per leaf overrides the rule.

    Args:
      params: a pytree of arrays (or ``jax.ShapeDtypeStruct`` s).
      rank: optional; leaves whose smaller matrix side is ``<= rank`` are labelled ``None`` here.
        Leave it out in rules passed to a recipe (the recipe's own rank decides); a rule given a
        rank that differs from the recipe's is an error at ``init``, never a silent mismatch.
      exclude: regex matched in full against every path component and every word of it
        (:func:`excluded`); ``None`` excludes nothing.
      num_batch_dims: ``None`` (default): the layout rule above. An int ``k``: only leaves with
        exactly ``2 + k`` axes are labelled, as a batch of matrices over their last two axes.
      logical_axes: optional pytree like ``params`` of per-axis names (flax partitioning
        names, MaxText's logical axes; see :func:`memjax.optim.layouts.layouts`).

    Returns:
      A pytree like ``params`` with :class:`RuleDims` (a ``MatrixDims``) or ``None`` leaves.

    Example:
      >>> import jax.numpy as jnp
      >>> params = {"embed": jnp.zeros((100, 16)), "blocks": {"up": jnp.zeros((4, 16, 64)),
      ...           "multihead_out": jnp.zeros((16, 16)), "norm": {"scale": jnp.zeros((4, 16))}}}
      >>> labels = label_matrices(params)
      >>> labels["embed"], labels["blocks"]["up"], labels["blocks"]["multihead_out"]
      (None, RuleDims(reduction_axis=1, output_axis=2), RuleDims(reduction_axis=0, output_axis=1))
      >>> labels["blocks"]["norm"]["scale"] is None
      True
      >>> attention = {"query": {"kernel": jnp.zeros((32, 4, 8))},
      ...              "out": {"kernel": jnp.zeros((4, 8, 32))}}
      >>> label_matrices(attention)["query"]["kernel"], label_matrices(attention)["out"]["kernel"]
      (RuleDims(reduction_axis=0, output_axis=(1, 2)), RuleDims(reduction_axis=(0, 1), output_axis=2))
    """
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ValueError(f"label_matrices: rank={rank!r} must be a positive int or None.")
    if num_batch_dims is not None and (not isinstance(num_batch_dims, int) or num_batch_dims < 0):
        raise ValueError(f"label_matrices: num_batch_dims={num_batch_dims!r} must be an int >= 0 "
                         "or None.")
    if exclude:
        re.compile(exclude)  # a bad regex fails here, naming the argument's value in the trace
    leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(params)
    if num_batch_dims is None:
        views = layouts_lib.layouts(params, logical_axes)
    else:
        views = [_last_two(tuple(getattr(x, "shape", ())), num_batch_dims)
                 for _, x in leaves_with_path]

    def rule(path, leaf, layout):
        if layout is None or not is_float(leaf):  # counters, int8 buffers, keys: never a matrix
            return None
        if excluded(path_str(path), exclude):
            return None
        if rank is not None and min(layout.sides(leaf.shape)) <= rank:
            return None
        return rule_dims(layout, rank)

    return treedef.unflatten([rule(path, leaf, layout) for (path, leaf), layout
                              in zip(leaves_with_path, views)])


def _last_two(shape: tuple[int, ...], num_batch_dims: int) -> layouts_lib.Layout | None:
    if len(shape) != 2 + num_batch_dims:
        return None
    n = len(shape)
    return layouts_lib.Layout((), tuple(range(n - 2)), (n - 2,), (n - 1,), "last two")


def rule_dims(layout: layouts_lib.Layout, rank: int | None) -> RuleDims:
    """The :class:`RuleDims` of a :class:`memjax.optim.layouts.Layout` (single axes as ints)."""
    one = lambda axes: axes[0] if len(axes) == 1 else axes  # noqa: E731
    return RuleDims(one(layout.rows), one(layout.cols), rank)


def as_matrix_dims(label: Any) -> Any:
    """optax's ``GaLoreDimensionNumbers`` / ``MuonDimensionNumbers`` (same fields) as a
    :class:`MatrixDims`; any other label unchanged."""
    if type(label).__name__ in ("GaLoreDimensionNumbers", "MuonDimensionNumbers"):
        return MatrixDims(label.reduction_axis, label.output_axis)
    return label


def label_tree(params: Any, labels: Labels) -> LabelTree:
    """The label pytree ``labels`` stands for: :func:`label_matrices` (``None``), ``labels(params)``
    (a callable) or ``labels`` itself."""
    if labels is None:
        return label_matrices(params)
    return labels(params) if callable(labels) else labels


def resolve_labels(params: Any, labels: Labels, rank: int) -> list[MatrixView | None]:
    """Resolves ``labels`` into one static :class:`MatrixView` (or ``None``) per leaf of ``params``.

    Args:
        params: the parameter (or gradient) pytree.
        labels: ``None`` (use :func:`label_matrices`: a labelled leaf whose smaller side is
            ``<= rank`` stays full); a callable ``params -> tree``;
            or a pytree with the structure of ``params`` whose leaves are ``MatrixDims``, ``None``,
            or ``bool`` (``True`` means a plain 2-D matrix).
        rank: the projection rank, checked against every labelled leaf.

    Returns:
        A list aligned with ``jax.tree_util.tree_leaves(params)``.

    Raises:
        ValueError: a labelled leaf is not a matrix, or ``rank`` exceeds its smaller side, or the
            label tree does not match ``params``.
    """
    tree = label_tree(params, labels)
    leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(params)
    try:
        label_leaves = treedef.flatten_up_to(jax.tree.map(
            as_matrix_dims, tree, is_leaf=lambda x: hasattr(x, "reduction_axis")))
    except (ValueError, TypeError) as e:
        raise ValueError(
                "labels: the label tree must have the structure of the parameters, with MatrixDims, "
                f"None or bool at each leaf ({e}).") from e
    views: list[MatrixView | None] = []
    for (path, leaf), label in zip(leaves_with_path, label_leaves):
        name = path_str(path)
        label = as_matrix_dims(label)
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
            raise ValueError(f"labels: leaf '{name}' has label {label!r}; expected MatrixDims (or "
                             "optax.contrib.GaLoreDimensionNumbers / MuonDimensionNumbers), None "
                             "or bool.")
        if not is_float(leaf):
            raise ValueError(
                    f"labels: leaf '{name}' has dtype {getattr(leaf, 'dtype', None)} and is "
                    "labelled a matrix; only floating leaves can be projected. Label it None (or "
                    "leave it out of the optimizer with optax.masked / optax.partition).")
        view = matrix_view(leaf.shape, label, name)
        if isinstance(label, RuleDims):
            if label.rule_rank is not None and label.rule_rank != rank:
                raise ValueError(
                        f"labels: leaf '{name}' was labelled by label_matrices(rank={label.rule_rank}) "
                        f"but the optimizer's rank is {rank}; call label_matrices without rank (the "
                        "optimizer's rank decides which matrices are too small) or with the same rank.")
            if min(view.m, view.n) <= rank:
                views.append(None)  # the rule's fallback: no smaller than the matrix itself
                continue
        elif rank > min(view.m, view.n):
            raise ValueError(
                    f"labels: rank={rank} exceeds the smaller side of leaf '{name}' viewed as a "
                    f"{view.m}x{view.n} matrix; lower `rank` or label this leaf None.")
        views.append(view)
    return views


class NoProjectionWarning(UserWarning):
    """A low-rank optimizer whose labels project no leaf: it runs as its full inner optimizer."""


def unprojected_reasons(params: Any, views: list[MatrixView | None], labels: Labels,
                        rank: int) -> list[str]:
    """``["path (shape): why", ...]`` for every leaf whose resolved view (:func:`resolve_labels`
    of ``labels`` and ``rank``) is ``None``."""
    leaves_with_path = jax.tree_util.tree_flatten_with_path(params)[0]
    why_full = full_reasons(params, rank) if labels is None else [None] * len(views)
    return [f"{path_str(path)} {tuple(getattr(leaf, 'shape', ()))}: {why or 'labelled None'}"
            for (path, leaf), view, why in zip(leaves_with_path, views, why_full)
            if view is None]


def full_reasons(params: Any, rank: int | None) -> list[str | None]:
    """Why the default rule (:func:`label_matrices`) keeps each leaf full (``None`` for a leaf it
    projects at ``rank``): ``"one axis"``, ``"not float (int32)"``, ``"excluded by name"``,
    ``"smaller side 8 <= rank 16"``."""
    out = []
    for (path, leaf), layout in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                                    layouts_lib.layouts(params)):
        shape = tuple(getattr(leaf, "shape", ()))
        if layout is None:
            out.append("one axis" if len(shape) <= 1 else "one axis per layer")
        elif not is_float(leaf):
            out.append(f"not float ({leaf.dtype})")
        elif excluded(path_str(path), DEFAULT_EXCLUDE):
            out.append("excluded by name (DEFAULT_EXCLUDE)")
        else:
            small = min(layout.sides(shape))
            out.append(f"smaller side {small} <= rank {rank}"
                       if rank is not None and small <= rank else None)
    return out


def warn_if_nothing_projected(params: Any, views: list[MatrixView | None], labels: Labels,
                              rank: int, who: str) -> None:
    """Warns (:class:`NoProjectionWarning`) when no resolved view of ``params`` is a matrix."""
    if any(v is not None for v in views):
        return
    reasons = unprojected_reasons(params, views, labels, rank)
    shown = "; ".join(reasons[:8]) + (f"; ... ({len(reasons) - 8} more)" if len(reasons) > 8 else "")
    warnings.warn(
            f"{who}: no leaf is projected, so this optimizer runs as its full inner optimizer "
            f"(no memory saved). Leaves seen: {shown or 'none'}. Pass labels= (e.g. "
            "memjax.optim.label_matrices with another exclude=, or MatrixDims per leaf) or a "
            "smaller rank; memjax.optim.describe(tx, params) shows every leaf's treatment.",
            NoProjectionWarning, stacklevel=3)
