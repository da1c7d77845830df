r"""How every memjax recipe ends: learning rate, weight decay, the non-finite guard, INT8 weights.

A recipe is a core transform (the direction, e.g. :func:`memjax.optim.scale_by_low_rank`) and
one call of :func:`finish`:

.. math::
  \text{decay after (GaLore, Fira, APOLLO):}\quad
  W \leftarrow W - \eta_t U_t, \quad W \leftarrow W - \eta_t \lambda W \\
  \text{decay before (FRUGAL, torch AdamW):}\quad
  W \leftarrow W - \eta_t (U_t + \lambda W)

wrapped in :func:`memjax.optim.skip_nonfinite` and run on the float view of INT8 weights
(:func:`memjax.optim.on_float_view`). The recipes, one module each, all built on
:func:`memjax.optim.scale_by_low_rank` with a residual policy (:mod:`memjax.optim.residual`),
a subspace (:mod:`memjax.optim.projectors`) and an inner optimizer:

================  ================================  ==================  ======================
recipe            outside the subspace              subspace            inner optimizer
================  ================================  ==================  ======================
``galore``        dropped                           SVD (dct, random,   Adam
                                                    power)
``fira``          scaled, norm-limited residual     SVD                 Adam
``apollo``        raw gradient, channel-scaled      random (seed)       Adam (only for scales)
``frugal``        signSGD / SGD (state-free)        SVD, random, rows,  Adam, reset on refresh
                                                    columns, blocks
``q_galore``      dropped                           SVD in INT4, lazy   8-bit Adam
================  ================================  ==================  ======================

For ``optax.inject_hyperparams`` pass the arguments that fix shapes or schedules as static:
``optax.inject_hyperparams(galore, static_args=("rank", "update_proj_gap", "seed"))`` (likewise
``fira``, ``apollo``, ``apollo_mini``); ``frugal``: ``("density", "update_proj_gap", "seed")``;
``q_galore``: add ``"proj_bits", "proj_group_size", "queue_size", "gamma_proj", "block_size",
"min_8bit_size"``.

References: Loshchilov & Hutter, "Decoupled Weight Decay Regularization", ICLR 2019; the
authors' codes of GaLore (arXiv 2403.03507: decay after the step) and FRUGAL
(arXiv 2411.07837: ``torch.optim.AdamW``, decay before).
"""

from __future__ import annotations

from typing import Any

import optax

from memjax.optim import _checks, guards
from memjax.optim import quantized_weights as weights_lib
from memjax.optim.adam import scale_by_hf_adam, scale_by_hf_bias_correction
from memjax.optim.weight_decay import add_decayed_weights_after_step

DECAY_ORDERS = ("after", "before")


def _decays(weight_decay) -> bool:
    return not (isinstance(weight_decay, (int, float)) and weight_decay == 0)


def finish(core: optax.GradientTransformation, learning_rate: optax.ScalarOrSchedule,
           weight_decay: optax.ScalarOrSchedule = 0.0, weight_decay_mask: Any = None,
           skip_nonfinite: bool = True, *, decay: str = "after"
           ) -> optax.GradientTransformationExtraArgs:
    """``skip_nonfinite(chain(core, lr, weight decay))`` (``decay="before"``: the decay before
    the learning rate) on the float view of INT8 weights.

    Args:
      core: the recipe's direction (gradient in, update before the learning rate out).
      learning_rate: ``lr`` or an optax schedule.
      weight_decay: decoupled weight decay ``lambda`` (0: none).
      weight_decay_mask: pytree or callable selecting the leaves that decay (default all).
      skip_nonfinite: skip (zero update, unchanged state) steps with non-finite gradients.
      decay: ``"after"`` (the updated weights decay, GaLore's code) or ``"before"`` (the old
        weights decay, ``torch.optim.AdamW``).

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Raises:
      ValueError: an unknown ``decay``.
      TypeError: a ``learning_rate`` that is neither a number, a scalar array nor a schedule.
    """
    _checks.check_choice("decay", decay, DECAY_ORDERS)
    _checks.check_learning_rate(learning_rate)
    parts = [core]
    if decay == "before" and _decays(weight_decay):
        parts.append(optax.add_decayed_weights(weight_decay, weight_decay_mask))
    parts.append(optax.scale_by_learning_rate(learning_rate))
    if decay == "after" and _decays(weight_decay):
        parts.append(add_decayed_weights_after_step(weight_decay, learning_rate, weight_decay_mask))
    tx = optax.chain(*parts)
    return weights_lib.on_float_view(guards.skip_nonfinite(tx) if skip_nonfinite else tx)


def adam_direction(b1, b2, eps, inner: optax.GradientTransformation | None):
    """``(inner, after)`` for recipes that scale the Adam direction before its bias correction.

    Fira and APOLLO compute their scaling factors (and their limiter) from
    ``M / (sqrt(V) + eps)`` and apply Adam's bias correction afterwards, to the full update of
    every leaf (the authors' ``step_size``): ``inner`` is :func:`scale_by_hf_adam` without the
    correction and ``after`` is :func:`scale_by_hf_bias_correction`. A user ``inner`` is used
    as it is, and ``after`` is ``None``.
    """
    if inner is not None:
        return inner, None
    return (scale_by_hf_adam(b1, b2, eps, bias_correction=False),
            scale_by_hf_bias_correction(b1, b2))


def then(core: optax.GradientTransformation, after: optax.GradientTransformation | None):
    """``chain(core, after)``, or ``core`` when ``after`` is ``None``."""
    return core if after is None else optax.chain(core, after)
