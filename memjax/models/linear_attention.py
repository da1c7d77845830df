"""Linear attention layer (Flax NNX): feature maps, optional Lightning decay, two output heads.

For x (batch, L, d_model), per head h (H heads of size d_h):

    q, k, v = x W_q, x W_k, x W_v                              (batch, L, H, d_h)
    o_i     = sum_{j <= i} lam_h^(i - j) (phi(q_i) . phi(k_j)) v_j          (memjax.kernels)
    output "normalize":  o_i <- o_i / (sum_{j <= i} lam_h^(i - j) phi(q_i) . phi(k_j) + eps)
    output "norm_gate":  o_i <- RMSNorm_h(o_i) * sigmoid(x_i W_gate)          (TransNormerLLM)
    y       = o W_o                                             (batch, L, d_model)

Feature maps ``phi``: ``"elu+1"`` (Katharopoulos et al. 2020), ``"relu"``, ``"identity"`` and
``"hedgehog"``, a learnable map ``phi(x) = [softmax(x W), softmax(-x W)]`` over the feature axis
with a per-head W (d_h, d_h) initialised to the identity, separately for queries and keys (Zhang
et al. 2024), which doubles the feature size to 2 d_h. ``decay="lightning"`` uses the fixed
per-head decays ``lam_h = exp(-2^(-8 (h + 1) / H))`` of Lightning attention; ``None`` means no
decay. The RMSNorm of ``"norm_gate"`` normalises each head separately (a group norm over heads), so
it never needs the other heads' values when heads are sharded.

Decoding: ``init_cache`` gives the constant-size recurrent state (:class:`LinearAttentionCache`) and
``step`` advances it one token; the parallel form and the step agree token by token.

References:
  Katharopoulos et al. "Transformers are RNNs." ICML 2020, arXiv:2006.16236.
  Qin et al. "TransNormerLLM", arXiv:2307.14995, 2023 (Lightning attention, norm + gate output).
  Zhang, Bhatia, Kumbong, Re. "The Hedgehog & the Porcupine: Expressive Linear Attentions with
  Softmax Mimicry." ICLR 2024, arXiv:2402.04347.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from memjax.kernels.linear_attention import (
    LinearAttentionState,
    lightning_decay,
    linear_attention,
    linear_attention_step,
)
from memjax.models.layers import partitioned

__all__ = ["HedgehogFeatureMap", "LinearAttention", "LinearAttentionCache"]

FEATURE_MAPS = ("elu+1", "relu", "identity", "hedgehog")
OUTPUTS = ("normalize", "norm_gate")


class LinearAttentionCache(NamedTuple):
    """Decoding state of :class:`LinearAttention`; its size does not grow with the length.

    Attributes:
      kv: (batch, heads, d_feature, d_h), ``sum_j lam^(t - j) phi(k_j)^T v_j``.
      k_sum: (batch, heads, d_feature) normaliser state for ``output="normalize"``, else None.
    """

    kv: jax.Array
    k_sum: jax.Array | None


def _identity_per_head(key, shape, dtype=jnp.float32):
    """(heads, d, d) stack of identity matrices (``key`` unused)."""
    del key
    return jnp.broadcast_to(jnp.eye(shape[-1], dtype=dtype), shape)


class HedgehogFeatureMap(nnx.Module):
    """Learnable softmax feature map ``phi(x) = [softmax(x W_h), softmax(-x W_h)]`` per head.

    Maps (..., heads, d) to (..., heads, 2 d); every feature is positive. W_h starts at identity.
    """

    def __init__(self, num_heads: int, head_dim: int, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
        init = partitioned(_identity_per_head, ("heads", "kv", None))
        self.weight = nnx.Param(init(rngs.params(), (num_heads, head_dim, head_dim), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        """x (..., heads, d) -> (..., heads, 2 d), computed in float32, returned in x.dtype."""
        z = jnp.einsum("...hd,hde->...he", x.astype(jnp.float32),
                       self.weight[...].astype(jnp.float32))
        phi = jnp.concatenate([jax.nn.softmax(z, axis=-1), jax.nn.softmax(-z, axis=-1)], axis=-1)
        return phi.astype(x.dtype)


def _fixed_feature_map(name: str, x: jax.Array) -> jax.Array:
    """Parameter-free feature maps, elementwise; shape preserved."""
    if name == "elu+1":
        return jax.nn.elu(x) + 1.0
    if name == "relu":
        return jax.nn.relu(x)
    return x


def _resolve_decay(decay, num_heads: int) -> tuple[float, ...] | None:
    """None, "lightning" or a (heads,) sequence -> a static tuple of floats in (0, 1], or None."""
    if decay is None:
        return None
    if isinstance(decay, str):
        if decay != "lightning":
            raise ValueError(
                f"decay must be None, 'lightning' or (num_heads,) values, got {decay!r}.")
        decay = lightning_decay(num_heads)
    values = tuple(float(d) for d in np.ravel(np.asarray(decay)))  # static, even while tracing
    if len(values) != num_heads or not all(0.0 < d <= 1.0 for d in values):
        raise ValueError(f"decay must have num_heads={num_heads} values in (0, 1], got {values}.")
    return values


class LinearAttention(nnx.Module):
    """Multi-head (decayed) linear attention, a sequence mixer: (batch, L, d_model) -> same shape.

    Args:
      d_model: model width.
      num_heads: H.
      head_dim: d_h; defaults to ``d_model // num_heads``.
      feature_map: ``"elu+1"``, ``"relu"``, ``"identity"`` or ``"hedgehog"``.
      decay: None, ``"lightning"`` or (num_heads,) fixed decays in (0, 1].
      output: ``"normalize"`` (Katharopoulos denominator; needs a non-negative feature map) or
        ``"norm_gate"`` (per-head RMSNorm then a sigmoid gate of x, TransNormerLLM).
      causal: causal mixing (decoding needs it); False gives the bidirectional form.
      chunk_size: chunk of the chunkwise kernel.
      eps: denominator / RMSNorm epsilon.
      impl: kernel implementation, see ``memjax.kernels.linear_attention.linear_attention``.
      dtype: computation dtype of the projections (None: from the inputs and parameters).
      param_dtype: parameter dtype.
      rngs: ``nnx.Rngs`` with a ``params`` stream.
    """

    def __init__(self, d_model: int, num_heads: int, *, head_dim: int | None = None,
                 feature_map: str = "elu+1", decay=None, output: str = "normalize",
                 causal: bool = True, chunk_size: int = 64, eps: float = 1e-6,
                 impl: str = "auto", dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        if num_heads <= 0:
            raise ValueError(f"num_heads must be positive, got {num_heads}.")
        if head_dim is None:
            if d_model % num_heads:
                raise ValueError(f"d_model={d_model} must be divisible by num_heads={num_heads} "
                                 "when head_dim is not given.")
            head_dim = d_model // num_heads
        if feature_map not in FEATURE_MAPS:
            raise ValueError(f"feature_map must be one of {FEATURE_MAPS}, got {feature_map!r}.")
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}.")
        if output == "normalize" and feature_map == "identity":
            raise ValueError("output='normalize' needs a non-negative feature_map; "
                             "use output='norm_gate' with feature_map='identity'.")
        if chunk_size <= 0:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}.")

        self.d_model, self.num_heads, self.head_dim = d_model, num_heads, head_dim
        self.feature_map, self.output, self.causal = feature_map, output, causal
        self.chunk_size, self.eps, self.impl = chunk_size, eps, impl
        self.decay = _resolve_decay(decay, num_heads)

        def project_in():
            return nnx.LinearGeneral(
                d_model, (num_heads, head_dim), use_bias=False, dtype=dtype,
                param_dtype=param_dtype, rngs=rngs,
                kernel_init=partitioned(nnx.initializers.lecun_normal(),
                                         ("embed", "heads", "kv")))

        self.q_proj, self.k_proj, self.v_proj = project_in(), project_in(), project_in()
        self.o_proj = nnx.LinearGeneral(
            (num_heads, head_dim), d_model, axis=(-2, -1), use_bias=False, dtype=dtype,
            param_dtype=param_dtype, rngs=rngs,
            kernel_init=partitioned(nnx.initializers.lecun_normal(), ("heads", "kv", "embed")))
        if feature_map == "hedgehog":
            self.q_feature = HedgehogFeatureMap(num_heads, head_dim, param_dtype=param_dtype,
                                                rngs=rngs)
            self.k_feature = HedgehogFeatureMap(num_heads, head_dim, param_dtype=param_dtype,
                                                rngs=rngs)
        else:
            self.q_feature = self.k_feature = None
        if output == "norm_gate":
            self.gate_proj = project_in()
            self.norm_scale = nnx.Param(partitioned(nnx.initializers.ones, ("heads", "kv"))(
                rngs.params(), (num_heads, head_dim), param_dtype))
        else:
            self.gate_proj = self.norm_scale = None

    @property
    def feature_dim(self) -> int:
        """d_k seen by the kernel: 2 d_h for the Hedgehog map, else d_h."""
        return 2 * self.head_dim if self.feature_map == "hedgehog" else self.head_dim

    def _decay_array(self) -> np.ndarray | None:
        """(H,) decays as a static constant, or None."""
        return None if self.decay is None else np.asarray(self.decay, np.float32)

    def _features(self, x: jax.Array):
        """x (..., d_model) -> phi(q), phi(k): (..., H, d_feature); v: (..., H, d_h)."""
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.feature_map == "hedgehog":
            return self.q_feature(q), self.k_feature(k), v
        return _fixed_feature_map(self.feature_map, q), _fixed_feature_map(self.feature_map, k), v

    def _output(self, x: jax.Array, o: jax.Array) -> jax.Array:
        """x (..., d_model), o (..., H, d_h) -> (..., d_model)."""
        if self.output == "norm_gate":
            o32 = o.astype(jnp.float32)
            rms = jax.lax.rsqrt(jnp.mean(jnp.square(o32), axis=-1, keepdims=True) + self.eps)
            gate = jax.nn.sigmoid(self.gate_proj(x).astype(jnp.float32))
            scale = self.norm_scale[...].astype(jnp.float32)
            scale = scale.reshape((1,) * (o.ndim - 2) + scale.shape)
            o = (o32 * rms * scale * gate).astype(o.dtype)
        return self.o_proj(o)

    def _check_decoding(self):
        if not self.causal:
            raise ValueError("decoding (init_cache / step / prefill) needs causal=True.")

    def __call__(self, x: jax.Array) -> jax.Array:
        """Parallel (chunkwise) form: x (batch, L, d_model) -> (batch, L, d_model)."""
        q, k, v = self._features(x)
        o = linear_attention(q, k, v, decay=self._decay_array(), causal=self.causal,
                             normalize=self.output == "normalize", eps=self.eps,
                             chunk_size=self.chunk_size, impl=self.impl)
        return self._output(x, o)

    def init_cache(self, batch_size: int, max_length: int,
                   dtype=jnp.float32) -> LinearAttentionCache:
        """Zero decoding state; ``max_length`` is accepted for the mixer protocol and unused.

        Returns kv (batch, H, d_feature, d_h) and, for ``output="normalize"``, k_sum
        (batch, H, d_feature), both in ``dtype``.
        """
        del max_length
        self._check_decoding()
        shape = (batch_size, self.num_heads, self.feature_dim)
        kv = jnp.zeros(shape + (self.head_dim,), dtype)
        k_sum = jnp.zeros(shape, dtype) if self.output == "normalize" else None
        return LinearAttentionCache(kv, k_sum)

    def step(self, x: jax.Array, cache: LinearAttentionCache):
        """One token: x (batch, d_model) -> (y (batch, d_model), new cache)."""
        self._check_decoding()
        q, k, v = self._features(x)
        normalize = self.output == "normalize"
        state = LinearAttentionState(cache.kv, cache.k_sum) if normalize else cache.kv
        o, state = linear_attention_step(q, k, v, state, self._decay_array(),
                                         normalize=normalize, eps=self.eps)
        new_cache = LinearAttentionCache(*state) if normalize else LinearAttentionCache(state, None)
        return self._output(x, o), new_cache

    def prefill(self, x: jax.Array, dtype=jnp.float32):
        """Parallel form that also returns the cache after the last token.

        x (batch, L, d_model) -> (y (batch, L, d_model), :class:`LinearAttentionCache` in
        ``dtype``).
        """
        self._check_decoding()
        q, k, v = self._features(x)
        normalize = self.output == "normalize"
        o, state = linear_attention(q, k, v, decay=self._decay_array(), normalize=normalize,
                                    eps=self.eps, chunk_size=self.chunk_size, impl=self.impl,
                                    return_last_state=True)
        if normalize:
            cache = LinearAttentionCache(state.kv.astype(dtype), state.k_sum.astype(dtype))
        else:
            cache = LinearAttentionCache(state.astype(dtype), None)
        return self._output(x, o), cache
