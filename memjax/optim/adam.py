"""Adam with the bias correction folded into the step size (the Hugging Face / GaLore convention).

The GaLore, Fira and APOLLO reference implementations use the ``transformers`` AdamW step::

    M <- b1 M + (1 - b1) G
    V <- b2 V + (1 - b2) G^2
    U  = sqrt(1 - b2^t) / (1 - b1^t) * M / (sqrt(V) + eps)

which equals ``M_hat / (sqrt(V_hat) + eps / sqrt(1 - b2^t))``: the effective epsilon is larger in
early steps than in ``optax.scale_by_adam`` (``M_hat / (sqrt(V_hat) + eps)``). With the authors'
``eps = 1e-6`` the two differ by more than 1e-5 relative in the first steps, so memjax's recipes
use this form to port torch configurations 1:1. Any gradient-only optax transform can be used as
the inner optimizer instead.

Reference: Loshchilov & Hutter, "Decoupled Weight Decay Regularization", ICLR 2019; the
``transformers.AdamW`` step as used by Zhao et al., "GaLore", arXiv 2403.03507 (2024).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax


class ScaleByHFAdamState(NamedTuple):
    """State of :func:`scale_by_hf_adam`.

    Attributes:
      count: int32 scalar, number of steps taken.
      mu: first moments, like the updates.
      nu: second moments, like the updates.
    """

    count: jax.Array
    mu: optax.Updates
    nu: optax.Updates


def scale_by_hf_adam(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-6,
                     mu_dtype=None) -> optax.GradientTransformation:
    r"""Adam direction with the bias correction folded into the step size.

    .. math::
      U_t = \frac{\sqrt{1 - b_2^t}}{1 - b_1^t} \frac{M_t}{\sqrt{V_t} + \epsilon}

    Args:
      b1: decay of the first moment.
      b2: decay of the second moment.
      eps: added to ``sqrt(V)`` before the bias correction (code default of GaLore: 1e-6).
      mu_dtype: optional dtype of the first moment; default the update dtype.

    Returns:
      An ``optax.GradientTransformation`` (gradient-only: ``params`` are ignored).

    Example:
      >>> import jax.numpy as jnp, memjax
      >>> tx = memjax.optim.scale_by_hf_adam()
      >>> u, _ = tx.update({"w": jnp.ones(3)}, tx.init({"w": jnp.zeros(3)}))
      >>> bool(jnp.allclose(u["w"], 1.0, atol=1e-4))
      True
    """
    # Hyperparameters may arrive as traced arrays (optax.inject_hyperparams): check numbers only.
    for name, value in (("b1", b1), ("b2", b2)):
        if isinstance(value, (int, float)) and not 0.0 <= value < 1.0:
            raise ValueError(f"{name}={value} must lie in [0, 1).")
    if isinstance(eps, (int, float)) and eps < 0:
        raise ValueError(f"eps={eps} must be >= 0.")

    def init_fn(params):
        return ScaleByHFAdamState(
            count=jnp.zeros([], jnp.int32),
            mu=optax.tree.zeros_like(params, dtype=mu_dtype),
            nu=optax.tree.zeros_like(params),
        )

    def update_fn(updates, state, params=None):
        del params
        mu = optax.tree.update_moment(updates, state.mu, b1, 1)
        nu = optax.tree.update_moment_per_elem_norm(updates, state.nu, b2, 2)
        count = optax.safe_increment(state.count)
        t = count.astype(jnp.float32)
        step = jnp.sqrt(1.0 - b2**t) / (1.0 - b1**t)
        out = jax.tree.map(
            lambda m, v: (step * m.astype(jnp.float32)
                          / (jnp.sqrt(v.astype(jnp.float32)) + eps)).astype(m.dtype),
            mu, nu)
        out = optax.tree.cast_like(out, updates)
        return out, ScaleByHFAdamState(count, optax.tree.cast(mu, mu_dtype),
                                       optax.tree.cast_like(nu, state.nu))

    return optax.GradientTransformation(init_fn, update_fn)
