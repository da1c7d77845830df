"""Small building blocks of a LLaMA-style decoder: RMSNorm, SwiGLU MLP, rotary embeddings.

* RMSNorm (Zhang and Sennrich 2019): ``y = x / sqrt(mean(x**2) + eps) * scale``, computed in float32.
* SwiGLU MLP (Shazeer 2020): ``down(silu(gate(x)) * up(x))``, three bias-free linears as in LLaMA.
* Rotary position embedding, RoPE (Su et al. 2021, arXiv 2104.09864), "rotate half" layout of LLaMA:
  for a head vector split into halves ``(x1, x2)`` and angle ``theta_i = p * base**(-2 i / head_dim)``,
  ``rope(x) = (x1 cos - x2 sin, x2 cos + x1 sin)``.

Every parameter carries logical axis names (``"embed"``, ``"mlp"``, ...) through
:func:`partitioned`; the names are metadata only (no mesh is needed to build a module), and a trainer
maps them to mesh axes with ``nnx.get_partition_spec`` and its logical-axis rules.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

__all__ = ["DEFAULT_INIT_STD", "RMSNorm", "SwiGLU", "head_kernel", "partitioned", "project_out",
           "project_qkv", "qkvo_kernels", "rope"]

DEFAULT_INIT_STD = 0.02  # LLaMA / GaLore: every linear and embedding ~ N(0, 0.02**2).


def partitioned(init: Any, names: Sequence[str | None]) -> Any:
    """Wrap an initializer so the created ``nnx.Variable`` records logical axis ``names``.

    The names are recorded without eager sharding, so modules are built without a mesh; shard
    them later by name (``nnx.get_partition_spec`` + logical-axis rules).
    """
    return nnx.with_partitioning(init, tuple(names), eager_sharding=False)


def head_kernel(rngs: nnx.Rngs, shape: Sequence[int], names: Sequence[str | None],
                param_dtype: Any = jnp.float32) -> nnx.Param:
    """A N(0, 0.02^2) multi-head projection kernel carrying logical axis ``names``.

    Shapes: ``(d_model, heads, head_dim)`` with names ``("embed", "heads", "kv")`` for q/k/v, or
    ``(heads, head_dim, d_model)`` with ``("heads", "kv", "embed")`` for the output.
    """
    return nnx.Param(partitioned(_normal(), names)(rngs.params(), tuple(shape), param_dtype))


def qkvo_kernels(rngs: nnx.Rngs, d_model: int, num_heads: int,
                 param_dtype: Any = jnp.float32) -> tuple[nnx.Param, nnx.Param, nnx.Param, nnx.Param]:
    """The q, k, v kernels ``(d_model, heads, head_dim)`` and the output kernel
    ``(heads, head_dim, d_model)`` of a multi-head mixer (:func:`head_kernel`)."""
    head_dim = d_model // num_heads
    q, k, v = (head_kernel(rngs, (d_model, num_heads, head_dim), ("embed", "heads", "kv"),
                           param_dtype) for _ in range(3))
    o = head_kernel(rngs, (num_heads, head_dim, d_model), ("heads", "kv", "embed"), param_dtype)
    return q, k, v, o


def project_qkv(x: jax.Array, kernels: Sequence[nnx.Param], dtype: Any) -> tuple[jax.Array, ...]:
    """(B, L, d_model) -> q, k, v, each (B, L, heads, head_dim), computed in ``dtype``."""
    return tuple(jnp.einsum("bld,dhk->blhk", x, w[...].astype(dtype)) for w in kernels)


def project_out(o: jax.Array, kernel: nnx.Param, dtype: Any) -> jax.Array:
    """(B, L, heads, head_dim) -> (B, L, d_model) with the output kernel, in ``dtype``."""
    return jnp.einsum("blhk,hkd->bld", o, kernel[...].astype(dtype))


def _normal(std: float = DEFAULT_INIT_STD) -> Any:
    return nnx.initializers.normal(stddev=std)


def linear(
    in_features: int,
    out_features: int,
    names: tuple[str | None, str | None],
    *,
    dtype: Any,
    param_dtype: Any,
    rngs: nnx.Rngs,
    use_bias: bool = False,
) -> nnx.Linear:
    """An ``nnx.Linear`` with a N(0, 0.02) kernel named ``names`` (in, out); bias-free unless
    ``use_bias`` (a zero-initialised bias named ``names[1]``)."""
    return nnx.Linear(
        in_features,
        out_features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=partitioned(_normal(), names),
        bias_init=partitioned(nnx.initializers.zeros_init(), names[1:]),
        rngs=rngs,
    )


class RMSNorm(nnx.Module):
    """Root-mean-square norm over the last axis, with a learned scale (initialised to 1).

    ``__call__(x)``: (..., dim) -> (..., dim) in ``dtype`` (or x's dtype); statistics in float32.
    """

    def __init__(
        self,
        dim: int,
        *,
        eps: float = 1e-6,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs | None = None,
    ):
        del rngs  # deterministic init; accepted for a uniform constructor
        self.eps = eps
        self.dtype = dtype
        self.scale = nnx.Param(
            partitioned(nnx.initializers.ones, ("embed",))(None, (dim,), param_dtype)
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        out_dtype = self.dtype or x.dtype
        x32 = x.astype(jnp.float32)
        inv = jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        scale = self.scale[...].astype(jnp.float32).reshape((1,) * (x.ndim - 1) + (-1,))
        return (x32 * inv * scale).astype(out_dtype)


class SwiGLU(nnx.Module):
    """LLaMA MLP: ``down(silu(gate(x)) * up(x))``; kernels (embed, mlp) and (mlp, embed).

    ``__call__(x)``: (..., d_model) -> (..., d_model).
    """

    def __init__(
        self,
        d_model: int,
        hidden_dim: int,
        *,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate = linear(d_model, hidden_dim, ("embed", "mlp"), **kw)
        self.up = linear(d_model, hidden_dim, ("embed", "mlp"), **kw)
        self.down = linear(hidden_dim, d_model, ("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down(jax.nn.silu(self.gate(x)) * self.up(x))


def rope(x: jax.Array, positions: jax.Array, *, base: float = 10_000.0) -> jax.Array:
    """Rotary position embedding ("rotate half" layout).

    Args:
      x: (B, L, H, D) queries or keys, D even.
      positions: (B, L) or (L,) integer positions.
      base: the wavelength base (10000 in LLaMA).

    Returns:
      (B, L, H, D) in x's dtype; the rotation is computed in float32.
    """
    head_dim = x.shape[-1]
    if head_dim % 2:
        raise ValueError(f"rope needs an even head dimension, got {head_dim}")
    half = head_dim // 2
    inv_freq = base ** (-jnp.arange(half, dtype=jnp.float32) * 2.0 / head_dim)  # (D/2,)
    pos = jnp.broadcast_to(positions, x.shape[:2]).astype(jnp.float32)  # (B, L)
    angles = pos[:, :, None, None] * inv_freq[None, None, None, :]  # (B, L, 1, D/2)
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    x32 = x.astype(jnp.float32)
    x1, x2 = x32[..., :half], x32[..., half:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)
