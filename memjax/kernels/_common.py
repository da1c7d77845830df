"""Helpers shared by the kernels: tile arithmetic and the checks of attention-style ``(q, k, v)``
inputs."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def next_power_of_two(n: int) -> int:
    """The smallest power of two >= ``n`` (1 for ``n <= 1``)."""
    return 1 << max(0, n - 1).bit_length()


def round_up(n: int, multiple: int) -> int:
    """The smallest multiple of ``multiple`` >= ``n``."""
    return -(-n // multiple) * multiple


def check_qkv(q, k, v) -> None:
    """Raise ``ValueError`` naming the argument unless q, k, v are (batch, length, heads, head_dim)
    arrays that agree on (batch, length, heads), q and k on head_dim, with length >= 1."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if jnp.ndim(x) != 4:
            raise ValueError(
                f"{name} must have shape (batch, length, heads, head_dim), got {jnp.shape(x)}"
            )
    if not (q.shape[:3] == k.shape[:3] == v.shape[:3]):
        raise ValueError(
            f"q, k, v must agree on (batch, length, heads), got {q.shape}, {k.shape}, {v.shape}"
        )
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"q and k must have the same head_dim, got {q.shape[3]} and {k.shape[3]}")
    if q.shape[1] < 1:
        raise ValueError("q, k, v: length must be at least 1")
