"""memjax.training: whole training steps as pure functions (no I/O, no models imported).

A step is ``step(params, opt_state, batch) -> (params, opt_state, metrics)``:

* :func:`gradient_step`: ``value_and_grad``, then ``tx.update`` (any optax transform).
* :func:`layerwise_step`: the optimizer inside the backward pass (no gradient tree), for a model
  given as a :class:`Layered` (before the layers, one scanned layer, after the layers).
* :func:`zeroth_order_step`: forward passes only (:func:`memjax.optim.mezo`).
* :func:`nnx_zeroth_order`: MeZO on a Flax NNX model (split, loss, donated jitted step).
* :mod:`stack_plan`: which slice of any optax state belongs to one layer, read from ``tx.init``.
"""

from memjax.training import dependence, stack_plan
from memjax.training.layerwise import GUARDS, Layered, layerwise_step
from memjax.training.zeroth_order_nnx import NnxZerothOrder, nnx_zeroth_order
from memjax.training.stack_plan import StackPlan, plan_stack
from memjax.training.step import Step, gradient_step, zeroth_order_step

__all__ = [
    "GUARDS",
    "Layered",
    "NnxZerothOrder",
    "StackPlan",
    "Step",
    "dependence",
    "gradient_step",
    "layerwise_step",
    "nnx_zeroth_order",
    "plan_stack",
    "stack_plan",
    "zeroth_order_step",
]
