r"""Gaussian matrices from a threefry key, as one fused elementwise computation.

:func:`normal` returns exactly ``jax.random.normal(key, shape, float32)`` (bit for bit) for a
default (threefry-2x32) key, but computes the Threefry-2x32 hash (Salmon et al. 2011, 20 rounds)
with plain unrolled integer ops instead of the ``threefry2x32`` primitive. On CPU that primitive
lowers to a rolled ``while`` loop (5 iterations, each a handful of tiny kernels and tuple
copies), which dominated the step of the random-projection optimizers that regenerate their
projection from its seed every step; the unrolled form fuses into one loop over the output.

The bits follow JAX's "partitionable" threefry layout (``jax_threefry_partitionable=True``, the
default since JAX 0.5): the counter of entry ``i`` (row-major) is the 64-bit ``i`` split into two
32-bit words ``(hi, lo)``, the bits are ``x1 ^ x2`` of ``threefry2x32(key, (hi, lo))``, and the
float is ``sqrt(2) * erfinv(u)`` with ``u`` uniform on ``[nextafter(-1, 0), 1)`` from the top 23
bits. With any other configuration or key implementation, :func:`normal` simply calls
``jax.random.normal``. ``tests/optim/test_projectors.py`` checks the equality.

Reference:
  Salmon et al., "Parallel Random Numbers: As Easy as 1, 2, 3", SC 2011 (Threefry).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_PARITY = 0x1BD11BDA


def _rotate_left(x: jax.Array, d: int) -> jax.Array:
    return jax.lax.shift_left(x, jnp.uint32(d)) | jax.lax.shift_right_logical(x, jnp.uint32(32 - d))


@jax.jit
def threefry2x32(k1: jax.Array, k2: jax.Array, x1: jax.Array,
                 x2: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Threefry-2x32 (20 rounds) of counters ``(x1, x2)`` under key ``(k1, k2)``, unrolled.

    Jitted so that its 60-odd integer ops are traced once per input shape and reused as one call
    (XLA inlines it, so it still fuses into the caller's loop): traced inline, every ``tx.init``
    of a tree with many leaves spent seconds in Python building the same ops again.

    Args:
      k1, k2: uint32 scalars, the key words.
      x1, x2: uint32 arrays of one shape, the counter words.

    Returns:
      The two uint32 output words, ``x1``'s shape.
    """
    ks = (k1, k2, k1 ^ k2 ^ jnp.uint32(_PARITY))
    x1, x2 = x1 + ks[0], x2 + ks[1]
    for i in range(5):
        for r in _ROTATIONS[i % 2]:
            x1 = x1 + x2
            x2 = x1 ^ _rotate_left(x2, r)
        x1 = x1 + ks[(i + 1) % 3]
        x2 = x2 + ks[(i + 2) % 3] + jnp.uint32(i + 1)
    return x1, x2


def _partitionable_threefry(impl: str) -> bool:
    return impl == "threefry2x32" and bool(jax.config.jax_threefry_partitionable)


def _threefry_key(key: jax.Array) -> bool:
    """A typed scalar key that :func:`normal` / :func:`fold_in` can hash themselves."""
    return (jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key) and key.shape == ()
            and _partitionable_threefry(str(jax.random.key_impl(key))))


def _fused_unit(key_data: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Uniform floats on ``[0, 1)`` from the top 23 bits of the unrolled threefry hash of a
    (partitionable) threefry key's uint32 ``(2,)`` data."""
    lo = jax.lax.iota(jnp.uint32, math.prod(shape)).reshape(shape)
    b1, b2 = threefry2x32(key_data[0], key_data[1], jnp.zeros_like(lo), lo)
    bits = b1 ^ b2
    one = np.array(1.0, np.float32).view(np.uint32)
    return jax.lax.bitcast_convert_type(
        jax.lax.shift_right_logical(bits, jnp.uint32(9)) | jnp.uint32(one), jnp.float32) - 1.0


def uniform(key_data: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """``jax.random.uniform(wrap_key_data(key_data), shape, float32)`` on ``[0, 1)``, bit for bit,
    fused (as :func:`normal`)."""
    if (not _partitionable_threefry(str(jax.config.jax_default_prng_impl))
            or math.prod(shape) >= 2**32):
        return jax.random.uniform(jax.random.wrap_key_data(key_data), shape, jnp.float32)
    return jnp.maximum(np.float32(0.0), _fused_unit(key_data, shape))


def _fused_normal(key_data: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """The unrolled-threefry Gaussian of a (partitionable) threefry key's uint32 ``(2,)`` data."""
    floats = _fused_unit(key_data, shape)
    low = np.nextafter(np.float32(-1.0), np.float32(0.0))
    u = jnp.maximum(low, floats * (np.float32(1.0) - low) + low)
    return np.float32(np.sqrt(2)) * jax.lax.erf_inv(u)


def normal(key_data: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """``jax.random.normal(wrap_key_data(key_data), shape, float32)``, bit for bit, fused.

    Args:
      key_data: raw data of a key of JAX's default PRNG implementation (uint32 ``(2,)`` for
        threefry).
      shape: output shape.

    Returns:
      float32 array of ``shape``, standard normal.
    """
    if (not _partitionable_threefry(str(jax.config.jax_default_prng_impl))
            or math.prod(shape) >= 2**32):
        return jax.random.normal(jax.random.wrap_key_data(key_data), shape, jnp.float32)
    return _fused_normal(key_data, shape)


def key_normal(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """``jax.random.normal(key, shape, float32)`` for a typed scalar key, fused for threefry."""
    if not _threefry_key(key) or math.prod(shape) >= 2**32:
        return jax.random.normal(key, shape, jnp.float32)
    return _fused_normal(jax.random.key_data(key), shape)


def fold_in(key: jax.Array, data) -> jax.Array:
    """``jax.random.fold_in(key, data)`` bit for bit, as unrolled integer ops for threefry.

    JAX folds ``data`` in as the threefry hash of the counter pair ``(0, data)``.
    """
    if not _threefry_key(key):
        return jax.random.fold_in(key, data)
    kd = jax.random.key_data(key)
    data = jnp.asarray(data, dtype=jnp.uint32)
    o1, o2 = threefry2x32(kd[0], kd[1], jnp.zeros_like(data), data)
    return jax.random.wrap_key_data(jnp.stack([o1, o2]), impl="threefry2x32")
