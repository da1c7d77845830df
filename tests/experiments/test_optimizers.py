"""Every optimizer of :mod:`experiments.optimizers` builds on the LM's stacked parameters and trains.

Every configuration below is built by name (``optimizers.build``) and traced on the tiny LM's
parameters, whose blocks carry a leading ``"layers"`` axis: update and state shapes, state
shardings following the parameters on a ``(data 1, fsdp 2)`` mesh, a state smaller than AdamW's.
One configuration per recipe name is then compiled by ``trainer.build`` (on one device: compiling
the LM costs seconds per optimizer; tests/optim/test_sharding.py runs the recipes sharded) and
stepped on one fixed batch, so the loss must fall (memorisation). FRUGAL's subspaces share one
builder: ``frugal-block`` is trained, the others are traced. The CLI tests check that the recipes
and their hyperparameters can be picked with ``--optimizers.N.*`` overrides.
"""

import typing

import jax
import numpy as np
import pytest

import memjax
from experiments import optimizers, sharding, trainer
from experiments.config import (
    ConfigError,
    MeshConfig,
    OptimizerConfig,
    OptimizerName,
    ScheduleConfig,
    validate,
)
from experiments.data import Batch
from experiments.train import parse
from memjax.models.lm import lm_preset

STEPS, BATCH, SEQ = 6, 8, 16
LM = lm_preset("tiny", num_layers=2, max_length=SEQ)  # d_model 32, ffn 64, vocab 64, 2 stacked
SCHEDULE = ScheduleConfig(steps=STEPS, warmup_fraction=0.0, final_lr_fraction=1.0)
_LOW_RANK = {"rank": 8, "update_proj_gap": 3}  # a refresh at steps 0 and 3

CONFIGS = {  # display name -> config; learning rates large enough to move in six steps
    "adamw": OptimizerConfig(name="adamw", learning_rate=1e-2),
    "galore-svd": OptimizerConfig(name="galore", learning_rate=2e-2, **_LOW_RANK),
    "fira-svd": OptimizerConfig(name="fira", learning_rate=1e-2, **_LOW_RANK),
    "apollo-random": OptimizerConfig(name="apollo", learning_rate=1e-2, **_LOW_RANK),
    "apollo_mini": OptimizerConfig(name="apollo_mini", learning_rate=1e-2, update_proj_gap=3),
    **{f"frugal-{s}": OptimizerConfig(name="frugal", learning_rate=1e-2, subspace=s,
                                      update_proj_gap=3, density=0.5 if s == "block" else 0.25)
       for s in ("svd", "random", "columns", "rows", "block")},
    # Small blocks and groups, so the moments and the projector are really quantized.
    "q_galore": OptimizerConfig(name="q_galore", learning_rate=2e-2, block_size=32,
                                proj_group_size=32, min_8bit_size=0, **_LOW_RANK),
}


def test_every_recipe_name_has_a_builder_and_a_test():
    names = set(typing.get_args(OptimizerName)) - {"mezo"}  # zeroth order: tests/experiments/test_mezo.py
    assert set(optimizers.RECIPES) == names
    assert isinstance(optimizers.build(OptimizerConfig(name="mezo"), SCHEDULE)[0],
                      memjax.optim.ZerothOrderTransformation)
    assert {c.name for c in CONFIGS.values()} == names
    assert all(c.display_name == label for label, c in CONFIGS.items())


TRAINED = ["adamw", "galore-svd", "fira-svd", "apollo-random", "apollo_mini", "frugal-block",
           "q_galore"]  # one per recipe name
RULES = (("embed", "fsdp"),)


@pytest.fixture(scope="module")
def lm_params():
    """The tiny LM's abstract parameters and their shardings on a (data 1, fsdp 2) mesh."""
    _, params, logical = trainer.abstract_model(LM)
    mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=2), jax.devices()[:2])
    return params, sharding.param_shardings(params, logical, RULES, mesh)


@pytest.fixture(scope="module")
def adamw_state_bytes(lm_params):
    tx, _ = optimizers.build(CONFIGS["adamw"], SCHEDULE)
    return memjax.optim.state_bytes(jax.eval_shape(tx.init, lm_params[0]))


@pytest.mark.slow
@pytest.mark.parametrize("label", list(CONFIGS))
def test_recipe_builds_on_stacked_parameters(label, lm_params, adamw_state_bytes):
    params, p_sh = lm_params
    tx, _ = optimizers.build(CONFIGS[label], SCHEDULE)
    state = jax.eval_shape(tx.init, params)
    updates, new_state = jax.eval_shape(tx.update, params, state, params)
    shape = lambda x: (x.shape, x.dtype)
    assert jax.tree.map(shape, updates) == jax.tree.map(shape, params)
    assert jax.tree.map(shape, new_state) == jax.tree.map(shape, state)
    # Moments (FRUGAL's shared block buffers too) follow the parameters' sharding; only small
    # leaves and Q-GaLore's packed INT4 projector codes (1/8 of a float projector) are replicated.
    s_sh = memjax.optim.state_shardings(state, params, p_sh)
    replicated = []
    for (path, x), sh in zip(jax.tree_util.tree_flatten_with_path(state)[0], jax.tree.leaves(s_sh)):
        where = memjax.optim.labels.path_str(path)
        int4_projector = "/projector/" in where and where.endswith("/codes")
        if sh.is_fully_replicated and x.size >= 256 and not int4_projector:
            replicated.append((where, x.shape))
    assert not replicated, (label, replicated)
    if label != "adamw":
        assert memjax.optim.state_bytes(state) < adamw_state_bytes, label
    assert all(x.size for x in jax.tree.leaves(state)), label  # orbax cannot save empty arrays


def test_q_galore_with_float32_fallback_leaves_can_be_checkpointed(lm_params):
    tx, _ = optimizers.build(OptimizerConfig(name="q_galore", rank=8), SCHEDULE)  # 4096: fallback
    state = jax.eval_shape(tx.init, lm_params[0])
    empty = [memjax.optim.labels.path_str(path)
             for path, x in jax.tree_util.tree_flatten_with_path(state)[0] if x.size == 0]
    assert not empty, empty


@pytest.fixture(scope="module")
def batch():
    tokens = jax.random.randint(jax.random.key(1), (BATCH, SEQ), 0, LM.vocab_size)
    return trainer.micro_batches(Batch(np.asarray(tokens, np.int32),
                                       np.ones((BATCH, SEQ - 1), np.float32)), 1)


@pytest.mark.slow
@pytest.mark.parametrize("label", TRAINED)
def test_recipe_trains_through_the_trainer(label, batch):
    tx, lr = optimizers.build(CONFIGS[label], SCHEDULE)
    mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=1), jax.devices()[:1])
    tr = trainer.build(LM, tx, lr, mesh=mesh, rules=RULES, seed=0, micro_batch=BATCH,
                       grad_accum=1, seq_len=SEQ)
    on_device = trainer.to_device(batch, tr.batch_shardings)
    state = tr.init()
    before = jax.tree.map(np.asarray, state.params)
    losses = []
    for _ in range(STEPS):
        state, m, _ = tr.step(state, on_device)
        m = trainer.host_metrics(m)
        assert m["skipped"] == 0, label
        losses.append(m["loss"])
    assert np.all(np.isfinite(losses)), (label, losses)
    # Every step lowers the loss on the memorised batch, by > 0.3 over the six steps (each recipe
    # measured >= 0.6).
    assert np.all(np.diff(losses) < 0) and losses[-1] < losses[0] - 0.3, (label, losses)
    after = jax.tree.map(np.asarray, state.params)
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(after)), label
    # Every stacked matrix moves (the state-free and the inactive parts too).
    for group, name in (("mixer", "q_proj"), ("mixer", "o_proj"), ("mlp", "up"), ("mlp", "down")):
        w0, w1 = before["blocks"][group][name]["kernel"], after["blocks"][group][name]["kernel"]
        assert not np.array_equal(w0, w1), (label, name)


def test_cli_picks_new_recipes_and_their_hyperparameters():
    config = parse(["--config", "smoke", "--optimizers.1.name", "frugal",
                    "--optimizers.1.subspace", "block", "--optimizers.1.density", "0.5",
                    "--optimizers.1.order", "ascending", "--optimizers.1.state-free", "sgd"])
    o = config.optimizers[1]
    assert (o.name, o.subspace, o.density, o.order, o.state_free) == (
        "frugal", "block", 0.5, "ascending", "sgd")
    assert o.display_name == "frugal-block"
    validate(config)

    config = parse(["--config", "smoke", "--optimizers.1.name", "apollo_mini"])
    o = config.optimizers[1]
    assert o.display_name == "apollo_mini"
    assert (o.scale, o.projector, o.scale_type) == (
        128.0, "random", "tensor")

    config = parse(["--config", "smoke", "--optimizers.1.name", "q_galore",
                    "--optimizers.1.proj-bits", "8", "--optimizers.1.no-lazy",
                    "--optimizers.1.scale", "0.5"])
    o = config.optimizers[1]
    assert (o.proj_bits, o.lazy, o.scale) == (8, False, 0.5)
    with pytest.raises(ConfigError, match="proj-bits"):
        parse(["--config", "smoke", "--optimizers.1.proj-bits", "3"])


def test_default_labels_and_recipe_defaults():
    assert OptimizerConfig(name="galore").display_name == "galore-svd"
    assert OptimizerConfig(name="fira", projector="dct").display_name == "fira-dct"
    assert OptimizerConfig(name="apollo").display_name == "apollo-random"
    assert OptimizerConfig(name="frugal", subspace="columns").display_name == "frugal-columns"
    assert OptimizerConfig(name="q_galore", label="qg").display_name == "qg"
    assert OptimizerConfig(name="galore").scale == 0.25
    assert OptimizerConfig(name="apollo").scale == 1.0
    assert OptimizerConfig(name="apollo").scale_type == "channel"
    assert OptimizerConfig(name="apollo_mini").scale_type == "tensor"


def test_validate_checks_recipe_hyperparameters():
    config = parse(["--config", "smoke", "--optimizers.1.name", "frugal",
                    "--optimizers.1.density", "1.5"])
    with pytest.raises(ConfigError, match="density=1.5"):
        validate(config)
    # rank is a field of the low-rank recipes only: frugal and apollo_mini have none.
    for name in ("frugal", "apollo_mini"):
        with pytest.raises(ConfigError, match=f"optimizers.1 is {name}, which has no rank"):
            parse(["--config", "smoke", "--optimizers.1.name", name, "--optimizers.1.rank", "64"])
    with pytest.raises(ConfigError, match="rank=64"):
        validate(parse(["--config", "smoke", "--optimizers.1.name", "fira",
                        "--optimizers.1.rank", "64"]))
