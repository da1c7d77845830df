"""The conformance suite every memjax transform must pass (optax's ``_common_test`` idea).

Add a factory to ``TRANSFORMS`` and every test in ``test_conformance.py`` runs on it:
jit, chain with clipping, ``inject_hyperparams``, ``MultiSteps``, ``apply_if_finite``,
bfloat16 dtypes, state shapes/dtypes stable across a refresh, and the built-in non-finite skip.
Each factory takes ``learning_rate`` and returns a complete optax transform; ``STATIC`` names the
integer arguments ``inject_hyperparams`` must treat as static.
"""

import functools

import jax
import jax.numpy as jnp

import memjax

RANK, GAP = 4, 3
STATIC = ("rank", "update_proj_gap", "seed")

TRANSFORMS = {
    "galore_svd": functools.partial(memjax.optim.galore, rank=RANK, update_proj_gap=GAP,
                                    weight_decay=0.01),
    "galore_dct": functools.partial(memjax.optim.galore, rank=RANK, update_proj_gap=GAP,
                                    projector="dct"),
    "galore_random": functools.partial(memjax.optim.galore, rank=RANK, update_proj_gap=GAP,
                                       projector="random"),
    "galore_min_state_staggered": functools.partial(
        memjax.optim.galore, rank=RANK, update_proj_gap=GAP, proj_type="min_state",
        refresh="staggered"),
}


def make_params(dtype=jnp.float32):
    """A small tree with matrices of both orientations, a stacked-free bias, an embedding."""
    keys = jax.random.split(jax.random.key(0), 4)
    return {
        "layer": {"w_in": jax.random.normal(keys[0], (24, 16), dtype),
                  "w_out": jax.random.normal(keys[1], (16, 24), dtype)},
        "bias": jax.random.normal(keys[2], (16,), dtype),
        "embed": jax.random.normal(keys[3], (40, 16), dtype),
    }


def make_grads(params, step: int):
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.fold_in(jax.random.key(1), step), len(leaves))

    def grad(k, p):
        # A decaying column spectrum keeps singular gaps open (like real gradients), so SVD
        # projectors are well conditioned and 1-ulp input changes cannot flip the subspace.
        g = jax.random.normal(k, p.shape, jnp.float32)
        decay = jnp.linspace(2.0, 0.1, p.shape[-1]).reshape((1,) * (p.ndim - 1) + (-1,))
        return (g * decay).astype(p.dtype)

    return treedef.unflatten([grad(k, p) for k, p in zip(keys, leaves)])
