"""Sharded init + update on 8 CPU devices: equal to the unsharded run, state not replicated."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import memjax
from tests.optim.conformance import GAP, TRANSFORMS, make_grads

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake CPU) devices")


def _params():
    keys = jax.random.split(jax.random.key(0), 3)
    return {"w_in": jax.random.normal(keys[0], (64, 16)),   # std: right, moments (64, r)
            "w_out": jax.random.normal(keys[1], (16, 64)),  # std: left, moments (r, 64)
            "bias": jax.random.normal(keys[2], (16,))}


@pytest.mark.parametrize("name", ["galore_svd", "galore_dct", "galore_random"])
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
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), ps, pu)

    low_rank = ss.inner_state[0]
    moments = {k: getattr(low_rank.inner_state, k) for k in ("mu", "nu")}
    for kind, tree in moments.items():
        for key in ("w_in", "w_out"):
            leaf = tree[key]
            assert not leaf.sharding.is_fully_replicated, (kind, key, leaf.shape, leaf.sharding)
            # Each device holds 1/8 of the moments.
            shard = leaf.addressable_shards[0].data
            assert shard.size * 8 == leaf.size, (kind, key, shard.shape)
