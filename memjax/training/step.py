"""The step protocol and its gradient and zeroth-order kinds (the layerwise kind is
:func:`memjax.training.layerwise_step`).

Every kind is a pure function ``step(params, opt_state, batch) -> (params, opt_state, metrics)``
whose ``batch`` leaves carry a leading axis of ``A`` micro-batches (``A = 1`` without gradient
accumulation) and whose ``metrics`` are scalars: ``loss`` (mean over the micro-batches),
``grad_norm`` and ``skipped`` (1 if this step changed nothing for a non-finite gradient or loss).
A trainer jits the one it is given (donating ``params`` and ``opt_state``) and never asks which
kind it holds.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import optax

from memjax.optim import quantized_weights as qw


class Step(Protocol):
    """``(params, opt_state, batch) -> (params, opt_state, metrics)``."""

    def __call__(self, params: Any, opt_state: Any, batch: Any) -> tuple[Any, Any, dict]:
        ...


def _skipped(old_state: Any, new_state: Any) -> jax.Array:
    """1 if a :func:`memjax.optim.skip_nonfinite` at the top of the state skipped this step."""
    if hasattr(new_state, "skipped") and hasattr(old_state, "skipped"):
        return (new_state.skipped - old_state.skipped).astype(jnp.int32)
    return jnp.zeros([], jnp.int32)


def gradient_step(loss_fn: Callable[[Any, Any], jax.Array], tx: optax.GradientTransformation,
                  *, grad_shardings: Any = None) -> Step:
    r"""The standard step: the mean gradient over the micro-batches, then ``tx.update``.

    .. math::
      g = \frac{1}{A}\sum_a \nabla_\theta \ell(\theta, b_a), \qquad
      (u, s) = \mathrm{tx.update}(g, s, \theta), \qquad \theta \leftarrow \theta + u

    Args:
      loss_fn: ``(params, micro_batch) -> scalar loss``.
      tx: any optax transform (clipping and :func:`memjax.optim.skip_nonfinite` go inside it).
      grad_shardings: optional tree of ``NamedSharding`` s the summed gradient is constrained to.

    Returns:
      a :class:`Step`. The gradient sum over micro-batches is one tree the size of the
      parameters (absent with ``A = 1``: XLA folds the zero initial value).

    INT8 weights (:class:`memjax.optim.QuantizedWeight` leaves): the gradient is taken with
    respect to the dequantised weights, ``tx`` runs on that float view, and the update is
    applied by :func:`memjax.optim.apply_updates` (dequantise, add, re-quantise with the
    weight's rounding); a step that :func:`memjax.optim.skip_nonfinite` at the top of ``tx``
    skips leaves them untouched (a non-finite update without it gives non-finite weights, as
    with floats). This step dequantises the whole tree (it holds a whole float gradient anyway);
    :func:`memjax.training.layerwise_step` dequantises one layer at a time.
    """

    def step(params, opt_state, batch):
        num_micro = jax.tree.leaves(batch)[0].shape[0]
        quantized = qw.has_quantized(params)
        if quantized:
            qw.check_float_state(tx, params, opt_state, "gradient_step")
        view = qw.dequantize_weights(params) if quantized else params

        def micro(grad_sum, mb):
            loss, grads = jax.value_and_grad(loss_fn)(view, mb)
            return jax.tree.map(jnp.add, grad_sum, grads), loss

        grad_sum, losses = jax.lax.scan(micro, optax.tree.zeros_like(view), batch)
        grads = optax.tree.scale(1.0 / num_micro, grad_sum)
        if grad_shardings is not None:
            grads = jax.lax.with_sharding_constraint(grads, grad_shardings)
        updates, new_state = tx.update(grads, opt_state, view)
        skipped = _skipped(opt_state, new_state)
        metrics = {"loss": jnp.mean(losses), "grad_norm": optax.tree.norm(grads),
                   "skipped": skipped}
        if not quantized:
            return optax.apply_updates(params, updates), new_state, metrics
        # a skipped step must not re-quantise (re-rounding moves codes and advances the keys)
        new_params = optax.tree.where(skipped > 0, params, qw.apply_updates(params, updates))
        return new_params, new_state, metrics

    return step


def zeroth_order_step(loss_fn: Callable[[Any, Any, Any], jax.Array], tx: Any) -> Step:
    """A :class:`memjax.optim.ZerothOrderTransformation` (e.g. :func:`memjax.optim.mezo`) as a
    :class:`Step`: forward passes only, no backward is compiled.

    Args:
      loss_fn: ``(params, batch, noise) -> loss`` as :meth:`ZerothOrderTransformation.step` takes
        it (the batch keeps its micro-batch axis).
      tx: the zeroth-order transformation.

    Returns:
      a :class:`Step`; ``grad_norm`` is the mean ``|projected gradient|`` of the SPSA samples.
    """

    def step(params, opt_state, batch):
        params, opt_state, info = tx.step(loss_fn, params, opt_state, batch)
        metrics = {"loss": info.loss, "grad_norm": jnp.mean(jnp.abs(info.scalars)),
                   "skipped": jnp.asarray(info.skipped).astype(jnp.int32)}
        return params, opt_state, metrics

    return step
