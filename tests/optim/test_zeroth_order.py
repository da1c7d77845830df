"""MeZO / SPSA (memjax.optim.zeroth_order) against a naive NumPy MeZO loop and the SPSA identities.

The NumPy reference follows Malladi et al. 2023, Algorithm 1 literally (perturb in place, evaluate,
perturb back, update); it takes ``z`` from :func:`zeroth_order.sample_noise` so both sides use the
same directions, and everything else (loss, perturbation, update) is re-implemented in float64.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memjax.optim import zeroth_order as zo

D_IN, D_OUT = 6, 5


def _problem(seed=0):
    rng = np.random.default_rng(seed)
    params = {"w": jnp.asarray(rng.normal(size=(2, D_IN, D_OUT)), jnp.float32),
              "bias": jnp.asarray(rng.normal(size=(D_OUT,)), jnp.float32)}
    x = jnp.asarray(rng.normal(size=(16, D_IN)), jnp.float32)
    y = jnp.asarray(rng.normal(size=(16, D_OUT)), jnp.float32)
    return params, (x, y)


def _loss(params, batch):
    x, y = batch
    pred = x @ params["w"][0] + params["bias"][None] + 0.1 * jnp.tanh(x @ params["w"][1])
    return jnp.mean((pred - y) ** 2)


def _np_loss(params, batch):
    x, y = (np.asarray(a, np.float64) for a in batch)
    pred = x @ params["w"][0] + params["bias"] + 0.1 * np.tanh(x @ params["w"][1])
    return np.mean((pred - y) ** 2)


STACKED = {"w": 1, "bias": 0}


def _z(params, key):
    keys = zo.noise_keys(params, key, STACKED)
    return {k: np.asarray(zo.sample_noise(keys[k], params[k].shape), np.float64) for k in params}


def _numpy_mezo(params, batch, state_key, steps, lr, eps, n, wd):
    """Malladi et al. 2023, Algorithm 1 (n-SPSA, weight decay on matrices only), in float64."""
    theta = {k: np.asarray(v, np.float64) for k, v in params.items()}
    for t in range(steps):
        step_key = jax.random.fold_in(state_key, t)
        direction = {k: np.zeros_like(v) for k, v in theta.items()}
        for j in range(n):
            z = _z(params, zo.sample_key(step_key, j))
            for k in theta:
                theta[k] += eps * z[k]
            plus = _np_loss(theta, batch)
            for k in theta:
                theta[k] -= 2 * eps * z[k]
            minus = _np_loss(theta, batch)
            for k in theta:
                theta[k] += eps * z[k]
            g = (plus - minus) / (2 * eps)
            for k in theta:
                direction[k] += g * z[k] / n
        theta["w"] -= lr * (direction["w"] + wd * theta["w"])
        theta["bias"] -= lr * direction["bias"]
    return theta


@pytest.mark.slow
@pytest.mark.parametrize("n", [1, 3])
def test_mezo_matches_numpy_algorithm(n):
    params, batch = _problem()
    opt = zo.mezo(0.05, eps=1e-2, n=n, weight_decay=0.1, seed=7, stacked_axes=STACKED)
    state = opt.init(params)
    step = jax.jit(lambda p, s: opt.step(_loss, p, s, batch))
    ours = params
    for _ in range(12):
        ours, state, info = step(ours, state)
        assert not info.skipped
    ref = _numpy_mezo(params, batch, jax.random.key(7), 12, 0.05, 1e-2, n, 0.1)
    for k in ref:  # float32 SPSA differences vs float64: the scalar g carries ~1e-5 relative noise
        np.testing.assert_allclose(np.asarray(ours[k]), ref[k], rtol=2e-4, atol=2e-5)
    assert int(state.count) == 12


def test_directional_derivative_is_exact_for_a_quadratic():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(8, 8))
    a = jnp.asarray(a @ a.T / 8, jnp.float32)
    params = {"v": jnp.asarray(rng.normal(size=(8,)), jnp.float32)}
    loss = lambda p, _: 0.5 * p["v"] @ a @ p["v"]
    key = jax.random.key(3)
    est = zo.spsa_estimate(loss, params, None, key, eps=1e-2)
    z = zo.sample_noise(zo.noise_keys(params, zo.sample_key(key, 0))["v"], (8,))
    np.testing.assert_allclose(est.scalars[0], (a @ params["v"]) @ z, rtol=1e-3)


def _mean_direction(n, num_keys):
    rng = np.random.default_rng(2)
    a = rng.normal(size=(10, 10))
    a = jnp.asarray(a @ a.T / 10 + np.eye(10), jnp.float32)
    params = {"v": jnp.asarray(rng.normal(size=(10,)), jnp.float32)}
    loss = lambda p, _: 0.5 * p["v"] @ a @ p["v"]

    def direction(key):  # mean_j g_j z_j from one step: theta - update(theta) with lr 1
        est = zo.spsa_estimate(loss, params, None, key, eps=1e-2, n=n)
        new = zo.spsa_update(params, jax.random.wrap_key_data(est.sample_keys), est.scalars, 1.0)
        return params["v"] - new["v"]

    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(11), i))(jnp.arange(num_keys))
    return np.asarray(jax.jit(jax.vmap(direction))(keys)), np.asarray(a @ params["v"])


def test_spsa_is_unbiased_and_n_spsa_reduces_variance():
    num_keys = 4000
    d1, grad = _mean_direction(1, num_keys)
    d4, _ = _mean_direction(4, num_keys)
    # E[g z] = E[z z^T] grad = grad; each component's std is ~ |grad| (d + 1)^0.5 / sqrt(K)
    rel = np.linalg.norm(d1.mean(0) - grad) / np.linalg.norm(grad)
    assert rel < 0.15, rel
    rel4 = np.linalg.norm(d4.mean(0) - grad) / np.linalg.norm(grad)
    assert rel4 < 0.08, rel4
    ratio = d4.var(0).sum() / d1.var(0).sum()
    assert 0.15 < ratio < 0.4, ratio  # 1/n = 0.25


@pytest.mark.slow
def test_noise_definition_stacked_and_chunked():
    key = jax.random.key(5)
    keys = zo.noise_keys({"s": jnp.zeros((3, 4, 5))}, key, 1)["s"]
    z = zo.sample_noise(keys, (3, 4, 5))
    for layer in range(3):  # a layer's slice is drawn from its own key, independent of the stack
        np.testing.assert_array_equal(z[layer], zo.sample_noise(keys[layer], (4, 5)))
        np.testing.assert_array_equal(jax.random.key_data(keys[layer]),
                                      jax.random.key_data(jax.random.fold_in(jax.random.fold_in(key, 0), layer)))
    big = (zo.CHUNK + 1000,)
    zb = zo.sample_noise(key, big)
    np.testing.assert_array_equal(zb[:zo.CHUNK], jax.random.normal(jax.random.fold_in(key, 0), (zo.CHUNK,)))
    np.testing.assert_array_equal(zb[zo.CHUNK:], jax.random.normal(jax.random.fold_in(key, 1), (1000,)))
    small = zo.sample_noise(key, (7, 3))
    np.testing.assert_array_equal(small, jax.random.normal(key, (7, 3)))
    assert abs(float(zb.mean())) < 0.02 and abs(float(zb.std()) - 1) < 0.02


def test_update_of_a_chunked_leaf_matches_the_formula():
    m = zo.CHUNK * 2 + 17
    params = {"w": jnp.linspace(-1, 1, m, dtype=jnp.float32).reshape(1, m)}
    keys = jax.vmap(lambda j: jax.random.fold_in(jax.random.key(0), j))(jnp.arange(2))
    g = jnp.asarray([0.5, -2.0])
    new = jax.jit(lambda p: zo.spsa_update(p, keys, g, 0.1, weight_decay=0.3))(params)
    zs = [zo.sample_noise(zo.noise_keys(params, keys[j])["w"], (1, m)) for j in range(2)]
    expect = params["w"] - 0.1 * ((0.5 * zs[0] - 2.0 * zs[1]) / 2 + 0.3 * params["w"])
    np.testing.assert_allclose(new["w"], expect, rtol=1e-6, atol=1e-6)


def test_default_decay_mask():
    params = {"blocks": {"mlp": {"kernel": jnp.zeros((2, 3, 4))}, "mixer_norm": {"scale": jnp.zeros((2, 3))}},
              "embed": jnp.zeros((5, 3)), "proj": {"bias": jnp.zeros((3, 3))}}
    mask = zo.decay_mask(params, lambda path, leaf: 1 if path.startswith("blocks") else 0)
    assert mask == {"blocks": {"mlp": {"kernel": True}, "mixer_norm": {"scale": False}},
                    "embed": True, "proj": {"bias": False}}


@pytest.mark.slow
def test_nonfinite_loss_skips_the_step_bitwise():
    params, batch = _problem()
    opt = zo.mezo(0.1, weight_decay=0.5, stacked_axes=STACKED)
    state = opt.init(params)
    bad = lambda p, b: _loss(p, b) + jnp.where(p["bias"][0] > -100, jnp.nan, 0.0)
    new, state, info = jax.jit(lambda p, s: opt.step(bad, p, s, batch))(params, state)
    assert bool(info.skipped) and int(state.count) == 0  # state untouched too
    for k in params:
        np.testing.assert_array_equal(new[k], params[k])
    new, state, info = jax.jit(lambda p, s: opt.step(_loss, p, s, batch))(new, state)
    assert not bool(info.skipped) and np.isfinite(np.asarray(new["w"])).all()


@pytest.mark.slow
def test_same_seed_same_numbers_and_donation():
    params, batch = _problem()
    runs = []
    for seed in (3, 3, 4):
        opt = zo.mezo(0.05, stacked_axes=STACKED, seed=seed)
        p, s = jax.tree.map(jnp.copy, params), opt.init(params)
        step = jax.jit(lambda p, s, opt=opt: opt.step(_loss, p, s, batch), donate_argnums=(0,))
        for _ in range(3):
            old = p
            p, s, _ = step(p, s)
        assert all(leaf.is_deleted() for leaf in jax.tree.leaves(old))  # updated in place
        runs.append(p)
    for a, b in zip(jax.tree.leaves(runs[0]), jax.tree.leaves(runs[1])):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(runs[0]["w"], runs[2]["w"])  # the seed is used


def test_bad_input():
    params, batch = _problem()
    with pytest.raises(ValueError, match="eps"):
        zo.mezo(1e-3, eps=0.0)
    with pytest.raises(ValueError, match="n "):
        zo.mezo(1e-3, n=0)
    with pytest.raises(ValueError, match="learning_rate"):
        zo.mezo(-1.0)
    with pytest.raises(ValueError, match="weight_decay"):
        zo.mezo(1e-3, weight_decay=-1.0)
    with pytest.raises(ValueError, match="stacked_axes"):
        zo.noise_keys(params, jax.random.key(0), 4)
    opt = zo.mezo(1e-3)
    with pytest.raises(ValueError, match="scalar"):
        opt.step(lambda p, b: jnp.ones(3), params, opt.init(params), batch)


def test_many_samples_update_matches_the_formula():
    """m > 8 samples take the fori_loop branch of the update."""
    params = {"w": jnp.linspace(-1, 1, 12, dtype=jnp.float32).reshape(3, 4)}
    keys = jax.vmap(lambda j: jax.random.fold_in(jax.random.key(4), j))(jnp.arange(11))
    g = jnp.linspace(-2.0, 3.0, 11)
    new = jax.jit(lambda p: zo.spsa_update(p, keys, g, 0.1))(params)
    zs = [zo.sample_noise(zo.noise_keys(params, keys[j])["w"], (3, 4)) for j in range(11)]
    expect = params["w"] - 0.1 * sum(g[j] * zs[j] for j in range(11)) / 11
    np.testing.assert_allclose(new["w"], expect, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("chunk", [0, 1000])
def test_perturbation_and_update_agree_on_stacked_chunked_leaves(chunk):
    """z of a stacked leaf larger than a chunk: add_noise, the per-layer hook and the update all
    regenerate the same z (the update with lr 1 and g = 1 subtracts exactly z)."""
    params = {"blocks": {"w": jnp.zeros((3, 40, 60))}, "head": jnp.zeros((50, 70))}
    stacked = {"blocks": {"w": 1}, "head": 0}
    key = jax.random.key(9)
    keys = zo.noise_keys(params, key, stacked)
    noise = zo.Noise(keys, jnp.float32(1.0), chunk)
    z = zo.add_noise(params, noise)
    hook = zo.param_hook(noise)
    for layer in range(3):
        np.testing.assert_array_equal(hook("blocks", {"w": params["blocks"]["w"][layer]}, layer)["w"],
                                      z["blocks"]["w"][layer])
    new = zo.spsa_update(params, key[None], jnp.ones((1,)), 1.0, stacked_axes=stacked, chunk=chunk)
    for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(z)):
        np.testing.assert_array_equal(a, -b)
    if chunk:  # chunking changes z's definition, not its distribution
        other = zo.add_noise(params, zo.Noise(keys, jnp.float32(1.0), 0))
        assert not np.array_equal(other["head"], z["head"])
        assert abs(float(jnp.std(z["head"])) - 1) < 0.05


def test_overflowing_difference_with_finite_losses_is_skipped():
    params = {"w": jnp.ones((4,))}
    loss = lambda p, _: jnp.where(p["w"][0] > 1.0, 3e38, -3e38)  # finite, but g overflows
    est = zo.spsa_estimate(loss, params, None, jax.random.key(0), eps=1e-3)
    assert not bool(est.finite)
    opt = zo.mezo(0.1)
    new, state, info = opt.step(loss, params, opt.init(params), None)
    assert bool(info.skipped) and int(state.count) == 0
    np.testing.assert_array_equal(new["w"], params["w"])


def test_spsa_estimate_rejects_bad_eps_and_n():
    params, batch = _problem()
    for kwargs, match in (({"eps": -1.0}, "eps"), ({"eps": float("nan")}, "eps"),
                          ({"eps": 1e-3, "n": 0}, "n "), ({"eps": 1e-3, "n": True}, "n ")):
        with pytest.raises(ValueError, match=match):
            zo.spsa_estimate(_loss, params, batch, jax.random.key(0), **kwargs)
    with pytest.raises(ValueError, match="chunk"):
        zo.mezo(1e-3, chunk=-1)
    zo.mezo(np.float32(1e-3), eps=np.float64(1e-3))  # numpy scalars are numbers


def test_unchunked_noise_keeps_sharded_leaves_sharded():
    """chunk=0 (what FSDP needs): the update of a sharded leaf compiles without a collective."""
    mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp", None))
    params = {"w": jax.device_put(jnp.zeros((512, 256)), sharding)}
    keys = jax.random.key(0)[None]
    hlo = jax.jit(lambda p: zo.spsa_update(p, keys, jnp.ones((1,)), 0.1, chunk=0)).lower(
        params).compile().as_text()
    assert "all-gather" not in hlo and "all-reduce" not in hlo
