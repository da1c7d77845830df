"""Tests of memjax.models.mamba: parallel form vs token-by-token decode, initialisation, gradients, and
the bidirectional / 2-D vision wrappers. Float32 tolerances: rtol 1e-4, atol 1e-5."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from memjax.models.mamba import BidirectionalMamba, Mamba, MambaCache, ResidualVisionMamba

F32_TOL = dict(rtol=1e-4, atol=1e-5)
D_MODEL, D_STATE, BATCH = 8, 4, 2
SMALL = dict(d_state=D_STATE, chunk_size=4)


def inputs(*shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


@nnx.jit
def forward(model, x):
    return model(x)


@nnx.jit
def prefill(model, x, cache):
    return model.prefill(x, cache)


@nnx.jit
def step(model, x, cache):
    return model.step(x, cache)


@pytest.mark.slow
def test_parallel_form_equals_token_by_token_decode():
    model = Mamba(D_MODEL, **SMALL, rngs=nnx.Rngs(0))
    length = 7
    x = inputs(BATCH, length, D_MODEL)
    y = forward(model, x)
    assert y.shape == (BATCH, length, D_MODEL)

    cache = model.init_cache(BATCH, max_length=length)
    assert cache.conv_state.shape == (BATCH, 2 * D_MODEL, 4)
    assert cache.ssm_state.shape == (BATCH, 2 * D_MODEL, D_STATE)
    ys = []
    for t in range(length):
        y_t, cache = step(model, x[:, t], cache)
        ys.append(y_t)
    np.testing.assert_allclose(jnp.stack(ys, axis=1), y, **F32_TOL)

    # A prompt through the parallel form, then decoding, gives the same tokens and the same cache.
    y_prompt, cache_prompt = prefill(model, x[:, :4], model.init_cache(BATCH, length))
    np.testing.assert_allclose(y_prompt, y[:, :4], **F32_TOL)
    for t in range(4, length):
        y_t, cache_prompt = step(model, x[:, t], cache_prompt)
        np.testing.assert_allclose(y_t, y[:, t], **F32_TOL)
    for a, b in zip(cache_prompt, cache, strict=True):
        np.testing.assert_allclose(a, b, **F32_TOL)


def test_cache_dtypes_are_kept_by_step():
    model = Mamba(D_MODEL, **SMALL, rngs=nnx.Rngs(0))
    cache = model.init_cache(BATCH, 16, dtype=jnp.bfloat16)
    assert isinstance(cache, MambaCache)
    assert cache.conv_state.dtype == jnp.bfloat16 and cache.ssm_state.dtype == jnp.float32
    _, new_cache = step(model, inputs(BATCH, D_MODEL), cache)
    assert jax.tree.map(lambda a: (a.shape, a.dtype), new_cache) == jax.tree.map(
        lambda a: (a.shape, a.dtype), cache
    )


@pytest.mark.slow
def test_gradient_reaches_every_parameter():
    model = Mamba(D_MODEL, **SMALL, bias=True, rngs=nnx.Rngs(1))
    x = inputs(BATCH, 9, D_MODEL, seed=1)

    @nnx.jit
    def grads(model, x):
        return nnx.grad(lambda m: jnp.sum(jnp.sin(m(x))))(model)

    g = nnx.state(grads(model, x), nnx.Param)
    flat = jax.tree_util.tree_leaves_with_path(g)
    assert len(flat) == 11  # in/out proj kernel+bias, conv weight+bias, x_proj, dt_proj, dt_bias, A_log, D
    for path, leaf in flat:
        assert bool(jnp.all(jnp.isfinite(leaf))), path
        assert float(jnp.max(jnp.abs(leaf))) > 0.0, path


def test_initialisation_follows_the_authors():
    dt_min, dt_max = 1e-3, 0.1
    model = Mamba(D_MODEL, **SMALL, dt_min=dt_min, dt_max=dt_max, rngs=nnx.Rngs(2))
    d_inner, dt_rank = 2 * D_MODEL, 1
    expected_a_log = np.log(np.broadcast_to(np.arange(1, D_STATE + 1, dtype=np.float32), (d_inner, D_STATE)))
    np.testing.assert_allclose(model.A_log[...], expected_a_log, rtol=1e-6)
    np.testing.assert_array_equal(model.D[...], np.ones(d_inner))
    dt = jax.nn.softplus(model.dt_bias[...])
    assert dt.shape == (d_inner,)
    assert float(dt.min()) >= dt_min * (1 - 1e-4) and float(dt.max()) <= dt_max * (1 + 1e-4)
    assert float(jnp.std(jnp.log(dt))) > 0.5  # spread over the log-range, not a constant
    assert float(jnp.max(jnp.abs(model.dt_proj.kernel[...]))) <= dt_rank**-0.5
    assert float(jnp.max(jnp.abs(model.conv_weight[...]))) <= 0.5  # U(+-1/sqrt(d_conv)), d_conv = 4

    floor_model = Mamba(D_MODEL, **SMALL, dt_min=1e-6, dt_max=2e-6, dt_init_floor=1e-4, rngs=nnx.Rngs(0))
    np.testing.assert_allclose(jax.nn.softplus(floor_model.dt_bias[...]), 1e-4, rtol=1e-3)

    # dt_rank = ceil(d_model / 16) and the projection shapes, checked abstractly (no computation).
    big = nnx.eval_shape(lambda: Mamba(40, d_state=16, rngs=nnx.Rngs(0)))
    assert big.dt_rank == math.ceil(40 / 16) == 3
    assert big.dt_proj.kernel.shape == (3, 80)
    assert big.x_proj.kernel.shape == (80, 3 + 2 * 16)
    assert big.A_log.shape == (80, 16) and big.conv_weight.shape == (4, 80)


def test_parameters_carry_logical_axis_names():
    model = Mamba(D_MODEL, **SMALL, rngs=nnx.Rngs(0))
    specs = nnx.get_partition_spec(nnx.state(model, nnx.Param))
    assert tuple(specs["in_proj"]["kernel"].get_value()) == ("embed", "mlp")
    assert tuple(specs["out_proj"]["kernel"].get_value()) == ("mlp", "embed")
    assert tuple(specs["A_log"].get_value()) == ("mlp", "state")


def test_bad_constructor_arguments_raise():
    with pytest.raises(ValueError, match="dt_rank"):
        Mamba(D_MODEL, dt_rank=0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="dt_min"):
        Mamba(D_MODEL, dt_min=0.2, dt_max=0.1, rngs=nnx.Rngs(0))


def _n_params(module):
    return sum(leaf.size for leaf in jax.tree.leaves(nnx.state(module, nnx.Param)))


def test_bidirectional_mamba_sees_both_directions():
    model = BidirectionalMamba(D_MODEL, **SMALL, rngs=nnx.Rngs(3))
    shared = BidirectionalMamba(D_MODEL, **SMALL, shared_weights=True, rngs=nnx.Rngs(3))
    assert _n_params(model) == 2 * _n_params(shared)
    x = inputs(BATCH, 6, D_MODEL, seed=3)
    y = forward(model, x)
    assert y.shape == x.shape
    y_last = forward(model, x.at[:, -1].add(1.0))
    y_first = forward(model, x.at[:, 0].add(1.0))
    assert float(jnp.max(jnp.abs(y_last[:, 0] - y[:, 0]))) > 1e-4  # future -> past: the backward scan
    assert float(jnp.max(jnp.abs(y_first[:, -1] - y[:, -1]))) > 1e-4  # past -> future: the forward scan


def test_residual_vision_mamba():
    layer = ResidualVisionMamba(D_MODEL, **SMALL, rngs=nnx.Rngs(4))
    x = inputs(BATCH, 3, 5, D_MODEL, seed=4)
    y = forward(layer, x)
    assert y.shape == x.shape
    assert float(jnp.max(jnp.abs(y - x))) > 1e-3
    # Both scan directions reach across the whole image (the bump is not constant over channels, which
    # the LayerNorm would remove).
    bump = inputs(D_MODEL, seed=5)[None]
    y_corner = forward(layer, x.at[:, -1, -1].add(bump))
    assert float(jnp.max(jnp.abs(y_corner[:, 0, 0] - y[:, 0, 0]))) > 1e-4
    y_origin = forward(layer, x.at[:, 0, 0].add(bump))
    assert float(jnp.max(jnp.abs(y_origin[:, -1, -1] - y[:, -1, -1]))) > 1e-4
    # Tree mode: split without graph semantics and merge back.
    graphdef, state = nnx.split(layer, graph=False)
    np.testing.assert_allclose(forward(nnx.merge(graphdef, state), x), y, **F32_TOL)
    # scale = 0 is the identity.
    layer.scale[...] = jnp.zeros_like(layer.scale[...])
    np.testing.assert_array_equal(forward(layer, x), x)
