"""Readable dense reference of Scatterbrain attention: builds the full L x L matrices.

Scatterbrain (Chen et al. 2021) approximates the unnormalised attention matrix ``exp(Q K^T)`` by a
low-rank Performer estimate corrected exactly on a sparse support ``S``::

    A = phi(Q) phi(K)^T + [exp(Q K^T) - phi(Q) phi(K)^T]_S
    out = A V / (A 1)

so that ``A_ij = exp(q_i . k_j)`` on ``S`` and ``A_ij = phi(q_i) . phi(k_j)`` off ``S`` (the
invariant). Written out, ``out = [(exp(QK^T) - phi(Q)phi(K)^T)_S V + phi(Q)(phi(K)^T V)] / D`` with
``D = sum_S exp(QK^T) + phi(Q) phi(K)^T 1 - sum_S phi(Q) phi(K)^T``. Causal attention keeps
``j <= i`` only, in every term.

* Scaling: q and k are each multiplied by ``d^(-1/4)`` so that ``q . k`` carries the usual
  ``1 / sqrt(d)``.
* Features (Performer FAVOR+, positive random features): for a projection ``W`` (m, d) with
  Gaussian rows, ``phi(x) = exp(W x - |x|^2 / 2) / sqrt(m)``, so ``E[phi(q) . phi(k)] = exp(q . k)``.
* Support ``S`` (union of the parts given):

  - local window ``w``: ``0 <= i - j < w`` (causal) or ``|i - j| < w`` (bidirectional);
  - LSH (Reformer's angular hash, shared by queries and keys): ``h(x) = argmax([x R, -x R])`` for
    random rotations ``R`` (d, buckets / 2). Query i attends to the ``C`` keys of its bucket
    (``h(k_j) = h(q_i)``) nearest before it, outside the window: the ``C`` largest
    ``j <= i - r`` (``r = w``, or 0 without a window); bidirectional, also to the ``C`` smallest
    ``j >= i + max(r, 1)``. The implementation sorts keys by ``(h(k_j), j)`` and reads, for every
    query, the chunk of ``C`` sorted keys that ends (starts) at its own (bucket, position): the
    same set. Unlike Reformer's fixed chunk boundaries (which depend on where *later* tokens
    hash), this set depends on keys ``j <= i`` only, so the causal layer is exactly causal. The
    window and LSH parts are disjoint by construction.

This file is the definition used by the tests (O(L^2) memory). The sub-quadratic implementation is
:mod:`memjax.kernels.scatterbrain.ops`. No argument checking here.

References:
  Chen, Dao, Winsor, Song, Rudra, Re. "Scatterbrain: Unifying Sparse and Low-rank Attention
  Approximation." NeurIPS 2021, arXiv:2110.15343.
  Choromanski et al. "Rethinking Attention with Performers." ICLR 2021, arXiv:2009.14794 (FAVOR+).
  Kitaev, Kaiser, Levskaya. "Reformer: The Efficient Transformer." ICLR 2020, arXiv:2001.04451 (LSH).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "default_chunk_size",
    "log_features",
    "lsh_hash",
    "scatterbrain_attention_reference",
    "scatterbrain_unnormalized",
    "support_mask",
]


def default_chunk_size(length: int) -> int:
    """``ceil(sqrt(length))``, the default LSH chunk C (and the causal low-rank chunk)."""
    return math.isqrt(max(length, 1) - 1) + 1


def log_features(x: jax.Array, projection: jax.Array) -> jax.Array:
    """``log(phi(x) sqrt(m)) = W x - |x|^2 / 2`` for already scaled x.

    Args:
      x: (..., d) float32, scaled by ``d^(-1/4)``.
      projection: (m, d).

    Returns:
      (..., m); ``phi(x) = exp(result) / sqrt(m)``.
    """
    proj = jnp.einsum("...d,md->...m", x, projection.astype(x.dtype))
    return proj - 0.5 * jnp.sum(x * x, axis=-1, keepdims=True)


def lsh_hash(x: jax.Array, rotations: jax.Array) -> jax.Array:
    """Angular LSH bucket of every vector: ``argmax([x R, -x R])``.

    Args:
      x: (..., d).
      rotations: (d, buckets / 2).

    Returns:
      (...,) int32 in ``[0, buckets)``.
    """
    rotated = jnp.einsum("...d,dr->...r", x.astype(jnp.float32), rotations.astype(jnp.float32))
    return jnp.argmax(jnp.concatenate([rotated, -rotated], axis=-1), axis=-1).astype(jnp.int32)


def _nearest_in_bucket(same: jax.Array, lo: np.ndarray, hi: np.ndarray, count: int) -> jax.Array:
    """Per row i, the ``count`` nearest True entries of ``same[i]`` at or before ``lo[i]`` and at or
    after ``hi[i]`` (use ``hi >= L`` for none).

    Args:
      same: (B, H, L, L) bool, ``same[i, j] = (h(k_j) == h(q_i))``.
      lo, hi: (L,) int column bounds, ``hi >= 1``.
      count: C.

    Returns:
      (B, H, L, L) bool.
    """
    length = same.shape[-1]
    cols = np.arange(length)[None, :]
    cum = jnp.cumsum(same.astype(jnp.int32), axis=-1)  # cum[i, j] = #{j' <= j : same[i, j']}

    def cum_at(index: np.ndarray) -> jax.Array:  # cum[i, index[i]], (B, H, L, 1)
        index = np.clip(index, 0, length - 1)[None, None, :, None]
        return jnp.take_along_axis(cum, jnp.broadcast_to(index, cum.shape[:-1] + (1,)), axis=-1)

    # same-bucket keys in (j, lo]: cum[lo] - cum[j];  in [hi, j): cum[j] - same[j] - cum[hi - 1]
    in_before = jnp.asarray(cols <= lo[:, None])[None, None]
    in_after = jnp.asarray(cols >= hi[:, None])[None, None]
    before = same & in_before & (cum_at(lo) - cum < count)
    after = same & in_after & (cum - same - cum_at(hi - 1) < count)
    return before | after


def support_mask(
    q: jax.Array,
    k: jax.Array,
    *,
    window: int | None,
    rotations: jax.Array | None,
    lsh_chunk_size: int | None,
    causal: bool,
) -> jax.Array:
    """The sparse support S as a dense boolean matrix.

    Args:
      q, k: (B, L, H, d).
      window: local window ``w`` or None.
      rotations: (d, buckets / 2) LSH rotations or None (no LSH part).
      lsh_chunk_size: C, same-bucket keys per query and side; None means ``ceil(sqrt(L))``.
      causal: keep ``j <= i`` only.

    Returns:
      (B, H, L, L) bool.
    """
    batch, length, heads, _ = q.shape
    pos = np.arange(length)
    diff = pos[:, None] - pos[None, :]  # i - j
    if window is None:
        band = np.zeros((length, length), bool)
    elif causal:
        band = (diff >= 0) & (diff < window)
    else:
        band = np.abs(diff) < window
    mask = jnp.broadcast_to(jnp.asarray(band)[None, None], (batch, heads, length, length))
    if rotations is not None:
        chunk = default_chunk_size(length) if lsh_chunk_size is None else lsh_chunk_size
        hq = jnp.swapaxes(lsh_hash(q, rotations), 1, 2)  # (B, H, L)
        hk = jnp.swapaxes(lsh_hash(k, rotations), 1, 2)
        same = hq[..., :, None] == hk[..., None, :]  # (B, H, L, L)
        gap = 0 if window is None else window
        lo = pos - gap  # before: j <= i - r
        hi = pos + max(gap, 1) if not causal else np.full(length, length)  # after: j >= i + max(r, 1)
        mask = mask | _nearest_in_bucket(same, lo, hi, chunk)
    if causal:
        mask = mask & jnp.asarray(diff >= 0)[None, None]
    return mask


def _scaled(q: jax.Array, k: jax.Array):
    scale = q.shape[-1] ** -0.25
    return q.astype(jnp.float32) * scale, k.astype(jnp.float32) * scale


def scatterbrain_unnormalized(
    q: jax.Array, k: jax.Array, projection: jax.Array, support: jax.Array, *, causal: bool
) -> jax.Array:
    """The paper's matrix ``A = phi(Q)phi(K)^T + [exp(QK^T) - phi(Q)phi(K)^T]_S`` (no stabiliser).

    For moderate inputs only (it exponentiates raw logits); used to check the invariant.

    Args:
      q, k: (B, L, H, d); projection: (m, d); support: (B, H, L, L) bool.
      causal: zero the entries ``j > i``.

    Returns:
      (B, H, L, L) float32.
    """
    qs, ks = _scaled(q, k)
    num_features = projection.shape[0]
    phi_q = jnp.exp(log_features(qs, projection)) / math.sqrt(num_features)  # (B, L, H, m)
    phi_k = jnp.exp(log_features(ks, projection)) / math.sqrt(num_features)
    low_rank = jnp.einsum("bihm,bjhm->bhij", phi_q, phi_k)
    exact = jnp.exp(jnp.einsum("bihd,bjhd->bhij", qs, ks))
    a = low_rank + jnp.where(support, exact - low_rank, 0.0)
    if causal:
        length = q.shape[1]
        a = jnp.where(jnp.tril(jnp.ones((length, length), bool))[None, None], a, 0.0)
    return a


def scatterbrain_attention_reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    projection: jax.Array,
    window: int | None = None,
    rotations: jax.Array | None = None,
    lsh_chunk_size: int | None = None,
    causal: bool = True,
) -> jax.Array:
    """Dense Scatterbrain attention, ``out = A V / (A 1)`` with A from the invariant.

    A is built in the log domain, ``log A_ij = q_i . k_j`` on S and
    ``log(phi(q_i) . phi(k_j))`` (a logsumexp over features) off S, then normalised by a softmax
    over j (``j <= i`` when causal): the same matrix as :func:`scatterbrain_unnormalized`, stable
    for any input scale.

    Args:
      q, k: (B, L, H, d); v: (B, L, H, dv).
      projection: (m, d) random-feature projection.
      window: local window or None.
      rotations: (d, buckets / 2) LSH rotations or None.
      lsh_chunk_size: C, same-bucket keys per query and side; None for ``ceil(sqrt(L))``.
      causal: autoregressive masking.

    Returns:
      (B, L, H, dv) in q's dtype.
    """
    qs, ks = _scaled(q, k)
    support = support_mask(
        q, k, window=window, rotations=rotations, lsh_chunk_size=lsh_chunk_size, causal=causal
    )
    lq = log_features(qs, projection)  # (B, L, H, m)
    lk = log_features(ks, projection)
    log_low_rank = jax.nn.logsumexp(
        lq[:, :, None, :, :] + lk[:, None, :, :, :], axis=-1
    ) - math.log(projection.shape[0])  # (B, Lq, Lk, H)
    log_low_rank = jnp.transpose(log_low_rank, (0, 3, 1, 2))
    log_exact = jnp.einsum("bihd,bjhd->bhij", qs, ks)
    log_a = jnp.where(support, log_exact, log_low_rank)
    if causal:
        length = q.shape[1]
        log_a = jnp.where(jnp.tril(jnp.ones((length, length), bool))[None, None], log_a, -1e30)
    probs = jax.nn.softmax(log_a, axis=-1)
    return jnp.einsum("bhij,bjhd->bihd", probs, v.astype(jnp.float32)).astype(q.dtype)
