"""Combiner attention in O(L sqrt L): blocked direct attention plus pooled span summaries.

Same function as :mod:`memjax.kernels.combiner.reference` (read its docstring for the math and the
regions of the ``"fixed"`` and ``"axial"`` modes), computed without any L x L array. With block
size (row length) ``b ~ sqrt(L)`` and ``n = ceil(L / b)`` blocks (rows):

* direct part, both modes: attention inside each block, logits (B, n, H, b, b): O(L b).
* ``"fixed"`` spans: one mean key, mean query and summary value per block, (B, n, H, D); every
  query scores all n block keys, logits (B, n, H, b, n): O(L n).
* ``"axial"`` spans: for query row ``p`` and column ``c`` the span is column ``c`` over the rows
  ``s < p`` (``s != p`` bidirectional). Its mean key / query (B, n, b, H, D) come from a (n x n)
  row mask contracted over rows, its summary value from an attention over rows per column,
  logits (B, n, n, b, H): O(L n). Every query scores the b column summaries of its row: O(L b).

The direct and span logits of a query share ONE softmax. Lengths that are not a multiple of ``b``
are padded at the end; padded keys are masked everywhere and excluded from the means, padded
queries are dropped. Everything is computed in float32 and returned in q's dtype; gradients are
those of XLA autodiff through this blocked form, so they too never build an L x L array.

Reference:
  Ren, Dai, Dai, Yang, Leskovec, Schuurmans, Dai. "Combiner: Full Attention Transformer with Sparse
  Computation Cost." NeurIPS 2021, arXiv:2107.05768.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from memjax.kernels._common import check_qkv
from memjax.kernels.combiner.reference import default_block_size

__all__ = ["MODES", "combiner_attention"]

MODES = ("axial", "fixed")
_MASKED = -1e30  # finite "minus infinity": masked logits give exp(.) = 0 without NaN gradients


def _check_args(q, k, v, block_size, mode) -> None:
    """Raise ``ValueError`` naming the offending argument."""
    check_qkv(q, k, v)
    if block_size is not None and (
        isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)) or block_size < 1
    ):
        raise ValueError(f"block_size must be a positive int or None, got {block_size!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def _to_blocks(x: jax.Array, block: int) -> jax.Array:
    """(B, L, H, D) -> (B, n, block, H, D) float32, zero-padded at the end of the sequence."""
    batch, length, heads, dim = x.shape
    num = -(-length // block)
    x = jnp.pad(x.astype(jnp.float32), ((0, 0), (0, num * block - length), (0, 0), (0, 0)))
    return x.reshape(batch, num, block, heads, dim)


def _fixed_spans(qb, kb, vb, valid, causal: bool, scale: float):
    """Combiner-Fixed: one mean-pooled summary per block, visible to later (or other) blocks.

    Args:
      qb, kb: (B, n, b, H, D); vb: (B, n, b, H, Dv); valid: (n, b) numpy bool.

    Returns:
      span logits (B, n, H, b, n), span mask (1, n, 1, 1, n), span values (B, n, H, Dv) and the
      einsum that applies span probabilities (B, n, H, b, n) to them.
    """
    weight = jnp.asarray(valid, jnp.float32)  # (n, b)
    count = weight.sum(-1)[None, :, None, None]  # (1, n, 1, 1), >= 1 for every block
    kbar = jnp.einsum("nk,bnkhd->bnhd", weight, kb) / count
    qbar = jnp.einsum("nk,bnkhd->bnhd", weight, qb) / count
    inner = jnp.einsum("bnhd,bnkhd->bnhk", qbar, kb) * scale
    inner = jax.nn.softmax(jnp.where(valid[None, :, None, :], inner, _MASKED), axis=-1)
    vbar = jnp.einsum("bnhk,bnkhd->bnhd", inner, vb)  # (B, n, H, Dv)

    logits = jnp.einsum("bnihd,bmhd->bnhim", qb, kbar) * scale  # (B, n, H, b, n)
    blocks = np.arange(valid.shape[0])
    visible = blocks[None, :] < blocks[:, None] if causal else blocks[None, :] != blocks[:, None]
    return logits, visible[None, :, None, None, :], vbar, "bnhim,bmhd->bnihd"


def _axial_spans(qb, kb, vb, valid, causal: bool, scale: float):
    """Combiner-Axial: one mean-pooled summary per column, over the earlier (or other) rows.

    Args:
      qb, kb: (B, n, b, H, D) rows; vb: (B, n, b, H, Dv); valid: (n, b) numpy bool.

    Returns:
      span logits (B, n, H, b, b), span mask (1, n, 1, 1, b), span values (B, n, b, H, Dv) (one per
      query row and column) and the einsum that applies span probabilities to them.
    """
    rows = np.arange(valid.shape[0])
    row_ok = rows[None, :] < rows[:, None] if causal else rows[None, :] != rows[:, None]
    member = row_ok[:, :, None] & valid[None, :, :]  # (p query row, s source row, c column)
    count = member.sum(1)  # (n, b)
    safe = jnp.asarray(np.maximum(count, 1), jnp.float32)[None, :, :, None, None]
    weight = jnp.asarray(member, jnp.float32)
    kbar = jnp.einsum("psc,bschd->bpchd", weight, kb) / safe  # (B, n, b, H, D)
    qbar = jnp.einsum("psc,bschd->bpchd", weight, qb) / safe
    inner = jnp.einsum("bpchd,bschd->bpsch", qbar, kb) * scale  # (B, n, n, b, H)
    inner = jax.nn.softmax(jnp.where(member[None, :, :, :, None], inner, _MASKED), axis=2)
    vbar = jnp.einsum("bpsch,bschd->bpchd", inner, vb)  # junk where count == 0, masked below

    logits = jnp.einsum("bpihd,bpchd->bphic", qb, kbar) * scale  # (B, n, H, b, b)
    return logits, (count > 0)[None, :, None, None, :], vbar, "bphic,bpchd->bpihd"


def combiner_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    block_size: int | None = None,
    mode: str = "axial",
    causal: bool = True,
) -> jax.Array:
    """Combiner attention (Fixed or Axial factorisation), O(L sqrt L) time and memory.

    Args:
      q, k: (batch, length, heads, head_dim).
      v: (batch, length, heads, head_dim_v).
      block_size: block size ("fixed") or row length ("axial") b >= 1; ``None`` means
        ``ceil(sqrt(length))``; values above the length are clipped to it (a single region, i.e.
        exact softmax attention).
      mode: ``"axial"`` or ``"fixed"``, see :mod:`memjax.kernels.combiner.reference`.
      causal: autoregressive masking (output i depends on inputs at positions <= i only).

    Returns:
      (batch, length, heads, head_dim_v) in q's dtype.

    Raises:
      ValueError: mismatched shapes, ``block_size`` not a positive int, unknown ``mode``.

    Example:
      >>> import jax.numpy as jnp
      >>> x = jnp.ones((1, 10, 2, 4))
      >>> combiner_attention(x, x, x, block_size=3, mode="fixed").shape
      (1, 10, 2, 4)
    """
    _check_args(q, k, v, block_size, mode)
    length = q.shape[1]
    block = default_block_size(length) if block_size is None else min(int(block_size), length)
    scale = 1.0 / math.sqrt(q.shape[-1])
    qb, kb, vb = (_to_blocks(x, block) for x in (q, k, v))
    num = qb.shape[1]
    pos = np.arange(num * block).reshape(num, block)
    valid = pos < length

    direct_logits = jnp.einsum("bnihd,bnjhd->bnhij", qb, kb) * scale  # (B, n, H, b, b)
    direct_mask = valid[:, None, :]
    if causal:
        direct_mask = direct_mask & (pos[:, None, :] <= pos[:, :, None])
    spans = _fixed_spans if mode == "fixed" else _axial_spans
    span_logits, span_mask, vbar, apply_spans = spans(qb, kb, vb, valid, causal, scale)

    logits = jnp.concatenate([direct_logits, span_logits], axis=-1)
    mask = np.concatenate(
        [
            np.broadcast_to(direct_mask[None, :, None], (1, num, 1, block, block)),
            np.broadcast_to(span_mask, (1, num, 1, block, span_mask.shape[-1])),
        ],
        axis=-1,
    )
    probs = jax.nn.softmax(jnp.where(mask, logits, _MASKED), axis=-1)
    out = jnp.einsum("bnhij,bnjhd->bnihd", probs[..., :block], vb)
    out = out + jnp.einsum(apply_spans, probs[..., block:], vbar)
    out = out.reshape(q.shape[0], num * block, *out.shape[3:])[:, :length]
    return out.astype(q.dtype)
