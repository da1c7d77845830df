"""Chunkwise parallel (decayed) linear attention in plain XLA.

The sequence of length L is cut into ``n = ceil(L / C)`` chunks of C tokens. Per batch element and
head, with ``lam`` the head's decay, ``i, j`` positions inside a chunk (0-based) and ``S`` the state
(d_k, d_v) carried into the chunk:

    intra:   O_intra = (Q K^T * M) V,        M_ij = lam^(i - j) for j <= i, else 0    (C x C only)
    inter:   O_inter = (Q * lam^(i + 1)) S
    state:   S <- lam^C S + (K * lam^(C - 1 - j))^T V

(REFERENCES.md writes the state weight as ``lam^(C - j)`` with 1-based ``j``.) The intra terms of
all chunks and the per-chunk state increments are batched matmuls; only the tiny state recurrence
runs in a ``lax.scan`` over chunks. Nothing of size L x L is formed: the largest intermediates are
(batch, heads, n, C, C) scores and the (batch, heads, n, d_k, d_v) chunk states.

Decay is handled in log space: ``b_i`` the inclusive sum of ``log lam`` over the chunk up to i,
so ``M_ij = exp(b_i - b_j)``, the inter weight is ``exp(b_i)`` and the state weights
``exp(b_{C-1} - b_j)`` and ``exp(b_{C-1})``; no weight exceeds 1 and nothing is divided. A length
that is not a multiple of C is zero-padded at the end, and the padded positions get ``log lam = 0``
so they neither add to nor decay the state: the last state is exact.

Katharopoulos normalisation appends a column of ones to V: the extra output column is the
denominator ``sum_j w_ij q_i . k_j`` and the extra state column the normaliser state ``sum_j k_j``.
The non-causal form with decay ``lam^|i - j|`` is a forward pass plus a pass over the reversed
sequence minus the diagonal ``(q_i . k_i) v_i`` counted twice; without decay it is ``Q (K^T V)``.

Layout: ``q, k``: (batch, L, heads, d_k); ``v``: (batch, L, heads, d_v); ``decay``: (heads,) or
None. Computes in float32 and does no argument checking (see ``ops.linear_attention``).

References:
  Katharopoulos et al. "Transformers are RNNs." ICML 2020, arXiv:2006.16236.
  Qin et al. "TransNormerLLM" / Lightning Attention, arXiv:2307.14995, 2023.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from memjax.kernels.linear_attention.reference import LinearAttentionState

__all__ = ["linear_attention_chunked"]


def _to_chunks(x: jax.Array, num_chunks: int, chunk: int) -> jax.Array:
    """(B, n * C, H, d) -> (B, H, n, C, d)."""
    batch, _, heads, dim = x.shape
    return x.reshape(batch, num_chunks, chunk, heads, dim).transpose(0, 3, 1, 2, 4)


def _from_chunks(x: jax.Array, length: int) -> jax.Array:
    """(B, H, n, C, d) -> (B, length, H, d), dropping the padding."""
    batch, heads, num_chunks, chunk, dim = x.shape
    x = x.transpose(0, 2, 3, 1, 4).reshape(batch, num_chunks * chunk, heads, dim)
    return x[:, :length]


def _cumulative_log_decay(log_decay: jax.Array, length: int, num_chunks: int, chunk: int):
    """(H, n, C) inclusive in-chunk sums ``b_i = sum_{t <= i} log lam``; padded positions add 0.

    With one decay per head this is ``log lam * (number of valid positions t <= i in the chunk)``.
    """
    position = jnp.arange(chunk)[None, :]                                # (1, C)
    valid_in_chunk = length - chunk * jnp.arange(num_chunks)[:, None]    # (n, 1), >= 1
    count = jnp.minimum(position + 1, valid_in_chunk).astype(jnp.float32)
    return log_decay[:, None, None] * count[None]


def _intra_chunk(q, k, v, b):
    """(Q K^T * M) V for every chunk.

    q, k: (B, H, n, C, d_k); v: (B, H, n, C, d_v); b: (H, n, C). Returns (B, H, n, C, d_v).
    """
    chunk = b.shape[-1]
    lower = jnp.tril(jnp.ones((chunk, chunk), bool))[None, None]        # (1, 1, C, C)
    log_mask = jnp.where(lower, b[..., :, None] - b[..., None, :], -jnp.inf)
    mask = jnp.exp(log_mask)                                            # (H, n, C, C)
    scores = jnp.einsum("bhnid,bhnjd->bhnij", q, k) * mask[None]
    return jnp.einsum("bhnij,bhnje->bhnie", scores, v)


def _chunk_states(k, v, b, initial_state):
    """States entering each chunk, (B, H, n, d_k, d_v), and the last state (B, H, d_k, d_v)."""
    last = b[..., -1:]                                                  # (H, n, 1)
    k_weighted = k * jnp.exp(last - b)[None, ..., None]                 # lam^(C - 1 - j) k_j
    increments = jnp.einsum("bhncd,bhnce->nbhde", k_weighted, v)         # (n, B, H, d_k, d_v)
    chunk_decay = jnp.exp(last[..., 0]).T                               # (n, H) = lam^C

    def step(state, inputs):
        decay_c, increment_c = inputs
        return decay_c[None, :, None, None] * state + increment_c, state

    last_state, entering = jax.lax.scan(step, initial_state, (chunk_decay, increments))
    return jnp.moveaxis(entering, 0, 2), last_state


def _causal_chunked(q, k, v, log_decay, chunk_size: int, initial_state):
    """Causal decayed linear attention, chunkwise. Returns (out (B, L, H, d_v), last state)."""
    _, length, _, _ = q.shape
    chunk = min(chunk_size, length)
    num_chunks = -(-length // chunk)
    pad = num_chunks * chunk - length
    padding = ((0, 0), (0, pad), (0, 0), (0, 0))
    qc, kc, vc = (_to_chunks(jnp.pad(x, padding), num_chunks, chunk) for x in (q, k, v))
    b = _cumulative_log_decay(log_decay, length, num_chunks, chunk)

    states, last_state = _chunk_states(kc, vc, b, initial_state)
    inter = jnp.einsum("bhncd,bhnde->bhnce", qc * jnp.exp(b)[None, ..., None], states)
    out = _intra_chunk(qc, kc, vc, b) + inter
    return _from_chunks(out, length), last_state


def _non_causal(q, k, v, log_decay, chunk_size: int, has_decay: bool):
    """out_i = sum_j lam^|i - j| (q_i . k_j) v_j. q, k: (B, L, H, d_k); v: (B, L, H, d_v)."""
    if not has_decay:
        return jnp.einsum("bihd,bhde->bihe", q, jnp.einsum("bjhd,bjhe->bhde", k, v))
    batch, _, heads, d_k = q.shape
    zeros = jnp.zeros((batch, heads, d_k, v.shape[-1]), jnp.float32)
    flip = lambda x: jnp.flip(x, axis=1)  # noqa: E731
    forward, _ = _causal_chunked(q, k, v, log_decay, chunk_size, zeros)
    backward, _ = _causal_chunked(flip(q), flip(k), flip(v), log_decay, chunk_size, zeros)
    diagonal = jnp.einsum("bihd,bihd->bih", q, k)[..., None] * v
    return forward + flip(backward) - diagonal


def linear_attention_chunked(q, k, v, *, decay=None, causal=True, normalize=False, eps=1e-6,
                             chunk_size=64, initial_state=None, return_last_state=False):
    """Chunkwise (decayed) linear attention; same contract as the references in ``reference.py``.

    Args:
      q: (batch, L, heads, d_k).
      k: (batch, L, heads, d_k).
      v: (batch, L, heads, d_v).
      decay: (heads,) in (0, 1], or None.
      causal: causal (``lam^(i-j)``, ``j <= i``) or bidirectional (``lam^|i-j|``) weights.
      normalize: divide by ``sum_j w_ij q_i . k_j + eps`` (Katharopoulos).
      eps: added to the denominator.
      chunk_size: C, tokens per chunk (clipped to L).
      initial_state: causal only; (batch, heads, d_k, d_v), or a ``LinearAttentionState`` when
        ``normalize``.
      return_last_state: causal only; also return the state after the last token.

    Returns:
      out (batch, L, heads, d_v) float32, and the last state if ``return_last_state``.
    """
    q, k, v = (jnp.asarray(x, jnp.float32) for x in (q, k, v))
    batch, _, heads, d_k = q.shape
    d_v = v.shape[-1]
    has_decay = decay is not None
    log_decay = jnp.log(jnp.asarray(decay, jnp.float32)) if has_decay else jnp.zeros((heads,))

    if normalize:  # a ones column in V yields the denominator; in the state, the k_sum.
        v = jnp.concatenate([v, jnp.ones(v.shape[:-1] + (1,), jnp.float32)], axis=-1)
    if initial_state is None:
        state = jnp.zeros((batch, heads, d_k, v.shape[-1]), jnp.float32)
    elif normalize:
        kv0, k_sum0 = initial_state
        state = jnp.concatenate([jnp.asarray(kv0, jnp.float32),
                                 jnp.asarray(k_sum0, jnp.float32)[..., None]], axis=-1)
    else:
        state = jnp.asarray(initial_state, jnp.float32)

    if causal:
        out, last_state = _causal_chunked(q, k, v, log_decay, chunk_size, state)
    else:
        out, last_state = _non_causal(q, k, v, log_decay, chunk_size, has_decay), None

    if normalize:
        out = out[..., :d_v] / (out[..., d_v:] + eps)
        if last_state is not None:
            last_state = LinearAttentionState(last_state[..., :d_v], last_state[..., d_v])
    return (out, last_state) if return_last_state else out
