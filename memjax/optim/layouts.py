"""Which axes of a parameter leaf are layer axes, and how its other axes group into a matrix.

The JAX model libraries store a linear layer's kernel in several layouts, and a low-rank
optimizer must project the matrix the layer multiplies by, with every stacked layer its own
matrix. This module reads the layout from the tree, in this order of evidence:

1. **Names, where the model gives them** (``logical_axes=``: flax partitioning names, MaxText's
   logical axis names, ``nnx.get_partition_spec``): an axis named in :data:`LAYER_AXIS_NAMES` is a
   layer axis; an axis named in :data:`WIDTH_AXIS_NAMES` is the model width.
2. **Structure, otherwise.** A *layer stack* is a subtree of at least two leaves, one of them with
   three or more axes, in which every leaf has the same size ``L`` at the same position ``p``
   (``p`` = 0: memjax's LM, ``nnx.vmap`` / ``nnx.scan``, linen ``nn.scan``, equinox
   ``filter_vmap``; ``p`` = 1: MaxText's default ``param_scan_axis=1``). Axis ``p`` of its
   leaves is a layer axis. Position 0 wins when both fit.
3. **The model width** ``D``: the named width axis, or the size most often first or last among
   the non-layer axes of the tree's floating leaves (biases left out; a window of a convolution, size
   <= 8, is never the width), when one size leads strictly.

The non-layer axes of a leaf form its matrix. Two axes are ``(rows, cols)``. With three or more
(``LinearGeneral`` / ``DenseGeneral`` kernels), the width decides:

===========================  ===========================  =====================================
layout                        example                      matrix
===========================  ===========================  =====================================
width first                   q/k/v ``(d, heads, hd)``      ``d x heads*hd``
width last (only)             out ``(heads, hd, d)``        ``heads*hd x d``
width inside (or twice)       fused gate/up ``(2, d, f)``   batch ``2``, ``d x f``
no width axis (or unknown)    conv ``(kh, kw, c_in, c_out)`` batch ``kh, kw``, ``c_in x c_out``
===========================  ===========================  =====================================

The last row is the rule memjax had before (the last two axes, leading axes batch). When the
rule cannot be right for a model, :class:`memjax.optim.MatrixDims` per leaf (or optax's
``GaLoreDimensionNumbers`` / ``MuonDimensionNumbers``) say it explicitly, and
:func:`memjax.optim.describe` shows what the rule chose for every leaf.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import math
import re
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

LAYER_AXIS_NAMES = ("layers", "layer", "stack", "scan", "stage", "blocks")
"""Logical axis names of a layer (scan) axis: MaxText's ``layers``, flax's ``nn.scan`` /
``nnx.vmap`` ``PARTITION_NAME`` as people name it."""

WIDTH_AXIS_NAMES = ("embed", "embed_no_exp", "emb", "d_model", "hidden", "model")
"""Logical axis names of the model width (MaxText's ``embed``)."""

VECTOR_WORDS = r"norm|layernorm|rmsnorm|ln|bias|biases|scale|scales"
"""Words of leaves that are vectors per layer (norm scales, biases)."""

MAX_WINDOW = 8
"""A size up to this is never inferred as the model width (convolution windows, fused pairs)."""


_DECLARED: contextvars.ContextVar[tuple[tuple[tuple[str, ...], int], ...]] = \
    contextvars.ContextVar("memjax_declared_layer_axes", default=())


@contextlib.contextmanager
def declared_layer_axis(prefix: Sequence[str], axis: int = 0) -> Iterator[None]:
    """Within this block every leaf under the subtree ``prefix`` has its layer axis at ``axis``,
    whatever the shapes of the other leaves.

    The layerwise step declares its stack so: it initialises and updates ``tx`` on trees where
    one leaf has one or two layers and the others ``L``, or stand-ins of size 0, and the layout
    of a leaf must not change with them (structure alone would see no stack there).
    """
    token = _DECLARED.set(_DECLARED.get() + ((tuple(prefix), axis),))
    try:
        yield
    finally:
        _DECLARED.reset(token)


class Layout(NamedTuple):
    """The axes of one leaf.

    Attributes:
      layers: the layer (stacked) axes, which are batch axes of the matrix.
      batch: other batch axes (leading axes a kernel's matrix does not use).
      rows: axes flattened into the matrix rows.
      cols: axes flattened into the matrix columns.
      how: which evidence chose it: ``"names"``, ``"width"`` or ``"last two"``.
    """

    layers: tuple[int, ...]
    batch: tuple[int, ...]
    rows: tuple[int, ...]
    cols: tuple[int, ...]
    how: str

    def sides(self, shape: Sequence[int]) -> tuple[int, int]:
        """``(m, n)``: the sizes of the rows and the columns of the matrix."""
        return (math.prod(shape[a] for a in self.rows), math.prod(shape[a] for a in self.cols))

    def describe(self, shape: Sequence[int]) -> str:
        """``"layers=8 | 512 x 4*64"``: layer and batch sizes, then ``rows x cols``."""
        size = lambda axes: "*".join(str(shape[a]) for a in axes)  # noqa: E731
        prefix = [f"layers={size(self.layers)}"] if self.layers else []
        prefix += [f"batch={size(self.batch)}"] if self.batch else []
        return " | ".join(prefix + [f"{size(self.rows)} x {size(self.cols)}"])


def path_keys(path: Sequence[Any]) -> tuple[str, ...]:
    """``(DictKey('a'), GetAttrKey('b'), SequenceKey(0))`` -> ``('a', 'b', '0')``."""
    out = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                out.append(str(getattr(k, attr)))
                break
        else:
            out.append(str(k))
    return tuple(out)


def stacked_axes(shapes: Sequence[tuple[int, ...]], paths: Sequence[tuple[str, ...]],
                 vector: Sequence[bool]) -> list[int | None]:
    """Per leaf, the position of its layer axis found from structure (or ``None``).

    A subtree (every prefix of the leaves' paths, the shortest first) is a layer stack when it
    holds at least two leaves, one with three or more axes, and every leaf has one size at
    position 0 (else at 1, where every 2-D leaf must be a stacked vector: ``vector``, a norm or
    bias by name, so that the width axis of ``(L, d, f)`` and ``(d, d)`` is not read as a layer
    axis). A leaf takes the layer axis of the highest stack that holds it.
    """
    out: list[int | None] = [None] * len(shapes)
    for prefix, axis in _DECLARED.get():
        for i, path in enumerate(paths):
            if path[:len(prefix)] == prefix and len(shapes[i]) > axis:
                out[i] = axis
    groups: dict[tuple[str, ...], list[int]] = collections.defaultdict(list)
    for i, path in enumerate(paths):
        for depth in range(len(path)):  # the root (depth 0) and every inner node
            groups[path[:depth]].append(i)
    for prefix in sorted(groups, key=len):
        members = [i for i in groups[prefix] if out[i] is None]
        if len(members) != len(groups[prefix]) or len(members) < 2:
            continue
        if not any(len(shapes[i]) >= 3 for i in members):
            continue
        for p in (0, 1):
            sizes = {shapes[i][p] if len(shapes[i]) > p else None for i in members}
            if p == 1 and not all(len(shapes[i]) > 2 or vector[i] for i in members):
                continue  # at position 1, a 2-D leaf must be a stacked vector (norm, bias)
            if len(sizes) == 1 and None not in sizes:
                for i in members:
                    out[i] = p
                break
    return out


def model_width(shapes: Sequence[tuple[int, ...]], layer_axes: Sequence[tuple[int, ...]],
                skip: Sequence[bool]) -> int | None:
    """The size most often first or last among the non-layer axes of the leaves not skipped
    (one-axis leaves count once), or ``None`` when no size leads strictly or it is a window."""
    counts: collections.Counter[int] = collections.Counter()
    for shape, layers, s in zip(shapes, layer_axes, skip):
        axes = [shape[a] for a in range(len(shape)) if a not in layers]
        if s or not axes or len(axes) > 3:
            continue
        counts.update({axes[0], axes[-1]} if len(axes) > 1 else {axes[0]})
    top = counts.most_common(2)
    if not top or (len(top) == 2 and top[0][1] == top[1][1]) or top[0][0] <= MAX_WINDOW:
        return None
    return top[0][0]


def group(shape: Sequence[int], layers: tuple[int, ...], width: int | None,
          names: Sequence[str | None] | None = None) -> Layout | None:
    """The :class:`Layout` of a leaf of ``shape`` with layer axes ``layers`` (``None``: fewer
    than two matrix axes). ``names`` (one per axis, or ``None``) take precedence over ``width``."""
    axes = [a for a in range(len(shape)) if a not in layers]
    if len(axes) < 2:
        return None
    if len(axes) == 2:
        return Layout(layers, (), (axes[0],), (axes[1],), "names" if names else "last two")
    if names is not None:
        is_width = [names[a] in WIDTH_AXIS_NAMES for a in axes]
        how = "names"
    else:
        is_width = [width is not None and shape[a] == width for a in axes]
        how = "width"
    if is_width[0]:
        return Layout(layers, (), (axes[0],), tuple(axes[1:]), how)
    if is_width[-1] and sum(is_width) == 1:
        return Layout(layers, (), tuple(axes[:-1]), (axes[-1],), how)
    if any(is_width):  # inside (or more than once: the first), the leading axes batch
        i = is_width.index(True)
        return Layout(layers, tuple(axes[:i]), (axes[i],), tuple(axes[i + 1:]), how)
    return Layout(layers, tuple(axes[:-2]), (axes[-2],), (axes[-1],), "last two")


def layouts(params: Any, logical_axes: Any = None, *,
            skip_width: str = r"bias|biases") -> list[Layout | None]:
    """The :class:`Layout` of every leaf of ``params`` (``None`` for leaves with fewer than two
    matrix axes), in ``jax.tree.leaves`` order.

    Args:
      params: a pytree of arrays or ``jax.ShapeDtypeStruct`` s.
      logical_axes: optional pytree with the structure of ``params`` whose leaves are tuples of
        axis names (``None`` for an unnamed axis), e.g. ``nn.get_partition_spec(variables)``
        (``PartitionSpec`` s are tuples) or MaxText's logical annotations. A leaf with names is
        read by its names only.
      skip_width: words of leaves that do not count towards the inferred width.
    """
    leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(params)
    shapes = [tuple(int(s) for s in getattr(x, "shape", ())) for _, x in leaves_with_path]
    paths = [path_keys(p) for p, _ in leaves_with_path]
    names: list[Sequence[str | None] | None] = [None] * len(shapes)
    if logical_axes is not None:
        names = [_names(n, s, "/".join(p)) for n, s, p in zip(
            treedef.flatten_up_to(logical_axes), shapes, paths)]
    skip = [_has_word(path, re.compile(skip_width)) or not is_float(x)
            for path, (_, x) in zip(paths, leaves_with_path)]
    vector = [_has_word(path, re.compile(VECTOR_WORDS)) for path in paths]
    found = stacked_axes(shapes, paths, vector)
    layer_axes = []
    for shape, n, p in zip(shapes, names, found):
        if n is not None:
            layer_axes.append(tuple(a for a, name in enumerate(n) if name in LAYER_AXIS_NAMES))
        else:
            layer_axes.append(() if p is None else (p,))
    width = model_width(shapes, layer_axes, skip)
    return [group(s, la, width, n) for s, la, n in zip(shapes, layer_axes, names)]


def is_float(leaf: Any) -> bool:
    """Whether ``leaf`` (an array or ``jax.ShapeDtypeStruct``) has a floating dtype."""
    dtype = getattr(leaf, "dtype", None)
    return dtype is not None and jnp.issubdtype(dtype, jnp.inexact)


def path_words(component: str) -> list[str]:
    """``"input_layernorm"`` -> ``["input", "layernorm"]``: the lower-cased letter runs."""
    return [w for w in re.split(r"[^a-z]+", component.lower()) if w]


def _has_word(path: Sequence[str], pattern: re.Pattern) -> bool:
    return any(pattern.fullmatch(w) for k in path for w in path_words(k))


def _names(names: Any, shape: tuple[int, ...], path: str) -> tuple[str | None, ...] | None:
    if names is None:
        return None
    names = tuple(names)
    if len(names) != len(shape):
        raise ValueError(f"logical_axes: leaf '{path}' of shape {shape} has {len(names)} axis "
                         f"names {names}; give one name (or None) per axis.")
    return tuple(n if n is None or isinstance(n, str) else str(n) for n in names)

