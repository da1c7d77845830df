"""Readable reference definitions of (decayed) linear attention.

Two forms of one function, used to check the fast implementations:

* :func:`linear_attention_quadratic` -- the masked quadratic form, O(L^2) time and memory.
* :func:`linear_attention_recurrent` -- the sequential form, a ``lax.scan`` over time.

Math (per batch element and head; ``q_i, k_i`` rows of length ``d_k``, ``v_i`` of length ``d_v``,
``lam`` the head's decay in (0, 1], ``lam = 1`` being plain linear attention):

    causal:      out_i = sum_{j <= i} lam^(i - j) (q_i . k_j) v_j
    non-causal:  out_i = sum_j        lam^|i - j| (q_i . k_j) v_j

With ``normalize=True`` (Katharopoulos et al. 2020) the output is divided by the matching
denominator ``z_i = sum_j w_ij (q_i . k_j)`` (``w_ij`` the same decay weights) plus ``eps``.

The causal form is a recurrence over a state ``S_t`` of shape (d_k, d_v):

    S_t = lam S_{t-1} + k_t^T v_t,      out_t = q_t S_t,      (normaliser: n_t = lam n_{t-1} + k_t,
                                                               z_t = q_t . n_t)

An ``initial_state`` ``S_{-1}`` adds ``lam^(i + 1) q_i S_{-1}`` to ``out_i``; the last state is
``S_{L-1} = lam^L S_{-1} + sum_j lam^(L - 1 - j) k_j^T v_j``. States (``initial_state`` and the
returned last state) exist for the causal form only. With ``normalize=True`` a state is the pair
:class:`LinearAttentionState` ``(kv, k_sum)``; otherwise it is the ``kv`` array alone.

Layout everywhere: ``q, k``: (batch, length, heads, d_k); ``v``: (batch, length, heads, d_v);
``decay``: (heads,) or ``None``; states: ``kv`` (batch, heads, d_k, d_v), ``k_sum``
(batch, heads, d_k). These functions compute in float32 and do no argument checking: call
:func:`memjax.kernels.linear_attention.linear_attention` (``impl="reference"``) for that.

References:
  Katharopoulos, Vyas, Pappas, Fleuret. "Transformers are RNNs: Fast Autoregressive Transformers
  with Linear Attention." ICML 2020, arXiv:2006.16236.
  Qin et al. "TransNormerLLM: A Faster and Better Large Language Model with Improved TransNormer."
  arXiv:2307.14995, 2023 (Lightning attention, decayed linear attention).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

__all__ = [
    "LinearAttentionState",
    "linear_attention_quadratic",
    "linear_attention_recurrent",
]


class LinearAttentionState(NamedTuple):
    """Recurrent state of normalised linear attention.

    Attributes:
      kv: (batch, heads, d_k, d_v), ``sum_j lam^(t - j) k_j^T v_j``.
      k_sum: (batch, heads, d_k), ``sum_j lam^(t - j) k_j`` (the normaliser's state).
    """

    kv: jax.Array
    k_sum: jax.Array


def _as_float32(*xs):
    return tuple(None if x is None else jnp.asarray(x, jnp.float32) for x in xs)


def _decay_or_ones(decay, num_heads: int) -> jax.Array:
    """(heads,) decay, ones when ``decay`` is None."""
    if decay is None:
        return jnp.ones((num_heads,), jnp.float32)
    return jnp.asarray(decay, jnp.float32)


def _split_state(state, normalize: bool, batch: int, heads: int, d_k: int, d_v: int):
    """Return ``(kv, k_sum)`` float32 arrays, zeros where no state was given."""
    if state is None:
        return (jnp.zeros((batch, heads, d_k, d_v), jnp.float32),
                jnp.zeros((batch, heads, d_k), jnp.float32))
    if normalize:
        kv, k_sum = state
        return jnp.asarray(kv, jnp.float32), jnp.asarray(k_sum, jnp.float32)
    return jnp.asarray(state, jnp.float32), jnp.zeros((batch, heads, d_k), jnp.float32)


def _join_state(kv, k_sum, normalize: bool):
    return LinearAttentionState(kv, k_sum) if normalize else kv


def _decay_weights(decay: jax.Array, length: int, causal: bool) -> jax.Array:
    """(heads, L, L) weights ``w_ij = lam^|i - j|``, zero above the diagonal when causal."""
    pos = jnp.arange(length)
    dist = jnp.abs(pos[:, None] - pos[None, :]).astype(jnp.float32)
    weights = decay[:, None, None] ** dist[None]
    if causal:
        weights = jnp.where((pos[:, None] >= pos[None, :])[None], weights, 0.0)
    return weights


def linear_attention_quadratic(q, k, v, *, decay=None, causal=True, normalize=False, eps=1e-6,
                               initial_state=None, return_last_state=False):
    """Quadratic masked form of (decayed) linear attention; O(L^2) memory, for testing.

    Args:
      q: (batch, L, heads, d_k).
      k: (batch, L, heads, d_k).
      v: (batch, L, heads, d_v).
      decay: (heads,) in (0, 1], or None (no decay).
      causal: mask ``j > i`` (otherwise weights ``lam^|i - j|``).
      normalize: divide by the denominator ``sum_j w_ij q_i . k_j`` plus ``eps``.
      eps: added to the denominator.
      initial_state: causal only; (batch, heads, d_k, d_v), or a :class:`LinearAttentionState`
        when ``normalize``.
      return_last_state: causal only; also return the state after the last token.

    Returns:
      out (batch, L, heads, d_v) float32, and the last state if ``return_last_state``.
    """
    q, k, v = _as_float32(q, k, v)
    batch, length, heads, d_k = q.shape
    d_v = v.shape[-1]
    lam = _decay_or_ones(decay, heads)
    kv0, k_sum0 = _split_state(initial_state, normalize, batch, heads, d_k, d_v)

    weights = _decay_weights(lam, length, causal)                      # (H, L, L)
    scores = jnp.einsum("bihd,bjhd->bhij", q, k) * weights[None]        # (B, H, L, L)
    num = jnp.einsum("bhij,bjhe->bihe", scores, v)                     # (B, L, H, d_v)
    den = jnp.einsum("bhij->bih", scores)                              # (B, L, H)

    # Carried-in state: lam^(i + 1) q_i S_{-1}.
    pos = jnp.arange(length, dtype=jnp.float32)
    carry_decay = (lam[None, :] ** (pos[:, None] + 1.0))[None]          # (1, L, H)
    num = num + carry_decay[..., None] * jnp.einsum("bihd,bhde->bihe", q, kv0)
    den = den + carry_decay * jnp.einsum("bihd,bhd->bih", q, k_sum0)

    out = num / (den + eps)[..., None] if normalize else num
    if not return_last_state:
        return out
    # S_{L-1} = lam^L S_{-1} + sum_j lam^(L - 1 - j) k_j^T v_j.
    last_w = lam[None, :] ** (length - 1.0 - pos[:, None])              # (L, H)
    k_w = k * last_w[None, :, :, None]
    total = (lam ** float(length))[None, :]                            # (1, H)
    kv = total[..., None, None] * kv0 + jnp.einsum("bjhd,bjhe->bhde", k_w, v)
    k_sum = total[..., None] * k_sum0 + jnp.einsum("bjhd->bhd", k_w)
    return out, _join_state(kv, k_sum, normalize)


def _causal_scan(q, k, v, lam, kv0, k_sum0):
    """Sequential causal pass. Returns (num (B, L, H, d_v), den (B, L, H), kv, k_sum)."""

    def step(carry, qkv_t):
        kv, k_sum = carry
        q_t, k_t, v_t = qkv_t                                          # (B, H, d)
        kv = lam[None, :, None, None] * kv + k_t[..., :, None] * v_t[..., None, :]
        k_sum = lam[None, :, None] * k_sum + k_t
        num_t = jnp.einsum("bhd,bhde->bhe", q_t, kv)
        den_t = jnp.einsum("bhd,bhd->bh", q_t, k_sum)
        return (kv, k_sum), (num_t, den_t)

    time_major = tuple(jnp.moveaxis(x, 1, 0) for x in (q, k, v))
    (kv, k_sum), (num, den) = jax.lax.scan(step, (kv0, k_sum0), time_major)
    return jnp.moveaxis(num, 0, 1), jnp.moveaxis(den, 0, 1), kv, k_sum


def linear_attention_recurrent(q, k, v, *, decay=None, causal=True, normalize=False, eps=1e-6,
                               initial_state=None, return_last_state=False):
    """Sequential form: a ``lax.scan`` over time carrying ``S`` (d_k, d_v) per batch and head.

    The non-causal form is a forward scan plus a backward scan minus the diagonal term (counted
    twice).
    Arguments, shapes and returns as :func:`linear_attention_quadratic`.
    """
    q, k, v = _as_float32(q, k, v)
    batch, length, heads, d_k = q.shape
    d_v = v.shape[-1]
    lam = _decay_or_ones(decay, heads)
    kv0, k_sum0 = _split_state(initial_state, normalize, batch, heads, d_k, d_v)

    num, den, kv, k_sum = _causal_scan(q, k, v, lam, kv0, k_sum0)
    if not causal:
        flip = lambda x: jnp.flip(x, axis=1)  # noqa: E731
        num_b, den_b, _, _ = _causal_scan(flip(q), flip(k), flip(v), lam, kv0, k_sum0)
        diag = jnp.einsum("bihd,bihd->bih", q, k)
        num = num + flip(num_b) - diag[..., None] * v
        den = den + flip(den_b) - diag

    out = num / (den + eps)[..., None] if normalize else num
    if return_last_state:
        return out, _join_state(kv, k_sum, normalize)
    return out
