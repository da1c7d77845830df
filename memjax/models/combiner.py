"""Combiner self-attention as a Flax NNX mixer: projections around :func:`combiner_attention`.

For x of shape (B, L, d_model) and H heads of size D = d_model / H::

    q, k, v = x W_q, x W_k, x W_v                      # kernels (d_model, H, D): (embed, heads, kv)
    o = combiner_attention(q, k, v, mode, block_size)  # (B, L, H, D), O(L sqrt L)
    y = o W_o                                          # kernel (H, D, d_model): (heads, kv, embed)

Combiner factorises the attention distribution of every query into direct attention inside its
block (row) and attention to mean-pooled summaries of the other blocks (columns), all in one softmax;
see :mod:`memjax.kernels.combiner.reference` for the exact regions. The layer has no positional
encoding of its own and no recurrent decode form: it is used through ``__call__`` only.

Reference:
  Ren et al. "Combiner: Full Attention Transformer with Sparse Computation Cost." NeurIPS 2021,
  arXiv:2107.05768.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from memjax.kernels.combiner.ops import MODES, combiner_attention
from memjax.models.layers import project_out, project_qkv, qkvo_kernels

__all__ = ["CombinerAttention"]



class CombinerAttention(nnx.Module):
    """Multi-head Combiner attention (Fixed or Axial factorisation).

    Args:
      d_model: model width, divisible by ``num_heads``.
      num_heads: number of heads H.
      mode: ``"axial"`` or ``"fixed"``.
      block_size: block size / row length; None means ``ceil(sqrt(L))`` at call time.
      causal: autoregressive masking.
      dtype: computation dtype (default: x's dtype); param_dtype: parameter dtype.
      rngs: ``nnx.Rngs`` with a ``params`` stream.

    ``__call__(x)``: (B, L, d_model) -> (B, L, d_model).
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        *,
        mode: str = "axial",
        block_size: int | None = None,
        causal: bool = True,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        if num_heads < 1 or d_model % num_heads:
            raise ValueError(f"d_model={d_model} must be divisible by num_heads={num_heads}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if block_size is not None and (not isinstance(block_size, int) or block_size < 1):
            raise ValueError(f"block_size must be a positive int or None, got {block_size!r}")
        self.num_heads = num_heads
        self.head_dim = d_model // num_heads
        self.mode = mode
        self.block_size = block_size
        self.causal = causal
        self.dtype = dtype
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = qkvo_kernels(
            rngs, d_model, num_heads, param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        """(B, L, d_model) -> (B, L, d_model)."""
        dtype = self.dtype or x.dtype
        x = x.astype(dtype)
        q, k, v = project_qkv(x, (self.q_proj, self.k_proj, self.v_proj), dtype)
        o = combiner_attention(q, k, v, block_size=self.block_size, mode=self.mode, causal=self.causal)
        return project_out(o, self.o_proj, dtype)
