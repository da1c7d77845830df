"""Public entry points of (decayed) linear attention: validation, dispatch, one-token decoding.

    causal:      out_i = sum_{j <= i} lam^(i - j) (q_i . k_j) v_j
    non-causal:  out_i = sum_j        lam^|i - j| (q_i . k_j) v_j
    normalize:   out_i <- out_i / (sum_j w_ij (q_i . k_j) + eps)        (Katharopoulos et al. 2020)

``lam`` is a per-head decay in (0, 1] (``None``: no decay, plain linear attention). The causal
form is the recurrence ``S_t = lam S_{t-1} + k_t^T v_t``, ``out_t = q_t S_t`` with a state ``S`` of
shape (d_k, d_v) per batch element and head, which :func:`linear_attention_step` advances one token
at a time for decoding. Lightning attention (TransNormerLLM) uses the fixed per-head decays of
:func:`lightning_decay`, ``lam_h = exp(-s_h)`` with slopes ``s_h = 2^(-8 (h + 1) / H)``.

Implementations (``impl``): ``"xla"`` the chunkwise form of ``chunked.py``; ``"pallas"`` the
Pallas kernels of ``pallas.py`` (Triton on GPU, Mosaic on TPU, the Pallas interpreter on CPU) for
the causal un-normalised form, which falls back to ``"xla"`` for ``normalize=True`` or
``causal=False``; ``"reference"`` the quadratic form of ``reference.py`` (O(L^2), for tests);
``"auto"`` (default) is ``"pallas"`` on GPU and TPU and ``"xla"`` elsewhere (CPU). The platform is
the one the computation is lowered for (``jax.lax.platform_dependent``), not the host's default
backend, so a CPU host exports the GPU or TPU kernels and a multi-platform export holds each.

Layout: ``q, k``: (batch, L, heads, d_k); ``v``: (batch, L, heads, d_v); ``decay``: (heads,);
state: (batch, heads, d_k, d_v), or :class:`LinearAttentionState` ``(kv, k_sum)`` with ``k_sum``
(batch, heads, d_k) when ``normalize=True``. Everything is computed in float32; outputs are cast to
``q.dtype``, returned states stay float32 (a decoding state keeps its own dtype).

References:
  Katharopoulos, Vyas, Pappas, Fleuret. "Transformers are RNNs: Fast Autoregressive Transformers
  with Linear Attention." ICML 2020, arXiv:2006.16236.
  Qin et al. "TransNormerLLM: A Faster and Better Large Language Model with Improved TransNormer."
  arXiv:2307.14995, 2023; Qin et al. "Lightning Attention-2", arXiv:2401.04658, 2024.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from memjax.kernels._platform import platform_dependent
from memjax.kernels.linear_attention.chunked import linear_attention_chunked
from memjax.kernels.linear_attention.pallas import linear_attention_pallas
from memjax.kernels.linear_attention.reference import (
    LinearAttentionState,
    linear_attention_quadratic,
)

__all__ = [
    "LinearAttentionState",
    "lightning_decay",
    "lightning_slopes",
    "linear_attention",
    "linear_attention_step",
]


def _quadratic(q, k, v, *, chunk_size, **kwargs):
    """The quadratic reference under the common signature (it has no chunks)."""
    del chunk_size
    return linear_attention_quadratic(q, k, v, **kwargs)


def _pallas(q, k, v, *, decay, causal, normalize, eps, chunk_size, initial_state,
            return_last_state, interpret=False, backend=None):
    """The Pallas kernels for the causal un-normalised form; the chunked XLA form otherwise."""
    if normalize or not causal:
        return linear_attention_chunked(q, k, v, decay=decay, causal=causal, normalize=normalize,
                                        eps=eps, chunk_size=chunk_size,
                                        initial_state=initial_state,
                                        return_last_state=return_last_state)
    return linear_attention_pallas(q, k, v, decay=decay, initial_state=initial_state,
                                   return_last_state=return_last_state, chunk_size=chunk_size,
                                   interpret=interpret, backend=backend)


def _auto(q, k, v, *, interpret=False, **options):
    """The Pallas kernels where Pallas compiles (CUDA / ROCm: Triton, TPU: Mosaic), else "xla",
    chosen per lowering platform (see ``memjax.kernels._platform.platform_dependent``)."""
    if options["normalize"] or not options["causal"]:  # no kernel for these forms
        return linear_attention_chunked(q, k, v, **options)
    decay, initial_state = options.pop("decay"), options.pop("initial_state")

    def branch(impl, **extra):
        def run(q, k, v, decay, initial_state):  # outputs in q.dtype (chunked: float32)
            result = impl(q, k, v, decay=decay, initial_state=initial_state, **options, **extra)
            if options["return_last_state"]:
                return result[0].astype(q.dtype), result[1]
            return result.astype(q.dtype)
        return run

    return platform_dependent(q, k, v, decay, initial_state,
                              gpu=branch(_pallas, backend="triton", interpret=interpret),
                              tpu=branch(_pallas, backend="tpu", interpret=interpret),
                              other=branch(linear_attention_chunked))


# Every implementation has the signature of ``linear_attention_chunked``: keyword arguments
# decay, causal, normalize, eps, chunk_size, initial_state, return_last_state; float32 results
# (the Pallas kernels return ``q.dtype``). "pallas" and "auto" also take ``interpret``.
_IMPLEMENTATIONS = {
    "auto": _auto,
    "xla": linear_attention_chunked,
    "pallas": _pallas,
    "reference": _quadratic,
}


def lightning_slopes(num_heads: int) -> np.ndarray:
    """Lightning attention's per-head slopes ``s_h = 2^(-8 (h + 1) / H)``, shape (num_heads,).

    A float32 NumPy array: a static constant even while tracing (``jit``, ``nnx.eval_shape``).
    """
    if num_heads <= 0:
        raise ValueError(f"num_heads must be positive, got {num_heads}.")
    heads = np.arange(num_heads, dtype=np.float64)
    return (2.0 ** (-8.0 * (heads + 1.0) / num_heads)).astype(np.float32)


def lightning_decay(num_heads: int) -> np.ndarray:
    """Lightning attention's per-head decays ``lam_h = exp(-s_h)`` in (0, 1), shape (num_heads,).

    A float32 NumPy array, like :func:`lightning_slopes`.
    """
    return np.exp(-lightning_slopes(num_heads).astype(np.float64)).astype(np.float32)


def _check_impl(impl: str) -> str:
    """Check ``impl`` ("auto" is resolved per lowering platform, not here)."""
    if impl not in _IMPLEMENTATIONS:
        known = ", ".join(repr(name) for name in _IMPLEMENTATIONS)
        raise ValueError(f"impl must be one of {known}, got {impl!r}.")
    return impl


def _check_decay(decay, num_heads: int):
    """Validate ``decay`` (heads,) in (0, 1]; value checks only where the values are concrete."""
    if decay is None:
        return None
    if np.shape(decay) != (num_heads,):
        raise ValueError(f"decay must have shape (heads,) = ({num_heads},), "
                         f"got {np.shape(decay)}.")
    if not isinstance(decay, jax.core.Tracer):
        values = np.asarray(decay)
        if not np.all((values > 0) & (values <= 1)):
            raise ValueError(f"decay values must lie in (0, 1], got {values}.")
    return jnp.asarray(decay)


def _check_state(state, name: str, normalize: bool, kv_shape: tuple, k_sum_shape: tuple):
    """Validate a state: a kv array, or a ``(kv, k_sum)`` pair when ``normalize``."""
    if normalize:
        if not (isinstance(state, tuple) and len(state) == 2):
            raise ValueError(f"{name} must be a LinearAttentionState(kv, k_sum) when "
                             "normalize=True.")
        kv, k_sum = state
        if jnp.shape(k_sum) != k_sum_shape:
            raise ValueError(f"{name}.k_sum must have shape (batch, heads, d_k) = {k_sum_shape}, "
                             f"got {jnp.shape(k_sum)}.")
    else:
        kv = state
        if isinstance(kv, tuple):
            raise ValueError(f"{name} must be a (batch, heads, d_k, d_v) array when "
                             "normalize=False, got a tuple.")
    if jnp.shape(kv) != kv_shape:
        raise ValueError(f"{name} must have shape (batch, heads, d_k, d_v) = {kv_shape}, "
                         f"got {jnp.shape(kv)}.")


def _check_qkv(q, k, v):
    if jnp.ndim(q) != 4:
        raise ValueError(f"q must have shape (batch, length, heads, d_k), got {jnp.shape(q)}.")
    if jnp.shape(k) != jnp.shape(q):
        raise ValueError(f"k must have the shape of q {jnp.shape(q)}, got {jnp.shape(k)}.")
    if jnp.ndim(v) != 4 or jnp.shape(v)[:3] != jnp.shape(q)[:3]:
        raise ValueError(f"v must have shape (batch, length, heads, d_v) = {jnp.shape(q)[:3]} + "
                         f"(d_v,), got {jnp.shape(v)}.")
    if jnp.shape(q)[1] == 0:
        raise ValueError("q, k, v must have length >= 1.")


def linear_attention(q, k, v, *, decay=None, causal=True, normalize=False, eps=1e-6, chunk_size=64,
                     initial_state=None, return_last_state=False, impl="auto", interpret=False):
    """(Decayed) linear attention over a whole sequence.

    Args:
      q: (batch, L, heads, d_k) queries (already feature-mapped).
      k: (batch, L, heads, d_k) keys (already feature-mapped).
      v: (batch, L, heads, d_v) values.
      decay: None or (heads,) decays in (0, 1].
      causal: causal weights ``lam^(i-j)``, ``j <= i``; else bidirectional ``lam^|i-j|``.
      normalize: divide by the denominator ``sum_j w_ij q_i . k_j + eps`` (use a positive feature
        map). States are then :class:`LinearAttentionState` ``(kv, k_sum)``.
      eps: added to the denominator.
      chunk_size: tokens per chunk of the chunkwise form, > 0.
      initial_state: causal only; state before the first token, (batch, heads, d_k, d_v)
        (or ``(kv, k_sum)`` when ``normalize``). None means zeros.
      return_last_state: causal only; also return the state after the last token (float32).
      impl: ``"auto"``, ``"xla"``, ``"pallas"`` or ``"reference"`` (see the module docstring);
        ``"auto"`` and ``"pallas"`` pick the kernel per lowering platform.
      interpret: run the Pallas kernels in the Pallas interpreter on every platform.

    Returns:
      out (batch, L, heads, d_v) in ``q.dtype``; ``(out, last_state)`` if ``return_last_state``.

    Example:
      >>> q = k = jnp.ones((1, 5, 2, 4)); v = jnp.ones((1, 5, 2, 3))
      >>> linear_attention(q, k, v, decay=lightning_decay(2), chunk_size=2).shape
      (1, 5, 2, 3)
    """
    _check_qkv(q, k, v)
    batch, _, heads, d_k = jnp.shape(q)
    d_v = jnp.shape(v)[-1]
    decay = _check_decay(decay, heads)
    if not isinstance(chunk_size, (int, np.integer)) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}.")
    if not causal and (initial_state is not None or return_last_state):
        raise ValueError("initial_state and return_last_state need causal=True.")
    if initial_state is not None:
        _check_state(initial_state, "initial_state", normalize, (batch, heads, d_k, d_v),
                     (batch, heads, d_k))
    name = _check_impl(impl)
    fn = _IMPLEMENTATIONS[name]
    if name in ("pallas", "auto"):
        fn = functools.partial(fn, interpret=interpret)
    result = fn(q, k, v, decay=decay, causal=causal, normalize=normalize, eps=eps,
                chunk_size=int(chunk_size), initial_state=initial_state,
                return_last_state=return_last_state)
    if return_last_state:
        out, last_state = result
        return out.astype(q.dtype), last_state
    return result.astype(q.dtype)


def linear_attention_step(q_t, k_t, v_t, state, decay=None, *, normalize=False, eps=1e-6):
    """One causal decoding step: ``S <- lam S + k_t^T v_t``, ``o_t = q_t S`` (/ ``q_t . n``).

    Args:
      q_t: (batch, heads, d_k).
      k_t: (batch, heads, d_k).
      v_t: (batch, heads, d_v).
      state: (batch, heads, d_k, d_v), or :class:`LinearAttentionState` ``(kv, k_sum)`` when
        ``normalize``.
      decay: None or (heads,) in (0, 1].
      normalize: Katharopoulos normalisation, as in :func:`linear_attention`.
      eps: added to the denominator.

    Returns:
      ``(o_t, new_state)``: o_t (batch, heads, d_v) in ``q_t.dtype``; new_state of the same
      structure and dtype as ``state``.
    """
    if jnp.ndim(q_t) != 3:
        raise ValueError(f"q_t must have shape (batch, heads, d_k), got {jnp.shape(q_t)}.")
    if jnp.shape(k_t) != jnp.shape(q_t):
        raise ValueError(f"k_t must have the shape of q_t {jnp.shape(q_t)}, got {jnp.shape(k_t)}.")
    if jnp.ndim(v_t) != 3 or jnp.shape(v_t)[:2] != jnp.shape(q_t)[:2]:
        raise ValueError(f"v_t must have shape (batch, heads, d_v) = {jnp.shape(q_t)[:2]} + (d_v,),"
                         f" got {jnp.shape(v_t)}.")
    batch, heads, d_k = jnp.shape(q_t)
    _check_state(state, "state", normalize, (batch, heads, d_k, jnp.shape(v_t)[-1]),
                 (batch, heads, d_k))
    decay = _check_decay(decay, heads)

    q32, k32, v32 = (jnp.asarray(x, jnp.float32) for x in (q_t, k_t, v_t))
    lam = jnp.ones((heads,), jnp.float32) if decay is None else decay.astype(jnp.float32)
    kv_in = state.kv if normalize else state
    kv = (lam[None, :, None, None] * kv_in.astype(jnp.float32)
          + k32[..., :, None] * v32[..., None, :])
    out = jnp.einsum("bhd,bhde->bhe", q32, kv)
    kv = kv.astype(kv_in.dtype)
    if not normalize:
        return out.astype(q_t.dtype), kv
    k_sum = lam[None, :, None] * state.k_sum.astype(jnp.float32) + k32
    out = out / (jnp.einsum("bhd,bhd->bh", q32, k_sum) + eps)[..., None]
    return out.astype(q_t.dtype), LinearAttentionState(kv, k_sum.astype(state.k_sum.dtype))
