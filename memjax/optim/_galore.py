"""GaLore (Zhao et al., arXiv 2403.03507): Adam in a low-rank subspace of each gradient matrix."""

from __future__ import annotations

from typing import Any

import optax

from memjax.optim import labels as labels_lib
from memjax.optim import recipe
from memjax.optim.adam import scale_by_hf_adam
from memjax.optim.low_rank import scale_by_low_rank


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
    reset_inner_on_refresh: bool = False,
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
      projector: ``"svd"`` (GaLore), ``"dct"`` (SVD-free), ``"random"`` (seed-only state) or
        ``"power"`` (warm-started block power iteration, :func:`memjax.optim.power_projector`).
      b1, b2, eps: Adam hyperparameters (code default eps 1e-6).
      weight_decay: decoupled weight decay ``lambda``.
      labels: which leaves are projected (default :func:`memjax.optim.label_matrices`).
      refresh: ``"synchronous"`` or ``"staggered"``.
      inner: replaces the inner Adam with any gradient-only transform (then ``b1, b2, eps``
        are unused).
      weight_decay_mask: pytree or callable selecting the leaves that decay (default all).
      seed: seed of the random projector.
      skip_nonfinite: skip (zero update, unchanged state) steps with non-finite gradients.
      reset_inner_on_refresh: zero each projected matrix's Adam moments when its projector
        refreshes (the "momentum reset" ablation of the 2025 pre-training benchmark; the
        authors keep the moments across refreshes).

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
        refresh=refresh, seed=seed, reset_inner_on_refresh=reset_inner_on_refresh)
    return recipe.finish(core, learning_rate, weight_decay, weight_decay_mask, skip_nonfinite)
