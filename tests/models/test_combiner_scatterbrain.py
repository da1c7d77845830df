"""CombinerAttention and ScatterbrainAttention NNX modules: shapes, causality, gradients to every
trainable parameter, deterministic non-trainable random features, partitioning names, functional
(split / merge) use under jit, constructor checks."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from memjax.models.combiner import CombinerAttention
from memjax.models.scatterbrain import RandomFeatures, ScatterbrainAttention

D_MODEL, HEADS, LENGTH = 16, 2, 11

FACTORIES = {
    "combiner_axial": lambda causal, seed: CombinerAttention(
        D_MODEL, HEADS, mode="axial", causal=causal, rngs=nnx.Rngs(seed)
    ),
    "combiner_fixed": lambda causal, seed: CombinerAttention(
        D_MODEL, HEADS, mode="fixed", block_size=3, causal=causal, rngs=nnx.Rngs(seed)
    ),
    "scatterbrain": lambda causal, seed: ScatterbrainAttention(
        D_MODEL, HEADS, num_features=8, window=3, lsh_buckets=4, causal=causal, rngs=nnx.Rngs(seed)
    ),
}


NAMES = sorted(FACTORIES)
FUTURE_AFTER = 5  # the causality check redraws the inputs at positions > 5


@functools.cache
def _model(name: str, causal: bool = True, seed: int = 0):
    """One module per configuration, shared by the tests (none of them mutates it)."""
    return FACTORIES[name](causal, seed)


def _x(seed: int = 0, batch: int = 2, length: int = LENGTH) -> jax.Array:
    """Inputs of unit scale; numpy draws (no compilation)."""
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.standard_normal((batch, length, D_MODEL), dtype=np.float32))


def _run_all(states, x, x_future, x_last, *, graphdefs):
    """Functional NNX (split once, merge inside jit) for every module.

    Causal modules: y = f(x), f(x_future) and the gradient of mean((y - x)^2) w.r.t. the
    ``nnx.Param`` s; bidirectional modules: f(x) and f(x_last).
    """
    results = {}
    for key, (params, rest) in states.items():

        def apply(params, inputs, key=key, rest=rest):
            return nnx.merge(graphdefs[key], params, rest)(inputs)

        def loss(params, key=key, rest=rest):
            y = apply(params, x, key, rest)
            return jnp.mean(jnp.square(y - x)), y

        if key.endswith("/causal"):
            (_, y), grads = jax.value_and_grad(loss, has_aux=True)(params)
            results[key] = dict(y=y, y_future=apply(params, x_future), grads=grads)
        else:
            results[key] = dict(y=apply(params, x), y_last=apply(params, x_last))
    return results


@functools.cache
def _results():
    """Everything the shape / causality / gradient tests need, in one compilation (the shapes are
    tiny and compile time dominates, so also without LLVM optimisation)."""
    graphdefs, states = {}, {}
    for name in NAMES:
        for causal in (True, False):
            key = f"{name}/{'causal' if causal else 'bidirectional'}"
            graphdef, params, rest = nnx.split(_model(name, causal), nnx.Param, ...)
            graphdefs[key], states[key] = graphdef, (params, rest)
    x = _x()
    later = (np.arange(LENGTH) > FUTURE_AFTER)[None, :, None]
    x_future = jnp.where(later, _x(1), x)
    x_last = x.at[:, -1].set(0.0)
    no_llvm_opt = {"xla_backend_optimization_level": 0}
    run = jax.jit(functools.partial(_run_all, graphdefs=graphdefs), compiler_options=no_llvm_opt)
    return x, run(states, x, x_future, x_last)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_shapes_and_causality(name):
    x, results = _results()
    y, y_future = results[f"{name}/causal"]["y"], results[f"{name}/causal"]["y_future"]
    assert y.shape == x.shape and y.dtype == x.dtype
    assert bool(np.isfinite(y).all())
    t = FUTURE_AFTER  # the future moved: outputs up to t must not
    np.testing.assert_allclose(y_future[:, : t + 1], y[:, : t + 1], rtol=1e-5, atol=1e-6)
    assert not np.allclose(y_future[:, t + 1 :], y[:, t + 1 :])


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_bidirectional_sees_the_future(name):
    _, results = _results()
    y, y_last = results[f"{name}/bidirectional"]["y"], results[f"{name}/bidirectional"]["y_last"]
    assert y.shape == (2, LENGTH, D_MODEL)
    assert not np.allclose(y[:, 0], y_last[:, 0])


@pytest.mark.parametrize("name", NAMES)
def test_gradient_reaches_every_parameter(name):
    grads = _results()[1][f"{name}/causal"]["grads"]
    assert set(grads.keys()) == {"q_proj", "k_proj", "v_proj", "o_proj"}  # random features excluded
    for key in grads.keys():
        assert float(jnp.linalg.norm(grads[key].get_value())) > 0, f"no gradient reaches {key}"


@pytest.mark.parametrize("name", NAMES)
def test_parameters_carry_logical_axis_names(name):
    specs = nnx.get_partition_spec(nnx.state(_model(name), nnx.Param))
    for proj in ("q_proj", "k_proj", "v_proj"):
        assert tuple(specs[proj].get_value()) == ("embed", "heads", "kv")
    assert tuple(specs["o_proj"].get_value()) == ("heads", "kv", "embed")


def test_random_features_are_deterministic_and_not_trainable():
    a, b, c = _model("scatterbrain"), FACTORIES["scatterbrain"](True, 0), _model("scatterbrain", True, 1)
    features = [nnx.state(m, RandomFeatures) for m in (a, b, c)]
    assert set(features[0].keys()) == {"projection", "rotations"}
    assert features[0]["projection"].get_value().shape == (8, D_MODEL // HEADS)
    for key in ("projection", "rotations"):
        np.testing.assert_array_equal(features[0][key].get_value(), features[1][key].get_value())
        assert not np.array_equal(features[0][key].get_value(), features[2][key].get_value())
    assert "projection" not in nnx.state(a, nnx.Param)
    no_lsh = ScatterbrainAttention(D_MODEL, HEADS, num_features=8, window=3, rngs=nnx.Rngs(0))
    assert set(nnx.state(no_lsh, RandomFeatures).keys()) == {"projection"}


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: CombinerAttention(10, 3, rngs=nnx.Rngs(0)), "num_heads"),
        (lambda: CombinerAttention(8, 2, mode="dense", rngs=nnx.Rngs(0)), "mode"),
        (lambda: CombinerAttention(8, 2, block_size=0, rngs=nnx.Rngs(0)), "block_size"),
        (lambda: ScatterbrainAttention(10, 3, rngs=nnx.Rngs(0)), "num_heads"),
        (lambda: ScatterbrainAttention(8, 2, window=0, rngs=nnx.Rngs(0)), "window"),
        (lambda: ScatterbrainAttention(8, 2, num_features=0, rngs=nnx.Rngs(0)), "num_features"),
        (lambda: ScatterbrainAttention(8, 2, lsh_buckets=3, rngs=nnx.Rngs(0)), "lsh_buckets"),
    ],
)
def test_bad_constructor_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()
