"""The layerwise step (memjax.training.layerwise_step) against the standard step.

The standard step is ``value_and_grad`` of the whole loss, the mean over micro-batches, optional
global-norm clipping (memjax.optim.clip_by_global_norm) and ``tx.update``: the layerwise step must
give the same parameters and state. The two steps sum the same gradients in another order, so they
differ by float32 rounding only. Tolerance after 20 steps of a tiny LM at lr 1e-3: 1e-5 relative to
each leaf's largest entry (entries near zero cannot match to 1e-5 of themselves). Q-GaLore's
8-bit moments and INT4 projectors turn a rounding-level change into a one-level code change
(about 1% of a block's range), so its trajectories part after a few steps; it is compared teacher
forced instead: every one of the 20 steps starts both steps from the standard trajectory's state,
and the parameters must agree to 1e-5 of their scale plus a tenth of the step's largest entry (what
one-level code changes can move, `_assert_step_close`; without it the test failed on another CPU:
144 of 4096 entries off by 9.8e-6 for an atol of 7e-7), 99% of the codes exactly (all within one
level) and the float state (absmax, projector scales) to 1e-4 of its scale. FRUGAL is
checked with its random subspace and SGD outside it: with the SVD subspace a rounding-level change
decides which of two near-equal singular directions is state-full, and with signSGD which sign a
near-zero entry takes (a step of 2 lr either way), which no reordering of sums can hold fixed.
"""

from __future__ import annotations

import functools
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import memjax
from memjax.models.lm import LM, layered, lm_preset, next_token_loss

STEPS, LR, VOCAB = 20, 1e-3, 64
NF = {"skip_nonfinite": False}
RECIPES = {
    "adamw": lambda: optax.adamw(LR),
    "galore": lambda: memjax.optim.galore(LR, rank=4, update_proj_gap=5, **NF),
    "fira": lambda: memjax.optim.fira(LR, rank=4, update_proj_gap=5, **NF),
    "apollo": lambda: memjax.optim.apollo(LR, rank=4, update_proj_gap=5, **NF),
    "apollo_mini": lambda: memjax.optim.apollo_mini(LR, update_proj_gap=5, **NF),
    "frugal": lambda: memjax.optim.frugal(LR, density=0.25, update_proj_gap=5, subspace="random",
                                          state_free="sgd", **NF),
    "q_galore": lambda: memjax.optim.q_galore(LR, rank=4, update_proj_gap=5, min_8bit_size=0,
                                              **NF),
}


def _model(remat: str = "none"):
    config = lm_preset("tiny", remat=remat)
    graphdef, params = nnx.split(LM(config, rngs=nnx.Rngs(0)), nnx.Param)
    return config, graphdef, nnx.to_pure_dict(params)


def _standard_step(graphdef, tx):
    """``(params, state, batch, clip) -> (params, state, loss)``; ``clip = inf`` clips nothing
    (:func:`memjax.optim.clip_by_global_norm`'s rule, with the bound as an argument)."""
    def step(params, state, batch, clip):
        def micro(acc, mb):
            loss, g = jax.value_and_grad(
                lambda p: next_token_loss(nnx.merge(graphdef, p), mb[0], mb[1]))(params)
            return jax.tree.map(jnp.add, acc, g), loss
        g, losses = jax.lax.scan(micro, jax.tree.map(jnp.zeros_like, params), batch)
        g = jax.tree.map(lambda x: x / losses.shape[0], g)
        factor = jnp.minimum(1.0, clip / optax.tree.norm(g))
        updates, state = tx.update(jax.tree.map(lambda x: x * factor, g), state, params)
        return optax.apply_updates(params, updates), state, jnp.mean(losses)
    return jax.jit(step)


def _batches(num_micro, seed=0):
    rng = np.random.default_rng(seed)
    for _ in range(STEPS):
        tokens = jnp.asarray(rng.integers(0, VOCAB, (num_micro, 4, 16)), jnp.int32)
        yield tokens, jnp.ones((num_micro, 4, 15), jnp.float32)


@functools.lru_cache(maxsize=None)
def _compiled(name, remat):
    """The model, the recipe and both steps, jitted once per recipe: the clipping bound is an
    argument of both (``inf``: no clipping), so a recipe's runs with and without clipping share
    one compilation."""
    config, graphdef, params = _model(remat)
    tx = RECIPES[name]()
    model = layered(config)
    layerwise = jax.jit(lambda p, s, b, c: memjax.training.layerwise_step(
        model, tx, clip_norm=c, micro_batched=True)(p, s, b))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", memjax.optim.NoProjectionWarning)
        state = tx.init(params)
    return params, state, _standard_step(graphdef, tx), layerwise


def _run_both(name, clip=None, num_micro=1, remat="none", teacher_forced=False):
    params, state, standard, layerwise = _compiled(name, remat)
    bound = jnp.float32(jnp.inf if clip is None else clip)
    p1 = p2 = params
    s1 = s2 = state
    for batch in _batches(num_micro):
        if teacher_forced:
            start, p2, s2 = p1, p1, s1
        p1, s1, loss1 = standard(p1, s1, batch, bound)
        p2, s2, metrics = layerwise(p2, s2, batch, bound)
        np.testing.assert_allclose(metrics["loss"], loss1, rtol=1e-5)
        assert int(metrics["skipped"]) == 0
        if teacher_forced:
            _assert_step_close(start, p1, p2)
            _assert_codes_close(s1, s2)
    return (p1, s1), (p2, s2)


def _assert_step_close(start, a, b, rtol=1e-5, flip=0.1):
    """One step from ``start`` to ``a`` (standard) and to ``b`` (layerwise) over 8-bit state.

    Every entry agrees to ``rtol`` of the leaf's largest entry, plus what one-level code changes
    can add: a one-level change of an 8-bit moment moves that low-rank coordinate's Adam update
    by a few percent of the largest one, and back-projected it moves a column of the leaf's step,
    so by at most ``flip`` (a tenth) of the step's largest entry. A wrong update (another layer's
    state, a missed or doubled step) moves entries by the whole step.
    """
    for (path, x0), x, y in zip(jax.tree_util.tree_flatten_with_path(start)[0],
                                jax.tree.leaves(a), jax.tree.leaves(b)):
        x0, x, y = np.asarray(x0), np.asarray(x), np.asarray(y)
        step = np.abs(x - x0).max()
        np.testing.assert_allclose(y, x, rtol=0, atol=rtol * np.abs(x).max() + flip * step,
                                   err_msg=jax.tree_util.keystr(path))


def _assert_codes_close(a, b):
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
        x, y = np.asarray(x), np.asarray(y)
        if x.dtype in (np.int8, np.uint8) and x.size:
            diff = np.abs(x.astype(np.int32) - y.astype(np.int32))
            where = jax.tree_util.keystr(path)
            if x.dtype == np.uint8:  # packed INT4 pairs: compare each nibble
                diff = np.maximum(np.abs((x & 15).astype(np.int32) - (y & 15)),
                                  np.abs((x >> 4).astype(np.int32) - (y >> 4)))
            assert diff.max() <= 1 and np.mean(diff == 0) >= 0.99, (where, diff.max())
        elif x.size and np.issubdtype(x.dtype, np.floating):
            np.testing.assert_allclose(y, x, rtol=0, atol=1e-4 * max(np.abs(x).max(), 1e-30),
                                       err_msg=jax.tree_util.keystr(path))


def _assert_params_close(a, b, rtol=1e-5):
    """Within ``rtol`` of each leaf's largest entry."""
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
        x, y = np.asarray(x), np.asarray(y)
        np.testing.assert_allclose(y, x, rtol=0, atol=rtol * np.abs(x).max(),
                                   err_msg=jax.tree_util.keystr(path))


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(RECIPES))
def test_layerwise_equals_standard_step(name):
    """Without clipping (bound inf) and with clipping at 0.5, from the same start."""
    teacher_forced = name == "q_galore"  # every step checked inside, with the flip bound
    for clip in (None, 0.5):
        (p1, s1), (p2, s2) = _run_both(name, clip, teacher_forced=teacher_forced)
        if not teacher_forced:
            _assert_params_close(p1, p2)
        assert jax.tree.structure(s1) == jax.tree.structure(s2)


@pytest.mark.slow
@pytest.mark.parametrize("name,remat,num_micro", [("galore", "full", 3), ("apollo", "selective", 2)])
def test_layerwise_accumulation_and_remat_equal_standard_step(name, remat, num_micro):
    (p1, _), (p2, _) = _run_both(name, clip=1.0, num_micro=num_micro, remat=remat)
    _assert_params_close(p1, p2)


@pytest.mark.slow
def test_clipping_and_grad_norm_are_exact():
    config, graphdef, params = _model()
    tx = optax.sgd(1.0)
    batch = next(_batches(1))
    grads = jax.grad(lambda p: next_token_loss(nnx.merge(graphdef, p), batch[0][0],
                                               batch[1][0]))(params)
    norm = float(optax.tree.norm(grads))
    clip = norm / 4
    step = jax.jit(memjax.training.layerwise_step(layered(config), tx, clip_norm=clip,
                                                  micro_batched=True))
    new, _, metrics = step(params, tx.init(params), batch)
    np.testing.assert_allclose(metrics["grad_norm"], norm, rtol=1e-5)
    moved = optax.tree.norm(jax.tree.map(jnp.subtract, params, new))
    np.testing.assert_allclose(moved, clip, rtol=1e-5)


def _poisoned_batch():
    tokens, mask = next(_batches(1))
    return tokens, mask.at[0, 0, 3].set(jnp.inf)  # an infinite loss weight: non-finite gradients


@pytest.mark.slow
@pytest.mark.parametrize("guard,clip", [("step", None), ("step", 1.0), (None, 1.0)])
def test_nonfinite_gradient_changes_nothing(guard, clip):
    """The norm pass sees the non-finite norm before any layer is written: every parameter and
    every state leaf stays bit for bit (with a norm pass, even without the guard: the clip
    factor is then non-finite, so guard=None is not tested without it)."""
    config, _, params = _model()
    tx = RECIPES["galore"]()
    state = tx.init(params)
    step = jax.jit(memjax.training.layerwise_step(layered(config), tx, clip_norm=clip,
                                                  guard=guard, micro_batched=True))
    new, new_state, metrics = step(params, state, _poisoned_batch())
    if guard is None:
        assert not np.isfinite(float(metrics["grad_norm"]))
        return
    assert int(metrics["skipped"]) == 1
    for a, b in zip(jax.tree.leaves((params, state)), jax.tree.leaves((new, new_state))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow
def test_layer_guard_keeps_nonfinite_layers_and_updates_on_finite_data():
    config, _, params = _model()
    tx = optax.adamw(LR)
    step = jax.jit(memjax.training.layerwise_step(layered(config), tx, guard="layer",
                                                  micro_batched=True))
    new, state, metrics = step(params, tx.init(params), _poisoned_batch())
    assert int(metrics["skipped"]) == 1
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(new)):
        assert np.all(np.isfinite(np.asarray(b)))
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(state))
    (p1, _), (p2, _) = _run_both("adamw")
    _assert_params_close(p1, p2)


@pytest.mark.parametrize("make", [
    lambda: optax.chain(memjax.optim.clip_by_global_norm(1.0), optax.adam(LR)),
    lambda: memjax.optim.galore(LR, rank=4),  # skip_nonfinite=True: a guard over all leaves
    lambda: optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(LR)),
], ids=["memjax-clip", "recipe-with-guard", "optax-clip"])
@pytest.mark.slow
def test_transform_that_mixes_leaves_is_refused(make):
    config, _, params = _model()
    tx = make()
    step = memjax.training.layerwise_step(layered(config), tx)
    batch = jax.tree.map(lambda x: x[0], next(_batches(1)))
    with pytest.raises(ValueError, match="clip_norm"):
        jax.eval_shape(step, params, jax.eval_shape(tx.init, params), batch)


def test_bad_arguments():
    config = lm_preset("tiny")
    with pytest.raises(ValueError, match="guard"):
        memjax.training.layerwise_step(layered(config), optax.sgd(1.0), guard="all")
    with pytest.raises(ValueError, match="clip_norm"):
        memjax.training.layerwise_step(layered(config), optax.sgd(1.0), clip_norm=0.0)
    with pytest.raises(TypeError, match="Layered"):
        memjax.training.layerwise_step((1, 2, 3), optax.sgd(1.0))
    with pytest.raises(ValueError, match="stack"):
        memjax.training.plan_stack(optax.sgd(1.0), {"w": jnp.zeros(3)}, "blocks")


def test_plan_reads_per_layer_state_from_the_state_itself():
    params = {"blocks": {"w": jnp.zeros((3, 8, 16)), "scale": jnp.zeros((3, 8))},
              "head": jnp.zeros((8, 4))}
    plan = memjax.training.plan_stack(optax.adam(1e-3), params, "blocks")
    assert plan.separable == (True, True, False) and plan.held_paths == ()
    assert sum(plan.per_layer) == 4  # mu and nu of both stacked leaves; count is shared
    # 8-bit Adam: the (3, 8) leaf is quantized as one block over all layers (its scale mixes
    # the layers and has the same shape for one layer): the dependence trace holds it back
    plan = memjax.training.plan_stack(memjax.optim.scale_by_adam_8bit(min_8bit_size=0), params,
                                      "blocks")
    assert plan.held_paths == ("['blocks']['scale']",)
    # a stack of matrices (ndim 3) is quantized slice by slice: separable
    assert plan.separable[1]


@pytest.mark.slow
def test_compiled_step_copies_no_stack():
    """No whole stacked parameter or per-layer state buffer is copied (XLA copies a carried stack
    when a loop body writes it from reads of another stack, or fuses a read through the write)."""
    config = lm_preset("tiny", num_layers=3, d_model=48, ffn_dim=80, num_heads=2)
    _, params = nnx.split(nnx.eval_shape(lambda: LM(config, rngs=nnx.Rngs(0))), nnx.Param)
    params = nnx.to_pure_dict(params)
    tx = memjax.optim.galore(LR, rank=8, inner=memjax.optim.scale_by_adam_8bit(min_8bit_size=0),
                             **NF)
    state = jax.eval_shape(tx.init, params)
    batch = (jax.ShapeDtypeStruct((4, 16), jnp.int32), jax.ShapeDtypeStruct((4, 15), jnp.float32))
    step = memjax.training.layerwise_step(layered(config), tx, clip_norm=1.0)
    hlo = jax.jit(step, donate_argnums=(0, 1)).lower(params, state, batch).compile().as_text()
    stacked = {f"{jnp.dtype(x.dtype).name}[{','.join(map(str, x.shape))}]"
               for x in jax.tree.leaves((params["blocks"], state)) if x.shape[:1] == (3,)}
    short = {"float32": "f32", "int8": "s8", "uint32": "u32", "int32": "s32", "uint8": "u8"}
    stacked = {re.sub(r"^\w+", lambda m: short.get(m.group(0), m.group(0)), s) for s in stacked}
    # copies of a zero-initialised loop buffer (a broadcast) are not copies of a parameter or state
    copies = [shape for shape, src in re.findall(r"= (\w+\[[\d,]*\])\S* copy\(%([\w.-]+)\)", hlo)
              if "broadcast" not in src and "constant" not in src]
    assert len(stacked) >= 8
    assert not [c for c in copies if c in stacked], sorted(set(copies) & stacked)


@pytest.mark.slow
@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake CPU) devices")
def test_sharded_step_equals_unsharded_and_reduces_per_layer():
    from jax.sharding import NamedSharding, PartitionSpec as P

    config, _, params = _model()
    mesh = jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)

    def spec(path, x):
        if x.ndim == 3:  # stacked matrices: shard the first matrix axis over fsdp
            return NamedSharding(mesh, P(None, "fsdp", None))
        if x.ndim == 2 and x.shape[0] % 4 == 0:
            return NamedSharding(mesh, P("fsdp", None))
        return NamedSharding(mesh, P())

    shardings = jax.tree_util.tree_map_with_path(spec, params)
    tx = RECIPES["galore"]()
    state = tx.init(params)
    rng = np.random.default_rng(3)
    batch = (jnp.asarray(rng.integers(0, VOCAB, (1, 8, 16)), jnp.int32),
             jnp.ones((1, 8, 15), jnp.float32))
    plain = jax.jit(memjax.training.layerwise_step(layered(config), tx, clip_norm=1.0,
                                                   micro_batched=True))
    p_ref, s_ref, m_ref = plain(params, state, batch)
    sharded_step = memjax.training.layerwise_step(layered(config), tx, clip_norm=1.0,
                                                  micro_batched=True, param_shardings=shardings)
    state_sh = memjax.optim.state_shardings(jax.eval_shape(tx.init, params), params, shardings)
    batch_sh = NamedSharding(mesh, P(None, ("data", "fsdp")))
    jitted = jax.jit(sharded_step, in_shardings=(shardings, state_sh, (batch_sh, batch_sh)),
                     out_shardings=(shardings, state_sh, NamedSharding(mesh, P())))
    p_sh, s_sh, m_sh = jitted(jax.device_put(params, shardings), jax.device_put(state, state_sh),
                              jax.device_put(batch, (batch_sh, batch_sh)))
    for a, b in zip(jax.tree.leaves((p_ref, m_ref["loss"])), jax.tree.leaves((p_sh, m_sh["loss"]))):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6, atol=1e-6)
    hlo = jitted.lower(params, state, batch).compile().as_text()
    collectives = re.findall(r"= (\w+\[[\d,]*\])\S* (?:all-reduce|reduce-scatter|all-gather)\(",
                             hlo)
    assert collectives
    num_layers = config.num_layers
    whole = [c for c in collectives if re.match(rf"\w+\[{num_layers},\d+,\d+\]", c)]
    assert not whole, whole  # no collective over a whole stacked (all-layer) gradient


@pytest.mark.slow
def test_readme_example_runs():
    """The README's plain-JAX example (a stacked MLP) runs as written and trains."""
    from tests.readme import run_block

    namespace = run_block("memjax.training.Layered(")
    metrics = namespace["metrics"]
    assert int(metrics["skipped"]) == 0 and np.isfinite(float(metrics["loss"]))
    params = namespace["params"]
    assert float(jnp.abs(params["layers"]["w"]).max()) > 0  # the stacked layers were updated
