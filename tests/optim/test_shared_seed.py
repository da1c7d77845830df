"""Shared-seed MeZO over 8 CPU devices (memjax.optim.shared_seed): one-byte codec, bit-identical
replicas, an int8 all-gather as the only collective, exact replay and join-by-replay, 2 processes."""

import os
import pathlib
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from memjax.optim import shared_seed as ss
from tests.optim.test_zeroth_order import STACKED, _loss
from tests.processes import free_port, run_together, xla_flags

ROOT = pathlib.Path(__file__).resolve().parents[2]
COLLECTIVE = re.compile(r"=\s*(\S+)\s+(all-gather|all-reduce|reduce-scatter|collective-permute|"
                        r"all-to-all|collective-broadcast)(-start)?\(")


def test_codec_error_bound_and_special_values():
    codec = ss.OneByteCodec()
    lo, hi = codec.range
    g = np.concatenate([np.geomspace(lo, hi, 2001), -np.geomspace(lo, hi, 2001)]).astype(np.float32)
    codes = codec.encode(g)
    assert codes.dtype == jnp.int8
    back = np.asarray(codec.decode(codes))
    assert np.all(np.sign(back) == np.sign(g))
    rel = np.abs(back / g - 1)
    assert rel.max() <= codec.relative_error * (1 + 1e-4), rel.max()
    assert rel.max() > 0.5 * codec.relative_error  # the bound is tight, not vacuous
    special = codec.encode(jnp.asarray([0.0, np.nan, np.inf, -np.inf, 1e9, -1e9, lo / 10]))
    np.testing.assert_array_equal(special, [0, ss.INVALID, ss.INVALID, ss.INVALID, 127, -127, 0])
    np.testing.assert_array_equal(codec.decode(special)[:4], 0.0)
    np.testing.assert_allclose(codec.decode(special)[4], hi, rtol=1e-6)


def _problem():
    rng = np.random.default_rng(0)
    params = {"w": rng.normal(size=(2, 6, 5)).astype(np.float32),
              "bias": rng.normal(size=(5,)).astype(np.float32)}
    x = rng.normal(size=(32, 6)).astype(np.float32)
    y = rng.normal(size=(32, 5)).astype(np.float32)
    return params, (x, y)


def _setup(mesh, **kwargs):
    params, batch = _problem()
    opt = ss.mezo_shared_seed(_loss, mesh, 0.05, eps=1e-2, weight_decay=0.1, seed=1,
                              stacked_axes=STACKED, **kwargs)
    put = lambda t, spec: jax.device_put(t, NamedSharding(mesh, spec))
    return opt, params, put(params, P()), put(batch, P("data"))


def _replicas_equal(tree):
    for leaf in jax.tree.leaves(tree):
        shards = [np.asarray(s.data) for s in leaf.addressable_shards]
        if not all(np.array_equal(shards[0], s) for s in shards[1:]):
            return False
    return True


@pytest.mark.slow
def test_replicas_stay_bit_identical_and_replay_rebuilds_them():
    mesh = jax.make_mesh((8,), ("data",))
    opt, init, params, batch = _setup(mesh)
    state = opt.init(params)
    log = ss.ReplayLog.empty(8)
    losses = []
    for t in range(20):
        params, state, info = opt.step(params, state, batch)
        log = log.append(info)
        losses.append(float(np.mean(info.losses)))
        if t == 9:  # a checkpoint: the log up to here is saved with it
            log_at_ten, at_ten = log, jax.tree.map(np.asarray, params)
    assert _replicas_equal(params)
    assert losses[-1] < losses[0]
    assert len(log) == 20 and log.nbytes_per_step == 8
    replayed = opt.replay(init, log)
    for a, b in zip(jax.tree.leaves(replayed), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # a worker joins after step 10 from the initial parameters and the saved log
    joined = opt.replay(init, log_at_ten)
    for a, b in zip(jax.tree.leaves(joined), jax.tree.leaves(at_ten)):
        np.testing.assert_array_equal(np.asarray(a), b)


@pytest.mark.slow
def test_the_only_collective_is_an_int8_all_gather():
    mesh = jax.make_mesh((8,), ("data",))
    opt, _, params, batch = _setup(mesh, n=2)
    hlo = opt.step.lower(params, opt.init(params), batch).compile().as_text()
    collectives = COLLECTIVE.findall(hlo)
    assert [(shape.split("{")[0], op) for shape, op, _ in collectives] == [("s8[8,2]", "all-gather")]


@pytest.mark.slow
def test_a_worker_with_a_nonfinite_loss_is_left_out():
    mesh = jax.make_mesh((8,), ("data",))
    opt, _, params, _ = _setup(mesh)
    _, (x, y) = _problem()
    x = x.copy()
    x[12] = np.nan  # worker 3 (rows 12..15) sees a NaN
    batch = jax.device_put((x, y), NamedSharding(mesh, P("data")))
    params, _, info = opt.step(params, opt.init(params), batch)
    codes = np.asarray(info.codes)[:, 0]
    assert codes[3] == ss.INVALID and np.all(codes[np.arange(8) != 3] != ss.INVALID)
    assert all(np.isfinite(np.asarray(leaf)).all() for leaf in jax.tree.leaves(params))


def test_bad_input():
    mesh = jax.make_mesh((4, 2), ("data", "fsdp"))
    with pytest.raises(ValueError, match="size 1"):
        ss.mezo_shared_seed(_loss, mesh, 0.1)
    with pytest.raises(ValueError, match="axis_name"):
        ss.mezo_shared_seed(_loss, mesh, 0.1, axis_name="batch")
    with pytest.raises(ValueError, match="eps"):
        ss.mezo_shared_seed(_loss, jax.make_mesh((8,), ("data",)), 0.1, eps=-1.0)


WORKER = '''
import sys, hashlib
import jax, numpy as np
jax.distributed.initialize(sys.argv[1], 2, int(sys.argv[2]))
from jax.sharding import NamedSharding, PartitionSpec as P
sys.path.insert(0, sys.argv[3])
from tests.optim import test_shared_seed as t
mesh = jax.make_mesh((jax.device_count(),), ("data",))
opt, init, params, _ = t._setup(mesh)
_, (x, y) = t._problem()
sharding = NamedSharding(mesh, P("data"))
rows = len(x) // jax.process_count()
me = jax.process_index()
local = (x[me * rows:(me + 1) * rows], y[me * rows:(me + 1) * rows])
batch = jax.tree.map(lambda a: jax.make_array_from_process_local_data(sharding, a), local)
state = opt.init(params)
for _ in range(5):
    params, state, info = opt.step(params, state, batch)
digest = hashlib.sha256()
for leaf in jax.tree.leaves(params):
    for shard in leaf.addressable_shards:
        digest.update(np.asarray(shard.data).tobytes())
print("DIGEST", digest.hexdigest(), jax.device_count(), flush=True)
'''


@pytest.mark.slow
def test_two_processes_end_bit_identical(tmp_path):
    port = free_port()
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "XLA_FLAGS": xla_flags("--xla_force_host_platform_device_count=2"),
           "JAX_PLATFORMS": "cpu"}
    outs = run_together([[sys.executable, str(script), f"localhost:{port}", str(i), str(ROOT)]
                         for i in range(2)], env, timeout=240)
    digests = [re.findall(r"DIGEST (\w+) 4", out) for out in outs]
    assert digests[0] and digests[0] == digests[1], outs


@pytest.mark.slow
def test_replay_of_a_step_where_every_worker_failed_changes_nothing():
    params, _ = _problem()
    log = ss.ReplayLog(np.zeros((1, 2), np.uint32), np.full((1, 8, 1), ss.INVALID, np.int8),
                       np.ones((1,), np.float32))
    out = ss.replay(params, log, weight_decay=0.5, stacked_axes=STACKED)
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), b)
