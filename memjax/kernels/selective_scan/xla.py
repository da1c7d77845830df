"""Chunked selective scan in plain XLA: linear memory in the sequence, fast forward and backward.

The recurrence (see `reference.py`), per batch element, channel d and state index n,

    x_t = exp(delta_t * A) * x_{t-1} + delta_t * B_t * u_t,      y_t = <C_t, x_t>,

is split into `n_chunks` chunks of `T <= chunk_size` steps. An outer `jax.lax.scan` carries the state
x (batch, channels, N) from chunk to chunk; inside a chunk the T states are computed either

* ``"sequential"`` (default): a Python-unrolled loop over the T steps. XLA fuses each step's elementwise
  update and readout, so no (batch, T, channels, N) tensor needs to be kept; on CPU this is the fastest
  form for T around 16; or
* ``"associative"``: `jax.lax.associative_scan` over the T steps with the operator
  (a1, b1) o (a2, b2) = (a1 a2, a2 b1 + b2) on (decay, drive), which materialises (batch, T, channels, N).

The chunk body is wrapped in `jax.checkpoint`, so reverse-mode autodiff stores only the chunk-boundary
states (n_chunks, batch, channels, N) and the (batch, length, channels) inputs, and recomputes each
chunk's states in the backward pass. The full (batch, length, channels, N) tensor is never materialised.

Chunks are balanced: `n_chunks = ceil(L / chunk_size)`, `T = ceil(L / n_chunks)`, and the at most
`n_chunks - 1` missing steps are padded at the end with delta = 0, u = 0, B = C = 0, which is the
identity step (exp(0 * A) = 1, zero drive), so padding changes neither y nor the last state.

Reference: A. Gu and T. Dao, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces",
arXiv 2312.00752 (2023).
"""

from __future__ import annotations

import math
from typing import Literal

import jax
import jax.numpy as jnp

from memjax.kernels.selective_scan.reference import discretize_delta, gate_output

Array = jax.Array
ChunkMethod = Literal["sequential", "associative"]

DEFAULT_CHUNK_SIZE = 16
CHUNK_METHODS = ("sequential", "associative")


def chunk_layout(length: int, chunk_size: int) -> tuple[int, int]:
    """Balanced chunking of `length` steps into chunks of at most `chunk_size` steps.

    Returns:
      `(n_chunks, T)` with `n_chunks * T >= length` and `n_chunks * T - length < n_chunks`.
    """
    n_chunks = math.ceil(length / chunk_size)
    return n_chunks, math.ceil(length / n_chunks)


def _to_chunks(a: Array, n_chunks: int, T: int) -> Array:
    """(batch, length, k) -> (n_chunks, batch, T, k), zero-padded at the end of time."""
    batch, length, k = a.shape
    a = jnp.pad(a, ((0, 0), (0, n_chunks * T - length), (0, 0)))
    return jnp.moveaxis(a.reshape(batch, n_chunks, T, k), 1, 0)


def _from_chunks(a: Array, length: int) -> Array:
    """(n_chunks, batch, T, k) -> (batch, length, k), dropping the padding."""
    n_chunks, batch, T, k = a.shape
    return jnp.moveaxis(a, 0, 1).reshape(batch, n_chunks * T, k)[:, :length]


def _combine(left: tuple[Array, Array], right: tuple[Array, Array]) -> tuple[Array, Array]:
    """Composition of affine maps x -> a x + b, `left` applied first."""
    a1, b1 = left
    a2, b2 = right
    return a1 * a2, a2 * b1 + b2


def _chunk_sequential(
    state: Array, A: Array, u: Array, delta: Array, B: Array, C: Array
) -> tuple[Array, Array]:
    """One chunk, unrolled step by step.

    Args:
      state: (batch, channels, N) state before the chunk.
      A: (channels, N).
      u, delta: (batch, T, channels), float32, delta already discretised.
      B, C: (batch, T, N).

    Returns:
      `(last_state (batch, channels, N), y (batch, T, channels))`.
    """
    ys = []
    for t in range(u.shape[1]):
        dt = delta[:, t, :, None]  # (b, d, 1)
        drive = (dt * u[:, t, :, None]) * B[:, t, None, :]
        state = jnp.exp(dt * A[None]) * state + drive
        ys.append(jnp.einsum("bdn,bn->bd", state, C[:, t]))
    return state, jnp.stack(ys, axis=1)


def _chunk_associative(
    state: Array, A: Array, u: Array, delta: Array, B: Array, C: Array
) -> tuple[Array, Array]:
    """One chunk with `jax.lax.associative_scan` over time (same arguments as `_chunk_sequential`)."""
    dt = delta[..., None]  # (b, T, d, 1)
    decay = jnp.exp(dt * A[None, None])  # (b, T, d, n)
    drive = (dt * u[..., None]) * B[:, :, None, :]
    decay_prefix, drive_prefix = jax.lax.associative_scan(_combine, (decay, drive), axis=1)
    states = decay_prefix * state[:, None] + drive_prefix
    return states[:, -1], jnp.einsum("btdn,btn->btd", states, C)


_CHUNK_FNS = {"sequential": _chunk_sequential, "associative": _chunk_associative}


def chunked_scan(
    u: Array,
    delta: Array,
    A: Array,
    B: Array,
    C: Array,
    initial_state: Array,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    chunk_method: ChunkMethod = "sequential",
) -> tuple[Array, Array]:
    """The bare recurrence `y_t = <C_t, x_t>` in float32, chunked and rematerialised.

    Args:
      u, delta: (batch, length, channels) float32; delta already discretised.
      A: (channels, N) float32.
      B, C: (batch, length, N) float32.
      initial_state: (batch, channels, N) float32.
      chunk_size: maximum chunk length T.
      chunk_method: "sequential" or "associative" (see module docstring).

    Returns:
      `(y (batch, length, channels), last_state (batch, channels, N))`, float32.
    """
    length = u.shape[1]
    n_chunks, T = chunk_layout(length, chunk_size)
    chunk_fn = _CHUNK_FNS[chunk_method]

    def body(state: Array, xs: tuple[Array, Array, Array, Array]) -> tuple[Array, Array]:
        return chunk_fn(state, A, *xs)

    # Save only the chunk inputs (the boundary state and the chunk's slices); recompute the rest.
    body = jax.checkpoint(body, prevent_cse=False)

    xs = tuple(_to_chunks(a, n_chunks, T) for a in (u, delta, B, C))
    last_state, y = jax.lax.scan(body, initial_state, xs)
    return _from_chunks(y, length), last_state


def selective_scan_xla(
    u: Array,
    delta: Array,
    A: Array,
    B: Array,
    C: Array,
    D: Array | None = None,
    z: Array | None = None,
    delta_bias: Array | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    *,
    initial_state: Array | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    chunk_method: ChunkMethod = "sequential",
) -> Array | tuple[Array, Array]:
    """Selective scan with the semantics of `selective_scan_reference`, chunked for memory and speed.

    Args:
      u, delta: (batch, length, channels).
      A: (channels, N).
      B, C: (batch, length, N).
      D: (channels,) or None.
      z: (batch, length, channels) or None.
      delta_bias: (channels,) or None.
      delta_softplus: apply softplus to `delta + delta_bias`.
      return_last_state: also return the final state.
      initial_state: (batch, channels, N) or None (zeros).
      chunk_size: maximum number of time steps per chunk.
      chunk_method: "sequential" (unrolled, default) or "associative" within a chunk.

    Returns:
      y (batch, length, channels) in `u`'s dtype [, last_state (batch, channels, N) float32].
    """
    f32 = jnp.float32
    batch, _, channels = u.shape
    if initial_state is None:
        initial_state = jnp.zeros((batch, channels, A.shape[-1]), f32)
    dt = discretize_delta(delta, delta_bias, delta_softplus)
    y, last_state = chunked_scan(
        u.astype(f32),
        dt,
        A.astype(f32),
        B.astype(f32),
        C.astype(f32),
        initial_state.astype(f32),
        chunk_size=chunk_size,
        chunk_method=chunk_method,
    )
    y = gate_output(y, u, D, z).astype(u.dtype)
    return (y, last_state) if return_last_state else y
