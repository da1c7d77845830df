"""MeZO on a Flax NNX model: the helper takes exactly the pure-pytree MeZO steps."""

import doctest
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import memjax


class _MLP(nnx.Module):
    def __init__(self, rngs):
        self.up = nnx.Linear(6, 16, rngs=rngs)
        self.norm = nnx.LayerNorm(16, rngs=rngs)
        self.down = nnx.Linear(16, 1, rngs=rngs)

    def __call__(self, x):
        return self.down(jax.nn.gelu(self.norm(self.up(x))))


def _loss(model, batch):
    x, y = batch
    return jnp.mean((model(x) - y) ** 2)


@pytest.mark.slow
def test_nnx_steps_equal_the_pytree_steps_and_leave_the_model_alone():
    model = _MLP(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (32, 6))
    batch = (x, jnp.sin(x).sum(-1, keepdims=True))
    tx = memjax.optim.mezo(1e-2, eps=1e-3, n=2, weight_decay=0.1)
    before = jax.tree.map(np.array, nnx.state(model, nnx.Param))

    zo = memjax.training.nnx_zeroth_order(model, _loss, tx)
    params, state = zo.params, zo.opt_state
    # the same steps written by hand on a pytree: split, merge inside the loss, tx.step
    graphdef, ref, rest = nnx.split(model, nnx.Param, ...)
    ref = jax.tree.map(jnp.copy, ref)
    ref_state = tx.init(ref)
    ref_loss = lambda p, b: _loss(nnx.merge(graphdef, p, rest), b)  # noqa: E731
    ref_step = jax.jit(lambda p, s, b: tx.step(ref_loss, p, s, b))
    losses = []
    for _ in range(5):
        params, state, info = zo.step(params, state, batch)
        ref, ref_state, ref_info = ref_step(ref, ref_state, batch)
        assert float(info.loss) == float(ref_info.loss)
        losses.append(float(info.loss))
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert int(state.count) == 5 and not np.allclose(
        np.asarray(params["up"]["kernel"][...]), before["up"]["kernel"][...])
    # the model keeps its own (undonated) parameters; merge builds the trained one
    for a, b in zip(jax.tree.leaves(nnx.state(model, nnx.Param)), jax.tree.leaves(before)):
        np.testing.assert_array_equal(np.asarray(a), b)
    trained = zo.merge(params)
    np.testing.assert_array_equal(np.asarray(trained.up.kernel[...]),
                                  np.asarray(params["up"]["kernel"][...]))
    assert float(_loss(trained, batch)) == pytest.approx(
        float(ref_loss(ref, batch)), rel=0, abs=0)


def test_bad_arguments_name_the_fix():
    model = _MLP(nnx.Rngs(0))
    with pytest.raises(TypeError, match="use nnx.Optimizer"):
        memjax.training.nnx_zeroth_order(model, _loss, optax.adam(1e-3))
    with pytest.raises(TypeError, match="nnx.Module"):
        memjax.training.nnx_zeroth_order({"w": jnp.ones(3)}, _loss, memjax.optim.mezo(1e-3))


@pytest.mark.slow
def test_docstring_example_runs():
    module = importlib.import_module("memjax.training.zeroth_order_nnx")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted and result.failed == 0


@pytest.mark.slow
def test_readme_example_runs():
    from tests.readme import run_block

    ns = run_block("memjax.training.nnx_zeroth_order(model")
    assert isinstance(ns["model"], nnx.Module) and int(ns["opt_state"].count) == 10
    assert np.isfinite(float(ns["info"].loss))
    kernel = ns["model"].layers[0].kernel[...]
    np.testing.assert_array_equal(np.asarray(kernel),
                                  np.asarray(ns["params"]["layers"][0]["kernel"][...]))
