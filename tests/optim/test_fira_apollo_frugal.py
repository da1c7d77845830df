"""Fira, APOLLO, APOLLO-Mini and FRUGAL against independent NumPy versions of the authors' steps.

Every recipe runs on one tree holding the three orientations (m > n, m < n, m = n) and a bias, for
13 steps with T = 4 (refreshes at t = 0, 4, 8, 12), one compilation per configuration. Random
subspaces (APOLLO's Gaussian projector, FRUGAL's random / coordinate subspaces and random block
order) cannot be regenerated in NumPy, so the reference receives the subspace memjax drew for that
step; everything around it is independent.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import memjax
from memjax.optim import limiter as limiter_lib
from memjax.optim import residual as residual_lib
from tests.optim import numpy_reference as ref
from tests.trees import assert_trees_close

SHAPES = {"a": (48, 20), "b": (20, 48), "c": (32, 32)}  # m > n, m < n, m = n
STEPS, GAP, RANK, LR = 13, 4, 6, 0.05
# Tolerances are float32 rtol 1e-5, relative to each array's largest entry (normwise): the float32
# SVD and Adam's M / (sqrt(V) + eps) for near-zero projected entries make a single float32 step
# differ from float64 by ~1e-5 of the update's size (GaLore itself shows 1e-5 on these gradients),
# so entrywise checks on near-zero weights would test rounding, not the algorithm. An algorithmic
# error moves the weights by ~lr = 5e-2 per step.
RTOL = 1e-5
DISPLACEMENT_RTOL = 5e-5


def assert_close(actual, desired, rtol=RTOL, err_msg=""):
    assert_trees_close(actual, desired, rtol, normwise=True, err_msg=err_msg)


def _grads(seed):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(STEPS):
        g = {}
        for k, (m, n) in SHAPES.items():
            # A decaying spectrum keeps singular gaps well defined, like real gradients.
            g[k] = (rng.standard_normal((m, n)) * np.linspace(2.0, 0.1, n)[None, :]
                    + 0.3 * rng.standard_normal((m, n))).astype(np.float32)
        g["bias"] = rng.standard_normal(20).astype(np.float32)
        out.append(g)
    return out


def _params():
    rng = np.random.default_rng(0)
    p = {k: (0.5 * rng.standard_normal(s)).astype(np.float32) for k, s in SHAPES.items()}
    p["bias"] = rng.standard_normal(20).astype(np.float32)
    return p


def _jitted_step(tx):
    """``(params, state, grads) -> (params, state)``, one optimizer step, jitted."""

    @jax.jit
    def step(params, state, g):
        updates, state = tx.update(g, state, params)
        return optax.apply_updates(params, updates), state

    return step


def _run(tx, refs, observe=None, grads_seed=1):
    """Steps memjax and the references together; ``observe(state, t)`` runs after memjax's step."""
    p0 = _params()
    params = jax.tree.map(jnp.asarray, p0)
    state = tx.init(params)

    step = _jitted_step(tx)

    w = {k: v.astype(np.float64) for k, v in p0.items()}
    for t, g in enumerate(_grads(grads_seed)):
        params, state = step(params, state, jax.tree.map(jnp.asarray, g))
        if observe is not None:
            observe(state, t)
        w = {k: refs[k].step(w[k], g[k]) for k in w}
        for k in w:
            assert_close(params[k], w[k], err_msg=f"{k} t={t}")
    for k in SHAPES:  # the displacement itself agrees, so small updates cannot hide errors
        assert_close(np.asarray(params[k]) - p0[k], w[k] - p0[k], DISPLACEMENT_RTOL, err_msg=k)
    return state


def _states(state, cls):
    return [x for x in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, cls))
            if isinstance(x, cls)]


def _leaf_projector(state, key):
    """The projector state of leaf ``key`` in whichever LowRankState holds it."""
    for lr_state in _states(state, memjax.optim.LowRankState):
        p = lr_state.projector[key]
        if not isinstance(p, optax.MaskedNode):
            return np.asarray(p)
    raise KeyError(key)


# ------------------------------------------------------------------------------------ limiter


@settings(max_examples=25, deadline=None)
@given(scales=st.lists(st.floats(1e-3, 1e3), min_size=2, max_size=12),
       gamma=st.sampled_from([1.0, 1.01, 1.5]))
def test_limiter_norm_never_grows_more_than_gamma(scales, gamma):
    base = jnp.asarray(np.random.default_rng(len(scales)).standard_normal(8), jnp.float32)
    state = limiter_lib.init_norm_growth()
    numpy_limiter = ref.NormLimiter(gamma)
    prev = None
    for s in scales:
        x = base * s
        out, state = _limit(x, state, gamma)
        norm = float(jnp.linalg.norm(out))
        if prev is None:
            assert norm == pytest.approx(float(jnp.linalg.norm(x)), rel=1e-6)  # first: no limit
        else:
            assert norm <= gamma * (prev + 1e-8) * (1 + 1e-6)
            if float(jnp.linalg.norm(x)) <= gamma * prev * (1 - 1e-6):
                np.testing.assert_allclose(out, x, rtol=1e-6)  # below the threshold: unchanged
        assert float(state.norm) == pytest.approx(norm, rel=1e-5)  # stores the limited norm
        np.testing.assert_allclose(out, numpy_limiter(np.asarray(x, np.float64)), rtol=1e-5)
        prev = norm


_limit = jax.jit(limiter_lib.limit_norm_growth)


def test_limiter_transform_limits_every_leaf():
    tx = memjax.optim.scale_by_norm_growth_limit(1.01)
    params = {"a": jnp.ones(4), "b": jnp.ones((2, 3))}
    state = tx.init(params)
    u, state = tx.update(params, state)
    u, state = tx.update(jax.tree.map(lambda x: 5 * x, params), state)
    for k, p in params.items():
        assert float(jnp.linalg.norm(u[k])) == pytest.approx(1.01 * float(jnp.linalg.norm(p)),
                                                             rel=1e-5)


# --------------------------------------------------------------------------------------- Fira


@pytest.mark.slow
@pytest.mark.parametrize("paper_form", [False, True])
def test_fira_matches_numpy_reference(paper_form):
    scale, wd = 0.25, 0.1
    tx = memjax.optim.fira(LR, rank=RANK, update_proj_gap=GAP, scale=scale, weight_decay=wd,
                           paper_form=paper_form)
    refs = {k: ref.FiraAdamW(s, RANK, GAP, scale, LR, paper_form=paper_form, weight_decay=wd)
            for k, s in SHAPES.items()}
    refs["bias"] = ref.AdamW(20, LR, weight_decay=wd)
    state = _run(tx, refs)
    norms = _states(state, limiter_lib.NormGrowthState)
    assert norms and all(float(n.norm) > 0 for n in norms)


@pytest.mark.slow
@pytest.mark.parametrize("paper_form", [False, True])
@pytest.mark.parametrize(("side", "shape", "r"), [("left", (12, 9), 3), ("right", (12, 9), 3),
                                                  ("left", (6, 6), 6), ("right", (6, 6), 6)])
def test_fira_policy_one_back_projection_equals_the_naive_formula(side, shape, r, paper_form):
    # The policy folds phi into one up() and, for orthonormal projectors, takes the limiter's norm
    # in the low-rank space. Both paths must equal the definition step by step (limiter state
    # carried): S = (G - c up(R)) * phi, S = limit(S), U = scale up(O) + S, for an orthonormal P
    # (the low-rank norm path) and a Gaussian P (plain callable: the general path). The square
    # full-rank case (R has G's shape, phi may lie along the projected dimension) must too.
    rng = np.random.default_rng(5)
    (m, n), scale, gamma = shape, 0.25, 1.01
    c = 1.0 if paper_form else scale
    k = m if side == "left" else n
    ortho = np.linalg.qr(rng.standard_normal((k, r)))[0].astype(np.float32)
    gauss = (rng.standard_normal((k, r)) / math.sqrt(r)).astype(np.float32)
    policy = residual_lib.fira(scale=scale, gamma=gamma, paper_form=paper_form)
    for p, wrap in ((ortho, True), (gauss, False)):
        down = (lambda x, p=p: p.T @ x) if side == "left" else (lambda x, p=p: x @ p)
        up_fn = (lambda x, p=p: p @ x) if side == "left" else (lambda x, p=p: x @ p.T)
        up = residual_lib.BackProjection(up_fn, True) if wrap else up_fn
        state, limiter = policy.init((m, n), jnp.float32), ref.NormLimiter(gamma)
        for t in range(4):
            g = rng.standard_normal((m, n)).astype(np.float32) * (3.0 if t == 2 else 1.0)
            low_grad = down(g)
            low_update = rng.standard_normal(low_grad.shape).astype(np.float32)
            u, state = policy.apply(jnp.asarray(g), jnp.asarray(low_grad),
                                    jnp.asarray(low_update), up, state)
            phi = np.asarray(residual_lib.channel_scaling(low_update, low_grad, (m, n)))
            want = scale * up_fn(low_update) + limiter((g - c * up_fn(low_grad)) * phi)
            np.testing.assert_allclose(np.asarray(u), want, rtol=2e-5, atol=2e-6,
                                       err_msg=f"P orthonormal={wrap} t={t}")
            # The limiter's norm is ||S|| for S known entrywise to the atol above: in the square
            # full-rank case with c = 1, S = G - P P^T G is rounding noise (norm ~1e-7) whose
            # digits depend on the CPU's summation order, so ||S|| is held to the same bound
            # (2e-6 per entry, 2e-6 sqrt(mn) in norm), not to 2e-5 of itself.
            np.testing.assert_allclose(float(state.norm), limiter.prev, rtol=2e-5,
                                       atol=2e-6 * math.sqrt(m * n))


# ------------------------------------------------------------------------------------- APOLLO


def _random_projector(leaf_index, shape, rank, seed=0):
    """The Gaussian projector memjax's ``"random"`` subspace draws for a leaf at step t."""
    m, n = shape
    right = m >= n  # the basis is drawn k x r, k the projected dimension; the reference's
    # right-side P is its transpose (r x n)

    def projector(g, t):
        key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), leaf_index), t)
        basis = np.asarray(jax.random.normal(key, (n if right else m, rank), jnp.float32)
                           / math.sqrt(rank))
        return basis.T if right else basis

    return projector


LEAF_INDEX = {"a": 0, "b": 1, "bias": 2, "c": 3}  # flatten order of the dict


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["svd_channel", "random_channel_front", "mini"])
def test_apollo_matches_numpy_reference(variant):
    if variant == "mini":
        rank, scale, scale_type, projector, front = 1, 128.0, "tensor", "random", False
        make = memjax.optim.apollo_mini
    else:
        rank, scale, scale_type = RANK, 2.0, "channel"
        projector, front = ("svd", False) if variant == "svd_channel" else ("random", True)
        make = memjax.optim.apollo
    wd = 0.1
    tx = make(LR, rank=rank, update_proj_gap=GAP, scale=scale, projector=projector,
              scale_type=scale_type, scale_front=front, weight_decay=wd)
    refs = {}
    for k, s in SHAPES.items():
        proj = None if projector == "svd" else _random_projector(LEAF_INDEX[k], s, rank)
        refs[k] = ref.ApolloAdamW(s, rank, GAP, scale, LR, scale_type=scale_type,
                                  scale_front=front, weight_decay=wd, projector=proj)
    refs["bias"] = ref.AdamW(20, LR, weight_decay=wd)
    state = _run(tx, refs)
    if variant == "mini":  # SGD-like memory: two m x 1 (or 1 x n) moments per matrix
        adam = _states(state, memjax.optim.ScaleByHFAdamState)[0]
        assert adam.mu["a"].shape == (48, 1) and adam.mu["b"].shape == (1, 48)


def test_apollo_without_limiter_is_scaled_gradient():
    g = jax.random.normal(jax.random.key(0), (24, 10))
    low = jax.random.normal(jax.random.key(1), (24, 3))
    out = 2.0 * low
    policy = residual_lib.apollo(scale=4.0, scale_type="tensor", limiter=False)
    u, _ = policy.apply(g, low, out, None, policy.init((24, 10), jnp.float32))
    np.testing.assert_allclose(u, g * 2.0 * 2.0, rtol=1e-5)  # s = 2, sqrt(scale) = 2


# ------------------------------------------------------------------------------------- FRUGAL


def _frugal_rank(m, n, subspace, density):
    size = {"columns": n, "rows": m}.get(subspace, min(m, n))
    return max(1, round(density * size))


def _subspace_matrix(subspace, shape, rank, data):
    """The subspace as the matrix P of the reference (``down(G) = G P^T`` or ``P^T G``)."""
    m, n = shape
    if subspace in ("columns", "rows"):
        size = n if subspace == "columns" else m
        sel = np.eye(size)[np.asarray(data)]  # (r, size)
        return sel if subspace == "columns" else sel.T
    side = "right" if m >= n else "left"
    size = n if side == "right" else m
    gauss = jax.random.normal(jax.random.wrap_key_data(jnp.asarray(data)), (size, rank))
    q = np.asarray(jnp.linalg.qr(gauss)[0], np.float64)
    return q.T if side == "right" else q


@pytest.mark.parametrize("subspace, state_free, reset", [
    ("svd", "sign", True),
    ("random", "sgd", True),
    ("columns", "sign", False),
    ("rows", "none", True),
])
@pytest.mark.slow
def test_frugal_matches_numpy_reference(subspace, state_free, reset):
    density, wd, ratio = 0.25, 0.1, 0.5
    tx = memjax.optim.frugal(LR, density=density, subspace=subspace, state_free=state_free,
                             state_free_lr=ratio, update_proj_gap=GAP,
                             reset_state_on_refresh=reset, weight_decay=wd)
    seen = {}

    def observe(state, t):
        if t % GAP == 0 and subspace != "svd":
            for k in SHAPES:
                seen[k, t] = _leaf_projector(state, k)

    rule = {"sign": "sign_sgd", "sgd": "sgd", "none": "no"}[state_free]
    refs = {}
    for k, (m, n) in SHAPES.items():
        rank = _frugal_rank(m, n, subspace, density)
        side = {"columns": "right", "rows": "left"}.get(subspace, "right" if m >= n else "left")
        if subspace == "svd":
            proj = _svd_projector((m, n), rank, side)
        else:
            proj = (lambda g, t, k=k, s=(m, n), r=rank:
                    _subspace_matrix(subspace, s, r, seen[k, t]))
        refs[k] = ref.FrugalAdamW((m, n), side, proj, GAP, LR, inactive_update_rule=rule,
                                  inactive_lr_scale=ratio, reset_statistics=reset,
                                  weight_decay=wd)
    refs["bias"] = ref.TorchAdamW(20, LR, weight_decay=wd)
    _run(tx, refs, observe)


def _svd_projector(shape, rank, side):
    def projector(g, t):
        u, _, vh = np.linalg.svd(g.astype(np.float32), full_matrices=False)
        if side == "right":
            return ref.canonical(vh[:rank].astype(np.float64), axis=1)
        return ref.canonical(u[:, :rank].astype(np.float64), axis=0)

    return projector


@pytest.mark.slow
@pytest.mark.parametrize("side", ["left", "right"])
def test_frugal_subspaces_are_an_orthogonal_and_a_coordinate_projection(side):
    m, n, rank = 12, 8, 3
    g = jax.random.normal(jax.random.key(0), (m, n))
    key = jax.random.key(5)
    orth = memjax.optim.projectors.orthogonal_projector(m, n, rank, side)
    state = orth.refresh(g, orth.init(key), key)
    low = orth.down(g, state)
    assert low.shape == orth.low_shape == ((rank, n) if side == "left" else (m, rank))
    inside = orth.up(low, state)
    np.testing.assert_allclose(orth.up(orth.down(inside, state), state), inside, atol=1e-5)
    assert abs(float(jnp.sum((g - inside) * inside))) < 1e-4  # the complement is orthogonal

    coord = memjax.optim.projectors.coordinate_projector(m, n, rank, side)
    idx = np.asarray(coord.refresh(g, coord.init(key), key))
    assert idx.dtype == np.int32 and len(set(idx.tolist())) == rank and np.all(np.diff(idx) > 0)
    kept = np.asarray(coord.up(coord.down(g, idx), idx))
    mask = np.zeros((m, n), bool)
    mask[(idx, slice(None)) if side == "left" else (slice(None), idx)] = True
    np.testing.assert_array_equal(kept, np.where(mask, np.asarray(g), 0.0))


def test_frugal_block_buffers_hold_row_bands_of_the_active_matrices():
    """``S`` rows (a power of two dividing every size, bands >= 128 wide), one band per matrix."""
    shapes = {"a": (256, 128), "b": (128, 256), "c": (64, 64), "d": (64, 64)}  # 32768, 32768, 4096
    params = {k: jnp.zeros(s) for k, s in shapes.items()}
    tx = memjax.optim.frugal(LR, density=0.5, subspace="block", order="ascending")
    (bs,) = _states(tx.init(params), memjax.optim.BlockState)
    rows = 4096 // 128  # the smallest matrix keeps 128 columns
    assert bs.mu.shape == bs.nu.shape == (rows, (32768 + 32768) // rows)  # {a, b} then {c, d}
    g = {k: jnp.full(s, i + 1.0) for i, (k, s) in enumerate(shapes.items())}
    _, state = jax.jit(tx.update)(g, tx.init(params), params)
    (bs,) = _states(state, memjax.optim.BlockState)
    band = 32768 // rows  # "a" then "b", side by side: row s holds the s-th 1/S of each
    np.testing.assert_allclose(bs.mu[:, :band], 0.1 * 1.0)
    np.testing.assert_allclose(bs.mu[:, band:], 0.1 * 2.0)


BLOCK_SHAPES = [(24, 16), (16, 24), (20, 20), (12, 28), (30, 8)]


@pytest.mark.slow
@pytest.mark.parametrize("order", ["descending", "ascending", "mirror", "random"])
def test_frugal_block_matches_numpy_reference(order):
    density, gap, steps, seed = 0.4, 3, 13, 7  # 2 of 5 matrices active
    rng = np.random.default_rng(3)
    names = [f"w{i}" for i in range(len(BLOCK_SHAPES))]
    p0 = {k: rng.standard_normal(s).astype(np.float32) for k, s in zip(names, BLOCK_SHAPES)}
    p0["bias"] = rng.standard_normal(16).astype(np.float32)
    tx = memjax.optim.frugal(LR, density=density, subspace="block", order=order,
                             update_proj_gap=gap, state_free="sign", state_free_lr=0.3,
                             seed=seed)
    num_active = 2

    def random_sets(c):
        key = jax.random.fold_in(jax.random.key(seed), c)
        return np.asarray(jax.random.permutation(key, len(names))[:num_active]).tolist()

    blocks = ref.BlockFrugalAdamW(BLOCK_SHAPES, density, order, gap, LR, "sign_sgd", 0.3,
                                  active_sets=random_sets)
    bias = ref.TorchAdamW(16, LR)
    params = jax.tree.map(jnp.asarray, p0)
    state = tx.init(params)

    step = _jitted_step(tx)

    w = {k: v.astype(np.float64) for k, v in p0.items()}
    active_history = []
    for t in range(steps):
        g = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in p0.items()}
        params, state = step(params, state, jax.tree.map(jnp.asarray, g))
        new = blocks.step([w[k] for k in names], [g[k] for k in names])
        w.update(zip(names, new))
        w["bias"] = bias.step(w["bias"], g["bias"])
        active_history.append(sorted(blocks.active))
        for k, want in w.items():
            assert_close(params[k], want, err_msg=f"{k} t={t}")
    # >= 3 different active sets (mirror pairs i with 4 - i and never activates the middle one).
    assert len({tuple(a) for a in active_history}) >= (2 if order == "mirror" else 3)
    # Only the active matrices' moments are stored: at most the largest two matrices' worth.
    (bs,) = _states(state, memjax.optim.BlockState)
    biggest = sorted((math.prod(s) for s in BLOCK_SHAPES), reverse=True)
    assert bs.mu.size <= biggest[0] + biggest[1]


# ------------------------------------------------------------------------ reset_inner_on_refresh


def test_reset_inner_on_refresh_zeroes_refreshed_moments():
    params = {"w": jnp.zeros((24, 10)), "b": jnp.zeros((10,))}
    g = {"w": jnp.ones((24, 10)), "b": jnp.ones((10,))}
    tx = memjax.optim.scale_by_low_rank(2, 3, inner=optax.scale_by_adam(),
                                        reset_inner_on_refresh=True)
    state = tx.init(params)
    update = jax.jit(tx.update)
    for _ in range(3):
        _, state = update(g, state)
    mu_before = np.asarray(state.inner_state.mu["w"])
    _, state = update(g, state)  # t = 3 refreshes "w": its moments restart from one step
    np.testing.assert_allclose(state.inner_state.mu["w"], 0.1 * np.asarray(
        g["w"] @ state.projector["w"]), rtol=1e-5)  # right side: G B, B the n x r basis
    assert not np.allclose(mu_before, state.inner_state.mu["w"])
    # The full-rank bias never refreshes: its moments and the shared count continue.
    assert int(state.inner_state.count) == 4
    np.testing.assert_allclose(state.inner_state.mu["b"], 1 - 0.9**4, rtol=1e-5)

    # Without full-rank leaves and with synchronous refresh, the count restarts too.
    tx2 = memjax.optim.scale_by_low_rank(2, 3, inner=optax.scale_by_adam(),
                                         labels={"w": True}, reset_inner_on_refresh=True)
    s2 = tx2.init({"w": params["w"]})
    for _ in range(4):
        _, s2 = tx2.update({"w": g["w"]}, s2)
    assert int(s2.inner_state.count) == 1


# ---------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("kwargs, match", [
    (dict(density=0.0), "density"),
    (dict(density=1.5), "density"),
    (dict(subspace="qr"), "subspace"),
    (dict(order="zigzag"), "order"),
    (dict(state_free="adam"), "state_free"),
    (dict(state_free_lr=-1.0), "state_free_lr"),
    (dict(update_proj_gap=0), "update_proj_gap"),
    (dict(subspace="block", reset_state_on_refresh=False), "reset_state_on_refresh"),
])
def test_frugal_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        memjax.optim.frugal(1e-3, **kwargs)


def test_other_bad_arguments_raise():
    with pytest.raises(ValueError, match="scale_type"):
        memjax.optim.apollo(1e-3, scale_type="row")
    with pytest.raises(ValueError, match="gamma"):
        memjax.optim.fira(1e-3, gamma=0.5)
    with pytest.raises(ValueError, match="mode"):
        residual_lib.state_free("adam")
    with pytest.raises(ValueError, match="scale"):
        residual_lib.apollo(scale=-1.0)
    tx = memjax.optim.frugal(1e-3, density=0.25, subspace="block", order="mirror")
    params = {f"w{i}": jnp.zeros((8, 8)) for i in range(4)}  # 1 active matrix: odd
    with pytest.raises(ValueError, match="mirror"):
        tx.init(params)


def test_frugal_density_one_is_adam():
    params = {"w": jnp.zeros((24, 16))}
    state = memjax.optim.frugal(1e-3, density=1.0).init(params)
    assert not _states(state, memjax.optim.LowRankState)


def test_block_adam_alone_steps_active_blocks_with_adam_and_the_rest_state_free():
    tx = memjax.optim.scale_by_block_adam(0.5, "ascending", update_gap=3, state_free="sgd",
                                          state_free_lr=0.5, eps=1e-8)
    params = {"a": jnp.zeros((16, 8)), "b": jnp.zeros((8, 16))}
    g = jax.tree.map(lambda x: jax.random.normal(jax.random.key(x.shape[0]), x.shape), params)
    u, state = jax.jit(tx.update)(g, tx.init(params))
    # first Adam step: m_hat / (sqrt(v_hat) + eps) = g / (|g| + eps); block "b" is inactive
    np.testing.assert_allclose(u["a"], g["a"] / (jnp.abs(g["a"]) + 1e-8), rtol=1e-5)
    np.testing.assert_allclose(u["b"], 0.5 * g["b"], rtol=1e-6)
    assert isinstance(state, memjax.optim.BlockState) and state.mu.size == 128  # one block
    for kwargs, name in [(dict(density=0), "density"), (dict(order="up"), "order"),
                         (dict(update_gap=0), "update_gap"), (dict(state_free="adam"), "state_free")]:
        with pytest.raises(ValueError, match=name):
            memjax.optim.scale_by_block_adam(**kwargs)


def test_recipe_finish_names_a_bad_decay_order():
    with pytest.raises(ValueError, match="decay='sideways' is unknown"):
        memjax.optim.recipe.finish(optax.identity(), 1e-3, 0.1, decay="sideways")
