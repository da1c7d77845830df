"""INT8 weights with stochastic rounding (memjax.optim.quantized_weights) against NumPy models."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import memjax
from memjax.optim import quantized_weights as qw
from tests.optim import numpy_reference as ref


@pytest.mark.slow
def test_stochastic_round_is_unbiased_with_bounded_variance():
    """Values across the grid: the mean over 20000 draws is within 0.02 steps of y (about 7
    standard errors of the mean, sd <= 0.5 / sqrt(20000) = 0.0035), the variance is f (1 - f)
    <= 1/4 step^2 (within 0.02), and nearest rounding is round(y)."""
    y = jnp.linspace(-3.0, 3.0, 61) + jnp.array(0.37)
    noise = jax.random.uniform(jax.random.key(0), (20000, y.size))
    r = jax.vmap(lambda u: qw.stochastic_round(y, u))(noise)
    frac = y - jnp.floor(y)
    assert set(np.unique(np.asarray(r - jnp.floor(y)[None]))) <= {0.0, 1.0}
    np.testing.assert_allclose(r.mean(0), y, atol=0.02)
    np.testing.assert_allclose(r.var(0), frac * (1 - frac), atol=0.02)
    assert float(r.var(0).max()) <= 0.25 + 0.02
    # through the weight format: E[dequantize(requantize(x))] = x for every entry
    # (except a group's minimum and maximum, whose codes the zero point's rounding can push past
    # 0 or 255, where they are clipped: the authors' quantizer, biased there by < 1/2 step)
    x = jax.random.normal(jax.random.key(1), (8, 32)) * 0.02
    q = qw.quantize(x, qw.WeightFormat(group_size=64), key=jax.random.key(2))
    keys = jax.random.split(jax.random.key(3), 4000)
    deq = jax.vmap(lambda k: qw.dequantize(qw.requantize(
        dataclasses.replace(q, key=jax.random.key_data(k)), x)))(keys)
    step = float(q.scale.max())
    groups = np.asarray(x).reshape(4, 64)
    inner = ((groups > groups.min(1, keepdims=True))
             & (groups < groups.max(1, keepdims=True))).reshape(x.shape)
    np.testing.assert_allclose(np.asarray(deq.mean(0))[inner], np.asarray(x)[inner],
                               atol=0.03 * step)
    assert float(jnp.abs(deq - x[None]).max()) <= step * 1.001
    near = qw.requantize(dataclasses.replace(q, rounding="nearest"), x)
    assert float(jnp.abs(qw.dequantize(near) - x).max()) <= 0.5 * step * 1.001


@pytest.mark.slow
@pytest.mark.parametrize("group", [128, 256])
def test_quantize_matches_the_authors_quantizer(group):
    """Codes, scales and zero points equal the NumPy model (round to nearest); the dequantised
    weight is within half a step of the float one; stacked weights have per-layer groups/keys."""
    x = np.asarray(jax.random.normal(jax.random.key(0), (3, 64, 96)) * 0.02)
    q = qw.quantize(jnp.asarray(x), qw.WeightFormat(group_size=group), key=jax.random.key(1),
                    lead_axes=1)
    assert q.codes.dtype == jnp.uint8 and q.codes.shape == x.shape
    assert q.scale.shape == (3, 64 * 96 // group) and q.key.shape == (3, 2)
    assert q.group_size == group
    for layer in range(3):
        codes, scale, zero = ref.quantize_int8_weight(x[layer], group)
        np.testing.assert_array_equal(q.codes[layer], codes)
        np.testing.assert_array_equal(q.scale[layer], scale)
        np.testing.assert_array_equal(q.zero[layer], zero)
    deq = np.asarray(qw.dequantize(q))
    err = np.abs(deq - x).reshape(3, -1, group).max(-1)
    assert np.all(err <= np.asarray(q.scale) * 0.5 * 1.0001)
    assert len({tuple(k) for k in np.asarray(q.key)}) == 3  # one key chain per layer
    one = jax.tree.map(lambda a: a[1], q)  # a layer's slice is a weight of its own
    np.testing.assert_array_equal(qw.dequantize(one), deq[1])


@pytest.mark.slow
def test_one_q_galore_step_with_int8_weights_matches_numpy():
    """One Q-GaLore step (INT4 SVD projector, 8-bit Adam, scale, lr) on INT8 weights, then
    re-quantisation with stochastic rounding from the same uniforms: the NumPy model gives the
    same dequantised weights to rtol 1e-6. The projector is read from memjax's state (its INT4
    codes are checked against an SVD in test_quantization.py)."""
    m, n, rank, lr, scale, group, block = 64, 32, 4, 0.05, 0.25, 128, 64
    w0 = np.asarray(jax.random.normal(jax.random.key(0), (m, n)) * 0.02)
    params = memjax.optim.quantize_weights({"w": jnp.asarray(w0), "b": jnp.zeros(n)},
                                           qw.WeightFormat(group_size=group), seed=3)
    g = np.asarray(jax.random.normal(jax.random.key(1), (m, n)), np.float32)
    grads = {"w": jnp.asarray(g), "b": jnp.ones(n)}
    tx = memjax.optim.q_galore(lr, rank=rank, scale=scale, block_size=block, proj_group_size=64,
                               min_8bit_size=0)
    state = tx.init(params)
    updates, new_state = tx.update(grads, state, params)
    new = memjax.optim.apply_updates(params, updates)

    q = jax.tree.map(np.asarray, params["w"])
    w = ref.dequantize_int8_weight(q.codes, q.scale, q.zero, group)
    low_rank = lambda s: s.inner_state[0]  # noqa: E731 (skip_nonfinite, chain: low rank first)
    ps = low_rank(new_state).projector["w"]
    p = ref.dequantize_minmax(ref.unpack_int4(np.asarray(ps.codes), rank * n),
                              np.asarray(ps.scale), np.asarray(ps.minimum), (rank, n), 64)
    adam = low_rank(state).inner_state
    args = [np.asarray(f["w"]) for f in (adam.mu, adam.mu_absmax, adam.nu, adam.nu_absmax)]
    o, _, _ = ref.adam_8bit_step(g @ p.T, *args, 1, block, "dynamic")
    w_new = w + (-lr * scale * (o @ p)).astype(np.float32)
    noise = np.asarray(qw.rounding_noise(q.key, (m, n)))
    want = ref.dequantize_int8_weight(*ref.quantize_int8_weight(w_new, group, noise), group)
    got = np.asarray(qw.dequantize(new["w"]))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9)
    assert not np.array_equal(np.asarray(new["w"].key), q.key)  # the key chain moved on
    np.testing.assert_allclose(new["b"], params["b"] + updates["b"])


def test_nearest_rounding_stalls_where_stochastic_rounding_learns():
    """SGD on ||W - T||^2 / 2 with every update below half a quantisation step: round-to-nearest
    re-quantisation gives back the same codes (no progress), stochastic rounding moves the
    weights towards T on average (Q-GaLore's reason for SR)."""
    fmt = qw.WeightFormat(group_size=128)
    w0 = jax.random.normal(jax.random.key(0), (16, 64)) * 0.02
    target = w0 + 0.3 * float(jnp.std(w0)) * jnp.sign(jax.random.normal(jax.random.key(1),
                                                                          w0.shape))
    tx = optax.sgd(0.01)

    def run(rounding):
        params = qw.quantize(w0, qw.WeightFormat(group_size=128, rounding=rounding),
                             key=jax.random.key(2))
        state = tx.init(qw.dequantize(params))

        def body(carry, _):
            p, s = carry
            w = qw.dequantize(p)
            u, s = tx.update(w - target, s, w)
            return (qw.apply_update(p, u), s), jnp.max(jnp.abs(u))
        (p, _), largest = jax.lax.scan(body, (params, state), None, length=200)
        return p, largest

    start = float(jnp.linalg.norm(qw.dequantize(qw.quantize(w0, fmt, key=jax.random.key(2)))
                                  - target))
    p_near, largest = run("nearest")
    step = float(qw.quantize(w0, fmt, key=jax.random.key(2)).scale.min())
    assert float(largest.max()) < 0.5 * step  # every update is below half a step
    p_sr, _ = run("stochastic")
    near = float(jnp.linalg.norm(qw.dequantize(p_near) - target))
    sr = float(jnp.linalg.norm(qw.dequantize(p_sr) - target))
    assert near > 0.95 * start  # stalled
    assert sr < 0.6 * start  # learned


def test_bad_input_raises():
    with pytest.raises(ValueError, match="bits=4"):
        qw.WeightFormat(bits=4)
    with pytest.raises(ValueError, match="rounding"):
        qw.WeightFormat(rounding="up")
    with pytest.raises(ValueError, match="group_size=100 must divide"):
        qw.quantize(jnp.zeros((64, 48)), qw.WeightFormat(group_size=100), key=jax.random.key(0))
    with pytest.raises(ValueError, match="matrices"):
        memjax.optim.quantize_weights({"b": jnp.zeros((2, 64))}, lead_axes=1,
                                      where=lambda path, x: True)
    from memjax.models.lm import lm_preset
    with pytest.raises(ValueError, match="bits=4"):
        lm_preset("tiny", weight_bits=4)
    with pytest.raises(ValueError, match="attention mixer"):
        lm_preset("tiny", mixer="mamba", weight_bits=8, weight_group_size=64)
    with pytest.raises(ValueError, match="weight_group_size=96 must divide"):
        lm_preset("tiny", weight_bits=8, weight_group_size=96)


@pytest.mark.slow
def test_every_recipe_runs_on_the_float_view():
    """A recipe given INT8 weights initialises and updates on their dequantised values: the
    same state and updates as on the float tree itself."""
    params = memjax.optim.quantize_weights(
        {"w": jax.random.normal(jax.random.key(0), (64, 32)), "b": jnp.ones(32)},
        qw.WeightFormat(group_size=64))
    view = memjax.optim.dequantize_weights(params)
    grads = jax.tree.map(lambda x: jnp.cos(x * 3.0), view)
    for tx in (memjax.optim.galore(1e-2, rank=4), memjax.optim.apollo_mini(1e-2),
               memjax.optim.on_float_view(optax.adamw(1e-2, weight_decay=0.1))):
        u_q, s_q = tx.update(grads, tx.init(params), params)
        u_f, s_f = tx.update(grads, tx.init(view), view)
        jax.tree.map(np.testing.assert_array_equal, (u_q, s_q), (u_f, s_f))


@pytest.mark.slow
def test_readme_example_runs():
    """The README's INT8 example runs as written: the weight stays INT8 and moves."""
    from tests.readme import run_block

    w = run_block("memjax.optim.quantize_weights(")["params"]["w"]
    assert qw.is_quantized(w) and w.codes.dtype == jnp.uint8 and w.group_size == 256
    before = memjax.optim.quantize_weights(
        {"w": jax.random.normal(jax.random.key(0), (256, 128)) * 0.02},
        qw.WeightFormat(group_size=256))["w"]
    assert not np.array_equal(np.asarray(w.codes), np.asarray(before.codes))


@pytest.mark.slow
def test_one_sided_groups_nonfinite_updates_and_misuse():
    """A group on one side of zero keeps half-step accuracy (0 is in its range); a non-finite
    update gives a non-finite weight (not a clipped code); a plain optax state built on INT8
    weights, MeZO on them and describe() get clear answers."""
    x = jnp.linspace(1.0, 2.0, 256).reshape(4, 64)  # every group positive
    q = qw.quantize(x, qw.WeightFormat(group_size=64), key=jax.random.key(0))
    assert float(jnp.abs(qw.dequantize(q) - x).max()) <= 0.5 * float(q.scale.max()) * 1.0001
    bad = qw.apply_update(q, jnp.zeros_like(x).at[1, 3].set(jnp.nan))
    deq = np.asarray(qw.dequantize(bad))
    assert np.isnan(deq[1, 3]) and np.isfinite(np.delete(deq, 1, axis=0)).all()

    params = memjax.optim.quantize_weights({"w": jnp.ones((64, 32)) * jnp.arange(32.0)[None]},
                                           qw.WeightFormat(group_size=64))
    loss = lambda p, batch: jnp.sum(p["w"] ** 2)  # noqa: E731
    plain = optax.adam(1e-3)
    step = memjax.training.gradient_step(loss, plain)
    with pytest.raises(TypeError, match="on_float_view"):
        jax.eval_shape(step, params, plain.init(params), jnp.zeros((1, 1)))
    wrapped = memjax.optim.on_float_view(plain)
    jax.eval_shape(step, params, wrapped.init(params), jnp.zeros((1, 1)))  # the fix works
    with pytest.raises(ValueError, match="mezo: the parameters hold INT8 weights"):
        memjax.optim.mezo(1e-3).init(params)
    text = str(memjax.optim.describe(memjax.optim.galore(1e-3, rank=4), params))
    assert "projected" in text
