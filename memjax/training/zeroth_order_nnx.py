"""MeZO (or any zeroth-order transformation) on a Flax NNX model.

``nnx.Optimizer`` holds optax transforms, which take gradients; a zeroth-order transformation takes
the loss instead (:class:`memjax.optim.ZerothOrderTransformation`), so it cannot hold one. This
is the split / merge the user would otherwise write: the model's parameters become a pytree, the
loss a function of it, and the step one jitted pure function with the parameters and the state
donated (updated in place: the memory of inference plus one parameter copy is all MeZO needs).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx


class NnxZerothOrder(NamedTuple):
    """What :func:`nnx_zeroth_order` returns.

    Attributes:
      step: ``step(params, opt_state, batch) -> (params, opt_state, info)``, jitted, with
        ``params`` and ``opt_state`` donated; ``info`` is the transformation's
        :class:`memjax.optim.StepInfo` (loss, SPSA scalars, skipped).
      params: a copy of the model's ``wrt`` state as a pytree (an ``nnx.State``); the step
        donates it, the model keeps its own arrays (``del model`` to free them).
      opt_state: ``tx.init(params)``.
      merge: ``merge(params) -> model``, a new module with these parameters and the model's
        other state.
    """

    step: Callable[[Any, Any, Any], tuple[Any, Any, Any]]
    params: Any
    opt_state: Any
    merge: Callable[[Any], nnx.Module]


def nnx_zeroth_order(model: nnx.Module, loss_fn: Callable[[nnx.Module, Any], jax.Array],
                     tx: Any, *, wrt: Any = nnx.Param) -> NnxZerothOrder:
    """Splits ``model`` and builds the jitted zeroth-order step of ``loss_fn``.

    With :func:`memjax.optim.mezo` each step is
    ``theta <- theta - lr * (L(theta + eps z) - L(theta - eps z)) / (2 eps) * z`` over the
    ``wrt`` variables ``theta`` (Malladi et al. 2023, arXiv 2305.17333); the model's other state
    (batch statistics, RNG counters) is read, never updated.

    Args:
      model: any ``nnx.Module``; it is not modified (use ``merge`` on the trained parameters).
      loss_fn: ``(model, batch) -> scalar loss``.
      tx: a :class:`memjax.optim.ZerothOrderTransformation` (``memjax.optim.mezo(...)``).
      wrt: the ``nnx`` filter of the perturbed variables (default ``nnx.Param``).

    Returns:
      a :class:`NnxZerothOrder` ``(step, params, opt_state, merge)``.

    Raises:
      TypeError: ``tx`` takes gradients (an optax transform), or ``model`` is not a module.

    Example:
      >>> import jax, jax.numpy as jnp, memjax
      >>> from flax import nnx
      >>> model = nnx.Linear(8, 1, rngs=nnx.Rngs(0))
      >>> x = jax.random.normal(jax.random.key(1), (64, 8))
      >>> batch = (x, x @ jnp.arange(8.0)[:, None])
      >>> loss_fn = lambda m, b: jnp.mean((m(b[0]) - b[1]) ** 2)
      >>> zo = memjax.training.nnx_zeroth_order(model, loss_fn, memjax.optim.mezo(1e-2))
      >>> params, state = zo.params, zo.opt_state
      >>> for _ in range(300):
      ...     params, state, info = zo.step(params, state, batch)
      >>> bool(loss_fn(zo.merge(params), batch) < 0.5 * loss_fn(model, batch))
      True
    """
    if not isinstance(model, nnx.Module):
        raise TypeError(f"model must be an nnx.Module, got {type(model).__name__}")
    if not (callable(getattr(tx, "step", None)) and callable(getattr(tx, "init", None))) or (
            callable(getattr(tx, "update", None))):
        raise TypeError("tx must be a zeroth-order transformation with init(params) and "
                        "step(loss_fn, params, state, batch), e.g. memjax.optim.mezo(...); an "
                        "optax transform takes gradients: use nnx.Optimizer for it")
    graphdef, params, rest = nnx.split(model, wrt, ...)

    def loss(p, batch):
        return loss_fn(nnx.merge(graphdef, p, rest), batch)

    params = jax.tree.map(jnp.copy, params)  # donated by the step: the model keeps its own
    step = jax.jit(lambda p, state, batch: tx.step(loss, p, state, batch), donate_argnums=(0, 1))
    return NnxZerothOrder(step, params, tx.init(params),
                          lambda p: nnx.merge(graphdef, p, rest))
