"""Tests of memjax.models.linear_attention.LinearAttention.

The parallel (chunkwise) form and the one-token decode step must agree token by token, in float32
to ``rtol=1e-4, atol=1e-5``, for every feature map, with and without decay, for both output heads.
Modules run through ``nnx.split`` / ``nnx.merge`` under ``jax.jit`` (the way a trainer uses them).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from memjax.models.linear_attention import (
    HedgehogFeatureMap,
    LinearAttention,
    LinearAttentionCache,
)

# Shapes are tiny, so compile time dominates: compile at XLA's lowest backend optimisation level.
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0,
                                                   "xla_llvm_disable_expensive_passes": True})
F32 = dict(rtol=1e-4, atol=1e-5)
D_MODEL, HEADS, BATCH, LENGTH = 16, 4, 2, 7


def inputs(seed=0, length=LENGTH):
    """x (BATCH, length, D_MODEL) float32."""
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.standard_normal((BATCH, length, D_MODEL)), jnp.float32)


def make(**kwargs) -> LinearAttention:
    kwargs.setdefault("chunk_size", 3)  # LENGTH = 7: two full chunks and a padded one
    return LinearAttention(D_MODEL, HEADS, rngs=nnx.Rngs(0), **kwargs)


@jit
def _parallel_and_decode(graphdef, state, x):
    """Parallel outputs, and the token-by-token decode outputs and final cache."""
    module = nnx.merge(graphdef, state)

    def body(cache, x_t):
        y_t, cache = module.step(x_t, cache)
        return cache, y_t

    cache, ys = jax.lax.scan(body, module.init_cache(x.shape[0], x.shape[1]),
                             jnp.moveaxis(x, 1, 0))
    return module(x), (jnp.moveaxis(ys, 0, 1), cache)


# A pairwise covering design (the three options act at separate stages: feature map before the
# kernel, decay inside it, output head after it): every feature map with and without decay and with
# both output heads, and every (decay, output) pair. "identity" has no "normalize" head.
CONFIGS = [
    ("elu+1", None, "normalize"), ("elu+1", "lightning", "norm_gate"),
    ("relu", "lightning", "normalize"), ("relu", None, "norm_gate"),
    ("hedgehog", None, "normalize"), ("hedgehog", "lightning", "norm_gate"),
    ("identity", None, "norm_gate"), ("identity", "lightning", "norm_gate"),
]


@pytest.mark.slow
@pytest.mark.parametrize("feature_map, decay, output", CONFIGS)
def test_parallel_equals_decode_step(feature_map, decay, output):
    module = make(feature_map=feature_map, decay=decay, output=output)
    x = inputs()
    y, (y_steps, cache) = _parallel_and_decode(*nnx.split(module), x)
    assert y.shape == x.shape and y.dtype == jnp.float32
    assert isinstance(cache, LinearAttentionCache)
    assert cache.kv.shape == (BATCH, HEADS, module.feature_dim, D_MODEL // HEADS)
    assert (cache.k_sum is None) == (output == "norm_gate")
    np.testing.assert_allclose(y_steps, y, **F32)


def test_prefill_then_decode_continues_the_sequence():
    module = make(feature_map="hedgehog", decay="lightning", output="normalize")
    x = inputs(1)
    graphdef, state = nnx.split(module)

    @jit
    def run(state, x):
        module = nnx.merge(graphdef, state)
        y_prefill, cache = module.prefill(x[:, :4])
        outs = [y_prefill]
        for t in range(4, x.shape[1]):
            y_t, cache = module.step(x[:, t], cache)
            outs.append(y_t[:, None])
        return module(x), jnp.concatenate(outs, axis=1)

    want, got = run(state, x)
    np.testing.assert_allclose(got, want, **F32)


def test_hedgehog_feature_map_is_positive_softmax():
    feature = HedgehogFeatureMap(3, 5, rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(feature.weight[...], np.broadcast_to(np.eye(5), (3, 5, 5)))
    assert feature.weight.get_metadata()["out_sharding"] == ("heads", "kv", None)
    x = 4.0 * jnp.asarray(np.random.default_rng(2).standard_normal((2, 6, 3, 5)), jnp.float32)
    phi = feature(x)
    assert phi.shape == (2, 6, 3, 10)
    assert bool(jnp.all(phi > 0))
    np.testing.assert_allclose(phi[..., :5], jax.nn.softmax(x, axis=-1), rtol=1e-6)
    np.testing.assert_allclose(phi[..., 5:], jax.nn.softmax(-x, axis=-1), rtol=1e-6)
    np.testing.assert_allclose(jnp.sum(phi, axis=-1), 2.0, rtol=1e-6)


def test_gradient_reaches_every_parameter():
    module = make(feature_map="hedgehog", decay="lightning", output="norm_gate")
    graphdef, params = nnx.split(module, nnx.Param)
    x = inputs(3)

    @jit
    def grads(params):
        return jax.grad(lambda p: jnp.sum(jnp.sin(nnx.merge(graphdef, p)(x))))(params)

    flat = nnx.to_flat_state(grads(params))
    names = {"/".join(str(part) for part in path) for path, _ in flat}
    assert names == {"q_proj/kernel", "k_proj/kernel", "v_proj/kernel", "o_proj/kernel",
                     "q_feature/weight", "k_feature/weight", "gate_proj/kernel", "norm_scale"}
    for path, grad in flat:
        assert bool(jnp.all(jnp.isfinite(grad[...]))), path
        assert float(jnp.max(jnp.abs(grad[...]))) > 0.0, path


def test_partitioning_names_and_abstract_construction():
    # Construction is trace-safe (the LM builds its layers under nnx.eval_shape and jax.vmap).
    module = nnx.eval_shape(lambda: make(feature_map="hedgehog", decay="lightning",
                                         output="norm_gate"))
    specs = {"/".join(str(p) for p in path): v.get_metadata()["out_sharding"]
             for path, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}
    assert specs == {
        "q_proj/kernel": ("embed", "heads", "kv"), "k_proj/kernel": ("embed", "heads", "kv"),
        "v_proj/kernel": ("embed", "heads", "kv"), "gate_proj/kernel": ("embed", "heads", "kv"),
        "o_proj/kernel": ("heads", "kv", "embed"), "norm_scale": ("heads", "kv"),
        "q_feature/weight": ("heads", "kv", None), "k_feature/weight": ("heads", "kv", None),
    }


def test_tree_mode():
    """No shared references: the module splits, merges and differentiates in NNX tree mode."""
    with nnx.set_graph_mode(False):
        module = nnx.eval_shape(lambda: make(feature_map="hedgehog", output="norm_gate"))
        graphdef, params = nnx.split(module, nnx.Param)
        x = jax.ShapeDtypeStruct((BATCH, LENGTH, D_MODEL), jnp.float32)
        grads = jax.eval_shape(
            jax.grad(lambda p, x: jnp.sum(nnx.merge(graphdef, p)(x))), params, x)
        assert jax.tree.structure(grads) == jax.tree.structure(params)


def test_bidirectional_sees_the_future_and_refuses_decoding():
    causal, bidirectional = make(), make(causal=False)
    x = inputs(4)
    x_changed_end = x.at[:, -1].add(1.0)
    first = jit(lambda m, x: m(x)[:, 0])
    np.testing.assert_allclose(first(causal, x), first(causal, x_changed_end), **F32)
    assert not np.allclose(first(bidirectional, x), first(bidirectional, x_changed_end))
    with pytest.raises(ValueError, match="causal=True"):
        bidirectional.init_cache(BATCH, LENGTH)


def test_bfloat16_computation():
    module = make(decay="lightning", output="norm_gate", dtype=jnp.bfloat16)
    y = jit(lambda m, x: m(x))(module, inputs(5).astype(jnp.bfloat16))
    assert y.dtype == jnp.bfloat16 and y.shape == (BATCH, LENGTH, D_MODEL)
    assert bool(jnp.all(jnp.isfinite(y.astype(jnp.float32))))


@pytest.mark.parametrize("kwargs, match", [
    (dict(feature_map="softmax"), "feature_map"),
    (dict(output="gate"), "output"),
    (dict(decay="alibi"), "decay"),
    (dict(decay=[0.5, 0.5]), "decay"),
    (dict(decay=[0.5, 0.5, 0.5, 2.0]), "decay"),
    (dict(feature_map="identity", output="normalize"), "non-negative"),
    (dict(chunk_size=0), "chunk_size"),
])
def test_bad_configuration_raises_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make(**kwargs)
    with pytest.raises(ValueError, match="divisible"):
        LinearAttention(10, 4, rngs=nnx.Rngs(0))
