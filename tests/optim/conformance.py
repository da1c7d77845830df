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
import numpy as np

import memjax

RANK, GAP = 4, 3
STATIC = ("rank", "update_proj_gap", "seed")
STATIC_ARGS = {  # recipes whose static (shape-determining) arguments differ from STATIC
    "frugal_svd": ("density", "update_proj_gap", "seed"),
    "frugal_block": ("density", "update_proj_gap", "seed"),
    "q_galore": STATIC + ("proj_bits", "proj_group_size", "queue_size", "gamma_proj",
                          "block_size", "min_8bit_size"),
}
NORMWISE_RTOL = {"q_galore": 2e-3, "frugal_svd": 1e-5}
"""Transforms checked with a normwise tolerance (relative to each array's largest entry) instead
of an entrywise one, and why:

* ``q_galore``: a 1-ulp change of the input (clipping inside vs outside a jit, eager vs jit) can
  flip one code of the INT4 projector (1/15 of its group's range), which moves a few update
  entries by ~1e-4 of the update's largest entry;
* ``frugal_svd``: the update sums an Adam part and a signSGD part that cancel in some entries, so
  the ~7e-6 relative change of Adam's bias correction computed from an injected float32 ``b2``
  (``inject_hyperparams``) is a large *relative* change of those small entries.
"""


def static_args(name):
    return STATIC_ARGS.get(name, STATIC)

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
    "fira_svd": functools.partial(memjax.optim.fira, rank=RANK, update_proj_gap=GAP,
                                  weight_decay=0.01),
    "apollo_random": functools.partial(memjax.optim.apollo, rank=RANK, update_proj_gap=GAP),
    "apollo_mini": functools.partial(memjax.optim.apollo_mini, update_proj_gap=GAP),
    "frugal_svd": functools.partial(memjax.optim.frugal, density=0.25, update_proj_gap=GAP,
                                    weight_decay=0.01),
    "frugal_block": functools.partial(memjax.optim.frugal, density=0.5, subspace="block",
                                      update_proj_gap=GAP),
    # Small blocks / groups and no float32 fallback, so every state leaf is really quantized.
    "q_galore": functools.partial(memjax.optim.q_galore, rank=RANK, update_proj_gap=GAP,
                                  block_size=32, proj_group_size=32, min_8bit_size=0),
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
    """Gradients for ``params`` at ``step``: matrices with a fixed, widely spaced spectrum.

    A matrix gradient is ``U diag(s) V^T`` with random singular vectors and ``s_i = 2 * 0.7^i``:
    every singular gap is 30 %, so an SVD projector of any rank is well conditioned and a 1-ulp
    input change (clipping inside or outside a jit, another reduction order) moves it by rounding
    only. (With i.i.d. entries neighbouring singular values can lie within a few percent, and the
    projector's last vector then turns by ``eps * sigma_1 / gap``, which Fira's column scale and
    the residual amplify past a 1e-5 comparison.)
    """
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.fold_in(jax.random.key(1), step), len(leaves))

    def grad(k, p):
        g = np.asarray(jax.random.normal(k, p.shape, jnp.float32), np.float64)
        if g.ndim == 2:
            u, _, vt = np.linalg.svd(g, full_matrices=False)
            g = (u * (2.0 * 0.7 ** np.arange(u.shape[1]))) @ vt * np.sqrt(g.size)
        return jnp.asarray(g, jnp.float32).astype(p.dtype)

    return treedef.unflatten([grad(k, p) for k, p in zip(keys, leaves)])
