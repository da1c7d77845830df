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

from memjax.optim import _checks


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
                     mu_dtype=None, *, bias_correction: bool = True
                     ) -> optax.GradientTransformation:
    r"""Adam direction with the bias correction folded into the step size.

    .. math::
      U_t = c_t \frac{M_t}{\sqrt{V_t} + \epsilon}, \qquad
      c_t = \frac{\sqrt{1 - b_2^t}}{1 - b_1^t}

    Args:
      b1: decay of the first moment.
      b2: decay of the second moment.
      eps: added to ``sqrt(V)`` before the bias correction (code default of GaLore: 1e-6).
      mu_dtype: optional dtype of the first moment; default the update dtype.
      bias_correction: ``False`` leaves out ``c_t`` (``U_t = M_t / (sqrt(V_t) + eps)``), for
        recipes that compute scaling factors from that direction and apply ``c_t`` afterwards
        with :func:`scale_by_hf_bias_correction` (Fira, APOLLO).

    Returns:
      An ``optax.GradientTransformation`` (gradient-only: ``params`` are ignored).

    Example:
      >>> import jax.numpy as jnp, memjax
      >>> tx = memjax.optim.scale_by_hf_adam()
      >>> u, _ = tx.update({"w": jnp.ones(3)}, tx.init({"w": jnp.zeros(3)}))
      >>> bool(jnp.allclose(u["w"], 1.0, atol=1e-4))
      True
    """
    _checks.check_adam(b1, b2, eps)

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
        step = hf_bias_correction(count, b1, b2) if bias_correction else 1.0
        out = jax.tree.map(
            lambda m, v: (step * m.astype(jnp.float32)
                          / (jnp.sqrt(v.astype(jnp.float32)) + eps)).astype(m.dtype),
            mu, nu)
        out = optax.tree.cast_like(out, updates)
        return out, ScaleByHFAdamState(count, optax.tree.cast(mu, mu_dtype),
                                       optax.tree.cast_like(nu, state.nu))

    return optax.GradientTransformation(init_fn, update_fn)


def hf_bias_correction(count: jax.Array, b1, b2) -> jax.Array:
    r"""``c_t = sqrt(1 - b2^t) / (1 - b1^t)`` at step ``t = count`` (counted from 1), float32."""
    t = count.astype(jnp.float32)
    return jnp.sqrt(1.0 - b2**t) / (1.0 - b1**t)


def scale_by_hf_bias_correction(b1: float = 0.9, b2: float = 0.999
                                ) -> optax.GradientTransformation:
    r"""Multiplies every update by the Hugging Face Adam bias correction of its step.

    .. math::
      U_t \leftarrow \frac{\sqrt{1 - b_2^t}}{1 - b_1^t}\, U_t \qquad (t = 1, 2, \dots)

    The second half of :func:`scale_by_hf_adam` with ``bias_correction=False``: Fira and APOLLO
    (arXiv 2410.01623, 2412.05270) scale ``M / (sqrt(V) + eps)`` and apply the correction to
    the full update, as part of the step size.

    Args:
      b1, b2: the Adam decays.

    Returns:
      An ``optax.GradientTransformation`` whose state is ``optax.ScaleByScheduleState``.

    Example:
      >>> import jax.numpy as jnp, memjax
      >>> tx = memjax.optim.scale_by_hf_bias_correction(0.9, 0.999)
      >>> u, _ = tx.update({"w": jnp.ones(2)}, tx.init({"w": jnp.ones(2)}))
      >>> round(float(u["w"][0]), 4)  # sqrt(0.001) / 0.1
      0.3162
    """
    return optax.scale_by_schedule(lambda count: hf_bias_correction(count + 1, b1, b2))
