"""Adam on a rotating set of whole blocks, a state-free step on the others (BAdam / FRUGAL).

The building block of :func:`memjax.optim.frugal`'s ``subspace="block"`` mode, usable on its
own (:func:`scale_by_block_adam`). References: Luo et al., "BAdam", arXiv 2404.02827 (2024);
Zmushko et al., "FRUGAL", arXiv 2411.07837 (2024).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from memjax.optim import _checks

ORDERS = ("random", "ascending", "descending", "mirror")
STATE_FREE = ("sign", "sgd", "none")


MAX_BLOCK_ROWS = 1024
"""Upper bound on the rows ``S`` of FRUGAL's block moment buffers (and so on how many devices
:func:`memjax.optim.state_shardings` can split them over)."""
MIN_BAND_WIDTH = 128
"""Every matrix's band of the block moment buffers is at least this wide when its size allows (a
TPU lane tile; narrower minor dimensions would be padded in memory)."""


class BlockState(NamedTuple):
    """State of FRUGAL's blockwise (BAdam-like) mode.

    The moments of the active matrices share two buffers of ``S`` rows: ``S`` is the largest power
    of two that divides every matrix size, is at most :data:`MAX_BLOCK_ROWS` (1024) and leaves the
    smallest matrix at least :data:`MIN_BAND_WIDTH` (128) columns (1 if none does). A
    matrix of ``size`` entries, viewed as ``g.reshape(S, size // S)``, occupies a band of
    ``size // S`` columns; the active matrices' bands sit side by side in tree order. Row ``s`` thus
    holds the ``s``-th contiguous ``1/S`` of every active matrix (row-major), so splitting the rows
    over ``D`` devices (``D`` dividing ``S``; :func:`memjax.optim.state_shardings` does it) gives
    each device the moments of its own shard of every matrix sharded on its leading axis, and the
    update moves no moments between devices (a matrix sharded on another axis, e.g. stacked layers on
    their second, has its gradient and update resharded, never the buffers gathered).

    Memory: ``2 x capacity`` float32 entries, ``capacity`` the largest total size of any active
    set (no padding, nothing for inactive matrices), ``2 x capacity / D`` per device when sharded.

    Attributes:
      step: int32 scalar, steps taken.
      count: int32 scalar, Adam steps since the active blocks last changed.
      mu: float32 ``(S, capacity // S)``, first moments of the active matrices.
      nu: float32 ``(S, capacity // S)``, second moments, likewise.
    """

    step: jax.Array
    count: jax.Array
    mu: jax.Array
    nu: jax.Array


def _active_sets(num: int, active: int, order: str) -> np.ndarray:
    """Boolean table ``(period, num)``: the active matrices at switch ``c`` (row ``c mod period``).

    ``ascending``: matrices ``c a, ..., c a + a - 1`` (mod ``num``); ``descending`` starts from the
    last matrix and walks down; ``mirror`` pairs matrix ``i`` with ``num - 1 - i`` and walks the
    first half upwards (the authors' BAdam orders).
    """
    if order == "mirror":
        half = num // 2
        table = np.zeros((half, num), bool)
        for c in range(half):
            for j in range(active // 2):
                i = (c * (active // 2) + j) % half
                table[c, i] = table[c, num - 1 - i] = True
        return table
    table = np.zeros((num, num), bool)
    for c in range(num):
        for j in range(active):
            i = (c * active + j) % num if order == "ascending" else (num - 1 - c * active - j) % num
            table[c, i] = True
    return table


def scale_by_block_adam(density: float = 0.25, order: str = "descending",
                        update_gap: int = 200, *, b1: float = 0.9, b2: float = 0.999,
                        eps: float = 1e-8, state_free: str = "sign", state_free_lr: float = 1.0,
                        seed: int = 0) -> optax.GradientTransformation:
    r"""Adam on a rotating set of whole blocks, a state-free step on the others (BAdam-like).

    Every leaf of the tree it sees is a block (use it under ``optax.partition`` for a subset,
    as :func:`memjax.optim.frugal` does). Of ``K`` blocks, ``a = max(1, round(density K))`` are
    active; every ``T = update_gap`` steps a new set becomes active (``order``) and its Adam
    state restarts from zero with the step count ``k``:

    .. math::
      U = \begin{cases} \hat M_k / (\sqrt{\hat V_k} + \epsilon) & \text{active block} \\
      \rho\, f(G), \; f = \mathrm{sign} \text{ or } \mathrm{id} \text{ or } 0 & \text{otherwise}
      \end{cases}

    (``optax.scale_by_adam``'s bias-corrected form; ``rho = state_free_lr``). Only the active
    blocks' moments are stored, side by side in two float32 buffers (:class:`BlockState`).

    Args:
      density: fraction of the blocks that are active, in ``(0, 1]``.
      order: ``"random"`` (a fresh random set from ``seed`` at every switch), ``"ascending"``,
        ``"descending"`` or ``"mirror"`` (the authors' BAdam orders).
      update_gap: steps between switches ``T`` (>= 1).
      b1, b2, eps: Adam hyperparameters.
      state_free: ``"sign"``, ``"sgd"`` or ``"none"``.
      state_free_lr: ``rho``, the state-free step as a multiple of the learning rate.
      seed: seed of the random order.

    Returns:
      An ``optax.GradientTransformation`` whose state is a :class:`BlockState`.

    Raises:
      ValueError: an argument out of range, or ``order="mirror"`` with an odd active count.

    Example:
      >>> import jax.numpy as jnp, memjax
      >>> tx = memjax.optim.scale_by_block_adam(0.5, update_gap=10)
      >>> params = {"a": jnp.ones((256, 2)), "b": jnp.ones((256, 2))}
      >>> state = tx.init(params)
      >>> state.mu.shape  # one active block of 512 entries, as 4 rows of 128
      (4, 128)

    References:
      Luo et al., "BAdam: A Memory Efficient Full Parameter Optimization Method for Large
      Language Models", arXiv 2404.02827 (2024); Zmushko et al., "FRUGAL", arXiv 2411.07837
      (2024), ``BlockAdamW``.
    """
    _checks.check_fraction("density", density)
    _checks.check_choice("order", order, ORDERS)
    _checks.check_choice("state_free", state_free, STATE_FREE)
    _checks.check_nonnegative("state_free_lr", state_free_lr)
    _checks.check_int("update_gap", update_gap, 1)

    def plan(tree):
        """``(column widths, S, capacity // S, table, active count)``; every leaf is a block."""
        sizes = np.array([x.size for x in jax.tree.leaves(tree)], np.int64)
        num = len(sizes)
        num_active = max(1, round(density * num))
        if order == "mirror" and num_active % 2:
            raise ValueError(f"order='mirror' needs an even number of active blocks; "
                             f"density gives {num_active} of {num}.")
        rows = min(math.gcd(MAX_BLOCK_ROWS, *sizes.tolist()),
                   1 << (max(1, int(sizes.min()) // MIN_BAND_WIDTH).bit_length() - 1))
        cols = sizes // rows
        if order == "random":
            width = int(np.sort(cols)[::-1][:num_active].sum())
            table = None
        else:
            table = _active_sets(num, num_active, order)
            width = int((table * cols[None, :]).sum(axis=1).max())
        return cols, rows, width, table, num_active

    def init_fn(params):
        _, rows, width, _, _ = plan(params)
        zero = jnp.zeros([], jnp.int32)
        return BlockState(zero, zero, jnp.zeros((rows, width), jnp.float32),
                          jnp.zeros((rows, width), jnp.float32))

    def update_fn(updates, state, params=None):
        del params
        leaves, treedef = jax.tree.flatten(updates)
        cols, rows, width, table, num_active = plan(updates)
        num = len(leaves)
        switch_index = state.step // update_gap
        if table is None:
            key = jax.random.fold_in(jax.random.key(seed), switch_index)
            chosen = jax.random.permutation(key, num)[:num_active]
            active = jnp.zeros((num,), bool).at[chosen].set(True)
        else:
            active = jnp.asarray(table)[switch_index % table.shape[0]]
        offsets = jnp.cumsum(active * cols) - active * cols  # first column of each band
        switch = (state.step % update_gap) == 0
        mu = jnp.where(switch, 0.0, state.mu)
        nu = jnp.where(switch, 0.0, state.nu)
        count = jnp.where(switch, 0, state.count) + 1
        t = count.astype(jnp.float32)
        bc1, bc2 = 1.0 - b1**t, 1.0 - b2**t

        # Read every matrix's band first, then write the new bands in one chain of in-place
        # updates: the barrier orders all reads before the first write, so each buffer in the
        # chain has a single user and XLA updates it in place (interleaving reads and writes, or
        # a lax.cond per matrix, made XLA copy both whole buffers for every matrix).
        bands = [int(c) for c in cols]
        offs = [jnp.minimum(offsets[k], width - bands[k]) for k in range(num)]
        olds = [(jax.lax.dynamic_slice(mu, (0, offs[k]), (rows, bands[k])),
                 jax.lax.dynamic_slice(nu, (0, offs[k]), (rows, bands[k]))) for k in range(num)]
        olds, mu, nu = jax.lax.optimization_barrier((olds, mu, nu))
        out = []
        for k, g in enumerate(leaves):
            on = active[k]
            m_old, v_old = olds[k]
            g32 = g.astype(jnp.float32).reshape(rows, bands[k])
            m = b1 * m_old + (1.0 - b1) * g32
            v = b2 * v_old + (1.0 - b2) * g32 * g32
            u_adam = ((m / bc1) / (jnp.sqrt(v / bc2) + eps)).reshape(g.shape).astype(g.dtype)
            if state_free == "none":
                u_free = jnp.zeros_like(g)
            else:
                u_free = jnp.sign(g) if state_free == "sign" else g
                u_free = (state_free_lr * u_free.astype(jnp.float32)).astype(g.dtype)
            out.append(jnp.where(on, u_adam, u_free))
            # An inactive matrix's band may overlap active ones: it writes nothing (a zero-width
            # update is impossible, so it writes back what the chain holds there now).
            mu = jax.lax.dynamic_update_slice(
                mu, jnp.where(on, m, jax.lax.dynamic_slice(mu, (0, offs[k]), (rows, bands[k]))),
                (0, offs[k]))
            nu = jax.lax.dynamic_update_slice(
                nu, jnp.where(on, v, jax.lax.dynamic_slice(nu, (0, offs[k]), (rows, bands[k]))),
                (0, offs[k]))
        new_state = BlockState(optax.safe_increment(state.step), count, mu, nu)
        return treedef.unflatten(out), new_state

    return optax.GradientTransformation(init_fn, update_fn)
