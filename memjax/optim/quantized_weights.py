r"""INT8 weights re-quantised with stochastic rounding (Q-GaLore's and Q-APOLLO's weight format).

A weight matrix :math:`W` (or a stack of them, one per layer) is kept as unsigned 8-bit codes in
groups of ``g`` consecutive entries of its row-major flattening, each group with a float32 scale
:math:`s` and a uint8 zero point :math:`z` (asymmetric min-max, the authors' ``_quantize``)::

    hi = max(max(W_grp), 0)    lo = min(min(W_grp), 0)    s = max(hi - lo, 1e-5) * fl(1/255)
    z = clip(-round(lo * (1/s)), 0, 255)    q = clip(R(W_grp * (1/s)) + z, 0, 255)
    dequantize(q) = (q - z) * s

with ``R`` round-to-nearest at initialisation (divisions as products by reciprocals: XLA compiles
the authors' divisions so, within an ulp; written out, every backend computes the same bits). The
range ``[lo, hi]`` holds 0 (the authors' does for every group with entries of both signs; for a
group on one side of zero their clipped zero point saturates the codes). A group with a
non-finite entry gets a NaN scale: a non-finite update gives a non-finite weight, as with float
weights. Re-quantising an unchanged weight can move a code by one level (the range is recomputed
from the dequantised values). An update :math:`U` (float32, from any optax
transform) is applied by dequantising, adding and re-quantising with fresh scales and zero points
(:func:`requantize`), with ``R`` the weight's rounding:

* ``"stochastic"``: :math:`R(y) = \lfloor y\rfloor + [u < y - \lfloor y\rfloor]`, ``u`` uniform on
  ``[0, 1)``, so :math:`\mathbb{E}[R(y)] = y` and an update far below one quantisation step still
  moves the weight on average (:math:`\mathrm{Var}[R(y)] = f(1 - f) \le 1/4` steps², ``f`` the
  fractional part);
* ``"nearest"``: :math:`R(y) = \mathrm{round}(y)` (for comparison: updates below half a step
  are lost).

The random bits of a matrix come from its own key, stored with the weight (raw ``uint32`` key
data, one per matrix: ``fold_in(fold_in(seed, leaf), layer)`` at initialisation); each
re-quantisation draws from ``split(key)[0]`` and keeps ``split(key)[1]``. So a run is
deterministic for a seed, resumes bit for bit from a checkpoint (the key is a parameter leaf), and
a layer's bits do not depend on whether it is updated alone (a layerwise step) or with the whole
stack (a standard step).

:class:`QuantizedWeight` is a pytree: it checkpoints as four arrays, slices per layer along its
leading axes (so a ``lax.scan`` over layers dequantises one layer at a time), and shards like the
float weight it replaces (:func:`weight_shardings`). Optimizers never see it: a step differentiates
with respect to the dequantised weight, runs ``tx`` on that float view
(:func:`dequantize_weights`) and applies the update with :func:`apply_updates`.

Reference:
  Zhang et al., "Q-GaLore: Quantized GaLore with INT4 Projection and Layer-Adaptive Low-Rank
  Gradients", arXiv 2407.08296 (2024), Sec. 3 (INT8 weights with stochastic rounding); Zhu et al.,
  "APOLLO: SGD-like Memory, AdamW-level Performance", arXiv 2412.05270 (2024) (Q-APOLLO-Mini,
  groups of 128).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from memjax.optim import _rng

WEIGHT_BITS = (8,)
ROUNDINGS = ("stochastic", "nearest")
_LEVELS = 255
_MIN_RANGE = 1e-5
_INV_LEVELS = np.float32(1.0 / _LEVELS)


@dataclasses.dataclass(frozen=True)
class WeightFormat:
    """How a weight matrix is stored: ``bits`` (8), ``group_size`` entries per scale, and the
    ``rounding`` of every re-quantisation (``"stochastic"`` or ``"nearest"``). Q-GaLore: groups of
    256; Q-APOLLO-Mini: groups of 128."""

    bits: int = 8
    group_size: int = 256
    rounding: str = "stochastic"

    def __post_init__(self):
        if self.bits not in WEIGHT_BITS:
            raise ValueError(f"weight bits={self.bits!r}: only INT8 weights are implemented "
                             f"(bits=8)")
        if (not isinstance(self.group_size, int) or isinstance(self.group_size, bool)
                or self.group_size < 1):
            raise ValueError(f"weight group_size={self.group_size!r} must be a positive int "
                             f"(e.g. 128 or 256)")
        if self.rounding not in ROUNDINGS:
            raise ValueError(f"weight rounding={self.rounding!r} must be one of {ROUNDINGS}")


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["codes", "scale", "zero", "key"], meta_fields=["rounding"])
@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
    """An INT8 weight (see the module docstring); a pytree of four arrays.

    Attributes:
      codes: uint8 ``(*lead, *matrix)``: the weight's own shape.
      scale: float32 ``(*lead, G)``: one scale per group of ``g = prod(matrix) / G`` entries.
      zero: uint8 ``(*lead, G)``: the zero points.
      key: uint32 ``(*lead, *k)``: raw key data of each matrix's next rounding (``k = (2,)``
        for JAX's default threefry keys).
      rounding: ``"stochastic"`` or ``"nearest"`` (static).

    ``lead`` are batch axes (e.g. the layers of a stack): each slice along them is one matrix with
    its own groups and key, so slicing every array along them gives that layer's weight. The
    float view (``dtype``) is float32 whatever the model's ``param_dtype``: the update is added
    in float32, and gradients and optimizer state of these kernels are float32.
    """

    codes: Any
    scale: Any
    zero: Any
    key: Any
    rounding: str = "stochastic"

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.codes.shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def dtype(self) -> Any:
        """The dtype of the dequantised weight (float32)."""
        return jnp.dtype(jnp.float32)

    @property
    def lead_axes(self) -> int:
        """Leading batch axes (e.g. 1: the layers of a stack)."""
        return len(self.scale.shape) - 1

    @property
    def group_size(self) -> int:
        return math.prod(self.shape[self.lead_axes:]) // self.scale.shape[-1]


def is_quantized(x: Any) -> bool:
    """Whether ``x`` is a :class:`QuantizedWeight` (the ``is_leaf`` of trees that hold them)."""
    return isinstance(x, QuantizedWeight)


def _check_matrix(shape, lead_axes: int, group_size: int, name: str = "x") -> None:
    matrix = tuple(shape[lead_axes:])
    if len(matrix) < 2:
        raise ValueError(
            f"INT8 weights are for matrices: {name} has shape {tuple(shape)} with "
            f"lead_axes={lead_axes}, so each weight is {matrix} (fewer than 2 dims). Keep vectors "
            f"(norm scales, biases) in float (exclude them with where=).")
    if math.prod(matrix) % group_size:
        raise ValueError(
            f"weight group_size={group_size} must divide the number of entries of each matrix "
            f"of {name}: {matrix} has {math.prod(matrix)}; choose a divisor (e.g. 128 or 256 for "
            f"LLaMA shapes)")


def _batched(fn: Callable, lead_axes: int) -> Callable:
    for _ in range(lead_axes):
        fn = jax.vmap(fn)
    return fn


def _scale_zero(groups: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per group (last axis): the authors' min-max scale, its reciprocal and the
    (integer-valued) zero point. Every division is written as the product by a reciprocal, which
    is what XLA compiles a division by a constant or a broadcast into: explicit, the arithmetic
    is the same on every backend (and in a NumPy reference). The range always holds 0 (the
    authors' range does whenever a group has entries of both signs, as weight groups do): a
    group on one side of zero would otherwise get a zero point clipped to 0 or 255 and codes
    saturated at the other end. A group with a non-finite entry gets a NaN scale, so a
    non-finite update shows in the dequantised weight instead of being clipped into a code."""
    hi = jnp.maximum(jnp.max(groups, axis=-1), 0.0)
    lo = jnp.minimum(jnp.min(groups, axis=-1), 0.0)
    scale = jnp.maximum(hi - lo, _MIN_RANGE) * _INV_LEVELS
    scale = jnp.where(jnp.all(jnp.isfinite(groups), axis=-1), scale, jnp.nan)
    inv = 1.0 / scale
    zero = jnp.clip(-jnp.round(lo * inv), 0, _LEVELS)
    return scale, inv, zero


def stochastic_round(y: jax.Array, noise: jax.Array) -> jax.Array:
    r"""Round ``y`` up with probability equal to its fractional part: :math:`\lfloor y\rfloor +
    [u < y - \lfloor y\rfloor]` with ``noise`` :math:`u` uniform on ``[0, 1)`` (same shape), so
    :math:`\mathbb{E}_u[\cdot] = y`."""
    down = jnp.floor(y)
    return down + (noise < y - down).astype(y.dtype)


def rounding_noise(key: jax.Array, shape) -> jax.Array:
    """The uniforms a re-quantisation of one matrix of ``shape`` draws from its raw key data
    ``key`` (uint32 ``(2,)``): ``uniform(split(key)[0], shape)``."""
    bits_key = jax.random.split(jax.random.wrap_key_data(key))[0]
    # bit for bit jax.random.uniform, with the threefry hash unrolled so that XLA fuses it into
    # the rounding instead of materialising a layer's worth of random bits
    return _rng.uniform(jax.random.key_data(bits_key), tuple(shape))


def _next_key(key: jax.Array) -> jax.Array:
    return jax.random.key_data(jax.random.split(jax.random.wrap_key_data(key))[1])


def _encode(x: jax.Array, group_size: int, noise: jax.Array | None):
    """One matrix -> (codes, scale, zero); ``noise`` None: round to nearest."""
    groups = x.astype(jnp.float32).reshape(-1, group_size)
    scale, inv, zero = _scale_zero(groups)
    y = groups * inv[:, None]
    y = jnp.round(y) if noise is None else stochastic_round(y, noise.reshape(groups.shape))
    codes = jnp.clip(y + zero[:, None], 0, _LEVELS)
    return codes.reshape(x.shape).astype(jnp.uint8), scale, zero.astype(jnp.uint8)


def quantize(x: jax.Array, fmt: WeightFormat | None = None, *, key: jax.Array,
             lead_axes: int = 0) -> QuantizedWeight:
    """Quantise float ``x`` ``(*lead, *matrix)`` to a :class:`QuantizedWeight` (round to nearest).

    Args:
      x: the float weight.
      fmt: a :class:`WeightFormat` (default: 8 bits, groups of 256, stochastic re-quantisation).
      key: a PRNG key (typed or raw); matrix ``i`` (row-major over the lead axes) gets the key
        ``fold_in(key, i)`` for its first re-quantisation.
      lead_axes: number of leading batch axes (1 for a stack of layers).

    Raises:
      ValueError: a matrix with fewer than 2 dims, or ``group_size`` not dividing its size.
    """
    fmt = WeightFormat() if fmt is None else fmt
    _check_matrix(x.shape, lead_axes, fmt.group_size)
    lead = tuple(x.shape[:lead_axes])
    key = key if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else jax.random.wrap_key_data(key)
    keys = jax.vmap(lambda i: jax.random.key_data(jax.random.fold_in(key, i)))(
        jnp.arange(math.prod(lead), dtype=jnp.uint32))
    keys = keys.reshape(lead + keys.shape[1:])
    codes, scale, zero = _batched(lambda m: _encode(m, fmt.group_size, None), lead_axes)(x)
    return QuantizedWeight(codes, scale, zero, keys, fmt.rounding)


def dequantize(q: QuantizedWeight, dtype: Any = jnp.float32) -> jax.Array:
    """``(codes - zero) * scale`` per group, in float32, cast to ``dtype``: ``(*lead, *matrix)``."""
    g = q.group_size

    def one(codes, scale, zero):
        groups = codes.reshape(-1, g).astype(jnp.float32) - zero.astype(jnp.float32)[:, None]
        return (groups * scale[:, None]).reshape(codes.shape)

    return _batched(one, q.lead_axes)(q.codes, q.scale, q.zero).astype(dtype)


def requantize(q: QuantizedWeight, value: jax.Array) -> QuantizedWeight:
    """``value`` (float, ``q``'s shape) stored in ``q``'s format: fresh scales and zero points,
    rounded by ``q.rounding`` (stochastic: the bits of each matrix's key), keys advanced."""
    g = q.group_size
    stochastic = q.rounding == "stochastic"

    def one(x, key):
        noise = rounding_noise(key, x.shape) if stochastic else None
        codes, scale, zero = _encode(x, g, noise)
        return codes, scale, zero, _next_key(key)

    codes, scale, zero, key = _batched(one, q.lead_axes)(value.astype(jnp.float32), q.key)
    return QuantizedWeight(codes, scale, zero, key, q.rounding)


def apply_update(param: Any, update: jax.Array) -> Any:
    """``param + update`` for one leaf: a :class:`QuantizedWeight` is dequantised, updated in
    float32 and re-quantised (:func:`requantize`); any other leaf as ``optax.apply_updates``."""
    if is_quantized(param):
        return requantize(param, dequantize(param) + update.astype(jnp.float32))
    return optax.apply_updates(param, update)


def apply_updates(params: Any, updates: Any) -> Any:
    """``optax.apply_updates`` for trees that may hold :class:`QuantizedWeight` leaves
    (``updates`` is the float tree of :func:`dequantize_weights`' structure)."""
    leaves, treedef = jax.tree.flatten(params, is_leaf=is_quantized)
    return treedef.unflatten([apply_update(p, u) for p, u in
                              zip(leaves, treedef.flatten_up_to(updates))])


def dequantize_weights(params: Any) -> Any:
    """The float view of ``params``: every :class:`QuantizedWeight` dequantised (float32), other
    leaves as they are. Optimizers are initialised and updated on this view."""
    return jax.tree.map(lambda x: dequantize(x) if is_quantized(x) else x, params,
                        is_leaf=is_quantized)


def float_shapes(params: Any) -> Any:
    """The float view of ``params`` shape-only: ``ShapeDtypeStruct`` s (float32 for quantised
    weights); for ``tx.init`` planning and shardings without dequantising anything."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype if not is_quantized(x) else jnp.float32),
        params, is_leaf=is_quantized)


def has_quantized(params: Any) -> bool:
    """Whether any leaf of ``params`` is a :class:`QuantizedWeight`."""
    return any(is_quantized(x) for x in jax.tree.leaves(params, is_leaf=is_quantized))


def quantize_weights(params: Any, fmt: WeightFormat | None = None, *,
                     where: Callable[[str, Any], bool] | None = None,
                     seed: int | jax.Array = 0,
                     lead_axes: Callable[[str, Any], int] | int = 0) -> Any:
    """Replace selected float leaves of ``params`` by :class:`QuantizedWeight` s.

    Args:
      params: a tree of float arrays.
      fmt: the :class:`WeightFormat`.
      where: ``(path, leaf) -> bool`` (``path`` as ``jax.tree_util.keystr(..., simple=True,
        separator="/")``); default: every leaf with at least ``2 + lead_axes`` dims.
      seed: an int or a PRNG key; leaf ``i`` (tree order) draws its keys from
        ``fold_in(key(seed), i)``.
      lead_axes: leading batch axes of each leaf (an int, or ``(path, leaf) -> int``; 1 for
        stacked layers).

    Raises:
      ValueError: a selected leaf that is not a matrix, or a group size that does not divide it.
    """
    fmt = WeightFormat() if fmt is None else fmt
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    base = jax.random.key(seed) if isinstance(seed, int) else seed
    out = []
    for i, (path, x) in enumerate(flat):
        name = jax.tree_util.keystr(path, simple=True, separator="/")
        lead = lead_axes(name, x) if callable(lead_axes) else lead_axes
        chosen = where(name, x) if where is not None else jnp.ndim(x) >= 2 + lead
        if chosen:
            _check_matrix(jnp.shape(x), lead, fmt.group_size, name)
            out.append(quantize(x, fmt, key=jax.random.fold_in(base, i), lead_axes=lead))
        else:
            out.append(x)
    return treedef.unflatten(out)


def weight_shardings(q: QuantizedWeight, sharding: Any) -> QuantizedWeight:
    """The shardings of a :class:`QuantizedWeight` that replaces a float weight sharded by
    ``sharding`` (a ``NamedSharding``): the codes exactly as the weight; scales, zero points and
    keys as the weight's lead (layer) axes, replicated over their group axis."""
    mesh, spec = sharding.mesh, tuple(sharding.spec) + (None,) * q.ndim
    small = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec[:q.lead_axes], None))
    key = jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec(*spec[:q.lead_axes],
                                         *(None,) * (q.key.ndim - q.lead_axes)))
    return QuantizedWeight(sharding, small, small, key, q.rounding)


def check_float_state(tx: Any, params: Any, opt_state: Any, where: str) -> None:
    """Raise a ``TypeError`` naming the fix if ``opt_state`` is not ``tx.init`` of the float
    view of ``params`` (e.g. a plain optax transform initialised on INT8 weights, which sees
    their codes, scales and keys as parameters). Static: compares tree structures."""
    want = jax.tree.structure(jax.eval_shape(tx.init, float_shapes(params)))
    if jax.tree.structure(opt_state) != want:
        raise TypeError(
            f"{where}: the parameters hold INT8 weights (QuantizedWeight) but the optimizer state "
            f"is not tx.init of their float view: initialise it as "
            f"tx.init(memjax.optim.dequantize_weights(params)), or wrap a non-memjax transform "
            f"in memjax.optim.on_float_view(tx) so that tx.init(params) does")


def on_float_view(tx: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
    """``tx`` run on the float view of its parameters: ``init(params)`` and ``update(..., params)``
    accept trees with :class:`QuantizedWeight` leaves and pass ``tx`` their dequantised values
    (:func:`dequantize_weights`); the state is ``tx``'s. Every memjax recipe is wrapped so (the
    INT8 format is the parameters' own, as in the authors' code: any recipe trains INT8 weights);
    wrap any other optax transform to give it INT8 weights directly, and apply its updates with
    :func:`apply_updates`.
    """
    tx = optax.with_extra_args_support(tx)

    def init_fn(params):
        return tx.init(dequantize_weights(params))

    def update_fn(updates, state, params=None, **extra_args):
        view = None if params is None else dequantize_weights(params)
        return tx.update(updates, state, view, **extra_args)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
