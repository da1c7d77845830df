r"""Quantized optimizer state: 8-bit blockwise Adam moments and INT4/INT8 SVD projectors.

**Blockwise 8-bit quantization** (Dettmers et al. 2022). A tensor is flattened, cut into blocks of
``block_size`` consecutive entries (the last one zero-padded) and every block is stored as int8
codes plus one float32 absmax :math:`a_b = \max_{i \in b} |x_i|`:

.. math::
  c_i = \operatorname{argmin}_k |x_i / a_b - q_k|, \qquad \hat x_i = q_{c_i}\, a_b

over a map ``q`` of at most 256 values in ``[-1, 1]`` (signed) or ``[0, 1]`` (unsigned, for the
second moment): ``"linear"`` (``q_k = k / 127`` signed, ``k / 255`` unsigned; the round-trip error
is at most ``a_b / 254`` resp. ``a_b / 510``) or ``"dynamic"`` (dense near zero: decade
``[10^{-j-1}, 10^{-j}]`` holds ``2^{6-j}`` (signed) or ``2^{7-j}`` (unsigned) linearly spaced
values, down to ``1e-6`` resp. ``1e-7``; the relative error of an entry near the block maximum is
at most ``0.9 / 64 / 2 ~ 0.7%``). Codes are stored with the parameter's shape (so shardings follow
the parameters), the absmax values as one float32 per block: ``1 + 4 / block_size`` bytes per entry
instead of 4.

:func:`scale_by_adam_8bit` keeps both Adam moments this way: each step dequantizes them, takes the
float32 Adam step (the update is computed from the float32 moments) and requantizes them.

**INT4 projectors** (Q-GaLore, Zhang et al. 2024). An SVD projector ``P`` is stored with asymmetric
min-max quantization in groups of ``group_size`` consecutive entries:
:math:`s_g = (\max_g - \min_g) / (2^{b} - 1)`, :math:`c_i = \mathrm{round}((P_i - \min_g)/s_g)`,
:math:`\hat P_i = c_i s_g + \min_g`; two 4-bit codes are packed per uint8, so ``P`` takes
``1/8`` of its float32 bytes plus 8 bytes per group. :func:`quantized_svd_projector` is such a
projector for :func:`memjax.optim.scale_by_low_rank`, with Q-GaLore's *lazy refresh*: at each
scheduled refresh it compares the first singular vector of the new projector with the stored one
(cosine similarity), keeps the last ``queue_size`` similarities and, once their mean is
``>= cos_threshold``, multiplies that layer's refresh gap by ``gamma_proj``; scheduled refreshes
that fall inside a layer's longer gap skip the SVD. The state counts the SVDs taken and skipped
(:func:`svd_counts`).

References:
  Dettmers et al., "8-bit Optimizers via Block-wise Quantization", ICLR 2022, arXiv 2110.02861.
  Zhang et al., "Q-GaLore: Quantized GaLore with INT4 Projection and Layer-Adaptive Low-Rank
  Gradients", arXiv 2407.08296 (2024).
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from memjax.optim import _checks
from memjax.optim import projectors as proj_lib

MAPS = ("linear", "dynamic")
PROJ_BITS = (4, 8)
CHUNK_BLOCKS = 4096
"""8-bit Adam updates large leaves this many blocks at a time (bounds the float32 temporaries)."""


# ---------------------------------------------------------------------------------------------
# Blockwise 8-bit quantization.
# ---------------------------------------------------------------------------------------------


@functools.cache
def dynamic_map(signed: bool) -> np.ndarray:
    """The sorted ``"dynamic"`` code values in ``[-1, 1]`` (255, signed) or ``[0, 1]`` (256).

    Decade ``j`` (``[10^{-j-1}, 10^{-j}]``, ``j = 0`` the top) holds ``2^{D-1-j}`` values
    ``10^{-j} * linspace(0.1, 1, 2^{D-1-j} + 1)[1:]`` with ``D = 7`` decades (signed, mirrored
    around 0) or ``D = 8`` (unsigned), plus 0. The largest value is exactly 1, so every block's
    absmax entry is stored exactly.
    """
    decades = 7 if signed else 8
    pos = []
    for k in range(decades):  # k = 0 is the lowest decade
        items = 2**k
        frac = np.linspace(0.1, 1.0, items + 1)[1:]
        pos.append(frac * 10.0 ** (k - decades + 1))
    pos = np.concatenate(pos)
    values = np.concatenate([-pos[::-1], [0.0], pos]) if signed else np.concatenate([[0.0], pos])
    return values.astype(np.float32)


def _code_offset(signed: bool, map_: str) -> int:
    """int8 code = index into the map minus this offset."""
    return 127 if signed else 128


def _check_map(map_: str) -> None:
    if map_ not in MAPS:
        raise ValueError(f"map={map_!r} is unknown; choose one of {MAPS}.")


def _check_block_size(block_size) -> None:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size={block_size!r} must be a positive int.")


def num_blocks(size: int, block_size: int) -> int:
    """Number of blocks of ``block_size`` covering ``size`` entries."""
    return max(1, -(-size // block_size))


def _blocks(x: jax.Array, block_size: int) -> jax.Array:
    """``x`` flattened, zero-padded and reshaped to ``(num_blocks, block_size)`` (same dtype)."""
    flat = x.reshape(-1)
    nb = num_blocks(flat.size, block_size)
    flat = jnp.pad(flat, (0, nb * block_size - flat.size))
    return flat.reshape(nb, block_size)


def _unblocks(blocks: jax.Array, shape) -> jax.Array:
    size = math.prod(shape)
    return blocks.reshape(-1)[:size].reshape(shape)


def _slice_blocks(x: jax.Array, block_size: int) -> jax.Array:
    """Blocks that never straddle the leading (stack) axis of an ``x`` with ``ndim >= 3``: each
    ``x[i]`` is flattened, padded and cut on its own, giving
    ``(x.shape[0] * num_blocks(x[0].size), block_size)``. A lower-rank ``x`` is :func:`_blocks`."""
    if x.ndim < 3:
        return _blocks(x, block_size)
    rows = x.reshape(x.shape[0], -1)
    nb = num_blocks(rows.shape[1], block_size)
    rows = jnp.pad(rows, ((0, 0), (0, nb * block_size - rows.shape[1])))
    return rows.reshape(x.shape[0] * nb, block_size)


def _slice_unblocks(blocks: jax.Array, shape) -> jax.Array:
    """Inverse of :func:`_slice_blocks`."""
    if len(shape) < 3:
        return _unblocks(blocks, shape)
    row = math.prod(shape[1:])
    return blocks.reshape(shape[0], -1)[:, :row].reshape(shape)


def slice_absmax_shape(shape, block_size: int) -> tuple[int, ...]:
    """Shape of the absmax of a leaf of ``shape`` in :func:`scale_by_adam_8bit`:
    ``(shape[0], num_blocks(prod(shape[1:])))`` for ``ndim >= 3``, else ``(num_blocks(size),)``."""
    if len(shape) < 3:
        return (num_blocks(math.prod(shape), block_size),)
    return (shape[0], num_blocks(math.prod(shape[1:]), block_size))


def quantize_blockwise(x: jax.Array, block_size: int = 256, map: str = "dynamic",
                       signed: bool = True) -> tuple[jax.Array, jax.Array]:
    """Blockwise absmax quantization of ``x`` to int8 codes.

    Args:
      x: any float array (``signed=False`` requires ``x >= 0``).
      block_size: entries per block (the last block is zero-padded).
      map: ``"linear"`` or ``"dynamic"``.
      signed: signed map (first moments) or unsigned map (second moments).

    Returns:
      ``(codes, absmax)``: int8 codes with ``x``'s shape, float32 absmax per block
      ``(num_blocks(x.size, block_size),)``.

    Example:
      >>> import jax.numpy as jnp
      >>> c, a = quantize_blockwise(jnp.array([0.5, -1.0, 0.25]), map="linear")
      >>> c.tolist(), a.tolist()
      ([64, -127, 32], [1.0])
    """
    _check_map(map)
    _check_block_size(block_size)
    codes, absmax = _quantize_blocks(_blocks(x.astype(jnp.float32), block_size), map, signed)
    return _unblocks(codes, x.shape), absmax


def _quantize_blocks(blocks: jax.Array, map_: str, signed: bool) -> tuple[jax.Array, jax.Array]:
    """``(..., block)`` float32 -> int8 codes ``(..., block)`` and absmax ``(...)``."""
    absmax = jnp.max(jnp.abs(blocks), axis=-1)
    safe = jnp.where(absmax > 0, absmax, 1.0)
    xn = blocks / safe[..., None]
    if map_ == "linear":
        if signed:
            codes = jnp.clip(jnp.round(xn * 127.0), -127, 127)
        else:
            codes = jnp.clip(jnp.round(xn * 255.0), 0, 255) - 128
    else:
        codes = _nearest_dynamic(xn, signed) - _code_offset(signed, map_)
    return codes.astype(jnp.int8), absmax


def _dequantize_blocks(codes: jax.Array, absmax: jax.Array, map_: str,
                       signed: bool) -> jax.Array:
    """Inverse of :func:`_quantize_blocks` (float32)."""
    if map_ == "linear":
        c = codes.astype(jnp.float32)
        xn = c / 127.0 if signed else (c + 128.0) / 255.0
    else:
        values = jnp.asarray(dynamic_map(signed))
        xn = values[codes.astype(jnp.int32) + _code_offset(signed, map_)]
    return xn * absmax[..., None]


@functools.cache
def _bucket_table(signed: bool) -> tuple[int, np.ndarray, np.ndarray]:
    """Lookup table for :func:`_nearest_dynamic`: ``(shift, base, midpoints + [inf])``.

    Every float32 ``x`` falls in the bucket ``bits(x) >> shift`` (sign, exponent and the top
    ``23 - shift`` mantissa bits). ``shift`` is the largest for which no bucket holds two
    midpoints of the map, so the number of midpoints below ``x`` is ``base[bucket]`` (those below
    the whole bucket) plus at most one: ``midpoints[base[bucket]] < x``.
    """
    values = dynamic_map(signed)
    mids = (values[1:] + values[:-1]) / np.float32(2)  # float32, as the documented model
    for mantissa_bits in range(4, 16):
        shift = 23 - mantissa_bits
        first = np.arange(1 << (32 - shift), dtype=np.uint64) << np.uint64(shift)
        a = first.astype(np.uint32).view(np.float32)
        b = (first | np.uint64((1 << shift) - 1)).astype(np.uint32).view(np.float32)
        with np.errstate(invalid="ignore"):
            lo, hi = np.fmin(a, b), np.fmax(a, b)  # negative floats run backwards in bits
        finite = np.isfinite(lo) & np.isfinite(hi)
        lo, hi = np.where(finite, lo, 0.0), np.where(finite, hi, 0.0)
        base = np.searchsorted(mids, lo, side="left")
        if np.all(np.searchsorted(mids, hi, side="left") - base <= 1):
            padded = np.concatenate([mids, [np.inf]]).astype(np.float32)
            return shift, base.astype(np.uint8), padded
    raise AssertionError("no bucket width separates the dynamic map's midpoints")


def _nearest_dynamic(xn: jax.Array, signed: bool) -> jax.Array:
    """Index of the nearest ``dynamic_map`` value (ties: the smaller value), elementwise.

    Equals ``searchsorted(midpoints, xn, side="left")`` exactly, without a per-element binary
    search or transcendental functions: the float32 bits of ``xn`` pick a bucket whose count of
    midpoints below it is tabulated (:func:`_bucket_table`), and one comparison with the next
    midpoint settles the index. Two small gathers and a compare per entry.
    """
    shift, base, mids = _bucket_table(signed)
    bucket = jax.lax.shift_right_logical(
        jax.lax.bitcast_convert_type(xn.astype(jnp.float32), jnp.uint32), jnp.uint32(shift))
    below = jnp.asarray(base)[bucket.astype(jnp.int32)].astype(jnp.int32)
    return below + (jnp.asarray(mids)[below] < xn).astype(jnp.int32)


def dequantize_blockwise(codes: jax.Array, absmax: jax.Array, block_size: int = 256,
                         map: str = "dynamic", signed: bool = True,
                         dtype=jnp.float32) -> jax.Array:
    """Inverse of :func:`quantize_blockwise` (up to the quantization error)."""
    _check_map(map)
    blocks = _blocks(codes, block_size)
    return _unblocks(_dequantize_blocks(blocks, absmax, map, signed), codes.shape).astype(dtype)


# ---------------------------------------------------------------------------------------------
# 8-bit Adam.
# ---------------------------------------------------------------------------------------------


def _map_chunks_in_place(fn, *arrays: jax.Array) -> tuple:
    """``fn`` applied to consecutive row chunks of ``arrays``, results written back in place.

    ``fn`` maps chunks (rows ``[i, i + c)`` of every array, ``c =`` :data:`CHUNK_BLOCKS`) to new
    chunks of the same shapes and dtypes; the new values replace the old ones. A ``fori_loop`` over the full chunks plus one
    static tail chunk, each a ``dynamic_update_slice`` into the loop carry, so XLA updates the
    (donated) buffers in place: no zero-filled output buffers and no concatenation of a remainder,
    unlike ``lax.map(..., batch_size=c)``. Only one chunk's temporaries are ever live.
    """
    chunk = CHUNK_BLOCKS
    rows = arrays[0].shape[0]
    if rows <= chunk:
        return tuple(fn(*arrays))

    def apply(start, size, carry):
        ins = [jax.lax.dynamic_slice_in_dim(c, start, size) for c in carry]
        return tuple(jax.lax.dynamic_update_slice_in_dim(c, o, start, 0)
                     for c, o in zip(carry, fn(*ins)))

    full, tail = divmod(rows, chunk)
    carry = jax.lax.fori_loop(0, full, lambda i, c: apply(i * chunk, chunk, c), tuple(arrays))
    return apply(full * chunk, tail, carry) if tail else carry


class ScaleByAdam8bitState(NamedTuple):
    """State of :func:`scale_by_adam_8bit`.

    Attributes:
      count: int32 scalar, steps taken.
      mu: first moments like the params: int8 codes (float32 moments for leaves smaller than
        ``min_8bit_size``).
      mu_absmax: float32 per leaf, :func:`slice_absmax_shape` (an unused ``(1,)`` placeholder for
        float32 leaves).
      nu: second moments, like ``mu``.
      nu_absmax: like ``mu_absmax``.
    """

    count: jax.Array
    mu: optax.Updates
    mu_absmax: optax.Updates
    nu: optax.Updates
    nu_absmax: optax.Updates


def scale_by_adam_8bit(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-6,
                       block_size: int = 256, *, map: str = "dynamic",
                       min_8bit_size: int = 4096,
                       bias_correction: bool = True) -> optax.GradientTransformation:
    r"""Adam with both moments stored as blockwise 8-bit codes.

    Each step, per leaf: dequantize ``M, V``; :math:`M \leftarrow b_1 M + (1-b_1) G`,
    :math:`V \leftarrow b_2 V + (1-b_2) G^2`; the update
    :math:`U = \frac{\sqrt{1-b_2^t}}{1-b_1^t} \frac{M}{\sqrt V + \epsilon}` is computed from the
    float32 moments (the bias correction folded into the step size as in
    :func:`memjax.optim.scale_by_hf_adam`; ``bias_correction=False`` returns
    :math:`M / (\sqrt V + \epsilon)`); then ``M`` (signed map) and ``V`` (unsigned map) are
    requantized. Leaves with fewer than ``min_8bit_size`` entries keep float32 moments (like
    bitsandbytes). A leaf with ``ndim >= 3`` (a stack of matrices) is cut into blocks slice by
    slice (each ``x[i]`` on its own; bitsandbytes flattens the whole tensor, as done here for
    lower ranks), so the moments of a stack of layers are those of each layer quantized alone, and a layerwise step
    (:func:`memjax.training.layerwise_step`) can update one layer's slice of the state. Usable standalone or as the ``inner=`` optimizer of every memjax recipe.

    Args:
      b1, b2, eps: Adam hyperparameters.
      block_size: entries per quantization block (bitsandbytes: 256 for its blockwise kernels).
      map: ``"dynamic"`` (default, as bitsandbytes) or ``"linear"``. The linear map rounds
        second moments below ``absmax / 510`` to zero, after which ``M / (sqrt(V) + eps)`` can
        explode (it diverges on the regression in ``tests/optim/test_quantization.py``): use it
        to study quantization, not to train.
      min_8bit_size: smaller leaves keep float32 moments (0 quantizes everything).
      bias_correction: fold ``sqrt(1 - b2^t) / (1 - b1^t)`` into the update.

    Returns:
      An ``optax.GradientTransformation`` with a :class:`ScaleByAdam8bitState`.

    Example:
      >>> import jax.numpy as jnp, memjax
      >>> tx = memjax.optim.scale_by_adam_8bit(min_8bit_size=0)
      >>> state = tx.init({"w": jnp.zeros(512)})
      >>> state.mu["w"].dtype, state.mu_absmax["w"].shape
      (dtype('int8'), (2,))
    """
    _checks.check_adam(b1, b2, eps)
    _check_block_size(block_size)
    _check_map(map)
    _checks.check_int("min_8bit_size", min_8bit_size, 0)

    def quantized(x) -> bool:  # an empty leaf (e.g. a layerwise step's stand-in) stays float32
        return x.size >= max(min_8bit_size, 1)

    def init_moment(x):
        if quantized(x):
            return jnp.zeros(x.shape, jnp.int8)
        return jnp.zeros(x.shape, jnp.float32)

    def init_absmax(x):
        # float32 leaves keep a (1,) placeholder: checkpointers (orbax) refuse zero-size arrays
        shape = slice_absmax_shape(x.shape, block_size) if quantized(x) else (1,)
        return jnp.zeros(shape, jnp.float32)

    def init_fn(params):
        return ScaleByAdam8bitState(
            count=jnp.zeros([], jnp.int32),
            mu=jax.tree.map(init_moment, params), mu_absmax=jax.tree.map(init_absmax, params),
            nu=jax.tree.map(init_moment, params), nu_absmax=jax.tree.map(init_absmax, params))

    def block_step(step, g, mq, ma, vq, va):
        """One Adam step on blocks ``(..., block_size)`` of one leaf."""
        m = b1 * _dequantize_blocks(mq, ma, map, True) + (1.0 - b1) * g
        v = b2 * _dequantize_blocks(vq, va, map, False) + (1.0 - b2) * g * g
        out = step * m / (jnp.sqrt(v) + eps)
        return (out,) + _quantize_blocks(m, map, True) + _quantize_blocks(v, map, False)

    def leaf_step(step, g, mq, ma, vq, va):
        g32 = g.astype(jnp.float32)
        if mq.dtype != jnp.int8:  # small leaf: float32 moments
            m = b1 * mq + (1.0 - b1) * g32
            v = b2 * vq + (1.0 - b2) * g32 * g32
            return (step * m / (jnp.sqrt(v) + eps)).astype(g.dtype), m, ma, v, va
        # Blockwise, CHUNK_BLOCKS blocks at a time, so the float32 moments of only one chunk are
        # ever live; every chunk is written back in place (see _map_chunks_in_place).
        fn = functools.partial(block_step, step)
        out, mq, ma_flat, vq, va_flat = _map_chunks_in_place(
            fn, _slice_blocks(g32, block_size), _slice_blocks(mq, block_size), ma.reshape(-1),
            _slice_blocks(vq, block_size), va.reshape(-1))
        return (_slice_unblocks(out, g.shape).astype(g.dtype), _slice_unblocks(mq, g.shape),
                ma_flat.reshape(ma.shape), _slice_unblocks(vq, g.shape), va_flat.reshape(va.shape))

    def update_fn(updates, state, params=None):
        del params
        count = optax.safe_increment(state.count)
        t = count.astype(jnp.float32)
        step = jnp.sqrt(1.0 - b2**t) / (1.0 - b1**t) if bias_correction else 1.0
        leaves, treedef = jax.tree.flatten(updates)
        fields = [treedef.flatten_up_to(f) for f in state[1:]]
        results = [leaf_step(step, *args) for args in zip(leaves, *fields)]
        outs, mus, mu_as, nus, nu_as = (treedef.unflatten(list(r)) for r in zip(*results))
        return outs, ScaleByAdam8bitState(count, mus, mu_as, nus, nu_as)

    return optax.GradientTransformation(init_fn, update_fn)


# ---------------------------------------------------------------------------------------------
# INT4 / INT8 projector storage.
# ---------------------------------------------------------------------------------------------


def _check_bits(bits) -> None:
    if bits not in PROJ_BITS:
        raise ValueError(f"bits={bits!r} must be one of {PROJ_BITS}.")


def quantize_minmax(x: jax.Array, bits: int = 4,
                    group_size: int = 256) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Asymmetric min-max quantization of ``x`` (flattened) in groups of ``group_size``.

    Args:
      x: a float array.
      bits: 4 (two codes packed per uint8) or 8.
      group_size: entries per group (the last group is zero-padded, which can only widen its
        range).

    Returns:
      ``(packed uint8 codes, scale (num_groups,), minimum (num_groups,))``; with ``bits=4`` the
      codes take ``ceil(x.size / 2)`` bytes.
    """
    _check_bits(bits)
    _check_block_size(group_size)
    groups = _blocks(x.astype(jnp.float32), group_size)
    lo = jnp.min(groups, axis=1)
    hi = jnp.max(groups, axis=1)
    levels = 2**bits - 1
    scale = (hi - lo) / levels
    safe = jnp.where(scale > 0, scale, 1.0)
    codes = jnp.clip(jnp.round((groups - lo[:, None]) / safe[:, None]), 0, levels)
    codes = codes.reshape(-1)[: x.size].astype(jnp.uint8)
    if bits == 4:
        codes = jnp.pad(codes, (0, codes.size % 2))
        codes = codes[0::2] | (codes[1::2] << 4)
    return codes, scale, lo


def dequantize_minmax(packed: jax.Array, scale: jax.Array, lo: jax.Array, shape,
                      bits: int = 4, group_size: int = 256, dtype=jnp.float32) -> jax.Array:
    """Inverse of :func:`quantize_minmax`: ``code * scale + min`` per group."""
    size = math.prod(shape)
    if bits == 4:
        codes = jnp.stack([packed & 0xF, packed >> 4], axis=1).reshape(-1)[:size]
    else:
        codes = packed[:size]
    groups = _blocks(codes.astype(jnp.float32), group_size)
    values = groups * scale[:, None] + lo[:, None]
    return _unblocks(values, tuple(shape)).astype(dtype)


class QuantizedProjectorState(NamedTuple):
    """State of one :func:`quantized_svd_projector` (one matrix).

    Attributes:
      codes: uint8 packed codes of ``P`` (``ceil(size / 2)`` bytes for 4 bits).
      scale: float32 ``(num_groups,)`` quantization step per group.
      minimum: float32 ``(num_groups,)`` minimum per group.
      similarities: float32 ``(queue_size,)`` last cosine similarities (ring buffer).
      num_similarities: int32 scalar, similarities recorded so far.
      gap_multiplier: int32 scalar, this layer's refresh gap in units of ``update_proj_gap``.
      calls: int32 scalar, scheduled refreshes seen.
      svds: int32 scalar, SVDs computed.
      skipped: int32 scalar, scheduled refreshes whose SVD was skipped (lazy refresh).
    """

    codes: jax.Array
    scale: jax.Array
    minimum: jax.Array
    similarities: jax.Array
    num_similarities: jax.Array
    gap_multiplier: jax.Array
    calls: jax.Array
    svds: jax.Array
    skipped: jax.Array


def quantized_svd_projector(bits: int = 4, group_size: int = 256, *, lazy: bool = True,
                            queue_size: int = 5, cos_threshold: float = 0.4,
                            gamma_proj: int = 2):
    r"""A GaLore SVD projector stored in ``bits`` bits, with Q-GaLore's lazy refresh.

    Returns a factory ``(m, n, rank, side, dtype) -> Projector`` for the ``projector=`` argument of
    :func:`memjax.optim.scale_by_low_rank`. On every scheduled refresh (``t mod T = offset``) of
    a layer whose current gap multiplier ``k`` divides the number of scheduled refreshes seen, the
    projector takes the thin SVD of ``G`` (canonical signs, as the ``"svd"`` projector), records
    the cosine similarity of its first singular vector with the stored (dequantized) one, and
    quantizes it; otherwise the SVD is skipped and counted. Once ``queue_size`` similarities are
    recorded and the mean of the last ``queue_size`` is ``>= cos_threshold``, ``k`` is multiplied
    by ``gamma_proj`` (and again at every later SVD that keeps the mean above the threshold).
    ``down``/``up`` dequantize ``P`` on use.

    For stacked (vmapped) leaves both branches of the skip run under ``vmap``, so a skip saves no
    compute there; the counters still say which refreshes the schedule skipped.

    Args:
      bits: 4 (default) or 8.
      group_size: entries per quantization group.
      lazy: adapt the refresh gap (``False``: refresh at every scheduled step, still quantized).
      queue_size: number of similarities averaged.
      cos_threshold: mean similarity at which a layer's gap grows.
      gamma_proj: factor by which the gap grows (int >= 1).

    Raises:
      ValueError: ``bits`` not in {4, 8} or other invalid arguments.
    """
    _check_bits(bits)
    _check_block_size(group_size)
    _checks.check_int("queue_size", queue_size, 1)
    _checks.check_int("gamma_proj", gamma_proj, 1)
    if isinstance(cos_threshold, (int, float)) and not -1.0 <= cos_threshold <= 1.0:
        raise ValueError(f"cos_threshold={cos_threshold} must lie in [-1, 1].")

    def factory(m: int, n: int, rank: int, side: str, dtype) -> proj_lib.Projector:
        base = proj_lib.make_projector("svd", m, n, rank, side, jnp.float32)
        # Stored as the authors store it: the basis as it multiplies G, P (m x r) on the left,
        # P^T (r x n) on the right, grouped over its row-major flattening.
        p_shape = (m, rank) if side == "left" else (rank, n)
        as_stored = (lambda b: b) if side == "left" else (lambda b: b.T)
        size = math.prod(p_shape)
        ngroups = num_blocks(size, group_size)
        ncodes = -(-size // 2) if bits == 4 else size

        def basis(ps):
            """The dequantized basis in the base projector's layout (``k x r``)."""
            return as_stored(dequantize_minmax(ps.codes, ps.scale, ps.minimum, p_shape, bits,
                                               group_size))

        def init(key):
            del key
            z = lambda s, d: jnp.zeros(s, d)
            i32 = lambda v: jnp.full([], v, jnp.int32)
            return QuantizedProjectorState(
                z((ncodes,), jnp.uint8), z((ngroups,), jnp.float32), z((ngroups,), jnp.float32),
                z((queue_size,), jnp.float32), i32(0), i32(1), i32(0), i32(0), i32(0))

        def take_svd(g, ps, key):
            new = base.refresh(g, None, key).astype(jnp.float32)
            old_v, new_v = basis(ps)[:, 0], new[:, 0]
            cos = jnp.dot(old_v, new_v) / (
                jnp.linalg.norm(old_v) * jnp.linalg.norm(new_v) + 1e-12)
            record = ps.svds > 0
            sims = jnp.where(record, jnp.roll(ps.similarities, -1).at[-1].set(cos),
                             ps.similarities)
            num = ps.num_similarities + record.astype(jnp.int32)
            grow = record & (num >= queue_size) & (jnp.mean(sims) >= cos_threshold)
            gap = ps.gap_multiplier * jnp.where(grow & lazy, gamma_proj, 1).astype(jnp.int32)
            codes, scale, lo = quantize_minmax(as_stored(new), bits, group_size)
            return ps._replace(codes=codes, scale=scale, minimum=lo, similarities=sims,
                               num_similarities=num, gap_multiplier=gap, svds=ps.svds + 1)

        def skip(g, ps, key):
            del g, key
            return ps._replace(skipped=ps.skipped + 1)

        def refresh(g, ps, key):
            turn = (ps.calls % ps.gap_multiplier) == 0
            ps = jax.lax.cond(turn, take_svd, skip, g, ps, key)
            return ps._replace(calls=ps.calls + 1)

        def down(g, ps):
            return base.down(g, basis(ps).astype(dtype))

        def up(low, ps):
            return base.up(low, basis(ps).astype(dtype))

        return proj_lib.Projector(init, refresh, down, up, base.low_shape)

    return factory


def svd_counts(state: Any) -> tuple[jax.Array, jax.Array]:
    """``(SVDs computed, SVDs skipped)`` summed over every quantized projector in ``state``.

    Works on any optimizer state that contains :class:`QuantizedProjectorState` s (e.g. the
    state of :func:`memjax.optim.q_galore`); stacked leaves count every slice.
    """
    found = [x for x in jax.tree.leaves(state, is_leaf=lambda x: isinstance(
        x, QuantizedProjectorState)) if isinstance(x, QuantizedProjectorState)]
    svds = sum((jnp.sum(x.svds) for x in found), jnp.zeros([], jnp.int32))
    skipped = sum((jnp.sum(x.skipped) for x in found), jnp.zeros([], jnp.int32))
    return svds, skipped
