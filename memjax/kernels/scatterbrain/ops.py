"""Scatterbrain attention in sub-quadratic time and memory: Performer low rank + exact sparse part.

Computes the function defined in :mod:`memjax.kernels.scatterbrain.reference` (math, support and
references there) without any L x L array::

    out_i = [ phi(q_i) . sum_j phi(k_j) v_j + sum_{j in S_i} (e^{q_i . k_j} - phi(q_i) . phi(k_j)) v_j ]
          / [ phi(q_i) . sum_j phi(k_j)     + sum_{j in S_i} (e^{q_i . k_j} - phi(q_i) . phi(k_j)) ]

(sums over ``j <= i`` when causal).

* Low-rank part: bidirectional, one (m, dv) state ``phi(K)^T V``; causal, chunks of
  ``T = ceil(sqrt(L))``: a masked (T x T) product inside the chunk plus an exclusive prefix sum of
  the per-chunk states (O(L m dv + L T m)).
* Local window ``w``: blocks of ``w`` queries attend to their own and the previous key block (and
  the next one when bidirectional), masked to the band: O(L w).
* LSH: keys are sorted by ``(bucket, position)``; every query binary-searches its own
  ``(bucket, position)`` in that order and gathers the chunk of ``C`` sorted keys just before it
  (and, bidirectional, just after it), keeping those of its bucket: O(L C d + L log L). The
  window and LSH parts are disjoint by construction.
* Stability: with ``lk_jm = w_m . k_j - |k_j|^2 / 2`` and ``lq_im`` alike, a shared key stabiliser
  ``c = max_{j, m} lk_jm`` (per batch and head, as in Performer) and a per-query stabiliser
  ``a_i = max(max_m lq_im, max_{j in S_i} q_i . k_j - c)`` (both ``stop_gradient``), every term of
  the numerator and the denominator of query i is multiplied by the same ``exp(-a_i - c)``:
  ``phi(q_i) -> exp(lq_i - a_i)``, ``phi(k_j) -> exp(lk_j - c)``, ``e^{q.k} -> e^{q.k - a_i - c}``.
  Every exponent is <= 0, the ratio (and the invariant) is unchanged. As ``c`` is a max over all
  keys, later keys change the causal output at rounding level only (never its value in exact
  arithmetic, never its gradient).

Everything is computed in float32 and returned in q's dtype; gradients are XLA autodiff through
this form. Hash buckets and sort orders carry no gradient.

Reference:
  Chen et al. "Scatterbrain: Unifying Sparse and Low-rank Attention Approximation." NeurIPS 2021,
  arXiv:2110.15343.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from memjax.kernels._common import check_qkv
from memjax.kernels.scatterbrain.reference import default_chunk_size, log_features, lsh_hash

__all__ = ["gaussian_projection", "lsh_rotations", "scatterbrain_attention"]

_MASKED = -1e30  # finite "minus infinity" for masked logits


# ----------------------------------------------------------------------------- random draws


def gaussian_projection(
    key: jax.Array, num_features: int, head_dim: int, *, orthogonal: bool = True
) -> jax.Array:
    """Random-feature projection W (num_features, head_dim) with N(0, I) marginal rows.

    With ``orthogonal=True`` (FAVOR+), rows come in blocks of ``head_dim`` mutually orthogonal
    directions (QR of a Gaussian matrix), each row rescaled to the norm of an independent Gaussian
    vector; this keeps the estimator unbiased and lowers its variance.

    Args:
      key: PRNG key.
      num_features: m >= 1.
      head_dim: d >= 1.
      orthogonal: orthogonal random features.

    Returns:
      (num_features, head_dim) float32.
    """
    if num_features < 1:
        raise ValueError(f"num_features must be >= 1, got {num_features}")
    if not orthogonal:
        return jax.random.normal(key, (num_features, head_dim), jnp.float32)
    num_blocks = -(-num_features // head_dim)
    block_key, norm_key = jax.random.split(key)
    gaussian = jax.random.normal(block_key, (num_blocks, head_dim, head_dim), jnp.float32)
    qmat, rmat = jnp.linalg.qr(gaussian)  # (blocks, d, d)
    # sign fix: Q diag(sign(diag R)) is Haar distributed, so each column is uniform on the sphere
    signs = jnp.sign(jnp.diagonal(rmat, axis1=-2, axis2=-1))
    directions = qmat * jnp.where(signs == 0, 1.0, signs)[:, None, :]  # orthonormal columns
    directions = jnp.swapaxes(directions, 1, 2).reshape(num_blocks * head_dim, head_dim)
    norms = jnp.linalg.norm(jax.random.normal(norm_key, (num_features, head_dim)), axis=-1)
    return directions[:num_features] * norms[:, None]


def lsh_rotations(key: jax.Array, head_dim: int, num_buckets: int) -> jax.Array:
    """Gaussian random rotations R (head_dim, num_buckets / 2) for the angular hash.

    Raises:
      ValueError: ``num_buckets`` not an even int >= 2.
    """
    _check_buckets(num_buckets)
    return jax.random.normal(key, (head_dim, num_buckets // 2), jnp.float32)


# ----------------------------------------------------------------------------- checks


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _check_buckets(num_buckets) -> None:
    if not _is_int(num_buckets) or num_buckets < 2 or num_buckets % 2:
        raise ValueError(f"lsh_buckets must be an even int >= 2 or None, got {num_buckets!r}")


def _check_args(q, k, v, projection, window, lsh_buckets, rotations, lsh_chunk_size) -> None:
    """Raise ``ValueError`` naming the offending argument."""
    check_qkv(q, k, v)
    if projection is not None and (jnp.ndim(projection) != 2 or projection.shape[1] != q.shape[3]):
        raise ValueError(
            f"projection must have shape (num_features, {q.shape[3]}), got {jnp.shape(projection)}"
        )
    if window is not None and (not _is_int(window) or window < 1):
        raise ValueError(f"window must be a positive int or None, got {window!r}")
    if lsh_buckets is not None:
        _check_buckets(lsh_buckets)
        if rotations is not None and jnp.shape(rotations) != (q.shape[3], lsh_buckets // 2):
            raise ValueError(
                f"rotations must have shape ({q.shape[3]}, {lsh_buckets // 2}), "
                f"got {jnp.shape(rotations)}"
            )
    if lsh_chunk_size is not None and (not _is_int(lsh_chunk_size) or lsh_chunk_size < 1):
        raise ValueError(f"lsh_chunk_size must be a positive int or None, got {lsh_chunk_size!r}")


# ----------------------------------------------------------------------------- blocking helpers


def _blocks(x: jax.Array, size: int, fill=0) -> jax.Array:
    """(B, H, L, ...) -> (B, H, n, size, ...), padded at the end of L with ``fill``."""
    length = x.shape[2]
    num = -(-length // size)
    pad = [(0, 0)] * x.ndim
    pad[2] = (0, num * size - length)
    x = jnp.pad(x, pad, constant_values=fill)
    return x.reshape(x.shape[:2] + (num, size) + x.shape[3:])


def _unblock(x: jax.Array, length: int) -> jax.Array:
    """(B, H, n, size, ...) -> (B, H, length, ...), dropping the padding."""
    return x.reshape(x.shape[:2] + (-1,) + x.shape[4:])[:, :, :length]


def _neighbours(x: jax.Array, offsets, fill=0) -> jax.Array:
    """Concatenate blocks ``n + o`` for o in offsets: (B, H, n, s, ...) -> (B, H, n, len*s, ...).

    Blocks outside ``[0, n)`` are filled with ``fill``.
    """
    num = x.shape[2]
    pad = [(0, 0)] * x.ndim
    pad[2] = (1, 1)
    padded = jnp.pad(x, pad, constant_values=fill)
    return jnp.concatenate([padded[:, :, 1 + o : 1 + o + num] for o in offsets], axis=3)


def _gather_keys(x: jax.Array, index: jax.Array) -> jax.Array:
    """x (B, H, L, ...) at index (B, H, L, K) along L -> (B, H, L, K, ...)."""
    batch, heads, length, count = index.shape
    flat = index.reshape(batch, heads, length * count, *([1] * (x.ndim - 3)))
    out = jnp.take_along_axis(x, flat, axis=2)
    return out.reshape(batch, heads, length, count, *x.shape[3:])


# ----------------------------------------------------------------------------- sparse parts


class _SparsePart(NamedTuple):
    """One piece of the support: n query blocks of s queries, each against K key slots.

    Queries stay in sequence order: block ``b`` holds positions ``b s .. b s + s - 1``.

    Attributes:
      logits: (B, H, n, s, K) ``q_i . k_j`` (of the scaled inputs).
      mask: (B or 1, H or 1, n, s, K) bool, the support entries of this piece.
      size: s.
      lk: (B, H, n, K, m) log-features of the keys.
      v: (B, H, n, K, dv) values.
    """

    logits: jax.Array
    mask: jax.Array
    size: int
    lk: jax.Array
    v: jax.Array


def _window_part(qs, ks, lk, v, window: int, causal: bool) -> _SparsePart:
    """Band ``0 <= i - j < w`` (causal) or ``|i - j| < w``: blocks of w queries against the
    previous, own (and next) key blocks."""
    length = qs.shape[2]
    offsets = (-1, 0) if causal else (-1, 0, 1)
    num = -(-length // window)
    pos = np.arange(num * window).reshape(num, window)
    far = -(10 * length + 10)  # position of the blocks outside the sequence: never in the band
    padded = np.pad(pos, ((1, 1), (0, 0)), constant_values=far)
    key_pos = np.concatenate([padded[1 + o : 1 + o + num] for o in offsets], axis=1)  # (n, K)
    diff = pos[:, :, None] - key_pos[:, None, :]
    band = (diff >= 0) & (diff < window) if causal else np.abs(diff) < window
    band = band & (key_pos < length)[:, None, :]
    kb = _neighbours(_blocks(ks, window), offsets)
    logits = jnp.einsum("bhnid,bhnjd->bhnij", _blocks(qs, window), kb)
    return _SparsePart(
        logits,
        jnp.asarray(band)[None, None],
        window,
        _neighbours(_blocks(lk, window), offsets),
        _neighbours(_blocks(v, window), offsets),
    )


def _lsh_part(qs, ks, lk, v, rotations, count: int, window, causal: bool) -> _SparsePart:
    """Per query, the ``count`` nearest same-bucket keys before it (after it) outside the window.

    Keys are sorted by ``code = bucket * L + position``; the chunk ending at the last key with
    ``code <= h(q_i) L + i - r`` (and, bidirectional, the chunk starting at the first key with
    ``code >= h(q_i) L + i + max(r, 1)``) is gathered, keeping the keys of bucket ``h(q_i)``.
    Queries form blocks of size 1.
    """
    batch, heads, length, _ = qs.shape
    positions = jnp.arange(length)[None, None, :]
    hq = lsh_hash(jax.lax.stop_gradient(qs), rotations)  # (B, H, L)
    hk = lsh_hash(jax.lax.stop_gradient(ks), rotations)
    sorted_code = jnp.sort(hk * length + positions, axis=-1)
    gap = 0 if window is None else window

    def search(targets: jax.Array, side: str) -> jax.Array:
        find = jax.vmap(jax.vmap(lambda a, t: jnp.searchsorted(a, t, side=side)))
        return find(sorted_code, targets)  # (B, H, L)

    steps = jnp.arange(count)[None, None, None, :]
    slots = [search(hq * length + positions - gap, "right")[..., None] - 1 - steps]
    if not causal:
        slots.append(search(hq * length + positions + max(gap, 1), "left")[..., None] + steps)
    slots = jnp.concatenate(slots, axis=-1)  # (B, H, L, K) indices into the sorted keys
    in_range = (slots >= 0) & (slots < length)
    code = _gather_keys(sorted_code[..., None], jnp.clip(slots, 0, length - 1))[..., 0]
    mask = in_range & (code // length == hq[..., None])
    # one gather of [k, log-features, v] at the key positions, (B, H, L, K, d + m + dv)
    sizes = np.cumsum([ks.shape[-1], lk.shape[-1]])
    keys = _gather_keys(jnp.concatenate([ks, lk, v], axis=-1), code % length)
    k_keys, lk_keys, v_keys = jnp.split(keys, sizes, axis=-1)
    logits = jnp.einsum("bhid,bhijd->bhij", qs, k_keys)
    return _SparsePart(logits[:, :, :, None, :], mask[:, :, :, None, :], 1, lk_keys, v_keys)


# ----------------------------------------------------------------------------- low-rank part


def _low_rank(phi_q, phi_k, v, causal: bool):
    """Sums over all (causal: earlier) keys of ``phi(q_i) . phi(k_j)`` times ``[v_j, 1]``.

    Args:
      phi_q, phi_k: (B, H, L, m) stabilised features (the 1/m is applied here); v: (B, H, L, dv).

    Returns:
      numerator (B, H, L, dv), denominator (B, H, L).
    """
    length, num_features = phi_q.shape[2], phi_q.shape[3]
    if not causal:
        kv = jnp.einsum("bhjm,bhjd->bhmd", phi_k, v)
        num = jnp.einsum("bhim,bhmd->bhid", phi_q, kv)
        den = jnp.einsum("bhim,bhm->bhi", phi_q, phi_k.sum(2))
        return num / num_features, den / num_features
    chunk = default_chunk_size(length)
    pq, pk, vb = _blocks(phi_q, chunk), _blocks(phi_k, chunk), _blocks(v, chunk)
    tril = jnp.tril(jnp.ones((chunk, chunk), jnp.float32))[None, None, None]
    intra = jnp.einsum("bhnim,bhnjm->bhnij", pq, pk) * tril
    states = jnp.einsum("bhnjm,bhnjd->bhnmd", pk, vb)
    prefix = jnp.cumsum(states, axis=2) - states  # exclusive: chunks before n
    k_sums = pk.sum(3)
    k_prefix = jnp.cumsum(k_sums, axis=2) - k_sums
    num = jnp.einsum("bhnij,bhnjd->bhnid", intra, vb) + jnp.einsum("bhnim,bhnmd->bhnid", pq, prefix)
    den = intra.sum(-1) + jnp.einsum("bhnim,bhnm->bhni", pq, k_prefix)
    return _unblock(num, length) / num_features, _unblock(den, length) / num_features


# ----------------------------------------------------------------------------- entry point


def scatterbrain_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    key: jax.Array | None = None,
    projection: jax.Array | None = None,
    num_features: int = 64,
    orthogonal: bool = True,
    window: int | None = None,
    lsh_buckets: int | None = None,
    rotations: jax.Array | None = None,
    lsh_chunk_size: int | None = None,
    causal: bool = True,
) -> jax.Array:
    """Scatterbrain attention: Performer low rank plus exact sparse correction (window and/or LSH).

    Args:
      q, k: (batch, length, heads, head_dim); v: (batch, length, heads, head_dim_v).
      key: PRNG key used to draw what is not given: the projection
        (``gaussian_projection(fold_in(key, 0), num_features, head_dim, orthogonal=orthogonal)``)
        and the LSH rotations (``lsh_rotations(fold_in(key, 1), head_dim, lsh_buckets)``).
      projection: (m, head_dim) precomputed random-feature projection (then ``num_features`` is
        ignored).
      num_features: m, the number of random features when drawing the projection.
      orthogonal: orthogonal random features when drawing the projection.
      window: local window ``w`` (see the reference for the band), or None.
      lsh_buckets: even number of LSH buckets, or None for no LSH part.
      rotations: (head_dim, lsh_buckets / 2) precomputed LSH rotations.
      lsh_chunk_size: C, the same-bucket keys each query attends to per side (see the
        reference); None means ``ceil(sqrt(length))``.
      causal: autoregressive masking.

    With neither ``window`` nor ``lsh_buckets`` the support is empty and this is Performer
    attention.

    Returns:
      (batch, length, heads, head_dim_v) in q's dtype.

    Raises:
      ValueError: mismatched shapes, ``window`` / ``lsh_chunk_size`` not positive ints,
        ``lsh_buckets`` not an even int >= 2, ``num_features`` < 1, bad ``projection`` /
        ``rotations`` shapes, or a missing ``key`` when something must be drawn.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> x = jnp.ones((1, 10, 2, 4))
      >>> scatterbrain_attention(x, x, x, key=jax.random.key(0), num_features=8, window=3).shape
      (1, 10, 2, 4)
    """
    _check_args(q, k, v, projection, window, lsh_buckets, rotations, lsh_chunk_size)
    head_dim = q.shape[3]
    if projection is None or (lsh_buckets is not None and rotations is None):
        if key is None:
            raise ValueError("key is required to draw the projection / LSH rotations not given")
        if projection is None:
            if not _is_int(num_features) or num_features < 1:
                raise ValueError(f"num_features must be a positive int, got {num_features!r}")
            projection = gaussian_projection(
                jax.random.fold_in(key, 0), num_features, head_dim, orthogonal=orthogonal
            )
        if lsh_buckets is not None and rotations is None:
            rotations = lsh_rotations(jax.random.fold_in(key, 1), head_dim, lsh_buckets)
    projection = jax.lax.stop_gradient(jnp.asarray(projection, jnp.float32))

    length = q.shape[1]
    scale = head_dim**-0.25
    qs, ks, vf = (jnp.swapaxes(x.astype(jnp.float32), 1, 2) for x in (q, k, v))  # (B, H, L, .)
    qs, ks = qs * scale, ks * scale
    lq, lk = log_features(qs, projection), log_features(ks, projection)  # (B, H, L, m)
    c = jax.lax.stop_gradient(jnp.max(lk, axis=(2, 3), keepdims=True))  # (B, H, 1, 1)

    parts = []
    if window is not None:
        parts.append(_window_part(qs, ks, lk, vf, window, causal))
    if lsh_buckets is not None:
        count = default_chunk_size(length) if lsh_chunk_size is None else lsh_chunk_size
        parts.append(_lsh_part(qs, ks, lk, vf, rotations, count, window, causal))

    a = jnp.max(lq, axis=-1)  # (B, H, L)
    for part in parts:
        row_max = jnp.max(jnp.where(part.mask, part.logits, _MASKED), axis=-1)  # (B, H, n, s)
        a = jnp.maximum(a, _unblock(row_max, length) - c[..., 0])
    a = jax.lax.stop_gradient(a)

    phi_q = jnp.exp(lq - a[..., None])  # (B, H, L, m), entries <= 1
    phi_k = jnp.exp(lk - c)  # entries <= 1
    num, den = _low_rank(phi_q, phi_k, vf, causal)
    num_features = projection.shape[0]
    for part in parts:
        shift = _blocks(a, part.size)[..., None] + c[..., None]  # (B, H, n, s, 1)
        exact = jnp.exp(jnp.where(part.mask, part.logits - shift, _MASKED))
        low = jnp.einsum(
            "bhnim,bhnjm->bhnij", _blocks(phi_q, part.size), jnp.exp(part.lk - c[..., None])
        )
        corr = jnp.where(part.mask, exact - low / num_features, 0.0)  # (B, H, n, s, K)
        num = num + _unblock(jnp.einsum("bhnij,bhnjd->bhnid", corr, part.v), length)
        den = den + _unblock(corr.sum(-1), length)
    out = num / den[..., None]
    return jnp.swapaxes(out, 1, 2).astype(q.dtype)
