"""Leaf selection, sides, staggered refresh, stacked leaves, bad input, property tests."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import memjax
from memjax.optim import MatrixDims, label_matrices, scale_by_low_rank


def llama_like():
    return {
        "embed_tokens": jnp.zeros((100, 32)),
        "layers_0": {"attn": {"q_proj": jnp.zeros((32, 32)), "o_proj": jnp.zeros((32, 32))},
                     "mlp": {"up": jnp.zeros((32, 80)), "down": jnp.zeros((80, 32))},
                     "input_layernorm": jnp.zeros((32,)), "bias": jnp.zeros((32,))},
        "ln_f": {"scale": jnp.zeros((32,))},
        "lm_head": jnp.zeros((32, 100)),
        "tiny": jnp.zeros((32, 4)),
    }


def test_default_labels_follow_galore():
    labels = label_matrices(llama_like(), rank=8)
    assert labels["embed_tokens"] is None and labels["lm_head"] is None
    assert labels["layers_0"]["input_layernorm"] is None and labels["layers_0"]["bias"] is None
    assert labels["ln_f"]["scale"] is None
    assert labels["tiny"] is None  # min side 4 <= rank 8: full Adam
    for k in ("q_proj", "o_proj"):
        assert labels["layers_0"]["attn"][k] == MatrixDims()
    assert labels["layers_0"]["mlp"]["up"] == MatrixDims()


@pytest.mark.slow
def test_stacked_layers_are_a_batch_axis():
    params = {"w": jax.random.normal(jax.random.key(0), (3, 24, 10))}
    labels = lambda p: label_matrices(p, rank=4, num_batch_dims=1)  # noqa: E731
    tx = scale_by_low_rank(4, 2, labels=labels)
    state = tx.init(params)
    assert state.projector["w"].shape == (3, 10, 4)  # per layer: the n x r basis (right side)
    assert state.inner_state.mu["w"].shape == (3, 24, 4)
    g = jax.random.normal(jax.random.key(1), (3, 24, 10))
    u, _ = jax.jit(tx.update)({"w": g}, state)
    # Each layer slice is projected independently: equal to the 2-D transform on that slice.
    for i in range(3):
        tx2 = scale_by_low_rank(4, 2, labels={"w": True})
        u2, _ = tx2.update({"w": g[i]}, tx2.init({"w": g[i]}))
        np.testing.assert_allclose(np.asarray(u["w"][i]), np.asarray(u2["w"]), rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_dimension_numbers_for_attention_layout():
    # (embed, heads, head_dim) viewed as (embed) x (heads * head_dim).
    params = {"qkv": jax.random.normal(jax.random.key(0), (16, 4, 8))}
    tx = scale_by_low_rank(4, 2, labels={"qkv": MatrixDims(0, (1, 2))}, proj_type="left")
    state = tx.init(params)
    assert state.inner_state.mu["qkv"].shape == (4, 32)
    u, _ = tx.update(params, state)
    assert u["qkv"].shape == (16, 4, 8)


@pytest.mark.parametrize("projector", ["svd", "dct", "random"])
def test_min_state_never_larger_than_std(projector):
    params = {"a": jnp.zeros((96, 32)), "b": jnp.zeros((32, 96))}
    sizes = {}
    for pt in ("std", "reverse_std", "min_state"):
        sizes[pt] = memjax.optim.state_bytes(
            scale_by_low_rank(8, projector=projector, proj_type=pt).init(params))
    assert sizes["min_state"] == min(sizes.values())


def test_staggered_refresh_spreads_refreshes():
    gap = 4
    params = {f"w{i}": jnp.zeros((12, 8)) for i in range(4)}
    tx = scale_by_low_rank(2, gap, labels=lambda p: jax.tree.map(lambda _: True, p),
                           refresh="staggered")
    state = tx.init(params)
    update = jax.jit(tx.update)
    changed_at = {k: [] for k in params}
    prev = None
    for t in range(2 * gap + 1):
        g = {k: jax.random.normal(jax.random.fold_in(jax.random.key(t), i), (12, 8))
             for i, k in enumerate(params)}
        _, state = update(g, state)
        if prev is not None:
            for k in params:
                if not np.array_equal(prev[k], state.projector[k]):
                    changed_at[k].append(t)
        prev = jax.tree.map(np.asarray, state.projector)
    # Leaf j refreshes when t % gap == j (after the common t = 0): one SVD per step.
    assert changed_at == {"w0": [4, 8], "w1": [1, 5], "w2": [2, 6], "w3": [3, 7]}


@pytest.mark.parametrize("kwargs, match", [
    (dict(rank=0), "rank"),
    (dict(rank=-3), "rank"),
    (dict(rank=4, update_proj_gap=0), "update_proj_gap"),
    (dict(rank=4, projector="qr"), "projector"),
    (dict(rank=4, proj_type="diagonal"), "proj_type"),
    (dict(rank=4, refresh="lazy"), "refresh"),
])
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        memjax.optim.galore(1e-3, **kwargs)


def test_bad_types_raise():
    with pytest.raises(TypeError, match="rank"):
        scale_by_low_rank(4.0)
    with pytest.raises(TypeError, match="update_proj_gap"):
        scale_by_low_rank(4, 2.5)


def test_bad_labels_raise():
    params = {"w": jnp.zeros((16, 8)), "b": jnp.zeros((8,)), "t": jnp.zeros((2, 8, 8))}
    with pytest.raises(ValueError, match="'b'.*not a matrix"):
        scale_by_low_rank(2, labels={"w": True, "b": MatrixDims(), "t": None}).init(params)
    with pytest.raises(ValueError, match="'t'.*True"):
        scale_by_low_rank(2, labels={"w": True, "b": None, "t": True}).init(params)
    with pytest.raises(ValueError, match="rank=9 exceeds.*'w'"):
        scale_by_low_rank(9, labels={"w": True, "b": None, "t": None}).init(params)
    with pytest.raises(ValueError, match="overlapping"):
        scale_by_low_rank(2, labels={"w": MatrixDims(0, 0), "b": None, "t": None}).init(params)
    with pytest.raises(ValueError, match="structure"):
        scale_by_low_rank(2, labels={"w": True}).init(params)


@settings(max_examples=15, deadline=None)
@given(m=st.integers(2, 20), n=st.integers(2, 20), rank=st.integers(1, 20),
       projector=st.sampled_from(["svd", "dct", "random"]),
       proj_type=st.sampled_from(["std", "reverse_std", "left", "right", "min_state"]),
       dtype=st.sampled_from([jnp.float32, jnp.bfloat16]))
@pytest.mark.slow
def test_property_shapes_dtypes_finite(m, n, rank, projector, proj_type, dtype):
    params = {"w": jnp.zeros((m, n), dtype)}
    labels = {"w": True}
    side_len = {"left": m, "right": n}
    if rank > min(m, n):
        with pytest.raises(ValueError, match="rank"):
            scale_by_low_rank(rank, 3, projector=projector, proj_type=proj_type,
                              labels=labels).init(params)
        return
    tx = scale_by_low_rank(rank, 3, projector=projector, proj_type=proj_type, labels=labels)
    state = tx.init(params)
    g = {"w": jax.random.normal(jax.random.key(m * 31 + n), (m, n)).astype(dtype)}
    u, state = tx.update(g, state)
    assert u["w"].shape == (m, n) and u["w"].dtype == dtype
    assert bool(jnp.all(jnp.isfinite(u["w"].astype(jnp.float32))))
    low = state.inner_state.mu["w"].shape
    assert rank in low and max(side_len.values()) >= rank
    # The update lies in the chosen subspace: its rank is at most `rank` (up to the rounding
    # of the output dtype, which adds a full-rank perturbation of relative size ~eps).
    s = np.linalg.svd(np.asarray(u["w"], np.float32), compute_uv=False)
    tol = 3e-2 if dtype == jnp.bfloat16 else 1e-4
    assert np.sum(s > tol * max(s.max(), 1e-12)) <= rank


def test_state_bytes_and_compiled_memory():
    params = {"w": jnp.zeros((64, 32)), "b": jnp.zeros((32,))}
    state = optax.adam(1e-3).init(params)
    # count (int32) + 2 moments of (64*32 + 32) float32.
    assert memjax.optim.state_bytes(state) == 4 + 2 * 4 * (64 * 32 + 32)
    assert memjax.optim.state_bytes(jax.eval_shape(optax.adam(1e-3).init, params)) == \
        memjax.optim.state_bytes(state)
    assert memjax.optim.state_bytes({"k": jax.random.key(0)}) == 8
    mem = memjax.optim.compiled_memory(lambda x: (x @ x.T).sum(), jnp.zeros((64, 32)))
    assert mem.argument == 64 * 32 * 4 and mem.output == 4
    assert mem.peak >= mem.argument


@pytest.mark.slow
def test_readme_tour_runs():
    from tests.readme import run_block

    ns = run_block("optax.scale_by_lion()")
    state = ns["core"].init(ns["params"])
    projector = optax.tree.get(state, "projector")  # found by name, as the README shows
    assert projector["mlp"]["up"].dtype == jnp.uint32  # the random subspace stores a key
    assert isinstance(projector["embed"], optax.MaskedNode)
    assert ns["info"].scalars.shape[-1] == 1 and np.isfinite(ns["info"].scalars).all()


def test_per_leaf_rank_from_a_callable_equals_separate_int_ranks():
    params = {"a": jnp.zeros((64, 32)), "b": jnp.zeros((16, 48)), "c": jnp.zeros((8, 8)),
              "bias": jnp.zeros((32,))}
    grads = jax.tree.map(lambda x: jax.random.normal(jax.random.key(x.size), x.shape), params)

    def rank(view):  # a quarter of the smaller side; small matrices stay full-rank
        return None if view.m * view.n < 256 else min(view.m, view.n) // 4

    tx = scale_by_low_rank(rank, 3)
    state = tx.init(params)
    assert state.inner_state.mu["a"].shape == (64, 8) and state.inner_state.mu["b"].shape == (4, 48)
    assert state.inner_state.mu["c"].shape == (8, 8)  # None: full-rank
    updates, _ = jax.jit(tx.update)(grads, state)
    for name, r in (("a", 8), ("b", 4)):  # each projected leaf as scale_by_low_rank(r) alone
        labels = {k: k == name for k in params}
        alone = scale_by_low_rank(r, 3, labels=labels)
        want, _ = jax.jit(alone.update)(grads, alone.init(params))
        np.testing.assert_allclose(updates[name], want[name], rtol=1e-6)
    with pytest.raises(ValueError, match=r"rank\('a'\)=40 exceeds"):
        scale_by_low_rank(lambda v: 40, 3).init(params)
    with pytest.raises(TypeError, match=r"rank\('a'\) must be an int"):
        scale_by_low_rank(lambda v: 2.0, 3).init(params)
