"""Q-GaLore (Zhang et al., arXiv 2407.08296): GaLore, INT4 projector, lazy refresh, 8-bit Adam."""

from __future__ import annotations

from typing import Any

import optax

from memjax.optim import labels as labels_lib
from memjax.optim import quantization as quant_lib
from memjax.optim import recipe
from memjax.optim.low_rank import scale_by_low_rank


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
    return recipe.finish(core, learning_rate, weight_decay, weight_decay_mask, skip_nonfinite)
