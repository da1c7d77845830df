"""Selective scan (Mamba's S6) as Pallas kernels, forward and backward.

Per batch element b, channel d and state index n, with time t = 0..L-1 (see `reference.py`):

    dt_t = softplus(delta_t + delta_bias)                          (bias, softplus optional)
    x_t  = exp(dt_t A) * x_{t-1} + dt_t u_t B_t
    y_t  = (<C_t, x_t> + D u_t) * silu(z_t)                       (D, z optional)

A program owns one batch element and a tile of `block_d` channels, and carries that tile's
(N, block_d) state through time in fast memory (registers / SRAM on GPU, VMEM on TPU). Time is
cut into chunks of T steps; inside a chunk the T steps are unrolled. The (batch, L, D, N) tensor of
all states is never written to HBM: the forward pass stores only the state entering each chunk,
(batch, L / T, N, D), for the backward pass.

Backward (reverse time, chunks in reverse order), with h_t = dLoss/dx_t the adjoint state and
g_t = dLoss/d<C_t, x_t> = dy_t * silu(z_t):

    h_t    = C_t g_t + exp(dt_{t+1} A) h_{t+1}        (h_{L-1} starts from the last state's
                                                        cotangent; h_{-1} is d initial_state)
    dC_t   = sum_d x_t g_t                dB_t = sum_d h_t dt_t u_t
    du_t   = dt_t sum_n h_t B_t + D g_t
    ddt_t  = u_t sum_n h_t B_t + sum_n A h_t exp(dt_t A) x_{t-1}
    dA     = sum_{b,t} dt_t h_t exp(dt_t A) x_{t-1}

Each chunk's T states are recomputed from the saved chunk-entry state, then walked backwards;
exp(dt_t A) x_{t-1} is recovered as x_t - dt_t u_t B_t (no division, no second stash).

Two ways to walk the chunks (``backend``), with the same per-chunk code:

* ``"triton"`` (GPU): grid (batch, channel tiles); each program loops over the chunks with a
  ``fori_loop``, reading one time row of u / delta / z and one column of B^T / C^T per step.
  Triton needs power-of-two tiles: N and block_d are padded to powers of two.
* ``"tpu"`` (Mosaic): grid (batch, channel tiles, chunks) with the chunk axis "arbitrary"; the
  carried state lives in VMEM scratch between grid steps, so only one chunk of the inputs is
  resident in VMEM; the backward stashes the recomputed states of a chunk in a (T, N, block_d)
  VMEM scratch buffer. block_d is a multiple of 128 dividing D (or all of D); T a multiple of 8.

B and C are passed to the kernels as (batch, L / T, N, T), so a step's (N, 1) column is a static
lane slice; the state layout (N, block_d) keeps channels on the lanes. Lengths that are not a
multiple of T are zero padded, and padded steps are forced to dt = 0 (the identity step), so the
last state is exact. Both backends run on CPU with ``interpret=True``. With ``backend=None`` the
kernel style is chosen per lowering platform (Triton on CUDA / ROCm, Mosaic on TPU, the Pallas
interpreter elsewhere), so a CPU host can export the GPU or TPU kernel.

Reference: A. Gu and T. Dao, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces",
arXiv 2312.00752 (2023).
"""

from __future__ import annotations

import functools
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from memjax.kernels._common import next_power_of_two, round_up
from memjax.kernels._platform import for_backend, platform_dependent

__all__ = ["BACKENDS", "selective_scan_pallas"]

Backend = Literal["triton", "tpu"]
BACKENDS = ("triton", "tpu")
DEFAULT_CHUNK_SIZE = {"triton": 16, "tpu": 64}
DEFAULT_BLOCK_D = {"triton": 32, "tpu": 512}
_F32 = jnp.float32


class _Config(NamedTuple):
    """Static description of one call (the custom_vjp's non-differentiable argument)."""

    backend: str
    interpret: object  # False, True or a hashable pltpu.InterpretParams
    length: int        # real number of time steps L
    chunk: int         # T
    num_chunks: int    # n, n * T >= L
    block_d: int
    has_D: bool
    has_z: bool
    has_bias: bool
    softplus: bool
    save_states: bool  # forward: also write the chunk-entry states (needed by the backward)
    num_warps: int | None
    num_stages: int | None


def _sigmoid(x):
    return 1.0 / (1.0 + jnp.exp(-x))


def _softplus(x):
    """log(1 + e^x), as torch's softplus (threshold 20)."""
    return jnp.where(x > 20.0, x, jnp.log1p(jnp.exp(jnp.minimum(x, 20.0))))


# ----------------------------------------------------------------------------------------------
# Walking the chunks.


class _Chunk:
    """Access to chunk ``c``'s rows (time steps) and columns (of B^T, C^T) for one backend."""

    def __init__(self, cfg: _Config, c):
        self.cfg, self.c = cfg, c
        self.triton = cfg.backend == "triton"

    def row(self, ref, t: int):
        """(1, block_d) time step t of a (time, channels) ref."""
        if self.triton:
            return ref[pl.ds(self.c * self.cfg.chunk + t, 1), :]
        return ref[t:t + 1, :]

    def store_row(self, ref, t: int, x) -> None:
        if self.triton:
            ref[pl.ds(self.c * self.cfg.chunk + t, 1), :] = x.astype(ref.dtype)
        else:
            ref[t:t + 1, :] = x.astype(ref.dtype)

    def col(self, ref, t: int):
        """(N, 1) step t of a (chunks, N, T) ref (TPU: the (N, T) block of this chunk)."""
        return ref[self.c, :, t:t + 1] if self.triton else ref[:, t:t + 1]

    def store_col(self, ref, t: int, x) -> None:
        if self.triton:
            ref[self.c, :, t:t + 1] = x.astype(ref.dtype)
        else:
            ref[:, t:t + 1] = x.astype(ref.dtype)

    def block(self, ref):
        """(N, block_d) entry of a (chunks, N, channels) ref for this chunk."""
        return ref[self.c] if self.triton else ref[...]

    def store_block(self, ref, x) -> None:
        if self.triton:
            ref[self.c] = x.astype(ref.dtype)
        else:
            ref[...] = x.astype(ref.dtype)

    def valid(self, t: int):
        """1.0 if step t of this chunk is a real time step, 0.0 if it is padding (float32)."""
        return jnp.asarray(self.c * self.cfg.chunk + t < self.cfg.length, _F32)


def _walk_chunks(cfg: _Config, reverse: bool, init, body, finalize, carry_refs) -> None:
    """``carry = body(_Chunk, carry)`` over the chunks; "tpu" carries in VMEM ``carry_refs``."""
    n = cfg.num_chunks
    if cfg.backend == "triton":
        def step(i, carry):
            return body(_Chunk(cfg, n - 1 - i if reverse else i), carry)

        finalize(jax.lax.fori_loop(0, n, step, init()))
        return

    i = pl.program_id(2)

    @pl.when(i == 0)
    def _():
        for ref, value in zip(carry_refs, init()):
            ref[...] = value

    carry = body(_Chunk(cfg, n - 1 - i if reverse else i), tuple(r[...] for r in carry_refs))
    for ref, value in zip(carry_refs, carry):
        ref[...] = value

    @pl.when(i == n - 1)
    def _():
        finalize(carry)


class _Inputs(NamedTuple):
    """Refs of the scan inputs; optional ones are None."""

    u: object
    delta: object
    At: object
    Bt: object
    Ct: object
    D: object
    z: object
    bias: object


def _split_inputs(cfg: _Config, refs: list) -> tuple[_Inputs, list]:
    """Unpack (u, delta, At, Bt, Ct[, D][, z][, bias]) from the front of ``refs``."""
    refs = list(refs)
    u, delta, At, Bt, Ct = refs[:5]
    rest = refs[5:]
    D = rest.pop(0) if cfg.has_D else None
    z = rest.pop(0) if cfg.has_z else None
    bias = rest.pop(0) if cfg.has_bias else None
    return _Inputs(u, delta, At, Bt, Ct, D, z, bias), rest


def _step_size(cfg: _Config, ins: _Inputs, chunk: _Chunk, t: int, bias):
    """(dt (1, block_d), pre-softplus value or None) of step t; dt = 0 on padded steps."""
    raw = chunk.row(ins.delta, t).astype(_F32)
    if bias is not None:
        raw = raw + bias
    dt = _softplus(raw) if cfg.softplus else raw
    if cfg.num_chunks * cfg.chunk > cfg.length:
        dt = dt * chunk.valid(t)
    return dt, raw


# ----------------------------------------------------------------------------------------------
# Kernels.


def _forward_kernel(*refs, cfg: _Config):
    """y and the last state (and the chunk-entry states when ``cfg.save_states``)."""
    ins, refs = _split_inputs(cfg, refs)
    x0_ref, y_ref, x_last_ref = refs[:3]
    states_ref = refs[3] if cfg.save_states else None
    carry_refs = refs[4:] if cfg.save_states else refs[3:]
    At = ins.At[...].astype(_F32)
    D = ins.D[...].astype(_F32) if cfg.has_D else None
    bias = ins.bias[...].astype(_F32) if cfg.has_bias else None

    def body(chunk: _Chunk, carry):
        (x,) = carry
        if states_ref is not None:
            chunk.store_block(states_ref, x)
        for t in range(cfg.chunk):
            u = chunk.row(ins.u, t).astype(_F32)
            dt, _ = _step_size(cfg, ins, chunk, t, bias)
            x = jnp.exp(dt * At) * x + (dt * u) * chunk.col(ins.Bt, t).astype(_F32)
            y = jnp.sum(x * chunk.col(ins.Ct, t).astype(_F32), axis=0, keepdims=True)
            if D is not None:
                y = y + D * u
            if cfg.has_z:
                zt = chunk.row(ins.z, t).astype(_F32)
                y = y * zt * _sigmoid(zt)
            chunk.store_row(y_ref, t, y)
        return (x,)

    def finalize(carry):
        x_last_ref[...] = carry[0]

    _walk_chunks(cfg, False, lambda: (x0_ref[...].astype(_F32),), body, finalize, carry_refs)


def _backward_kernel(*refs, cfg: _Config):
    """Cotangents, chunks in reverse order; carry: (adjoint h, dA, dD) of the channel tile."""
    ins, refs = _split_inputs(cfg, refs)
    (states_ref, dy_ref, dx_last_ref, du_ref, ddelta_ref, dBt_ref, dCt_ref, dA_ref, dD_ref,
     dx0_ref) = refs[:10]
    refs = refs[10:]
    dz_ref = refs.pop(0) if cfg.has_z else None
    stash_ref = refs.pop(0) if cfg.backend == "tpu" else None
    carry_refs = refs
    At = ins.At[...].astype(_F32)
    D = ins.D[...].astype(_F32) if cfg.has_D else None
    bias = ins.bias[...].astype(_F32) if cfg.has_bias else None
    width = At.shape[1]

    def body(chunk: _Chunk, carry):
        h, dA, dD = carry
        # Recompute the chunk's states from its entry state.
        x = chunk.block(states_ref).astype(_F32)
        xs, steps = [], []
        for t in range(cfg.chunk):
            u = chunk.row(ins.u, t).astype(_F32)
            dt, raw = _step_size(cfg, ins, chunk, t, bias)
            x = jnp.exp(dt * At) * x + (dt * u) * chunk.col(ins.Bt, t).astype(_F32)
            if stash_ref is None:
                xs.append(x)
            else:
                stash_ref[t] = x
            steps.append((u, dt, raw))
        # Walk them backwards.
        for t in reversed(range(cfg.chunk)):
            u, dt, raw = steps[t]
            x = xs[t] if stash_ref is None else stash_ref[t]
            b_col = chunk.col(ins.Bt, t).astype(_F32)
            c_col = chunk.col(ins.Ct, t).astype(_F32)
            g = chunk.row(dy_ref, t).astype(_F32)
            if cfg.has_z:
                zt = chunk.row(ins.z, t).astype(_F32)
                sig = _sigmoid(zt)
                out = jnp.sum(x * c_col, axis=0, keepdims=True)
                if D is not None:
                    out = out + D * u
                chunk.store_row(dz_ref, t, g * out * sig * (1.0 + zt * (1.0 - sig)))
                g = g * zt * sig
            chunk.store_col(dCt_ref, t, jnp.sum(x * g, axis=1, keepdims=True))
            h = h + c_col * g
            drive = dt * u
            h_b = jnp.sum(h * b_col, axis=0, keepdims=True)
            du = dt * h_b
            if D is not None:
                du = du + D * g
                dD = dD + g * u
            decayed = h * (x - drive * b_col)          # h_t * exp(dt A) x_{t-1}
            ddt = u * h_b + jnp.sum(decayed * At, axis=0, keepdims=True)
            dA = dA + dt * decayed
            chunk.store_col(dBt_ref, t, jnp.sum(h * drive, axis=1, keepdims=True))
            h = jnp.exp(dt * At) * h
            if cfg.softplus:
                ddt = ddt * _sigmoid(raw)
            if cfg.num_chunks * cfg.chunk > cfg.length:
                ddt = ddt * chunk.valid(t)
            chunk.store_row(ddelta_ref, t, ddt)
            chunk.store_row(du_ref, t, du)
        return h, dA, dD

    def init():
        h = dx_last_ref[...].astype(_F32)
        return h, jnp.zeros_like(h), jnp.zeros((1, width), _F32)

    def finalize(carry):
        h, dA, dD = carry
        dx0_ref[...] = h
        dA_ref[...] = dA
        dD_ref[...] = dD

    _walk_chunks(cfg, True, init, body, finalize, carry_refs)


# ----------------------------------------------------------------------------------------------
# pallas_call plumbing. Arrays: u-like (batch, L_pad, D_pad); At (N, D_pad); Bt-like
# (batch, n, N, T); per-channel (1, D_pad); states (batch, N, D_pad); chunk states
# (batch, n, N, D_pad); per-tile partial sums get a leading (batch, tiles) pair.


class _Specs:
    """BlockSpecs, grid and compiler parameters of one backend; ``reverse`` walks chunks back."""

    def __init__(self, cfg: _Config, reverse: bool):
        self.cfg = cfg
        n = cfg.num_chunks
        self.tpu = cfg.backend == "tpu"
        self.chunk_index = (lambda i: n - 1 - i) if reverse else (lambda i: i)

    def _spec(self, block, tpu_index, triton_index):
        if self.tpu:
            return pl.BlockSpec(block[0], lambda b, d, i: tpu_index(b, d, self.chunk_index(i)))
        return pl.BlockSpec(block[1], lambda b, d: triton_index(b, d))

    def rows(self):
        """(batch, L_pad, D_pad) per-step arrays (u, delta, z, y and their cotangents)."""
        cfg = self.cfg
        return self._spec(((None, cfg.chunk, cfg.block_d),
                           (None, cfg.num_chunks * cfg.chunk, cfg.block_d)),
                          lambda b, d, c: (b, c, d), lambda b, d: (b, 0, d))

    def columns(self, n_state: int, per_tile: bool = False):
        """(batch, n, N, T) B^T / C^T, or (batch, tiles, n, N, T) per-tile partial dB^T / dC^T."""
        cfg = self.cfg
        if per_tile:
            return self._spec(((None, None, None, n_state, cfg.chunk),
                               (None, None, cfg.num_chunks, n_state, cfg.chunk)),
                              lambda b, d, c: (b, d, c, 0, 0), lambda b, d: (b, d, 0, 0, 0))
        return self._spec(((None, None, n_state, cfg.chunk),
                           (None, cfg.num_chunks, n_state, cfg.chunk)),
                          lambda b, d, c: (b, c, 0, 0), lambda b, d: (b, 0, 0, 0))

    def channels(self, rows: int):
        """(rows, D_pad) parameters (At, D, bias), tiled over channels."""
        return self._spec(((rows, self.cfg.block_d), (rows, self.cfg.block_d)),
                          lambda b, d, c: (0, d), lambda b, d: (0, d))

    def per_batch(self, rows: int):
        """(batch, rows, D_pad) states and per-batch partial sums."""
        return self._spec(((None, rows, self.cfg.block_d), (None, rows, self.cfg.block_d)),
                          lambda b, d, c: (b, 0, d), lambda b, d: (b, 0, d))

    def chunk_states(self, n_state: int):
        """(batch, n, N, D_pad) states entering each chunk."""
        cfg = self.cfg
        return self._spec(((None, None, n_state, cfg.block_d),
                           (None, cfg.num_chunks, n_state, cfg.block_d)),
                          lambda b, d, c: (b, c, 0, d), lambda b, d: (b, 0, 0, d))

    def scratch(self, *shapes):
        if not self.tpu:
            return []
        from jax.experimental.pallas import tpu as pltpu

        return [pltpu.VMEM(shape, _F32) for shape in shapes]

    def compiler_params(self):
        if self.tpu:
            from jax.experimental.pallas import tpu as pltpu

            return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"))
        from jax.experimental.pallas import triton as pltriton

        return pltriton.CompilerParams(num_warps=self.cfg.num_warps,
                                       num_stages=self.cfg.num_stages)

    def grid(self, batch: int, channels: int):
        tiles = channels // self.cfg.block_d
        return (batch, tiles, self.cfg.num_chunks) if self.tpu else (batch, tiles)


def _input_specs(cfg: _Config, specs: _Specs, n_state: int) -> list:
    in_specs = [specs.rows(), specs.rows(), specs.channels(n_state), specs.columns(n_state),
                specs.columns(n_state)]
    if cfg.has_D:
        in_specs.append(specs.channels(1))
    if cfg.has_z:
        in_specs.append(specs.rows())
    if cfg.has_bias:
        in_specs.append(specs.channels(1))
    return in_specs


def _present(*arrays):
    return [a for a in arrays if a is not None]


def _forward(cfg: _Config, u, delta, At, Bt, Ct, D, z, bias, x0):
    batch, _, channels = u.shape
    n_state = At.shape[0]
    specs = _Specs(cfg, reverse=False)
    out_specs = [specs.rows(), specs.per_batch(n_state)]
    out_shape = [jax.ShapeDtypeStruct(u.shape, u.dtype),
                 jax.ShapeDtypeStruct((batch, n_state, channels), _F32)]
    if cfg.save_states:
        out_specs.append(specs.chunk_states(n_state))
        out_shape.append(jax.ShapeDtypeStruct((batch, cfg.num_chunks, n_state, channels), _F32))
    call = pl.pallas_call(
        functools.partial(_forward_kernel, cfg=cfg),
        grid=specs.grid(batch, channels),
        in_specs=[*_input_specs(cfg, specs, n_state), specs.per_batch(n_state)],
        out_specs=out_specs,
        out_shape=out_shape,
        scratch_shapes=specs.scratch((n_state, cfg.block_d)),
        compiler_params=specs.compiler_params(),
        interpret=cfg.interpret,
    )
    outs = for_backend(call, cfg.backend, cfg.interpret)(
        *_present(u, delta, At, Bt, Ct, D, z, bias), x0)
    return tuple(outs)


def _backward(cfg: _Config, u, delta, At, Bt, Ct, D, z, bias, states, dy, dx_last):
    batch, _, channels = u.shape
    n_state = At.shape[0]
    tiles = channels // cfg.block_d
    specs = _Specs(cfg, reverse=True)
    out_specs = [specs.rows(), specs.rows(), specs.columns(n_state, per_tile=True),
                 specs.columns(n_state, per_tile=True), specs.per_batch(n_state),
                 specs.per_batch(1), specs.per_batch(n_state)]
    columns = jax.ShapeDtypeStruct((batch, tiles, cfg.num_chunks, n_state, cfg.chunk), _F32)
    out_shape = [jax.ShapeDtypeStruct(u.shape, u.dtype), jax.ShapeDtypeStruct(u.shape, delta.dtype),
                 columns, columns, jax.ShapeDtypeStruct((batch, n_state, channels), _F32),
                 jax.ShapeDtypeStruct((batch, 1, channels), _F32),
                 jax.ShapeDtypeStruct((batch, n_state, channels), _F32)]
    if cfg.has_z:
        out_specs.append(specs.rows())
        out_shape.append(jax.ShapeDtypeStruct(u.shape, z.dtype))
    scratch = specs.scratch((cfg.chunk, n_state, cfg.block_d), (n_state, cfg.block_d),
                            (n_state, cfg.block_d), (1, cfg.block_d))
    call = pl.pallas_call(
        functools.partial(_backward_kernel, cfg=cfg),
        grid=specs.grid(batch, channels),
        in_specs=[*_input_specs(cfg, specs, n_state), specs.chunk_states(n_state), specs.rows(),
                  specs.per_batch(n_state)],
        out_specs=out_specs,
        out_shape=out_shape,
        scratch_shapes=scratch,
        compiler_params=specs.compiler_params(),
        interpret=cfg.interpret,
    )
    outs = for_backend(call, cfg.backend, cfg.interpret)(
        *_present(u, delta, At, Bt, Ct, D, z, bias), states, dy, dx_last)
    return outs


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _scan_core(cfg: _Config, u, delta, At, Bt, Ct, D, z, bias, x0):
    """Padded, kernel-layout scan -> (y (batch, L_pad, D_pad), last state (batch, N, D_pad))."""
    y, x_last = _forward(cfg._replace(save_states=False), u, delta, At, Bt, Ct, D, z, bias, x0)
    return y, x_last


def _scan_fwd(cfg, u, delta, At, Bt, Ct, D, z, bias, x0):
    y, x_last, states = _forward(cfg._replace(save_states=True), u, delta, At, Bt, Ct, D, z,
                                 bias, x0)
    return (y, x_last), (u, delta, At, Bt, Ct, D, z, bias, states)


def _scan_bwd(cfg, residuals, cotangents):
    u, delta, At, Bt, Ct, D, z, bias, states = residuals
    dy, dx_last = cotangents
    outs = _backward(cfg, u, delta, At, Bt, Ct, D, z, bias, states, dy.astype(u.dtype),
                     dx_last.astype(_F32))
    du, ddelta, dBt, dCt, dA, dD, dx0 = outs[:7]
    dz = outs[7] if cfg.has_z else None
    dD = dD.sum(0).astype(D.dtype) if cfg.has_D else None
    dbias = ddelta.astype(_F32).sum((0, 1))[None].astype(bias.dtype) if cfg.has_bias else None
    return (du, ddelta, dA.sum(0).astype(At.dtype), dBt.sum(1).astype(Bt.dtype),
            dCt.sum(1).astype(Ct.dtype), dD, dz, dbias, dx0)


_scan_core.defvjp(_scan_fwd, _scan_bwd)


# ----------------------------------------------------------------------------------------------
# Public function.


def _layout(backend: str, length: int, channels: int, n_state: int, chunk_size, block_d):
    """(T, n, block_d, D_pad, N_pad) satisfying the backend's tile rules."""
    chunk = chunk_size or DEFAULT_CHUNK_SIZE[backend]
    if backend == "triton":
        chunk = min(chunk, length)
        block = min(next_power_of_two(block_d or DEFAULT_BLOCK_D["triton"]),
                    next_power_of_two(channels))
        channels_p = round_up(channels, block)
        n_state_p = next_power_of_two(n_state)
    else:
        chunk = min(round_up(chunk, 8), round_up(length, 8))
        block = block_d or DEFAULT_BLOCK_D["tpu"]
        if block >= channels or channels % block or block % 128:
            if block_d is not None and block_d < channels:
                raise ValueError(f"block_d must be a multiple of 128 dividing the channels "
                                 f"({channels}) on TPU, got {block_d}.")
            block = channels
        channels_p, n_state_p = channels, n_state
    return chunk, -(-length // chunk), block, channels_p, n_state_p


def selective_scan_pallas(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                          delta_softplus: bool = False, return_last_state: bool = False, *,
                          initial_state=None, chunk_size: int | None = None,
                          block_d: int | None = None, backend: Backend | None = None,
                          interpret=False, num_warps: int | None = 4,
                          num_stages: int | None = 1):
    """Selective scan with the semantics of `selective_scan_reference`, as Pallas kernels.

    Differentiable (`jax.custom_vjp`) in every array argument. Memory of forward + backward is
    O(batch L D) (plus the chunk-entry states, batch L D N / T floats), never O(batch L D N).

    Args:
      u, delta: (batch, L, channels).
      A: (channels, N).
      B, C: (batch, L, N).
      D: (channels,) or None.
      z: (batch, L, channels) or None.
      delta_bias: (channels,) or None.
      delta_softplus: apply softplus to `delta + delta_bias`.
      return_last_state: also return the (batch, channels, N) float32 state after the last step.
      initial_state: (batch, channels, N) or None (zeros).
      chunk_size: T, time steps per chunk (unrolled in the kernel; default 16 on Triton, 64 on
        TPU, where it is rounded up to a multiple of 8). The result does not depend on it.
      block_d: channels per program (Triton: a power of two, default 32; TPU: a multiple of 128
        dividing the channels, default 512 or all channels).
      backend: "triton" (GPU) or "tpu" (Mosaic); None picks per lowering platform
        (`jax.lax.platform_dependent`): Triton on CUDA / ROCm, Mosaic on TPU, and elsewhere (CPU)
        the Triton-style kernels in the Pallas interpreter.
      interpret: run in the Pallas interpreter on every platform: True (Triton-style kernels
        unless `backend` says otherwise), or a `pltpu.InterpretParams()` for the TPU-faithful
        interpreter (backend "tpu").
      num_warps, num_stages: Triton compiler parameters.

    Returns:
      y (batch, L, channels) in `u`'s dtype [, last_state (batch, channels, N) float32].
    """
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}.")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size <= 0):
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}.")
    if backend is None and not interpret:
        def kernel(style, interpret=False):
            def run(u, delta, A, B, C, D, z, delta_bias, initial_state):
                return selective_scan_pallas(
                    u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
                    initial_state=initial_state, chunk_size=chunk_size, block_d=block_d,
                    backend=style, interpret=interpret, num_warps=num_warps,
                    num_stages=num_stages)
            return run

        return platform_dependent(u, delta, A, B, C, D, z, delta_bias, initial_state,
                                  gpu=kernel("triton"), tpu=kernel("tpu"),
                                  other=kernel("triton", interpret=True))
    backend = backend or "triton"
    batch, length, channels = u.shape
    n_state = A.shape[1]
    chunk, num_chunks, block, channels_p, n_state_p = _layout(
        backend, length, channels, n_state, chunk_size, block_d)
    cfg = _Config(backend, interpret if interpret else False, length, chunk, num_chunks, block, D is not None,
                  z is not None, delta_bias is not None, bool(delta_softplus), False, num_warps,
                  num_stages)
    length_p = num_chunks * chunk

    def rows(x):  # (batch, L, channels) -> (batch, L_pad, D_pad)
        return jnp.pad(x, ((0, 0), (0, length_p - length), (0, channels_p - channels)))

    def columns(x):  # (batch, L, N) -> (batch, n, N_pad, T)
        x = jnp.pad(x, ((0, 0), (0, length_p - length), (0, n_state_p - n_state)))
        return x.reshape(batch, num_chunks, chunk, n_state_p).transpose(0, 1, 3, 2)

    def per_channel(x):  # (channels,) -> (1, D_pad) float32
        return None if x is None else jnp.pad(x.astype(_F32), (0, channels_p - channels))[None]

    At = jnp.pad(A.astype(_F32).T, ((0, n_state_p - n_state), (0, channels_p - channels)))
    if initial_state is None:
        x0 = jnp.zeros((batch, n_state_p, channels_p), _F32)
    else:
        x0 = jnp.pad(initial_state.astype(_F32).transpose(0, 2, 1),
                     ((0, 0), (0, n_state_p - n_state), (0, channels_p - channels)))
    y, x_last = _scan_core(cfg, rows(u), rows(delta), At, columns(B), columns(C),
                           per_channel(D), None if z is None else rows(z),
                           per_channel(delta_bias), x0)
    y = y[:, :length, :channels]
    if not return_last_state:
        return y
    return y, x_last[:, :n_state, :channels].transpose(0, 2, 1)
