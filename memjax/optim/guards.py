"""Skip steps whose gradients are not finite, so NaN/inf never reach parameters or state.

``optax.apply_if_finite`` gives up after ``max_consecutive_errors`` and then applies the
non-finite update; :func:`skip_nonfinite` never does. A skipped step returns zero updates and
leaves the inner state untouched.

Memory: the update runs inside a loop taken once (finite) or never; a loop's carry is updated in
place, so the state and updates are written over the old state and the gradients as unguarded.
A ``lax.cond`` around the update (this guard before 2026-11-30) cannot alias its outputs to its
operands: a LLaMA-7B GaLore step's temp went from 29.7 GiB (unguarded) to 57.6 GiB with it, and is
32.5 GiB with the loop (LLaMA-60M: 0.42 unguarded, 0.39 guarded; step time within noise). When
the gradients are arguments of the jitted function rather than made inside it, the loop may not
write over them and XLA copies them into its carry (an optimizer-only benchmark: +130 MB, +50% of
its step at 60M; BENCHMARKS.md section 11). The recipes keep the guard on by default
(``skip_nonfinite=True``); pass ``False`` when the caller guards its step itself (as
``experiments`` does, around the clipping too).
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
    # max |x| is finite iff every entry is (NaN propagates through max).
    return jnp.all(jnp.stack([
        jnp.isfinite(jnp.max(jnp.abs(x))) if jnp.issubdtype(x.dtype, jnp.inexact) and x.size
        else jnp.all(jnp.isfinite(x)) for x in leaves]))


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

        def step(carry):
            _, grads, inner_state = carry
            new_updates, inner_state = inner.update(grads, inner_state, params, **extra_args)
            if jax.tree.structure(new_updates) != jax.tree.structure(grads):
                raise ValueError("skip_nonfinite: the wrapped transform changed the tree of updates.")
            new_updates = jax.tree.map(lambda u, g: u.astype(g.dtype), new_updates, grads)
            return jnp.ones([], jnp.int32), new_updates, inner_state

        # A loop that runs once (finite) or never, not a lax.cond: a while loop's carry is updated
        # in place, so the inner update writes its state and updates over the old state and the
        # gradients as it would unguarded (a cond's outputs cannot alias its operands: +28 GiB of
        # temp for a LLaMA-7B GaLore step; elementwise selects of old and new state: +12 GiB).
        _, new_updates, inner_state = jax.lax.while_loop(
            lambda carry: jnp.logical_and(finite, carry[0] == 0), step,
            (jnp.zeros([], jnp.int32), updates, state.inner_state))
        new_updates = jax.tree.map(lambda u: jnp.where(finite, u, jnp.zeros((), u.dtype)),
                                   new_updates)
        skipped = state.skipped + jnp.where(finite, 0, 1).astype(jnp.int32)
        return new_updates, SkipNonFiniteState(skipped, inner_state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
