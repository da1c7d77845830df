"""Ready recipes with the authors' parameter names, so torch configurations port 1:1.

Each recipe is ``skip_nonfinite(chain(projected transform, learning rate, weight decay))``: a
complete ``optax.GradientTransformationExtraArgs`` like ``optax.adamw``. All of them share
:func:`memjax.optim.scale_by_low_rank` and differ in the residual policy
(:mod:`memjax.optim.residual`), the subspace and the inner optimizer:

================  ================================  ==================  ======================
recipe            outside the subspace              subspace            inner optimizer
================  ================================  ==================  ======================
:func:`galore`    dropped                           SVD                 Adam
:func:`fira`      scaled, norm-limited residual     SVD                 Adam
:func:`apollo`    raw gradient, channel-scaled      random (seed)       Adam (only for scales)
:func:`frugal`    signSGD / SGD (state-free)        SVD, random, rows,  Adam, reset on refresh
                                                    columns, blocks
:func:`q_galore`  dropped                           SVD in INT4, lazy   8-bit Adam
================  ================================  ==================  ======================

For ``optax.inject_hyperparams`` pass the arguments that fix shapes or schedules as static:
``optax.inject_hyperparams(galore, static_args=("rank", "update_proj_gap", "seed"))`` (likewise
:func:`fira`, :func:`apollo`, :func:`apollo_mini`); :func:`frugal`: ``("density",
"update_proj_gap", "seed")``; :func:`q_galore`: add ``"proj_bits", "proj_group_size",
"queue_size", "gamma_proj", "block_size", "min_8bit_size"``.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from memjax.optim import guards
from memjax.optim import labels as labels_lib
from memjax.optim import projectors as proj_lib
from memjax.optim import quantization as quant_lib
from memjax.optim import quantized_weights as weights_lib
from memjax.optim import residual as residual_lib
from memjax.optim.adam import scale_by_hf_adam
from memjax.optim.low_rank import scale_by_low_rank
from memjax.optim.weight_decay import add_decayed_weights_after_step


def _finish(core: optax.GradientTransformation, learning_rate, weight_decay, weight_decay_mask,
            skip_nonfinite: bool) -> optax.GradientTransformationExtraArgs:
    """``skip_nonfinite(chain(core, lr, weight decay))``, run on the float view of INT8 weights
    (:func:`memjax.optim.quantized_weights.on_float_view`)."""
    parts = [core, optax.scale_by_learning_rate(learning_rate)]
    if not (isinstance(weight_decay, (int, float)) and weight_decay == 0):
        parts.append(add_decayed_weights_after_step(weight_decay, learning_rate, weight_decay_mask))
    tx = optax.chain(*parts)
    return weights_lib.on_float_view(guards.skip_nonfinite(tx) if skip_nonfinite else tx)


def galore(
    learning_rate: optax.ScalarOrSchedule,
    rank: int = 128,
    update_proj_gap: int = 200,
    scale: float = 0.25,
    proj_type: str = "std",
    projector: str = "svd",
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    labels: labels_lib.Labels = None,
    refresh: str = "synchronous",
    *,
    inner: optax.GradientTransformation | None = None,
    weight_decay_mask: Any = None,
    seed: int = 0,
    skip_nonfinite: bool = True,
) -> optax.GradientTransformationExtraArgs:
    r"""GaLore: Adam in a low-rank subspace of each weight matrix's gradient.

    For a matrix leaf with gradient ``G`` (``m x n``) and the ``"std"`` side with ``m >= n``:

    .. math::
      P &= V_{:r}^T \text{ of } \mathrm{svd}(G) \text{, refreshed every } T \text{ steps} \\
      R &= G P^T, \quad O = \mathrm{Adam}(R), \quad
      W \leftarrow W - \eta\, s\, O P, \quad W \leftarrow W - \eta\, \lambda W

    (left projection ``P = U_{:, :r}`` when ``m < n``). Embeddings, heads, norms, biases and small
    leaves get plain Adam at the same learning rate. Adam folds its bias correction into the step
    size and the weight decay hits the updated weights, as in the authors' code.

    Args:
      learning_rate: ``lr`` or an optax schedule.
      rank: projection rank ``r``.
      update_proj_gap: projector refresh period ``T``.
      scale: GaLore ``scale`` (alpha) on the back-projected update.
      proj_type: ``"std"`` (authors' default), ``"reverse_std"``, ``"left"``, ``"right"``,
        ``"min_state"``.
      projector: ``"svd"`` (GaLore), ``"dct"`` (SVD-free) or ``"random"`` (seed-only state).
      b1, b2, eps: Adam hyperparameters (code default eps 1e-6).
      weight_decay: decoupled weight decay ``lambda``.
      labels: which leaves are projected (default :func:`memjax.optim.label_matrices`).
      refresh: ``"synchronous"`` or ``"staggered"``.
      inner: replaces the inner Adam with any gradient-only transform (then ``b1, b2, eps``
        are unused).
      weight_decay_mask: pytree or callable selecting the leaves that decay (default all).
      seed: seed of the random projector.
      skip_nonfinite: skip (zero update, unchanged state) steps with non-finite gradients.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Example:
      >>> import jax, jax.numpy as jnp, optax, memjax
      >>> params = {"w": jnp.ones((64, 32)), "b": jnp.zeros(32)}
      >>> tx = memjax.optim.galore(1e-2, rank=8)
      >>> state = tx.init(params)
      >>> updates, state = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
      >>> updates["w"].shape
      (64, 32)

    References:
      Zhao et al., "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection",
      ICML 2024, arXiv 2403.03507.
    """
    core = scale_by_low_rank(
        rank, update_proj_gap,
        inner=inner if inner is not None else scale_by_hf_adam(b1, b2, eps),
        scale=scale, proj_type=proj_type, projector=projector, labels=labels,
        refresh=refresh, seed=seed)
    return _finish(core, learning_rate, weight_decay, weight_decay_mask, skip_nonfinite)


# ---------------------------------------------------------------------------------------------
# Shared pieces of the Fira / APOLLO / FRUGAL / Q-GaLore recipes.
# ---------------------------------------------------------------------------------------------


def _hf_step_size(b1, b2, inverse: bool = False) -> optax.GradientTransformation:
    """Multiplies by the HF Adam bias correction ``sqrt(1 - b2^t) / (1 - b1^t)`` (or divides)."""

    def factor(count):
        t = (count + 1).astype(jnp.float32)
        c = jnp.sqrt(1.0 - b2**t) / (1.0 - b1**t)
        return 1.0 / c if inverse else c

    return optax.scale_by_schedule(factor)


def _adam_direction_and_step(b1, b2, eps, inner):
    """The inner optimizer and the transform applied after the residual policy.

    Fira and APOLLO compute their scaling factors (and their limiter) from ``M / (sqrt(V) + eps)``
    and apply Adam's bias correction afterwards, as part of the step size. With the default
    inner Adam the recipe does exactly that: the inner step is :func:`scale_by_hf_adam` with its
    folded correction divided out again, and the correction multiplies the full update after the
    residual policy (on every leaf, like the authors' ``step_size``). A user ``inner`` is used as
    it is and nothing is applied afterwards.
    """
    if inner is not None:
        return inner, None
    return (optax.chain(scale_by_hf_adam(b1, b2, eps), _hf_step_size(b1, b2, inverse=True)),
            _hf_step_size(b1, b2))


def _finish_after(core, after, learning_rate, weight_decay, weight_decay_mask, skip_nonfinite):
    if after is not None:
        core = optax.chain(core, after)
    return _finish(core, learning_rate, weight_decay, weight_decay_mask, skip_nonfinite)


def fira(
    learning_rate: optax.ScalarOrSchedule,
    rank: int = 128,
    update_proj_gap: int = 200,
    scale: float = 0.25,
    proj_type: str = "std",
    projector: str = "svd",
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    gamma: float = 1.01,
    labels: labels_lib.Labels = None,
    refresh: str = "synchronous",
    *,
    paper_form: bool = False,
    inner: optax.GradientTransformation | None = None,
    weight_decay_mask: Any = None,
    seed: int = 0,
    skip_nonfinite: bool = True,
) -> optax.GradientTransformationExtraArgs:
    r"""Fira: GaLore plus the norm-scaled, norm-limited residual outside the subspace.

    For a matrix leaf (``"std"`` side, ``m >= n``) with :math:`P` the GaLore SVD projector,
    :math:`R = G P^T`, :math:`O = M / (\sqrt V + \epsilon)` Adam on ``R`` and the channel factor
    :math:`\phi_i = \lVert O_{i,:}\rVert / (\lVert R_{i,:}\rVert + 10^{-8})`:

    .. math::
      S = \mathrm{limit}_\gamma\big((G - \alpha R P) \odot \phi\big), \qquad
      W \leftarrow W - \eta_t\, \frac{\sqrt{1-b_2^t}}{1-b_1^t}\, (\alpha\, O P + S), \qquad
      W \leftarrow W - \eta_t \lambda W

    ``limit`` is the norm-growth limiter (:mod:`memjax.optim.limiter`). Other leaves get the same
    Adam step. Everything else as :func:`galore` (side rules, labels, refresh).

    Args:
      learning_rate: ``lr`` or an optax schedule.
      rank, update_proj_gap, scale, proj_type, projector: as :func:`galore` (``scale`` = the
        authors' ``alpha``; published 1B setting: rank 512, scale 0.0625).
      b1, b2, eps: Adam hyperparameters (code default eps 1e-6).
      weight_decay: decoupled weight decay, applied after the step.
      gamma: norm-growth limiter threshold.
      labels, refresh: as :func:`galore`.
      paper_form: residual ``G - up(R)`` (paper) instead of ``G - scale * up(R)`` (code).
      inner: replaces the inner Adam; its output is used as ``O`` (then no bias correction is
        applied after the residual: pass an optimizer whose output already includes it).
      weight_decay_mask, seed, skip_nonfinite: as :func:`galore`.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Example:
      >>> import jax.numpy as jnp, memjax
      >>> params = {"w": jnp.ones((64, 32))}
      >>> tx = memjax.optim.fira(1e-2, rank=8)
      >>> updates, state = tx.update(params, tx.init(params), params)
      >>> updates["w"].shape
      (64, 32)

    References:
      Chen et al., "Fira: Can We Achieve Full-rank Training of LLMs Under Low-rank Constraint?",
      arXiv 2410.01623 (2024).
    """
    inner, after = _adam_direction_and_step(b1, b2, eps, inner)
    core = scale_by_low_rank(
        rank, update_proj_gap, inner=inner,
        residual=residual_lib.fira(scale, gamma, paper_form=paper_form),
        proj_type=proj_type, projector=projector, labels=labels, refresh=refresh, seed=seed)
    return _finish_after(core, after, learning_rate, weight_decay, weight_decay_mask,
                         skip_nonfinite)


def apollo(
    learning_rate: optax.ScalarOrSchedule,
    rank: int = 256,
    update_proj_gap: int = 200,
    scale: float = 1.0,
    proj_type: str = "std",
    projector: str = "random",
    scale_type: str = "channel",
    scale_front: bool = False,
    limiter: bool = True,
    gamma: float = 1.01,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    labels: labels_lib.Labels = None,
    refresh: str = "synchronous",
    *,
    inner: optax.GradientTransformation | None = None,
    weight_decay_mask: Any = None,
    seed: int = 0,
    skip_nonfinite: bool = True,
) -> optax.GradientTransformationExtraArgs:
    r"""APOLLO: the raw gradient scaled channel-wise by a random-projection Adam.

    For a matrix leaf (``"std"`` side, ``m >= n``) with :math:`P` Gaussian ``N(0, 1/r)``
    (``r x n``, regenerated from a new seed every ``T`` steps; only the seed is stored),
    :math:`R = G P^T`, :math:`O = M / (\sqrt V + \epsilon)` Adam on ``R``:

    .. math::
      s_i = \frac{\lVert O_{i,:}\rVert}{\lVert R_{i,:}\rVert + 10^{-8}}, \qquad
      W \leftarrow W - \eta_t\, \frac{\sqrt{1-b_2^t}}{1-b_1^t}\,
      \mathrm{limit}_\gamma(G \odot s)\, \sqrt{\alpha}, \qquad W \leftarrow W - \eta_t\lambda W

    (tensor-wise :math:`s = \lVert O\rVert / (\lVert R\rVert + 10^{-8})` with
    ``scale_type="tensor"``; ``sqrt(scale)`` before the limiter with ``scale_front=True``). Only
    ``R``'s moments (``m x r``), the seed and one limiter scalar are stored per matrix; the update
    needs no back-projection. Other leaves get the same Adam step.

    Args:
      learning_rate: ``lr`` or an optax schedule.
      rank: projection rank (authors: about a quarter of the hidden size).
      update_proj_gap: projector refresh period ``T``.
      scale: APOLLO ``scale``; the update is multiplied by ``sqrt(scale)``.
      proj_type: GaLore side rule (``"std"``).
      projector: ``"random"`` (APOLLO) or ``"svd"`` (the authors' SVD option), or ``"dct"``.
      scale_type: ``"channel"`` or ``"tensor"``.
      scale_front: multiply by ``sqrt(scale)`` before the limiter.
      limiter: use the norm-growth limiter (authors: ``disable_nl=False``).
      gamma: limiter threshold.
      b1, b2, eps, weight_decay, labels, refresh, inner, weight_decay_mask, seed,
        skip_nonfinite: as :func:`fira`.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Example:
      >>> import jax.numpy as jnp, memjax
      >>> params = {"w": jnp.ones((64, 32))}
      >>> tx = memjax.optim.apollo(1e-2, rank=8)
      >>> updates, state = tx.update(params, tx.init(params), params)
      >>> updates["w"].shape
      (64, 32)

    References:
      Zhu et al., "APOLLO: SGD-like Memory, AdamW-level Performance", arXiv 2412.05270 (2024).
    """
    inner, after = _adam_direction_and_step(b1, b2, eps, inner)
    core = scale_by_low_rank(
        rank, update_proj_gap, inner=inner,
        residual=residual_lib.apollo(scale, scale_type, limiter=limiter, gamma=gamma,
                                     scale_front=scale_front),
        proj_type=proj_type, projector=projector, labels=labels, refresh=refresh, seed=seed)
    return _finish_after(core, after, learning_rate, weight_decay, weight_decay_mask,
                         skip_nonfinite)


def apollo_mini(
    learning_rate: optax.ScalarOrSchedule,
    rank: int = 1,
    update_proj_gap: int = 200,
    scale: float = 128.0,
    proj_type: str = "std",
    projector: str = "random",
    scale_type: str = "tensor",
    scale_front: bool = False,
    limiter: bool = True,
    gamma: float = 1.01,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    labels: labels_lib.Labels = None,
    refresh: str = "synchronous",
    *,
    inner: optax.GradientTransformation | None = None,
    weight_decay_mask: Any = None,
    seed: int = 0,
    skip_nonfinite: bool = True,
) -> optax.GradientTransformationExtraArgs:
    r"""APOLLO-Mini: :func:`apollo` with a rank-1 random projection and tensor-wise scaling.

    Per matrix only two ``m x 1`` moments, a seed and one limiter scalar are stored (SGD-like
    memory); the defaults are the authors' (rank 1, ``scale_type="tensor"``, ``scale=128``).
    All arguments as :func:`apollo`. Over INT8 weights (groups of 128, stochastic rounding:
    :mod:`memjax.optim.quantized_weights`) this is Q-APOLLO-Mini.

    Example:
      >>> import jax.numpy as jnp, memjax
      >>> params = {"w": jnp.ones((64, 32))}
      >>> tx = memjax.optim.apollo_mini(1e-2)
      >>> tx.init(params).inner_state[0][0].inner_state[0].mu["w"].shape
      (64, 1)

    References:
      Zhu et al., "APOLLO: SGD-like Memory, AdamW-level Performance", arXiv 2412.05270 (2024).
    """
    return apollo(learning_rate, rank, update_proj_gap, scale, proj_type, projector, scale_type,
                  scale_front, limiter, gamma, b1, b2, eps, weight_decay, labels, refresh,
                  inner=inner, weight_decay_mask=weight_decay_mask, seed=seed,
                  skip_nonfinite=skip_nonfinite)


# ---------------------------------------------------------------------------------------------
# FRUGAL.
# ---------------------------------------------------------------------------------------------

SUBSPACES = ("svd", "random", "columns", "rows", "block")
ORDERS = ("random", "ascending", "descending", "mirror")
STATE_FREE = ("sign", "sgd", "none")


def _tree_dependent(build, check=None) -> optax.GradientTransformationExtraArgs:
    """A transform whose composition depends on the tree's static shapes (rebuilt per trace);
    ``check(params)`` runs once, at ``init``."""

    def init_fn(params):
        if check is not None:
            check(params)
        return build(params).init(params)

    def update_fn(updates, state, params=None, **extra_args):
        return build(updates).update(updates, state, params, **extra_args)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _label_leaves(tree, labels) -> list:
    """The ``MatrixDims`` (or ``None``) of every leaf of ``tree``, validated (rule labels whose
    matrix has a side of 1 fall back to ``None``)."""
    label_tree = labels_lib.label_tree(tree, labels)
    views = labels_lib.resolve_labels(tree, label_tree, 1)  # validates (raises named errors)
    leaves = jax.tree.structure(tree).flatten_up_to(label_tree)
    out = []
    for lab, view in zip(leaves, views):
        if view is None:
            out.append(None)
        elif lab is True:
            out.append(labels_lib.MatrixDims())
        else:
            out.append(labels_lib.MatrixDims(lab.reduction_axis, lab.output_axis))
    return out


def _frugal_rank(view, density: float, subspace: str) -> int | None:
    """Rank of the state-full subspace of one matrix, ``None`` if it is the whole matrix."""
    size = {"columns": view.n, "rows": view.m}.get(subspace, min(view.m, view.n))
    rank = max(1, round(density * size))
    if rank >= size:
        return None
    return min(rank, view.m, view.n)


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
    over ``D`` devices (``D`` dividing ``S``; :func:`memjax.optim.state_shardings` does it) gives each
    device the moments of its own shard of every matrix sharded on its leading axis, and the update
    moves no moments between devices (a matrix sharded on another axis, e.g. stacked layers on
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


def _scale_by_active_blocks(num_active: int, order: str, update_gap: int, b1, b2, eps,
                            free_mode: str, free_lr, seed: int, dims: list):
    """FRUGAL blockwise mode over the matrix leaves (``dims[i]`` not None), others untouched.

    Every ``update_gap`` steps a new set of ``num_active`` whole matrices becomes active: their
    Adam moments restart from zero (with the step count) in the shared buffers of
    :class:`BlockState`; the other matrices get the state-free update.
    """

    def plan(tree):
        """``(leaf indices, column widths, S, capacity // S, table)`` of the matrix leaves."""
        leaves = jax.tree.leaves(tree)
        idx = [i for i, d in enumerate(dims) if d is not None]
        sizes = np.array([leaves[i].size for i in idx], np.int64)
        num = len(idx)
        if order == "mirror" and num_active % 2:
            raise ValueError(f"order='mirror' needs an even number of active matrices; "
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
        return idx, cols, rows, width, table

    def init_fn(params):
        _, _, rows, width, _ = plan(params)
        zero = jnp.zeros([], jnp.int32)
        return BlockState(zero, zero, jnp.zeros((rows, width), jnp.float32),
                          jnp.zeros((rows, width), jnp.float32))

    def update_fn(updates, state, params=None):
        del params
        leaves, treedef = jax.tree.flatten(updates)
        idx, cols, rows, width, table = plan(updates)
        num = len(idx)
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
        out = list(leaves)
        for k, i in enumerate(idx):
            g, on = leaves[i], active[k]
            m_old, v_old = olds[k]
            g32 = g.astype(jnp.float32).reshape(rows, bands[k])
            m = b1 * m_old + (1.0 - b1) * g32
            v = b2 * v_old + (1.0 - b2) * g32 * g32
            u_adam = ((m / bc1) / (jnp.sqrt(v / bc2) + eps)).reshape(g.shape).astype(g.dtype)
            if free_mode == "none":
                u_free = jnp.zeros_like(g)
            else:
                u_free = jnp.sign(g) if free_mode == "sign" else g
                u_free = (free_lr * u_free.astype(jnp.float32)).astype(g.dtype)
            out[i] = jnp.where(on, u_adam, u_free)
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


def _finish_decay_before(core, learning_rate, weight_decay, weight_decay_mask, skip_nonfinite):
    """``lr`` scaling with torch-style decoupled weight decay (``W <- W (1 - lr wd) - lr U``)."""
    parts = [core]
    if not (isinstance(weight_decay, (int, float)) and weight_decay == 0):
        parts.append(optax.add_decayed_weights(weight_decay, weight_decay_mask))
    parts.append(optax.scale_by_learning_rate(learning_rate))
    tx = optax.chain(*parts)
    return weights_lib.on_float_view(guards.skip_nonfinite(tx) if skip_nonfinite else tx)


def frugal(
    learning_rate: optax.ScalarOrSchedule,
    density: float = 0.25,
    subspace: str = "svd",
    order: str = "descending",
    state_free: str = "sign",
    state_free_lr: float = 1.0,
    update_proj_gap: int = 200,
    reset_state_on_refresh: bool = True,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    labels: labels_lib.Labels = None,
    *,
    inner: optax.GradientTransformation | None = None,
    weight_decay_mask: Any = None,
    seed: int = 0,
    skip_nonfinite: bool = True,
) -> optax.GradientTransformationExtraArgs:
    r"""FRUGAL: Adam in a subspace of each matrix, a state-free optimizer on the rest.

    For a matrix leaf with gradient ``G``, a subspace with ``up``/``down`` (refreshed every
    ``T = update_proj_gap`` steps), ``R = down(G)`` and Adam on ``R``:

    .. math::
      W \leftarrow W (1 - \eta_t \lambda) - \eta_t \big(\mathrm{up}(\mathrm{Adam}(R))
      + \rho\, f(G - \mathrm{up}(R))\big), \qquad f = \mathrm{sign} \text{ or } \mathrm{id}
      \text{ or } 0

    with the subspace ``subspace``:

    * ``"svd"``: top singular vectors of ``G`` (GaLore side rule), rank
      ``round(density * min(m, n))``;
    * ``"random"``: a random orthonormal basis of the same rank (only a key is stored);
    * ``"columns"`` / ``"rows"``: ``round(density * n)`` random columns (``density * m`` rows);
    * ``"block"``: BAdam-like, ``max(1, round(density * K))`` of the ``K`` matrix leaves are
      entirely state-full (Adam), chosen in ``order`` (``"random"``, ``"ascending"``,
      ``"descending"``, ``"mirror"``) and switched every ``T`` steps; the others are entirely
      state-free. Only the active matrices' moments are stored: two float32 buffers as large as
      the largest active set (:class:`BlockState`), which
      :func:`memjax.optim.state_shardings` splits over the parameters' devices.

    Adam (``optax.scale_by_adam`` form: the torch ``AdamW`` of the authors' code) restarts from zero
    moments and step count at every subspace change when ``reset_state_on_refresh`` (the authors'
    ``reset_statistics``). Leaves that are not matrices (embeddings, heads, norms, biases: see
    :func:`memjax.optim.label_matrices`) and matrices whose subspace would be the whole matrix
    get plain Adam. Weight decay is applied to the old weights, as ``torch.optim.AdamW`` does.

    Args:
      learning_rate: ``lr`` or an optax schedule.
      density: fraction of each matrix (or of the matrices, ``"block"``) that is state-full, in
        ``(0, 1]``.
      subspace: ``"svd"``, ``"random"``, ``"columns"``, ``"rows"`` or ``"block"``.
      order: block order for ``subspace="block"`` (authors' ``block_order``).
      state_free: ``"sign"`` (signSGD, default), ``"sgd"``, or ``"none"`` (GaLore-like).
      state_free_lr: the state-free learning rate as a *multiple* of ``learning_rate`` (the
        authors' ``inactive_lr_scale``): the state-free part moves by
        ``learning_rate(t) * state_free_lr`` per step and follows the same schedule.
      update_proj_gap: subspace change period ``T`` (authors' ``update_gap``).
      reset_state_on_refresh: zero the Adam state at every subspace change (authors'
        ``reset_statistics``); must be ``True`` for ``"block"``.
      b1, b2, eps: Adam hyperparameters (authors' default eps 1e-8).
      weight_decay: decoupled weight decay.
      labels: which leaves are matrices (default :func:`memjax.optim.label_matrices`).
      inner: replaces the subspace Adam (not with ``"block"``).
      weight_decay_mask: pytree or callable selecting the leaves that decay.
      seed: seed of the random subspaces / random block order.
      skip_nonfinite: skip steps with non-finite gradients.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Raises:
      ValueError: ``density`` outside ``(0, 1]``, or an unknown ``subspace``, ``order`` or
        ``state_free``, or an unsupported combination.

    Example:
      >>> import jax.numpy as jnp, memjax
      >>> params = {"w": jnp.ones((64, 32))}
      >>> tx = memjax.optim.frugal(1e-3, density=0.25)
      >>> updates, state = tx.update(params, tx.init(params), params)
      >>> updates["w"].shape
      (64, 32)

    References:
      Zmushko et al., "FRUGAL: Memory-Efficient Optimization by Reducing State Overhead for
      Scalable Training", arXiv 2411.07837 (2024).
    """
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1:
        raise ValueError(f"density={density!r} must lie in (0, 1].")
    if subspace not in SUBSPACES:
        raise ValueError(f"subspace={subspace!r} is unknown; choose one of {SUBSPACES}.")
    if order not in ORDERS:
        raise ValueError(f"order={order!r} is unknown; choose one of {ORDERS}.")
    if state_free not in STATE_FREE:
        raise ValueError(f"state_free={state_free!r} is unknown; choose one of {STATE_FREE}.")
    if isinstance(state_free_lr, (int, float)) and state_free_lr < 0:
        raise ValueError(f"state_free_lr={state_free_lr} must be >= 0.")
    if isinstance(update_proj_gap, bool) or not isinstance(update_proj_gap, int):
        raise TypeError(f"update_proj_gap must be an int, got {type(update_proj_gap).__name__}.")
    if update_proj_gap < 1:
        raise ValueError(f"update_proj_gap={update_proj_gap} must be >= 1.")
    if subspace == "block" and not reset_state_on_refresh:
        raise ValueError("reset_state_on_refresh=False is not supported with subspace='block' "
                         "(the moments belong to the previously active matrices).")
    if subspace == "block" and inner is not None:
        raise ValueError("inner= is not supported with subspace='block' (blocks use Adam).")
    adam = inner if inner is not None else optax.scale_by_adam(b1, b2, eps)
    policy = (residual_lib.drop(1.0) if state_free == "none"
              else residual_lib.state_free(state_free, state_free_lr))
    projector = {"svd": "svd", "random": proj_lib.orthogonal_projector,
                 "columns": proj_lib.coordinate_projector,
                 "rows": proj_lib.coordinate_projector}.get(subspace)
    proj_type = {"columns": "right", "rows": "left"}.get(subspace, "std")

    def build(tree):
        dims = _label_leaves(tree, labels)
        leaves, treedef = jax.tree.flatten(tree)
        names, sub_labels = [], {}
        if subspace == "block":
            num = sum(d is not None for d in dims)
            num_active = max(1, round(density * num)) if num else 0
            names = ["block" if d is not None else "full" for d in dims]
            transforms = {"full": adam}
            if num:
                block_dims = [d if n == "block" else None for d, n in zip(dims, names)]
                transforms["block"] = _scale_by_active_blocks(
                    num_active, order, update_proj_gap, b1, b2, eps, state_free, state_free_lr,
                    seed, [d for d, n in zip(block_dims, names) if n == "block"])
        else:
            for leaf, d in zip(leaves, dims):
                view = None if d is None else labels_lib.matrix_view(leaf.shape, d)
                rank = None if view is None else _frugal_rank(view, density, subspace)
                names.append("full" if rank is None else f"rank_{rank}")
            transforms = {"full": adam}
            for k, name in enumerate(sorted(set(names) - {"full"})):
                lab = treedef.unflatten([d if n == name else optax.MaskedNode()
                                         for d, n in zip(dims, names)])
                sub_labels[name] = lab
                transforms[name] = scale_by_low_rank(
                    int(name.split("_")[1]), update_proj_gap, inner=adam, residual=policy,
                    proj_type=proj_type, projector=projector, labels=lab,
                    seed=seed + 1_000_003 * k, reset_inner_on_refresh=reset_state_on_refresh)
        transforms = {k: v for k, v in transforms.items() if k in names}
        return optax.partition(transforms, treedef.unflatten(names))

    def check(tree):
        labels_lib.warn_if_nothing_projected(tree, labels_lib.resolve_labels(tree, labels, 1),
                                             labels, 1, "frugal")

    return _finish_decay_before(_tree_dependent(build, check), learning_rate, weight_decay,
                                weight_decay_mask, skip_nonfinite)


# ---------------------------------------------------------------------------------------------
# Q-GaLore.
# ---------------------------------------------------------------------------------------------


def q_galore(
    learning_rate: optax.ScalarOrSchedule,
    rank: int = 128,
    update_proj_gap: int = 200,
    scale: float = 0.25,
    proj_type: str = "std",
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    proj_bits: int = 4,
    proj_group_size: int = 256,
    queue_size: int = 5,
    cos_threshold: float = 0.4,
    gamma_proj: int = 2,
    block_size: int = 256,
    labels: labels_lib.Labels = None,
    refresh: str = "synchronous",
    *,
    lazy: bool = True,
    min_8bit_size: int = 4096,
    inner: optax.GradientTransformation | None = None,
    weight_decay_mask: Any = None,
    seed: int = 0,
    skip_nonfinite: bool = True,
) -> optax.GradientTransformationExtraArgs:
    r"""Q-GaLore: GaLore with an INT4 projector, layer-adaptive lazy refresh and 8-bit Adam.

    The update is :func:`galore`'s, with three memory changes:

    * each SVD projector is stored in ``proj_bits`` bits (asymmetric min-max, groups of
      ``proj_group_size``; about 1/8 of float32 for 4 bits) and dequantized on use;
    * lazy refresh: a layer whose last ``queue_size`` first-singular-vector cosine similarities
      average ``>= cos_threshold`` multiplies its refresh gap by ``gamma_proj``; skipped SVDs
      are counted in the state (:func:`memjax.optim.quantization.svd_counts`);
    * the inner Adam keeps 8-bit blockwise moments (:func:`scale_by_adam_8bit`, ``block_size``;
      leaves smaller than ``min_8bit_size`` keep float32 moments).

    The authors also keep the *weights* in INT8 with stochastic rounding (groups of 256), as
    every recipe can: the weights are parameters (:class:`memjax.optim.QuantizedWeight`, made by
    :func:`memjax.optim.quantize_weights` or ``LMConfig(weight_bits=8)``); this transform runs on
    their float view, and the step applies its update by dequantising, adding and re-quantising
    (:func:`memjax.optim.apply_updates`, :func:`memjax.training.layerwise_step`).

    Args:
      learning_rate, rank, update_proj_gap, scale, proj_type, b1, b2, eps, weight_decay,
        labels, refresh, weight_decay_mask, seed, skip_nonfinite: as :func:`galore`.
      proj_bits: 4 or 8.
      proj_group_size, queue_size, cos_threshold, gamma_proj: the authors' names and defaults.
      block_size: 8-bit Adam block size.
      lazy: adapt the refresh gaps (``False``: refresh every ``T`` steps).
      min_8bit_size: leaves with fewer entries keep float32 moments.
      inner: replaces the 8-bit inner Adam.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Raises:
      ValueError: ``proj_bits`` not in {4, 8}, or any invalid argument.

    Example:
      >>> import jax.numpy as jnp, memjax
      >>> params = {"w": jnp.ones((64, 32))}
      >>> tx = memjax.optim.q_galore(1e-2, rank=8)
      >>> updates, state = tx.update(params, tx.init(params), params)
      >>> [int(c) for c in memjax.optim.quantization.svd_counts(state)]
      [1, 0]

    References:
      Zhang et al., "Q-GaLore: Quantized GaLore with INT4 Projection and Layer-Adaptive Low-Rank
      Gradients", arXiv 2407.08296 (2024).
    """
    factory = quant_lib.quantized_svd_projector(
        proj_bits, proj_group_size, lazy=lazy, queue_size=queue_size,
        cos_threshold=cos_threshold, gamma_proj=gamma_proj)
    if inner is None:
        inner = quant_lib.scale_by_adam_8bit(b1, b2, eps, block_size, min_8bit_size=min_8bit_size)
    core = scale_by_low_rank(rank, update_proj_gap, inner=inner, scale=scale, proj_type=proj_type,
                             projector=factory, labels=labels, refresh=refresh, seed=seed)
    return _finish(core, learning_rate, weight_decay, weight_decay_mask, skip_nonfinite)
