"""Projector properties: SVD sign convention, DCT basis and selection, random regeneration."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import memjax
from memjax.optim import dct_basis, make_projector
from tests.optim.numpy_reference import canonical

KEY = jax.random.key(0)


def test_canonical_signs_match_numpy_and_are_sign_invariant():
    g = np.random.default_rng(0).standard_normal((12, 7)).astype(np.float32)
    p = make_projector("svd", 12, 7, 3, "right")
    ours = np.asarray(p.refresh(jnp.asarray(g), p.init(KEY), KEY)).T  # stored n x r
    _, _, vh = np.linalg.svd(g, full_matrices=False)
    np.testing.assert_allclose(ours, canonical(vh[:3], axis=1), rtol=1e-5, atol=1e-6)
    # Flipping signs of the input vectors does not change the canonical output.
    flipped = memjax.optim.canonicalize_signs(-jnp.asarray(vh[:3]), axis=1)
    np.testing.assert_allclose(np.asarray(flipped), ours, rtol=1e-5, atol=1e-6)
    assert np.all(np.take_along_axis(ours, np.abs(ours).argmax(1)[:, None], 1) > 0)


@pytest.mark.parametrize("size", [1, 5, 16, 33])
def test_dct_basis_orthonormal(size):
    q = np.asarray(dct_basis(size), np.float64)
    np.testing.assert_allclose(q.T @ q, np.eye(size), atol=1e-5)
    cols = jnp.array([size - 1, 0], jnp.int32)
    np.testing.assert_allclose(np.asarray(dct_basis(size, cols)), q[:, [size - 1, 0]], atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("side", ["left", "right"])
def test_dct_recovers_exact_low_rank_gradient(side):
    m, n, r = 20, 12, 3
    size = m if side == "left" else n
    q = np.asarray(dct_basis(size), np.float64)
    chosen = [7, 2, size - 1]
    coeff = np.random.default_rng(1).standard_normal((r, n if side == "left" else m))
    if side == "left":
        g = q[:, chosen] @ coeff  # columns spanned by 3 DCT basis vectors
    else:
        g = (q[:, chosen] @ coeff).T
    p = make_projector("dct", m, n, r, side)
    idx = p.refresh(jnp.asarray(g, jnp.float32), p.init(KEY), KEY)
    assert sorted(np.asarray(idx).tolist()) == sorted(chosen)
    assert idx.dtype == jnp.int32 and idx.shape == (r,)
    low = p.down(jnp.asarray(g, jnp.float32), idx)
    np.testing.assert_allclose(np.asarray(p.up(low, idx)), g, atol=1e-5)  # lossless


@pytest.mark.slow
@pytest.mark.parametrize("name", ["svd", "dct"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_up_down_is_an_orthogonal_projection(name, side):
    m, n, r = 18, 10, 4
    g = jnp.asarray(np.random.default_rng(2).standard_normal((m, n)), jnp.float32)
    p = make_projector(name, m, n, r, side)
    s = p.refresh(g, p.init(KEY), KEY)
    proj = lambda x: p.up(p.down(x, s), s)  # noqa: E731
    pg = proj(g)
    np.testing.assert_allclose(np.asarray(proj(pg)), np.asarray(pg), atol=1e-5)  # idempotent
    # The residual is orthogonal to the projected part (on the projected side).
    res = g - pg
    inner = (pg.T @ res) if side == "left" else (pg @ res.T)
    np.testing.assert_allclose(np.asarray(inner), 0.0, atol=1e-4)
    assert float(jnp.linalg.norm(pg)) <= float(jnp.linalg.norm(g)) + 1e-5


def test_random_projector_regenerates_from_key_only():
    m, n, r = 30, 12, 4
    p = make_projector("random", m, n, r, "right")
    g = jnp.ones((m, n))
    s1 = p.refresh(g, p.init(KEY), jax.random.key(5))
    s2 = p.refresh(g * 2, p.init(KEY), jax.random.key(5))
    np.testing.assert_array_equal(np.asarray(s1), np.asarray(s2))
    np.testing.assert_array_equal(np.asarray(p.down(g, s1)), np.asarray(p.down(g, s2)))
    s3 = p.refresh(g, s1, jax.random.key(6))
    assert not np.array_equal(np.asarray(p.down(g, s1)), np.asarray(p.down(g, s3)))
    # Gaussian / sqrt(r): E[P^T P] = I.
    big = make_projector("random", 4, 400, 200, "right")
    eye = big.up(big.down(jnp.eye(400)[:4], big.init(KEY)), big.init(KEY))
    assert abs(float(jnp.mean(jnp.diag(eye[:, :4]))) - 1.0) < 0.2


@pytest.mark.slow
def test_random_state_holds_only_keys():
    params = {"w": jnp.zeros((64, 32)), "v": jnp.zeros((3, 40, 24))}
    labels = {"w": True, "v": memjax.optim.MatrixDims(1, 2)}
    tx = memjax.optim.scale_by_low_rank(8, 5, projector="random", labels=labels)
    state = tx.init(params)
    for leaf in jax.tree.leaves(state.projector):
        assert leaf.dtype == jnp.uint32 and leaf.shape[-1] == 2 and leaf.size <= 3 * 2
    _, state2 = tx.update({"w": jnp.ones((64, 32)), "v": jnp.ones((3, 40, 24))}, state)
    assert jax.tree.map(lambda x: (x.shape, x.dtype), state2.projector) == jax.tree.map(
        lambda x: (x.shape, x.dtype), state.projector)
    assert memjax.optim.state_bytes(state.projector) == 4 * 2 * 4


def test_dct_state_is_int32_indices():
    tx = memjax.optim.scale_by_low_rank(8, 5, projector="dct")
    state = tx.init({"w": jnp.zeros((64, 32))})
    (idx,) = jax.tree.leaves(state.projector)
    assert idx.dtype == jnp.int32 and idx.shape == (8,)


@pytest.mark.slow
@pytest.mark.parametrize("shape", [(512, 1), (3, 5), (7,), (130, 64)])
def test_fused_threefry_normal_uniform_and_fold_in_equal_jax_random_bit_for_bit(shape):
    # The random projectors and MeZO draw through memjax.optim._rng (unrolled threefry, one
    # fusion on CPU instead of a rolled while loop): it must be jax.random exactly.
    from memjax.optim import _rng

    for seed in (0, 1, 12345):
        key = jax.random.key(seed)
        kd = jax.random.key_data(key)
        want = jax.random.normal(key, shape, jnp.float32)
        np.testing.assert_array_equal(jax.jit(lambda k: _rng.normal(k, shape))(kd), want)
        np.testing.assert_array_equal(jax.jit(lambda k: _rng.key_normal(k, shape))(key), want)
        np.testing.assert_array_equal(jax.jit(lambda k: _rng.uniform(k, shape))(kd),
                                      jax.random.uniform(key, shape, jnp.float32))
        for data in (0, 1, 7, 2**31 + 5):
            np.testing.assert_array_equal(
                jax.random.key_data(jax.jit(lambda k, d=data: _rng.fold_in(k, d))(key)),
                jax.random.key_data(jax.random.fold_in(key, data)))
        folded = jax.jit(jax.vmap(_rng.fold_in, (None, 0)))(key, jnp.arange(4))
        np.testing.assert_array_equal(
            jax.random.key_data(folded),
            jax.random.key_data(jax.vmap(jax.random.fold_in, (None, 0))(key, jnp.arange(4))))
    rbg = jax.random.key(0, impl="rbg")  # any other implementation: plain jax.random
    np.testing.assert_array_equal(_rng.key_normal(rbg, shape), jax.random.normal(rbg, shape))


def test_fused_threefry_with_another_default_prng_impl():
    # A threefry key keeps the fused path when the default implementation is another one, and
    # raw key data of the (other) default implementation falls back to jax.random.
    from memjax.optim import _rng

    old = jax.config.jax_default_prng_impl
    jax.config.update("jax_default_prng_impl", "rbg")
    try:
        key = jax.random.key(3, impl="threefry2x32")
        np.testing.assert_array_equal(_rng.key_normal(key, (5, 2)), jax.random.normal(key, (5, 2)))
        rbg = jax.random.key(3)
        np.testing.assert_array_equal(_rng.normal(jax.random.key_data(rbg), (5, 2)),
                                      jax.random.normal(rbg, (5, 2)))
    finally:
        jax.config.update("jax_default_prng_impl", old)


# ------------------------------------------------------------------------------- power


def _numpy_power(g, start, iterations, rank):
    """Reference: ``iterations`` block power steps ``Q <- qr(G G^T Q)`` on ``G / ||G||_F``, then
    the top-``rank`` Ritz vectors ``Q W`` (``W``: eigenvectors of ``(Q^T G)(Q^T G)^T``) with
    the SVD's sign convention; float64."""
    g = np.asarray(g, np.float64) / np.linalg.norm(g)
    q = np.asarray(start, np.float64)
    for _ in range(iterations):
        q = np.linalg.qr(g @ (g.T @ q))[0]
    small = q.T @ g
    vals, vecs = np.linalg.eigh(small @ small.T)
    return canonical(q @ vecs[:, ::-1][:, :rank], axis=0)


def _energy(g, basis):
    """Fraction of ``||G||^2`` that the column space of ``basis`` captures."""
    return float(np.linalg.norm(basis.T @ g) ** 2 / np.linalg.norm(g) ** 2)


@pytest.mark.slow
@pytest.mark.parametrize("side", ["left", "right"])
def test_power_projector_matches_numpy_block_power_iteration(side):
    m, n, r = 24, 16, 4
    extra = 2  # ceil(POWER_OVERSAMPLE * r)
    rng = np.random.default_rng(3)
    u, _, vh = np.linalg.svd(rng.standard_normal((m, n)), full_matrices=False)
    spectrum = np.concatenate([[8.0, 6.0, 5.0, 4.0], np.linspace(1.0, 0.5, n - 4)])
    g = ((u * spectrum) @ vh).astype(np.float32)  # a gap after the 4th singular value
    p = make_projector("power", m, n, r, side)
    view = g if side == "left" else g.T  # the right side is the left side of G^T
    k = view.shape[0]
    first = np.asarray(p.refresh(jnp.asarray(g), p.init(KEY), jax.random.key(7)))
    start = np.asarray(jax.random.normal(jax.random.key(7), (k, r + extra), jnp.float32))
    want = _numpy_power(view, start, memjax.optim.projectors.POWER_INIT_ITERATIONS, r)
    np.testing.assert_allclose(first, want, rtol=1e-4, atol=1e-4)
    # A warm refresh: one step from [stored basis, fresh Gaussian columns].
    g2 = g + 0.1 * rng.standard_normal((m, n)).astype(np.float32)
    second = np.asarray(p.refresh(jnp.asarray(g2), jnp.asarray(first), jax.random.key(8)))
    fresh = np.asarray(jax.random.normal(jax.random.key(8), (k, extra), jnp.float32))
    want = _numpy_power(g2 if side == "left" else g2.T, np.concatenate([first, fresh], 1), 1, r)
    np.testing.assert_allclose(second, want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(second.T @ second, np.eye(r), atol=1e-5)  # orthonormal
    # Close to the SVD's basis (signs included), and down / up are the SVD projector's.
    svd = make_projector("svd", m, n, r, side)
    exact = np.asarray(svd.refresh(jnp.asarray(g2), svd.init(KEY), KEY))
    assert np.min(np.sum(second * exact, axis=0)) > 0.99
    low = p.down(jnp.asarray(g), second)
    np.testing.assert_allclose(low, svd.down(jnp.asarray(g), jnp.asarray(second)), rtol=1e-6)


def test_power_projector_tracks_a_rotating_subspace_like_the_svd():
    # A gradient stream whose top-8 subspace rotates a little between refreshes: one warm
    # iteration per refresh captures >= 0.99 of the energy the exact SVD basis captures.
    m, n, r, steps = 64, 48, 8, 30
    rng = np.random.default_rng(0)
    u = np.linalg.qr(rng.standard_normal((m, m)))[0]
    v = np.linalg.qr(rng.standard_normal((n, n)))[0]
    spectrum = np.concatenate([np.linspace(10, 4, r), 0.5 * np.ones(n - r)])
    angle = rng.standard_normal((m, m)) * 0.02
    rot = np.linalg.qr(np.eye(m) + angle - angle.T)[0]  # a small rotation
    p = make_projector("power", m, n, r, "left")
    refresh = jax.jit(p.refresh)
    state = p.init(KEY)
    for t in range(steps):
        g = (u[:, :n] * spectrum) @ v.T + 0.05 * rng.standard_normal((m, n))
        state = refresh(jnp.asarray(g, jnp.float32), state, jax.random.key(t))
        best = _energy(g, np.linalg.svd(g)[0][:, :r])
        assert _energy(g, np.asarray(state, np.float64)) >= 0.99 * best, t
        u = rot @ u


@pytest.mark.parametrize("kwargs, error", [
    ({"iterations": 0}, ValueError), ({"init_iterations": 0}, ValueError),
    ({"oversample": -0.5}, ValueError), ({"iterations": 1.5}, TypeError),
    ({"oversample": "half"}, TypeError)])
def test_power_projector_rejects_bad_arguments(kwargs, error):
    with pytest.raises(error, match=f"{next(iter(kwargs))}.* must be"):
        memjax.optim.power_projector(**kwargs)


@pytest.mark.slow
def test_galore_with_power_projector_on_stacked_and_plain_leaves():
    params = {"w": jnp.zeros((3, 24, 10)), "v": jnp.zeros((10, 24)), "b": jnp.zeros(10)}
    labels = {"w": memjax.optim.MatrixDims(1, 2), "v": True, "b": False}
    tx = memjax.optim.galore(1e-2, rank=4, update_proj_gap=2, projector="power", labels=labels)
    state = tx.init(params)
    grads = jax.tree.map(lambda x: jax.random.normal(jax.random.key(x.ndim), x.shape), params)
    update = jax.jit(tx.update)
    for _ in range(3):
        u, state = update(grads, state, params)
    basis = optax.tree.get(state, "projector")
    assert basis["w"].shape == (3, 10, 4) and basis["v"].shape == (10, 4)
    for b in (basis["w"][1], basis["v"]):
        np.testing.assert_allclose(b.T @ b, np.eye(4), atol=1e-5)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(u))
