"""Readable dense reference of Combiner attention: builds the full L x L probability matrix p(j | i).

Combiner (Ren et al. 2021) writes attention as a conditional expectation and factorises the
attention distribution of query ``i`` through a partition of what it may see into a *direct* region
``D_i`` and *spans* ``Omega_i^r``::

    p(j | i) = p(j | i)                               for j in D_i       (direct expectation)
    p(j | i) = p(Omega_i^r | i) q(j | Omega_i^r)      for j in Omega_i^r (local expectation)

where the direct probabilities and the span probabilities come from ONE softmax::

    [p(. | i) on D_i, p(Omega_i^. | i)]
        = softmax([q_i . k_j / sqrt(d)        for j in D_i,
                   q_i . kbar_{i,r} / sqrt(d)  for r with Omega_i^r non-empty])

and, inside a span, ``q(j | Omega) = softmax_{j in Omega}(qbar_Omega . k_j / sqrt(d))``. memjax
summarises a span by mean pooling: ``kbar_Omega = mean_{j in Omega} k_j`` (the span's key) and
``qbar_Omega = mean_{j in Omega} q_j`` (the span's query). The output is ``out_i = sum_j p(j|i) v_j``.

Regions, for block size ``b`` (row length in the axial mode) and ``block(i) = i // b``:

* ``"fixed"`` (Combiner-Fixed): ``D_i`` = the positions of i's block (``j <= i`` when causal);
  one span per other block ``r``: every earlier block (causal) or every other block (bidirectional).
  The spans do not depend on ``i``.
* ``"axial"`` (Combiner-Axial): view the sequence as rows of length ``b``, ``row(i) = i // b``,
  ``col(i) = i % b``. ``D_i`` = i's row (``j <= i`` when causal); one span per column ``r``:
  ``Omega_i^r = {j : col(j) = r, row(j) < row(i)}`` (causal) or ``row(j) != row(i)``
  (bidirectional), i.e. the column above (and below) the query's row.

When one region covers the whole sequence (``b >= L``) there are no spans and p(j | i) is ordinary
(causal or bidirectional) softmax attention. Every visible key lies in exactly one region of the
query and gets positive mass: full attention in one layer.

Choices where the paper leaves room: span summaries are parameter-free mean pools (of keys for the
span logit, of queries for the span's own attention), and the span logit carries no ``log|Omega|``
term. The axial spans are the columns above the query's row, so both modes cost O(L sqrt L) with
``b ~ sqrt(L)``.

This file is the definition used by the tests: it builds the dense boolean masks ``direct (L, L)``
and ``member (L, R, L)`` and the full matrix, so it costs O(L^2 R) memory. The O(L sqrt L)
implementation is :mod:`memjax.kernels.combiner.ops`. No argument checking here.

Reference:
  Ren, Dai, Dai, Yang, Leskovec, Schuurmans, Dai. "Combiner: Full Attention Transformer with Sparse
  Computation Cost." NeurIPS 2021, arXiv:2107.05768.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "combiner_attention_reference",
    "combiner_probabilities",
    "combiner_regions",
    "default_block_size",
]

_MASKED = -1e30  # finite "minus infinity": masked logits give exp(.) = 0 without NaN gradients


def default_block_size(length: int) -> int:
    """``ceil(sqrt(length))``: the block size that balances direct and span work (O(L sqrt L))."""
    return math.isqrt(max(length, 1) - 1) + 1


def combiner_regions(length: int, block_size: int, mode: str, causal: bool):
    """Dense region masks of Combiner-Fixed / Combiner-Axial.

    Args:
      length: sequence length L.
      block_size: block size (fixed) or row length (axial) b >= 1.
      mode: ``"fixed"`` or ``"axial"``.
      causal: restrict every region to positions ``j <= i`` (spans to strictly earlier blocks/rows).

    Returns:
      ``(direct, member)``: numpy bool arrays, ``direct (L, L)`` with ``direct[i, j]`` iff j is in
      ``D_i``, and ``member (L, R, L)`` with ``member[i, r, j]`` iff j is in ``Omega_i^r``
      (R = number of blocks for "fixed", b for "axial").
    """
    pos = np.arange(length)
    block = pos // block_size
    same = block[:, None] == block[None, :]
    direct = same & (pos[None, :] <= pos[:, None]) if causal else same
    if mode == "fixed":
        spans = np.arange(block[-1] + 1)  # one span per block r
        span_of_key = block  # key j belongs to span block(j)
        # span r is visible from query i: earlier block (causal) or any other block
        visible = spans[None, :] < block[:, None] if causal else spans[None, :] != block[:, None]
        member = visible[:, :, None] & (span_of_key[None, None, :] == spans[None, :, None])
    elif mode == "axial":
        spans = np.arange(block_size)  # one span per column r
        col = pos % block_size
        row_ok = block[None, :] < block[:, None] if causal else block[None, :] != block[:, None]
        member = (col[None, None, :] == spans[None, :, None]) & row_ok[:, None, :]
    else:
        raise ValueError(f"mode must be 'fixed' or 'axial', got {mode!r}")
    return direct, member


def combiner_probabilities(q: jax.Array, k: jax.Array, direct, member) -> jax.Array:
    """The full attention matrix p(j | i) of Combiner for given region masks.

    Args:
      q, k: (B, L, H, D).
      direct: (L, L) bool, the direct regions.
      member: (L, R, L) bool, the spans.

    Returns:
      (B, H, L, L) float32, rows summing to one.
    """
    q, k = q.astype(jnp.float32), k.astype(jnp.float32)
    scale = 1.0 / math.sqrt(q.shape[-1])
    direct = jnp.asarray(direct)
    member = jnp.asarray(member, jnp.float32)  # (L, R, L)
    count = member.sum(-1)  # (L, R)
    has_span = count > 0
    safe = jnp.maximum(count, 1.0)
    # span keys and queries: mean over the span's positions, (B, H, L, R, D)
    kbar = jnp.einsum("irj,bjhd->bhird", member, k) / safe[None, None, :, :, None]
    qbar = jnp.einsum("irj,bjhd->bhird", member, q) / safe[None, None, :, :, None]

    # one softmax over direct logits (L) and span logits (R)
    direct_logits = jnp.einsum("bihd,bjhd->bhij", q, k) * scale
    span_logits = jnp.einsum("bihd,bhird->bhir", q, kbar) * scale
    logits = jnp.concatenate([direct_logits, span_logits], axis=-1)
    mask = jnp.concatenate([direct, has_span], axis=-1)[None, None]
    probs = jax.nn.softmax(jnp.where(mask, logits, _MASKED), axis=-1)
    p_direct, p_span = probs[..., : q.shape[1]], probs[..., q.shape[1] :]

    # q(j | Omega_i^r): attention of the span's mean query over the span's keys
    inner_logits = jnp.einsum("bhird,bjhd->bhirj", qbar, k) * scale
    inner_mask = (member > 0)[None, None]
    inner = jax.nn.softmax(jnp.where(inner_mask, inner_logits, _MASKED), axis=-1)
    inner = jnp.where(inner_mask, inner, 0.0)  # an empty span's row is junk but has p_span = 0

    return p_direct + jnp.einsum("bhir,bhirj->bhij", p_span, inner)


def combiner_attention_reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    block_size: int | None = None,
    mode: str = "axial",
    causal: bool = True,
) -> jax.Array:
    """Dense Combiner attention ``out = P v`` with P from :func:`combiner_probabilities`.

    Args:
      q, k: (B, L, H, D); v: (B, L, H, Dv).
      block_size: block size / row length b; ``None`` means ``ceil(sqrt(L))``.
      mode: ``"fixed"`` or ``"axial"``.
      causal: autoregressive masking.

    Returns:
      (B, L, H, Dv) in q's dtype.
    """
    length = q.shape[1]
    block = default_block_size(length) if block_size is None else min(block_size, length)
    direct, member = combiner_regions(length, block, mode, causal)
    probs = combiner_probabilities(q, k, direct, member)
    out = jnp.einsum("bhij,bjhd->bihd", probs, v.astype(jnp.float32))
    return out.astype(q.dtype)
