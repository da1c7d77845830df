"""Decoupled weight decay applied to the already-updated weights (the GaLore/Hugging Face order).

The GaLore, Fira and APOLLO reference optimizers first take the step and then decay the
*new* weights::

    W' = W - lr * U;   W'' = W' - lr * wd * W'

whereas ``optax.add_decayed_weights`` (like ``torch.optim.AdamW``) decays the old weights. This
transform reproduces the authors' order exactly: given the learning-rate-scaled update
``u = -lr * U`` it returns ``u - lr * wd * (W + u)``.

Reference: Loshchilov & Hutter, "Decoupled Weight Decay Regularization", ICLR 2019.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


class DecayAfterStepState(NamedTuple):
    """Step counter for a learning-rate schedule."""

    count: jax.Array


def add_decayed_weights_after_step(weight_decay: Any, learning_rate: optax.ScalarOrSchedule,
                                   mask: Any = None) -> optax.GradientTransformation:
    r"""``u -> u - lr_t \cdot wd \cdot (W + u)``, placed after the learning-rate scaling.

    Args:
      weight_decay: decay coefficient ``wd``.
      learning_rate: the same learning rate (or schedule) used to scale the update.
      mask: optional pytree of bools or a callable ``params -> mask``; only ``True`` leaves decay.

    Returns:
      An ``optax.GradientTransformation`` that needs ``params``.
    """

    def init_fn(params):
        del params
        return DecayAfterStepState(jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("add_decayed_weights_after_step needs `params` in update().")
        lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
        new = jax.tree.map(
            lambda u, w: (u - lr * weight_decay * (w + u)).astype(u.dtype), updates, params)
        return new, DecayAfterStepState(optax.safe_increment(state.count))

    tx = optax.GradientTransformation(init_fn, update_fn)
    return optax.masked(tx, mask) if mask is not None else tx
