"""Sharded init + update on 8 CPU devices: equal to the unsharded run, state not replicated."""

import jax
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import memjax
from tests.optim.conformance import GAP, NORMWISE_RTOL, TRANSFORMS, make_grads

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake CPU) devices")


def _params():
    keys = jax.random.split(jax.random.key(0), 3)
    return {"w_in": jax.random.normal(keys[0], (64, 16)),   # std: right, moments (64, r)
            "w_out": jax.random.normal(keys[1], (16, 64)),  # std: left, moments (r, 64)
            "bias": jax.random.normal(keys[2], (16,))}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["galore_svd", "galore_dct", "galore_random", "fira_svd",
                                  "apollo_random", "apollo_mini", "frugal_svd", "frugal_block",
                                  "q_galore"])
def test_fsdp_sharded_matches_unsharded_and_state_is_sharded(name):
    mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
    params = _params()
    specs = {"w_in": P("fsdp", None), "w_out": P("fsdp", None), "bias": P()}
    p_sh = jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                        is_leaf=lambda x: isinstance(x, P))
    tx = TRANSFORMS[name](1e-2)
    s_sh = memjax.optim.state_shardings(jax.eval_shape(tx.init, params), params, p_sh)

    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    init_sharded = jax.jit(tx.init, out_shardings=s_sh)
    step_sharded = jax.jit(step, in_shardings=(p_sh, s_sh, p_sh), out_shardings=(p_sh, s_sh))
    step_plain = jax.jit(step)

    ps = jax.device_put(params, p_sh)
    ss = init_sharded(ps)
    pu, su = params, tx.init(params)
    for t in range(GAP + 2):  # crosses a refresh
        g = make_grads(params, t)
        ps, ss = step_sharded(ps, ss, jax.device_put(g, p_sh))
        pu, su = step_plain(pu, su, g)
    tol = NORMWISE_RTOL.get(name, 1e-6)  # quantized state: a reduction order can flip a code
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=tol, atol=tol), ps, pu)

    # Every matrix-shaped piece of state of w_in / w_out (moments, float projectors, int8 codes,
    # FRUGAL's block moment buffers shared by the active matrices) is spread over the 8 devices;
    # only small vectors (keys, block scales, INT4 codes, counters) may be replicated.
    checked = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(ss)[0]:
        where = memjax.optim.labels.path_str(path)
        owned = any(k in where for k in ("w_in", "w_out")) or "/block/" in where
        if leaf.ndim != 2 or leaf.size < 64 or not owned:
            continue
        assert not leaf.sharding.is_fully_replicated, (where, leaf.shape, leaf.sharding)
        shard = leaf.addressable_shards[0].data
        assert shard.size * 8 == leaf.size, (where, shard.shape)
        checked += 1
    assert checked >= (2 if name == "frugal_block" else 4)  # two moments of each matrix
