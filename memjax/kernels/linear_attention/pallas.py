"""Chunked causal (decayed) linear attention as Pallas kernels, forward and backward.

Per batch element and head, with ``lam`` the head's decay (``lam = 1`` without decay), the sequence
is cut into chunks of C tokens; ``i, j`` are 0-based positions inside a chunk and ``S`` the
(d_k, d_v) state entering the chunk (Lightning attention / simple gated linear attention):

    O      = (Q K^T * M) V + (Q * a) S,          M_ij = lam^(i - j) [j <= i],   a_i = lam^(i + 1)
    S_next = lam^C S + (K * b)^T V,               b_j = lam^(C - 1 - j)

Everything is a matmul or an elementwise product with a per-head table (no cumulative sums, which
Mosaic TPU lacks). The backward pass, with ``dO`` the output cotangent and ``G`` the cotangent of
the state leaving the chunk, is two kernels that recompute the states instead of storing them:

    forward-order kernel:  dQ = (dO V^T * M) K + (dO S^T) * a               (S recomputed)
    reverse-order kernel:  dK = (dO V^T * M)^T Q + (V G^T) * b
                           dV = (Q K^T * M)^T dO + (K * b) G
                           G  <- lam^C G + (Q * a)^T dO                     (G of the chunk before)

and the cotangent of ``g = log lam`` (one scalar per head) follows from the identity
``dg = sum_pairs (p_query - p_key) w s`` over all (query, key) pairs:

    dg = sum_t t (q_t . dq_t - k_t . dk_t) + (L - 1) <dS_last, S_last> + <S_0, dS_0>.

The length is zero-padded to a multiple of C; the last chunk uses its own weights
``b_j = lam^(r - 1 - j) [j < r]`` and ``lam^r`` (``r`` its number of real tokens), so padding
changes neither the outputs nor the last state.

Two ways to walk the chunks (``backend``), with identical per-chunk math:

* ``"triton"`` (GPU): grid (batch * heads, d_v tiles); each program loops over the chunks with a
  ``fori_loop`` and keeps the (d_k, block_v) state in registers. Triton needs power-of-two tiles,
  so d_k, d_v and C are padded to powers of two (at least 16, the smallest ``tl.dot``).
* ``"tpu"`` (Mosaic): grid (batch * heads, d_v tiles, chunks) with the chunk axis "arbitrary"
  (sequential); the state lives in a VMEM scratch buffer carried across grid steps, so only one
  chunk of Q, K, V is resident in VMEM at a time. C is rounded up to a multiple of 8.

Both run on CPU with ``interpret=True``. With ``backend=None`` the kernel style is chosen per
lowering platform (Triton on CUDA / ROCm, Mosaic on TPU, the Pallas interpreter elsewhere), so a
CPU host can export the GPU or TPU kernel. Layout: q, k (batch, L, heads, d_k); v (batch, L, heads,
d_v); decay (heads,) in (0, 1] or None; states (batch, heads, d_k, d_v) float32.

References:
  Qin et al. "Lightning Attention-2: A Free Lunch for Handling Unlimited Sequence Lengths in Large
  Language Models." arXiv:2401.04658, 2024 (chunked intra/inter decomposition with decay).
  Katharopoulos et al. "Transformers are RNNs." ICML 2020, arXiv:2006.16236.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from memjax.kernels._common import next_power_of_two, round_up
from memjax.kernels._platform import for_backend, platform_dependent

__all__ = ["BACKENDS", "linear_attention_pallas"]

Backend = Literal["triton", "tpu"]
BACKENDS = ("triton", "tpu")
DEFAULT_CHUNK_SIZE = 64
DEFAULT_BLOCK_V = {"triton": 64, "tpu": 512}
_F32 = jnp.float32
_HIGHEST = jax.lax.Precision.HIGHEST
_TABLE_WIDTH = 8  # columns of the per-head vector table (see `_decay_tables`)


class _Config(NamedTuple):
    """Static description of one call (hashable: the custom_vjp's non-differentiable argument)."""

    backend: str
    interpret: object  # False, True or a hashable pltpu.InterpretParams
    length: int       # real number of tokens L
    chunk: int        # C
    num_chunks: int   # n, with n * C >= L
    heads: int
    block_v: int
    num_warps: int | None
    num_stages: int | None


# ----------------------------------------------------------------------------------------------
# Per-head decay tables (built in XLA, read by the kernels).


def _decay_tables(log_decay: jax.Array, length: int, chunk: int, num_chunks: int):
    """Per-head weights of one chunk.

    Args:
      log_decay: (H,) ``g = log lam`` (zeros without decay).

    Returns:
      mask (H, C, C) ``M_ij = lam^(i - j) [j <= i]``, and table (H, C, 8) whose columns are
      ``a_i = lam^(i + 1)``, ``b_j = lam^(C - 1 - j)``, the last chunk's ``b_j = lam^(r - 1 - j)
      [j < r]``, ``lam^C`` and ``lam^r`` (constant columns), then zeros.
    """
    g = log_decay.astype(_F32)[:, None]                                  # (H, 1)
    pos = jnp.arange(chunk, dtype=_F32)[None, :]                         # (1, C)
    rest = float(length - (num_chunks - 1) * chunk)                      # r, 1 <= r <= C
    diff = pos[:, :, None] - pos[:, None, :]                             # (1, C, C)
    mask = jnp.where(diff >= 0, jnp.exp(g[:, :, None] * jnp.maximum(diff, 0.0)), 0.0)
    ones = jnp.ones_like(g * pos)
    columns = [
        jnp.exp(g * (pos + 1.0)),
        jnp.exp(g * (chunk - 1.0 - pos)),
        jnp.where(pos < rest, jnp.exp(g * jnp.maximum(rest - 1.0 - pos, 0.0)), 0.0),
        jnp.exp(g * chunk) * ones,
        jnp.exp(g * rest) * ones,
    ]
    columns += [jnp.zeros_like(ones)] * (_TABLE_WIDTH - len(columns))
    return mask, jnp.stack(columns, axis=-1)


def _mm(a, b, contract_a: int, contract_b: int):
    """``a @ b`` contracting ``a``'s axis ``contract_a`` with ``b``'s ``contract_b``, in float32."""
    return jax.lax.dot_general(a, b, (((contract_a,), (contract_b,)), ((), ())),
                               preferred_element_type=_F32, precision=_HIGHEST)


class _Tables(NamedTuple):
    mask: jax.Array     # (C, C)
    a: jax.Array        # (C, 1)
    b: jax.Array        # (C, 1), every chunk but the last
    b_last: jax.Array   # (C, 1)
    lam_c: jax.Array    # (1, 1)
    lam_r: jax.Array    # (1, 1)

    def for_chunk(self, is_last):
        """(b, state decay) of a chunk: the last chunk's weights when ``is_last``.

        A blend with a 0 / 1 weight (exact) rather than a select on a scalar predicate.
        """
        last = jnp.asarray(is_last, _F32)
        return (last * self.b_last + (1.0 - last) * self.b,
                last * self.lam_r + (1.0 - last) * self.lam_c)


def _load_tables(mask_ref, table_ref) -> _Tables:
    return _Tables(mask_ref[...], table_ref[:, 0:1], table_ref[:, 1:2], table_ref[:, 2:3],
                   table_ref[0:1, 3:4], table_ref[0:1, 4:5])


# ----------------------------------------------------------------------------------------------
# Walking the chunks: one body, two backends.


def _walk_chunks(cfg: _Config, reverse: bool, init: Callable[[], tuple],
                 body: Callable, finalize: Callable[[tuple], None], scratch: tuple) -> None:
    """Run ``carry = body(c, is_last, load, store, carry)`` over the chunks in order.

    ``load(ref)`` returns the chunk's (C, width) tile of a per-token ref and ``store(ref, x)``
    writes it. With "triton" the refs hold the whole padded sequence and a ``fori_loop`` slices
    them; with "tpu" the grid's last axis is the chunk (the BlockSpecs already selected the tile)
    and the carry lives in the VMEM ``scratch`` refs between grid steps.
    """
    n = cfg.num_chunks
    if cfg.backend == "triton":
        def step(i, carry):
            c = n - 1 - i if reverse else i
            rows = pl.ds(pl.multiple_of(c * cfg.chunk, cfg.chunk), cfg.chunk)

            def store(ref, x):
                ref[rows, :] = x.astype(ref.dtype)

            return body(c, c == n - 1, lambda ref: ref[rows, :], store, carry)

        finalize(jax.lax.fori_loop(0, n, step, init()))
        return

    i = pl.program_id(2)
    c = n - 1 - i if reverse else i

    @pl.when(i == 0)
    def _():
        for ref, value in zip(scratch, init()):
            ref[...] = value

    def store(ref, x):
        ref[...] = x.astype(ref.dtype)

    carry = body(c, c == n - 1, lambda ref: ref[...], store, tuple(ref[...] for ref in scratch))
    for ref, value in zip(scratch, carry):
        ref[...] = value

    @pl.when(i == n - 1)
    def _():
        finalize(carry)


# ----------------------------------------------------------------------------------------------
# Kernels.


def _forward_kernel(q_ref, k_ref, v_ref, mask_ref, table_ref, s0_ref, o_ref, s_last_ref,
                    *scratch, cfg: _Config):
    """O and the last state; carry: S (d_k, block_v)."""
    tables = _load_tables(mask_ref, table_ref)

    def body(c, is_last, load, store, carry):
        del c
        (s,) = carry
        q, k, v = (load(ref).astype(_F32) for ref in (q_ref, k_ref, v_ref))
        b, lam_chunk = tables.for_chunk(is_last)
        scores = _mm(q, k, 1, 1) * tables.mask
        store(o_ref, _mm(scores, v, 1, 0) + _mm(q * tables.a, s, 1, 0))
        return (lam_chunk * s + _mm(k * b, v, 0, 0),)

    def finalize(carry):
        s_last_ref[...] = carry[0]

    _walk_chunks(cfg, False, lambda: (s0_ref[...].astype(_F32),), body, finalize, scratch)


def _dq_kernel(k_ref, v_ref, do_ref, mask_ref, table_ref, s0_ref, dq_ref, *scratch, cfg: _Config):
    """dQ (partial over the d_v tile), recomputing the states in forward order."""
    tables = _load_tables(mask_ref, table_ref)

    def body(c, is_last, load, store, carry):
        del c
        (s,) = carry
        k, v, do = (load(ref).astype(_F32) for ref in (k_ref, v_ref, do_ref))
        b, lam_chunk = tables.for_chunk(is_last)
        store(dq_ref, _mm(_mm(do, v, 1, 1) * tables.mask, k, 1, 0) + _mm(do, s, 1, 1) * tables.a)
        return (lam_chunk * s + _mm(k * b, v, 0, 0),)

    _walk_chunks(cfg, False, lambda: (s0_ref[...].astype(_F32),), body, lambda carry: None,
                 scratch)


def _dkdv_kernel(q_ref, k_ref, v_ref, do_ref, mask_ref, table_ref, ds_last_ref,
                 dk_ref, dv_ref, ds0_ref, *scratch, cfg: _Config):
    """dK (partial over the d_v tile), dV and dS_0, in reverse chunk order; carry: G."""
    tables = _load_tables(mask_ref, table_ref)

    def body(c, is_last, load, store, carry):
        del c
        (g,) = carry
        q, k, v, do = (load(ref).astype(_F32) for ref in (q_ref, k_ref, v_ref, do_ref))
        b, lam_chunk = tables.for_chunk(is_last)
        dov = _mm(do, v, 1, 1) * tables.mask                      # (dO V^T) * M
        qk = _mm(q, k, 1, 1) * tables.mask                        # (Q K^T) * M
        store(dk_ref, _mm(dov, q, 0, 0) + _mm(v, g, 1, 1) * b)
        store(dv_ref, _mm(qk, do, 0, 0) + _mm(k * b, g, 1, 0))
        return (lam_chunk * g + _mm(q * tables.a, do, 0, 0),)

    def finalize(carry):
        ds0_ref[...] = carry[0]

    _walk_chunks(cfg, True, lambda: (ds_last_ref[...].astype(_F32),), body, finalize, scratch)


# ----------------------------------------------------------------------------------------------
# pallas_call plumbing.


class _Specs:
    """BlockSpecs and grid of one backend. Arrays are (BH, L_pad, width) or per-head tables."""

    def __init__(self, cfg: _Config, reverse: bool):
        self.cfg = cfg
        n = cfg.num_chunks
        if cfg.backend == "tpu":
            self.grid_tail = (n,)
            self.chunk_index = (lambda i: n - 1 - i) if reverse else (lambda i: i)
        else:
            self.grid_tail = ()

    def grid(self, bh: int, v_tiles: int) -> tuple[int, ...]:
        return (bh, v_tiles, *self.grid_tail)

    def tokens(self, width: int, v_tiled: bool, lead: int = 0) -> pl.BlockSpec:
        """Per-token array (*lead, BH, L_pad, width); the last axis tiled by block_v if v_tiled."""
        cfg = self.cfg
        block_width = cfg.block_v if v_tiled else width
        nones = (None,) * (lead + 1)
        if cfg.backend == "tpu":
            return pl.BlockSpec(
                (*nones, cfg.chunk, block_width),
                lambda bh, j, i: (*((j,) * lead), bh, self.chunk_index(i), j if v_tiled else 0))
        return pl.BlockSpec((*nones, cfg.num_chunks * cfg.chunk, block_width),
                            lambda bh, j: (*((j,) * lead), bh, 0, j if v_tiled else 0))

    def state(self, d_k: int) -> pl.BlockSpec:
        """(BH, d_k, d_v) states, tiled over d_v."""
        block = (None, d_k, self.cfg.block_v)
        if self.cfg.backend == "tpu":
            return pl.BlockSpec(block, lambda bh, j, i: (bh, 0, j))
        return pl.BlockSpec(block, lambda bh, j: (bh, 0, j))

    def per_head(self, shape: tuple[int, ...]) -> pl.BlockSpec:
        """(H, *shape) tables, selected by head = bh % H."""
        heads, zeros = self.cfg.heads, (0,) * len(shape)
        if self.cfg.backend == "tpu":
            return pl.BlockSpec((None, *shape), lambda bh, j, i: (bh % heads, *zeros))
        return pl.BlockSpec((None, *shape), lambda bh, j: (bh % heads, *zeros))

    def scratch(self, *shapes) -> list:
        if self.cfg.backend != "tpu":
            return []
        from jax.experimental.pallas import tpu as pltpu

        return [pltpu.VMEM(shape, _F32) for shape in shapes]

    def compiler_params(self):
        cfg = self.cfg
        if cfg.backend == "tpu":
            from jax.experimental.pallas import tpu as pltpu

            return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"))
        from jax.experimental.pallas import triton as pltriton

        return pltriton.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _call(kernel, cfg: _Config, specs: _Specs, grid, in_specs, out_specs, out_shape, scratch):
    call = pl.pallas_call(
        functools.partial(kernel, cfg=cfg),
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        scratch_shapes=scratch,
        compiler_params=specs.compiler_params(),
        interpret=cfg.interpret,
    )
    return for_backend(call, cfg.backend, cfg.interpret)


def _forward(cfg: _Config, q, k, v, log_decay, s0):
    bh, _, d_k = q.shape
    d_v = v.shape[-1]
    v_tiles = d_v // cfg.block_v
    mask, table = _decay_tables(log_decay, cfg.length, cfg.chunk, cfg.num_chunks)
    specs = _Specs(cfg, reverse=False)
    return _call(
        _forward_kernel, cfg, specs, specs.grid(bh, v_tiles),
        in_specs=[specs.tokens(d_k, False), specs.tokens(d_k, False), specs.tokens(d_v, True),
                  specs.per_head(mask.shape[1:]), specs.per_head(table.shape[1:]),
                  specs.state(d_k)],
        out_specs=[specs.tokens(d_v, True), specs.state(d_k)],
        out_shape=[jax.ShapeDtypeStruct(v.shape, q.dtype),
                   jax.ShapeDtypeStruct((bh, d_k, d_v), _F32)],
        scratch=specs.scratch((d_k, cfg.block_v)),
    )(q, k, v, mask, table, s0)


def _backward(cfg: _Config, q, k, v, log_decay, s0, do, ds_last):
    """(dq, dk, dv, ds0) in float32; dq and dk summed over the d_v tiles."""
    bh, length_p, d_k = q.shape
    d_v = v.shape[-1]
    v_tiles = d_v // cfg.block_v
    mask, table = _decay_tables(log_decay, cfg.length, cfg.chunk, cfg.num_chunks)
    partial_shape = jax.ShapeDtypeStruct((v_tiles, bh, length_p, d_k), _F32)

    specs = _Specs(cfg, reverse=False)
    dq = _call(
        _dq_kernel, cfg, specs, specs.grid(bh, v_tiles),
        in_specs=[specs.tokens(d_k, False), specs.tokens(d_v, True), specs.tokens(d_v, True),
                  specs.per_head(mask.shape[1:]), specs.per_head(table.shape[1:]),
                  specs.state(d_k)],
        out_specs=specs.tokens(d_k, False, lead=1),
        out_shape=partial_shape,
        scratch=specs.scratch((d_k, cfg.block_v)),
    )(k, v, do, mask, table, s0)

    specs = _Specs(cfg, reverse=True)
    dk, dv, ds0 = _call(
        _dkdv_kernel, cfg, specs, specs.grid(bh, v_tiles),
        in_specs=[specs.tokens(d_k, False), specs.tokens(d_k, False), specs.tokens(d_v, True),
                  specs.tokens(d_v, True), specs.per_head(mask.shape[1:]),
                  specs.per_head(table.shape[1:]), specs.state(d_k)],
        out_specs=[specs.tokens(d_k, False, lead=1), specs.tokens(d_v, True), specs.state(d_k)],
        out_shape=[partial_shape, jax.ShapeDtypeStruct(v.shape, _F32),
                   jax.ShapeDtypeStruct((bh, d_k, d_v), _F32)],
        scratch=specs.scratch((d_k, cfg.block_v)),
    )(q, k, v, do, mask, table, ds_last)
    return dq.sum(0), dk.sum(0), dv, ds0


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _linear_attention_core(cfg: _Config, q, k, v, log_decay, s0):
    """(BH, L_pad, d) inputs, (H,) log-decay, (BH, d_k, d_v) state -> (out, last state)."""
    return _forward(cfg, q, k, v, log_decay, s0)


def _core_fwd(cfg, q, k, v, log_decay, s0):
    out, s_last = _forward(cfg, q, k, v, log_decay, s0)
    return (out, s_last), (q, k, v, log_decay, s0, s_last)


def _core_bwd(cfg, residuals, cotangents):
    q, k, v, log_decay, s0, s_last = residuals
    do, ds_last = cotangents
    dq, dk, dv, ds0 = _backward(cfg, q, k, v, log_decay, s0, do.astype(q.dtype),
                                ds_last.astype(_F32))
    # dg = sum_t t (q_t . dq_t - k_t . dk_t) + (L - 1) <dS_last, S_last> + <S_0, dS_0>, per head.
    position = jnp.arange(q.shape[1], dtype=_F32)[None, :, None]
    per_row = (q.astype(_F32) * dq - k.astype(_F32) * dk) * position
    dg = (per_row.sum(axis=(1, 2)) + (cfg.length - 1.0) * (ds_last * s_last).sum(axis=(1, 2))
          + (s0 * ds0).sum(axis=(1, 2)))
    dg = dg.reshape(-1, cfg.heads).sum(0)
    return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype),
            dg.astype(log_decay.dtype), ds0.astype(s0.dtype))


_linear_attention_core.defvjp(_core_fwd, _core_bwd)


# ----------------------------------------------------------------------------------------------
# Public function.


def _tiles(backend: str, length: int, d_k: int, d_v: int, chunk_size: int, block_v: int | None):
    """(chunk, num_chunks, d_k padded, d_v padded, block_v) satisfying the backend's tile rules."""
    if backend == "triton":
        chunk = min(next_power_of_two(max(chunk_size, 16)), next_power_of_two(max(length, 16)))
        d_k_p, d_v_p = (next_power_of_two(max(d, 16)) for d in (d_k, d_v))
        block = min(next_power_of_two(block_v or DEFAULT_BLOCK_V["triton"]), d_v_p)
        block = max(block, 16)
    else:
        chunk = min(round_up(chunk_size, 8), round_up(length, 8))
        d_k_p, d_v_p = d_k, d_v
        block = block_v or DEFAULT_BLOCK_V["tpu"]
        if block >= d_v or d_v % block:
            block = d_v  # a tile must be a multiple of 128 lanes dividing d_v, or all of d_v
            if block_v is not None and block_v < d_v and block_v % 128:
                raise ValueError(f"block_v must be a multiple of 128 dividing d_v={d_v} on "
                                 f"TPU, got {block_v}.")
    return chunk, -(-length // chunk), d_k_p, d_v_p, block


def linear_attention_pallas(q, k, v, *, decay=None, initial_state=None, return_last_state=False,
                            chunk_size: int = DEFAULT_CHUNK_SIZE, block_v: int | None = None,
                            backend: Backend | None = None, interpret=False,
                            num_warps: int | None = 4, num_stages: int | None = 1):
    """Causal (decayed) linear attention ``out_i = sum_{j <= i} lam^(i - j) (q_i . k_j) v_j``.

    Differentiable (``jax.custom_vjp``) in q, k, v, decay and initial_state; no (L, L) or
    per-token state tensor is formed. Same contract as the causal, un-normalised
    ``linear_attention_chunked`` except that ``out`` is in ``q.dtype``.

    Args:
      q: (batch, L, heads, d_k).
      k: (batch, L, heads, d_k).
      v: (batch, L, heads, d_v).
      decay: None or (heads,) in (0, 1].
      initial_state: None or (batch, heads, d_k, d_v), the state before the first token.
      return_last_state: also return the (batch, heads, d_k, d_v) float32 state after the last
        token.
      chunk_size: C; rounded to the backend's tile rules (Triton: a power of two >= 16; TPU: a
        multiple of 8), and clipped to the (rounded) length. The result does not depend on it.
      block_v: d_v tile per program (Triton: power of two, default 64; TPU: a multiple of 128
        dividing d_v, default all of d_v).
      backend: "triton" (GPU) or "tpu" (Mosaic); None picks per lowering platform
        (``jax.lax.platform_dependent``): Triton on CUDA / ROCm, Mosaic on TPU, and elsewhere
        (CPU) the Triton-style kernels in the Pallas interpreter.
      interpret: run the kernels in the Pallas interpreter on every platform: True
        (Triton-style kernels unless ``backend`` says otherwise), or a
        ``pltpu.InterpretParams()`` for the TPU-faithful interpreter (backend "tpu").
      num_warps, num_stages: Triton compiler parameters.

    Returns:
      out (batch, L, heads, d_v) in ``q.dtype``, and the last state if ``return_last_state``.
    """
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}.")
    if not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}.")
    if backend is None and not interpret:
        def kernel(style, interpret=False):
            def run(q, k, v, decay, initial_state):
                return linear_attention_pallas(
                    q, k, v, decay=decay, initial_state=initial_state,
                    return_last_state=return_last_state, chunk_size=chunk_size,
                    block_v=block_v, backend=style, interpret=interpret, num_warps=num_warps,
                    num_stages=num_stages)
            return run

        return platform_dependent(q, k, v, decay, initial_state, gpu=kernel("triton"),
                                  tpu=kernel("tpu"), other=kernel("triton", interpret=True))
    backend = backend or "triton"
    batch, length, heads, d_k = q.shape
    d_v = v.shape[-1]
    chunk, num_chunks, d_k_p, d_v_p, block = _tiles(backend, length, d_k, d_v, chunk_size,
                                                    block_v)
    cfg = _Config(backend, interpret if interpret else False, length, chunk, num_chunks, heads, block, num_warps,
                  num_stages)

    def to_rows(x, width):  # (B, L, H, d) -> (B * H, L_pad, width), zero padded
        x = jnp.pad(x, ((0, 0), (0, num_chunks * chunk - length), (0, 0), (0, width - x.shape[-1])))
        return x.transpose(0, 2, 1, 3).reshape(batch * heads, num_chunks * chunk, width)

    dtype = jnp.result_type(q.dtype, k.dtype, v.dtype)
    q_r, k_r = to_rows(q.astype(dtype), d_k_p), to_rows(k.astype(dtype), d_k_p)
    v_r = to_rows(v.astype(dtype), d_v_p)
    if decay is None:
        log_decay = jnp.zeros((heads,), _F32)
    else:
        log_decay = jnp.log(jnp.asarray(decay, _F32))
    if initial_state is None:
        s0 = jnp.zeros((batch * heads, d_k_p, d_v_p), _F32)
    else:
        s0 = jnp.asarray(initial_state, _F32).reshape(batch * heads, d_k, d_v)
        s0 = jnp.pad(s0, ((0, 0), (0, d_k_p - d_k), (0, d_v_p - d_v)))

    out, s_last = _linear_attention_core(cfg, q_r, k_r, v_r, log_decay, s0)
    out = out.reshape(batch, heads, -1, d_v_p)[:, :, :length, :d_v].transpose(0, 2, 1, 3)
    out = out.astype(q.dtype)
    if not return_last_state:
        return out
    return out, s_last[:, :d_k, :d_v].reshape(batch, heads, d_k, d_v)
