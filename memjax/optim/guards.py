"""Skip steps whose gradients are not finite, so NaN/inf never reach parameters or state.

``optax.apply_if_finite`` gives up after ``max_consecutive_errors`` and then applies the
non-finite update; :func:`skip_nonfinite` never does. A skipped step returns zero updates and
leaves the inner state untouched (both branches of one ``lax.cond``, so no second copy of the
state is ever live).

Cost: on XLA:CPU a conditional around a whole optimizer step blocks fusion and in-place buffer
reuse (a GaLore step on a 39M-parameter tree went from ~0.14 s to ~0.45 s); an elementwise
``jnp.where`` select of the new and old state measured the same. The recipes therefore take
``skip_nonfinite=`` so a trainer that already guards its step can turn it off; BENCHMARKS.md
quotes step times both ways.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax


class SkipNonFiniteState(NamedTuple):
    """State of :func:`skip_nonfinite`.

    Attributes:
      skipped: int32 scalar, number of steps skipped so far.
      inner_state: the wrapped transform's state.
    """

    skipped: jax.Array
    inner_state: optax.OptState


def all_finite(tree) -> jax.Array:
    """``True`` iff every entry of every leaf of ``tree`` is finite (a bool scalar)."""
    leaves = jax.tree.leaves(tree)
    if not leaves:
        return jnp.array(True)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def skip_nonfinite(inner: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
    """Wraps ``inner`` so that a step with any non-finite gradient entry is a no-op.

    Args:
      inner: any optax transform.

    Returns:
      A transform with :class:`SkipNonFiniteState`; on a non-finite step the updates are zeros
      and the inner state is returned unchanged.
    """
    inner = optax.with_extra_args_support(inner)

    def init_fn(params):
        return SkipNonFiniteState(jnp.zeros([], jnp.int32), inner.init(params))

    def update_fn(updates, state, params=None, **extra_args):
        finite = all_finite(updates)
        new_updates, inner_state = jax.lax.cond(
            finite,
            lambda: inner.update(updates, state.inner_state, params, **extra_args),
            lambda: (optax.tree.zeros_like(updates), state.inner_state),
        )
        skipped = state.skipped + jnp.where(finite, 0, 1).astype(jnp.int32)
        return new_updates, SkipNonFiniteState(skipped, inner_state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
