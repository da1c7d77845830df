"""Every memjax transform in ``conformance.TRANSFORMS`` against optax's composition contracts."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tests.optim.conformance import (GAP, NORMWISE_RTOL, TRANSFORMS, make_grads, make_params,
                                     static_args)
from tests.trees import assert_trees_close

NAMES = sorted(TRANSFORMS)
LR = 1e-2


@functools.lru_cache(maxsize=None)
def _tx(name, lr=LR):
    """One transform object per (name, lr), so its jitted update compiles once per module."""
    return TRANSFORMS[name](lr)


@functools.lru_cache(maxsize=None)
def _jit_update(tx):
    return jax.jit(tx.update)


def _run(tx, params, steps, jit=True, start=0):
    state = tx.init(params)
    update = _jit_update(tx) if jit else tx.update
    for t in range(start, start + steps):
        updates, state = update(make_grads(params, t), state, params)
        params = optax.apply_updates(params, updates)
    return params, state


def _assert_trees_close(a, b, rtol=1e-6, atol=1e-7, name=None):
    if name in NORMWISE_RTOL:
        assert_trees_close(a, b, max(NORMWISE_RTOL[name], rtol), normwise=True)
    else:
        assert_trees_close(a, b, rtol, atol)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_jit_matches_eager(name):
    tx = _tx(name)
    p_jit, _ = _run(tx, make_params(), 2, jit=True)
    p_eager, _ = _run(tx, make_params(), 2, jit=False)  # op-by-op dispatch: keep it short
    _assert_trees_close(p_jit, p_eager, rtol=1e-5, atol=1e-6, name=name)
    moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), p_jit, make_params())
    assert all(v > 0 for v in jax.tree.leaves(moved)), moved


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_chain_with_clipping(name):
    params = make_params()
    tx = optax.chain(optax.clip_by_global_norm(0.5), _tx(name))
    ref = _tx(name)
    s, s_ref = tx.init(params), ref.init(params)
    g = make_grads(params, 0)
    u, _ = jax.jit(tx.update)(g, s, params)
    clip = optax.clip_by_global_norm(0.5)
    clipped, _ = clip.update(g, clip.init(params))
    assert float(optax.tree.norm(clipped)) == pytest.approx(0.5, rel=1e-5)
    u_ref, _ = _jit_update(ref)(clipped, s_ref, params)
    _assert_trees_close(u, u_ref, rtol=1e-5, atol=1e-7, name=name)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_inject_hyperparams(name):
    params = make_params()
    tx = optax.inject_hyperparams(TRANSFORMS[name],
                                  static_args=static_args(name))(learning_rate=LR)
    state = tx.init(params)
    update = jax.jit(tx.update)
    u1, state = update(make_grads(params, 0), state, params)
    u_ref, _ = _jit_update(_tx(name))(make_grads(params, 0), _tx(name).init(params), params)
    _assert_trees_close(u1, u_ref, rtol=1e-5, atol=1e-7, name=name)
    # Changing the injected learning rate acts like building the recipe with that rate
    # (the optimizer state after step 0 does not depend on the learning rate).
    state.hyperparams["learning_rate"] = jnp.asarray(2 * LR)
    u2, _ = update(make_grads(params, 1), state, params)
    plain = _tx(name, 2 * LR)
    _, s_plain = _jit_update(plain)(make_grads(params, 0), plain.init(params), params)
    u2_ref, _ = _jit_update(plain)(make_grads(params, 1), s_plain, params)
    _assert_trees_close(u2, u2_ref, rtol=1e-5, atol=1e-7, name=name)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_multisteps_accumulates(name):
    params = make_params()
    k = 2
    tx = optax.MultiSteps(_tx(name), every_k_schedule=k)
    ref = _tx(name)
    s, s_ref = tx.init(params), ref.init(params)
    g0, g1 = make_grads(params, 0), make_grads(params, 1)
    update = jax.jit(tx.update)
    u, s = update(g0, s, params)
    assert all(float(jnp.abs(x).max()) == 0 for x in jax.tree.leaves(u))
    u, s = update(g1, s, params)
    mean = jax.tree.map(lambda a, b: (a + b) / 2, g0, g1)
    u_ref, _ = _jit_update(ref)(mean, s_ref, params)
    _assert_trees_close(u, u_ref, rtol=1e-5, atol=1e-6, name=name)


@pytest.mark.slow
@pytest.mark.parametrize("wrap", ["apply_if_finite", "builtin"])
@pytest.mark.parametrize("name", NAMES)
def test_nonfinite_gradient_changes_nothing(name, wrap):
    params = make_params()
    tx = _tx(name)
    if wrap == "apply_if_finite":
        tx = optax.apply_if_finite(tx, max_consecutive_errors=3)
    _, state = _run(tx, params, GAP + 1)  # past a refresh, with non-trivial state
    bad = make_grads(params, 7)
    bad["layer"]["w_in"] = bad["layer"]["w_in"].at[0, 0].set(jnp.nan)
    bad["bias"] = bad["bias"].at[1].set(jnp.inf)
    updates, new_state = _jit_update(tx)(bad, state, params)
    new_params = optax.apply_updates(params, updates)
    jax.tree.map(np.testing.assert_array_equal, new_params, params)
    inner = lambda s: s.inner_state if wrap == "apply_if_finite" else s  # noqa: E731
    jax.tree.map(np.testing.assert_array_equal, inner(new_state).inner_state,
                 inner(state).inner_state)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_bfloat16_keeps_dtypes(name):
    params = make_params(jnp.bfloat16)
    tx = _tx(name)
    new_params, state = _run(tx, params, GAP + 1)
    for p in jax.tree.leaves(new_params):
        assert p.dtype == jnp.bfloat16
        assert bool(jnp.all(jnp.isfinite(p)))
    updates, _ = _jit_update(tx)(make_grads(params, 9), state, params)
    assert all(u.dtype == jnp.bfloat16 for u in jax.tree.leaves(updates))


@pytest.mark.parametrize("name", NAMES)
def test_state_structure_stable_across_refresh(name):
    params = make_params()
    tx = _tx(name)
    state = tx.init(params)
    spec = jax.tree.map(lambda x: (x.shape, x.dtype), state)
    update = _jit_update(tx)
    for t in range(2 * GAP + 1):
        _, state = update(make_grads(params, t), state, params)
        assert jax.tree.map(lambda x: (x.shape, x.dtype), state) == spec, f"step {t}"
