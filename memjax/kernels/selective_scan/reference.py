"""Readable sequential definition of the selective scan (the S6 layer of Mamba).

For every batch element, channel d and state index n, with time t = 1..L:

    delta_t = softplus(delta_t + delta_bias)          (bias and softplus optional)
    x_t     = exp(delta_t * A) * x_{t-1} + delta_t * B_t * u_t
    y_t     = sum_n C_t[n] * x_t[n] + D * u_t         (D optional)
    y_t     = y_t * silu(z_t)                          (z optional)

Shapes: u, delta, z: (batch, length, channels); A: (channels, N); B, C: (batch, length, N);
D, delta_bias: (channels,); the state x: (batch, channels, N).

This file is the naive definition: a `jax.lax.scan` over time whose body is the one-token decode step
`selective_state_update`, so the recurrent (decode) form and the reference agree by construction.
Everything is computed in float32; `y` is returned in `u`'s dtype and the last state in float32, as in the
authors' `selective_scan_ref`.

Reference: A. Gu and T. Dao, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces",
arXiv 2312.00752 (2023).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def discretize_delta(delta: Array, delta_bias: Array | None, delta_softplus: bool) -> Array:
    """The step size actually used by the scan, in float32.

    Args:
      delta: (..., channels) raw step sizes.
      delta_bias: (channels,) or None; added before the softplus.
      delta_softplus: whether to apply softplus.

    Returns:
      (..., channels) float32 `softplus(delta + delta_bias)` (each part optional).
    """
    delta = delta.astype(jnp.float32)
    if delta_bias is not None:
        delta = delta + jnp.broadcast_to(delta_bias.astype(jnp.float32), delta.shape)
    if delta_softplus:
        delta = jax.nn.softplus(delta)
    return delta


def gate_output(y: Array, u: Array, D: Array | None, z: Array | None) -> Array:
    """Skip connection and gate: `(y + D * u) * silu(z)`, in float32.

    Args:
      y: (..., channels) float32 readout `<C_t, x_t>`.
      u: (..., channels) scan input.
      D: (channels,) or None.
      z: (..., channels) or None.

    Returns:
      (..., channels) float32.
    """
    if D is not None:
        y = y + u.astype(jnp.float32) * jnp.broadcast_to(D.astype(jnp.float32), y.shape)
    if z is not None:
        y = y * jax.nn.silu(z.astype(jnp.float32))
    return y


def selective_state_update(
    state: Array,
    u: Array,
    delta: Array,
    A: Array,
    B: Array,
    C: Array,
    D: Array | None = None,
    z: Array | None = None,
    delta_bias: Array | None = None,
    delta_softplus: bool = False,
) -> tuple[Array, Array]:
    """One step of the selective scan (the decode form).

    Args:
      state: (batch, channels, N) previous state x_{t-1}.
      u, delta: (batch, channels) input and raw step size at time t.
      A: (channels, N) state matrix (diagonal per channel; negative for a stable scan).
      B, C: (batch, N) input and output projections at time t.
      D: (channels,) skip weight, or None.
      z: (batch, channels) gate, or None.
      delta_bias: (channels,) added to delta, or None.
      delta_softplus: apply softplus to delta (after the bias).

    Returns:
      `(y, new_state)`: y (batch, channels) in `u`'s dtype; new_state (batch, channels, N) in `state`'s
      dtype.
    """
    f32 = jnp.float32
    dt = discretize_delta(delta, delta_bias, delta_softplus)[:, :, None]  # (b, d, 1)
    decay = jnp.exp(dt * A.astype(f32)[None])  # (b, d, n)
    drive = (dt * u.astype(f32)[:, :, None]) * B.astype(f32)[:, None, :]  # (b, d, n)
    x = decay * state.astype(f32) + drive
    y = jnp.einsum("bdn,bn->bd", x, C.astype(f32))
    y = gate_output(y, u, D, z)
    return y.astype(u.dtype), x.astype(state.dtype)


def selective_scan_reference(
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
) -> Array | tuple[Array, Array]:
    """Sequential selective scan: `lax.scan` of `selective_state_update` over time.

    Args:
      u, delta: (batch, length, channels).
      A: (channels, N).
      B, C: (batch, length, N).
      D: (channels,) or None.
      z: (batch, length, channels) or None.
      delta_bias: (channels,) or None.
      delta_softplus: apply softplus to `delta + delta_bias`.
      return_last_state: also return the final state.
      initial_state: (batch, channels, N) state before the first token; zeros when None.

    Returns:
      y (batch, length, channels) in `u`'s dtype, and if `return_last_state` also the last state
      (batch, channels, N) in float32.
    """
    batch, _, channels = u.shape
    n = A.shape[-1]
    if initial_state is None:
        initial_state = jnp.zeros((batch, channels, n), jnp.float32)
    initial_state = initial_state.astype(jnp.float32)

    def time_major(a: Array | None) -> Array | None:
        return None if a is None else jnp.swapaxes(a, 0, 1)

    def step(state, inputs):
        u_t, delta_t, B_t, C_t, z_t = inputs
        y_t, state = selective_state_update(
            state, u_t.astype(jnp.float32), delta_t, A, B_t, C_t, D, z_t, delta_bias, delta_softplus
        )
        return state, y_t

    xs = (time_major(u), time_major(delta), time_major(B), time_major(C), time_major(z))
    last_state, y = jax.lax.scan(step, initial_state, xs)
    y = jnp.swapaxes(y, 0, 1).astype(u.dtype)
    return (y, last_state) if return_last_state else y
