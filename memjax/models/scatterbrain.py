"""Scatterbrain self-attention as a Flax NNX mixer: projections around :func:`scatterbrain_attention`.

For x of shape (B, L, d_model) and H heads of size D = d_model / H::

    q, k, v = x W_q, x W_k, x W_v        # kernels (d_model, H, D): (embed, heads, kv)
    o = scatterbrain_attention(q, k, v)  # Performer low rank + exact local window / LSH buckets
    y = o W_o                            # kernel (H, D, d_model): (heads, kv, embed)

Random draws: the Performer projection (m, D) (orthogonal Gaussian features, shared by the heads)
and, with ``lsh_buckets``, the LSH rotations (D, buckets / 2) are drawn ONCE at construction from
``rngs.params()`` and stored as non-trainable :class:`RandomFeatures` variables: the layer is a
deterministic function of its state, the draws are saved with checkpoints, and an optimizer built
on ``nnx.Param`` never touches them. Redraw them by assigning new values (e.g. from
:func:`memjax.kernels.scatterbrain.gaussian_projection`) if a schedule wants fresh features.

The layer has no positional encoding of its own and no recurrent decode form: it is used through
``__call__`` only.

Reference:
  Chen et al. "Scatterbrain: Unifying Sparse and Low-rank Attention Approximation." NeurIPS 2021,
  arXiv:2110.15343.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from memjax.kernels.scatterbrain.ops import gaussian_projection, lsh_rotations, scatterbrain_attention
from memjax.models.layers import project_out, project_qkv, qkvo_kernels

__all__ = ["RandomFeatures", "ScatterbrainAttention"]



class RandomFeatures(nnx.Variable):
    """A non-trainable random draw (feature projection or LSH rotations)."""


def _positive_or_none(name: str, value) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise ValueError(f"{name} must be a positive int or None, got {value!r}")


class ScatterbrainAttention(nnx.Module):
    """Multi-head Scatterbrain attention.

    Args:
      d_model: model width, divisible by ``num_heads``.
      num_heads: number of heads H.
      num_features: m, Performer random features per head.
      window: local window of the sparse part (None: no window).
      lsh_buckets: even number of LSH buckets of the sparse part (None: no LSH).
      lsh_chunk_size: LSH chunk length; None means ``ceil(sqrt(L))`` at call time.
      causal: autoregressive masking.
      orthogonal: orthogonal random features (FAVOR+).
      dtype: computation dtype (default: x's dtype); param_dtype: parameter dtype.
      rngs: ``nnx.Rngs`` with a ``params`` stream (kernels and the random draws).

    ``__call__(x)``: (B, L, d_model) -> (B, L, d_model).
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        *,
        num_features: int = 64,
        window: int | None = 32,
        lsh_buckets: int | None = None,
        lsh_chunk_size: int | None = None,
        causal: bool = True,
        orthogonal: bool = True,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        if num_heads < 1 or d_model % num_heads:
            raise ValueError(f"d_model={d_model} must be divisible by num_heads={num_heads}")
        if not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"num_features must be a positive int, got {num_features!r}")
        _positive_or_none("window", window)
        _positive_or_none("lsh_chunk_size", lsh_chunk_size)
        if lsh_buckets is not None and (
            not isinstance(lsh_buckets, int) or lsh_buckets < 2 or lsh_buckets % 2
        ):
            raise ValueError(f"lsh_buckets must be an even int >= 2 or None, got {lsh_buckets!r}")
        self.num_heads = num_heads
        self.head_dim = d_model // num_heads
        self.window = window
        self.lsh_buckets = lsh_buckets
        self.lsh_chunk_size = lsh_chunk_size
        self.causal = causal
        self.dtype = dtype
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = qkvo_kernels(
            rngs, d_model, num_heads, param_dtype)
        self.projection = RandomFeatures(
            gaussian_projection(rngs.params(), num_features, self.head_dim, orthogonal=orthogonal)
        )
        self.rotations = (
            RandomFeatures(lsh_rotations(rngs.params(), self.head_dim, lsh_buckets))
            if lsh_buckets is not None
            else nnx.data(None)
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        """(B, L, d_model) -> (B, L, d_model)."""
        dtype = self.dtype or x.dtype
        x = x.astype(dtype)
        q, k, v = project_qkv(x, (self.q_proj, self.k_proj, self.v_proj), dtype)
        o = scatterbrain_attention(
            q,
            k,
            v,
            projection=self.projection[...],
            window=self.window,
            lsh_buckets=self.lsh_buckets,
            rotations=None if self.rotations is None else self.rotations[...],
            lsh_chunk_size=self.lsh_chunk_size,
            causal=self.causal,
        )
        return project_out(o, self.o_proj, dtype)
