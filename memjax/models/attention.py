"""Causal multi-head softmax attention with rotary embeddings and a KV cache (the LLaMA mixer).

Training form, for x of shape (B, L, d_model), H query heads of size D = d_model / H and K key /
value heads (K divides H; K = H is multi-head attention, K < H grouped-query attention, where
query head h reads key / value head ``h // (H / K)``)::

    q = rope(x W_q + b_q)                              # (B, L, H, D)
    k, v = rope(x W_k + b_k), x W_v + b_v              # (B, L, K, D); biases optional (Qwen2)
    o = softmax(q k^T / sqrt(D) + causal mask) v       # jax.nn.dot_product_attention
    y = o W_o                                          # (B, L, d_model)

Decode form: the cache holds the rotated keys and the values of every position seen so far,
``k, v: (B, max_length, K, D)``; a step writes position ``p`` and attends to positions ``0..p``.

Kernels are 2-D (``d_model x d_model``, as in LLaMA) so low-rank gradient methods see the same
matrices as the GaLore paper; the fused output axis is named ``"heads"`` (sharding it over n devices
with n | H keeps whole heads together), the input axis ``"embed"``.

References: Vaswani et al. 2017 (attention); Su et al. 2021, arXiv 2104.09864 (RoPE);
Touvron et al. 2023, arXiv 2302.13971 (LLaMA); Ainslie et al. 2023, arXiv 2305.13245 (GQA);
Qwen Team 2024, arXiv 2407.10671 (Qwen2: q/k/v biases).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from memjax.models.layers import linear, rope

__all__ = ["CausalSelfAttention", "KVCache"]


class KVCache(NamedTuple):
    """Rotated keys and values of the positions decoded so far; each (B, max_length, K, D)."""

    k: jax.Array
    v: jax.Array


class CausalSelfAttention(nnx.Module):
    """Causal softmax self-attention with RoPE.

    Args:
      d_model: model width, divisible by ``num_heads``; the head size must be even (RoPE).
      num_heads: number of query heads H.
      num_kv_heads: number of key / value heads K, dividing H (grouped-query attention);
        ``None``: H.
      qkv_bias: biases on the q, k and v projections (Qwen2), zero-initialised.
      rope_base: RoPE wavelength base (Hugging Face's ``rope_theta``).
      dtype / param_dtype: computation and parameter dtypes.
      rngs: ``nnx.Rngs`` for the kernels (N(0, 0.02)).
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        *,
        num_kv_heads: int | None = None,
        qkv_bias: bool = False,
        rope_base: float = 10_000.0,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        if num_heads < 1 or d_model % num_heads:
            raise ValueError(f"d_model={d_model} must be divisible by num_heads={num_heads}")
        if (d_model // num_heads) % 2:
            raise ValueError(f"head size d_model/num_heads={d_model // num_heads} must be even (RoPE)")
        kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if (isinstance(kv_heads, bool) or not isinstance(kv_heads, int) or kv_heads < 1
                or num_heads % kv_heads):
            raise ValueError(f"num_kv_heads={num_kv_heads!r} must be a positive int dividing "
                             f"num_heads={num_heads}")
        self.num_heads = num_heads
        self.num_kv_heads = kv_heads
        self.head_dim = d_model // num_heads
        self.rope_base = rope_base
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        kv_width = kv_heads * self.head_dim
        self.q_proj = linear(d_model, d_model, ("embed", "heads"), use_bias=qkv_bias, **kw)
        self.k_proj = linear(d_model, kv_width, ("embed", "heads"), use_bias=qkv_bias, **kw)
        self.v_proj = linear(d_model, kv_width, ("embed", "heads"), use_bias=qkv_bias, **kw)
        self.o_proj = linear(d_model, d_model, ("heads", "embed"), **kw)

    def _heads(self, t: jax.Array) -> jax.Array:
        return t.reshape(t.shape[:-1] + (-1, self.head_dim))

    def _qkv(self, x: jax.Array, positions: jax.Array):
        """q (..., H, D), k and v (..., K, D); q and k rotated."""
        q = rope(self._heads(self.q_proj(x)), positions, base=self.rope_base)
        k = rope(self._heads(self.k_proj(x)), positions, base=self.rope_base)
        return q, k, self._heads(self.v_proj(x))

    def __call__(self, x: jax.Array) -> jax.Array:
        """(B, L, d_model) -> (B, L, d_model), causal."""
        batch, length, d_model = x.shape
        q, k, v = self._qkv(x, jnp.arange(length))
        o = jax.nn.dot_product_attention(q, k, v, is_causal=True)  # (B, L, H, D)
        return self.o_proj(o.reshape(batch, length, d_model))

    def init_cache(self, batch_size: int, max_length: int, dtype: Any = jnp.float32) -> KVCache:
        """An empty cache: k, v zeros of shape (batch_size, max_length, K, D)."""
        shape = (batch_size, max_length, self.num_kv_heads, self.head_dim)
        return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))

    def step(self, x: jax.Array, cache: KVCache, position: jax.Array | int):
        """Decode one position.

        Args:
          x: (B, d_model), the input at ``position``.
          cache: a :class:`KVCache` holding positions ``0 .. position - 1``.
          position: scalar int, the index of x in the sequence (< max_length of the cache).

        Returns:
          y (B, d_model) and the cache with position ``position`` written.
        """
        batch, d_model = x.shape
        position = jnp.asarray(position, jnp.int32)
        q, k, v = self._qkv(x[:, None, :], jnp.full((1,), position))  # (B, 1, H|K, D)
        start = (0, position, 0, 0)
        cache = KVCache(
            k=jax.lax.dynamic_update_slice(cache.k, k.astype(cache.k.dtype), start),
            v=jax.lax.dynamic_update_slice(cache.v, v.astype(cache.v.dtype), start),
        )
        seen = jnp.full((batch,), position + 1, jnp.int32)
        o = jax.nn.dot_product_attention(
            q, cache.k.astype(q.dtype), cache.v.astype(q.dtype), key_value_seq_lengths=seen
        )  # (B, 1, H, D)
        return self.o_proj(o.reshape(batch, d_model)), cache
