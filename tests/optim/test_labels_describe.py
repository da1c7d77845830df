"""Default leaf selection on scan-over-layers models, the no-projection warning, describe(), clipping."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import memjax
from memjax.models.lm import LM, lm_preset
from memjax.optim import MatrixDims, label_matrices


def test_default_rule_reads_the_last_two_axes_and_matches_words():
    params = {
        "blocks": {"mlp": {"up": jnp.zeros((3, 16, 40))}, "mixer_norm": {"scale": jnp.zeros((3, 16))}},
        "multihead_out": jnp.zeros((16, 16)),     # not a "head"
        "upscale": jnp.zeros((16, 24)),           # not a "scale"
        "lm_head": jnp.zeros((16, 100)),
        "input_layernorm": jnp.zeros((16, 16)),   # 2-D but a norm by name
        "conv": {"kernel": jnp.zeros((3, 3, 16, 32))},
        "vector": jnp.zeros((16,)),
    }
    labels = label_matrices(params)
    assert labels["blocks"]["mlp"]["up"] == MatrixDims(1, 2)
    assert labels["multihead_out"] == MatrixDims(0, 1) and labels["upscale"] == MatrixDims(0, 1)
    assert labels["conv"]["kernel"] == MatrixDims(2, 3)  # one c_in x c_out matrix per tap
    for none in (labels["lm_head"], labels["input_layernorm"], labels["vector"],
                 labels["blocks"]["mixer_norm"]["scale"]):
        assert none is None
    # A tree mixing 2-D and stacked 3-D matrices: the default projects both.
    tx = memjax.optim.galore(1e-2, rank=4)
    d = memjax.optim.describe(tx, params)
    treatment = {r.path: r.treatment for r in d.rows}
    assert treatment["blocks/mlp/up"] == treatment["upscale"] == "projected"
    assert treatment["conv/kernel"] == "projected" and treatment["lm_head"] == "full"
    # The conv kernel gets one projector per tap, like a stacked leaf per layer.
    state = tx.init(params)
    assert state.inner_state[0].projector["conv"]["kernel"].shape[0] == 9


def test_num_batch_dims_still_restricts_the_rule():
    params = {"a": jnp.zeros((16, 16)), "b": jnp.zeros((2, 16, 16))}
    labels = label_matrices(params, num_batch_dims=1)
    assert labels["a"] is None and labels["b"] == MatrixDims(1, 2)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["galore", "apollo_mini", "fira", "q_galore", "frugal"])
def test_default_recipes_project_the_stacked_lm(recipe):
    config = lm_preset("tiny_bytes", num_layers=3)
    params = nnx.state(nnx.eval_shape(lambda: LM(config, rngs=nnx.Rngs(0))), nnx.Param)
    params = nnx.to_pure_dict(params)
    kwargs = {} if recipe in ("apollo_mini", "frugal") else {"rank": 8}
    tx = getattr(memjax.optim, recipe)(1e-2, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("error", memjax.optim.NoProjectionWarning)
        d = memjax.optim.describe(tx, params)
    stacked = [r for r in d.rows if r.path.startswith("blocks/") and len(r.shape) == 3
               and "norm" not in r.path]
    assert stacked and all(r.treatment in ("projected", "block") for r in stacked)
    assert all(r.treatment == "full" for r in d.rows if r.path.startswith(("embed", "lm_head")))


def test_galore_defaults_on_llama_60m_save_state():
    params = nnx.to_pure_dict(nnx.state(
        nnx.eval_shape(lambda: LM(lm_preset("llama_60m"), rngs=nnx.Rngs(0))), nnx.Param))
    galore = memjax.optim.state_bytes(jax.eval_shape(memjax.optim.galore(1e-2, rank=128).init,
                                                     params))
    adamw = memjax.optim.state_bytes(jax.eval_shape(optax.adamw(1e-3).init, params))
    assert galore <= 0.72 * adamw, galore / adamw


def test_nnx_vmap_stacked_user_model_is_projected():
    class Layer(nnx.Module):
        def __init__(self, rngs):
            self.proj = nnx.Linear(24, 48, rngs=rngs)

    @nnx.vmap(in_axes=0, out_axes=0)
    def make(key):
        return Layer(nnx.Rngs(key))

    model = make(jax.random.split(jax.random.key(0), 4))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    d = memjax.optim.describe(memjax.optim.galore(1e-2, rank=8), params)
    rows = {r.path: r for r in d.rows}
    assert rows["proj/kernel"].shape == (4, 24, 48)
    assert rows["proj/kernel"].treatment == "projected" and rows["proj/kernel"].rank == 8
    assert rows["proj/bias"].treatment == "full"


def test_nothing_projected_warns_with_the_leaves_seen():
    params = {"embed": jnp.zeros((50, 16)), "norm": jnp.zeros((16,)), "small": jnp.zeros((16, 4))}
    with pytest.warns(memjax.optim.NoProjectionWarning, match="embed.*excluded by name"):
        memjax.optim.galore(1e-2, rank=8).init(params)
    with pytest.warns(memjax.optim.NoProjectionWarning, match=r"small \(16, 4\): smaller side"):
        memjax.optim.apollo(1e-2, rank=8).init(params)
    with pytest.warns(memjax.optim.NoProjectionWarning):
        memjax.optim.frugal(1e-2).init({"norm": jnp.zeros((16,))})


def test_rule_rank_and_recipe_rank_cannot_disagree():
    params = {"w": jnp.zeros((32, 12))}
    tx = memjax.optim.galore(1e-2, rank=4, labels=lambda p: label_matrices(p, rank=16))
    with pytest.raises(ValueError, match=r"label_matrices\(rank=16\).*rank is 4"):
        tx.init({**params, "v": jnp.zeros((64, 32))})
    with pytest.warns(memjax.optim.NoProjectionWarning):  # every leaf too small for the rule
        tx.init(params)
    # Without a rank the rule defers to the recipe's: 12 > 8 projected, 12 <= 16 kept full.
    rule = lambda p: label_matrices(p)  # noqa: E731
    assert memjax.optim.describe(memjax.optim.galore(1e-2, rank=8, labels=rule), params).rows[0].rank == 8
    with pytest.warns(memjax.optim.NoProjectionWarning):
        memjax.optim.galore(1e-2, rank=16, labels=rule).init(params)
    # A hand-written MatrixDims with a rank above the matrix is still an error.
    with pytest.raises(ValueError, match="exceeds the smaller side"):
        memjax.optim.galore(1e-2, rank=16, labels={"w": MatrixDims()}).init(params)


def test_describe_charges_every_state_byte():
    params = {"blocks": {"w": jnp.zeros((2, 32, 16))}, "embed": jnp.zeros((40, 16))}
    for tx in (memjax.optim.galore(1e-2, rank=4), optax.adamw(1e-3),
               memjax.optim.q_galore(1e-2, rank=4), memjax.optim.frugal(1e-2, subspace="block")):
        d = memjax.optim.describe(tx, params)
        assert sum(r.state_bytes for r in d.rows) + d.shared_bytes == d.total_state_bytes
        assert d.total_state_bytes == memjax.optim.state_bytes(tx.init(params))
        assert "leaves projected" in str(d)
    rows = {r.path: r for r in memjax.optim.describe(optax.adamw(1e-3), params).rows}
    assert rows["embed"].state_bytes == 2 * 40 * 16 * 4 and rows["embed"].treatment == "full"
    g = memjax.optim.describe(memjax.optim.galore(1e-2, rank=4), params).rows[0]
    # (32, 16): m >= n, so the std side projects the right (columns): moments 32 x 4 per slice.
    assert (g.side, g.rank) == ("right", 4)
    block = memjax.optim.describe(memjax.optim.frugal(1e-2, subspace="block"), params).rows[0]
    assert block.treatment == "block"


def test_clip_by_global_norm_matches_optax():
    g = {"a": jax.random.normal(jax.random.key(0), (7, 5)), "b": jnp.arange(4.0)}
    for max_norm in (0.5, 1e3):
        ours, _ = memjax.optim.clip_by_global_norm(max_norm).update(g, optax.EmptyState())
        ref, _ = optax.clip_by_global_norm(max_norm).update(g, optax.EmptyState())
        for k in g:
            np.testing.assert_allclose(ours[k], ref[k], rtol=1e-6)
    with pytest.raises(ValueError, match="max_norm"):
        memjax.optim.clip_by_global_norm(0.0)


def test_heads_and_embeddings_of_other_libraries_stay_full():
    """MaxText's unembedding and token embedder, Gemma's embedder, LLaMA's top-level ``output``;
    an ``output`` inside a block (BERT's attention output) is a hidden matrix and is projected."""
    m = jnp.zeros((16, 24))
    params = {"decoder": {"logits_dense": {"kernel": m}, "layers": {"mlp": {"wi": m}}},
              "token_embedder": {"embedding": m}, "embedder": {"input_embedding": m},
              "output": {"kernel": m},
              "encoder": {"attention": {"output": {"dense": {"kernel": m}}}}}
    labels = label_matrices(params)
    for full in (labels["decoder"]["logits_dense"]["kernel"], labels["token_embedder"]["embedding"],
                 labels["embedder"]["input_embedding"], labels["output"]["kernel"]):
        assert full is None
    assert labels["decoder"]["layers"]["mlp"]["wi"] == MatrixDims(0, 1)
    assert labels["encoder"]["attention"]["output"]["dense"]["kernel"] == MatrixDims(0, 1)
    # a rule of the user's own (another exclude=) owns the decision, the top-level one included
    assert label_matrices(params, exclude=r"embedding")["output"]["kernel"] == MatrixDims(0, 1)


def test_non_float_leaves_are_never_matrices():
    params = {"blocks": {"w": jnp.zeros((3, 16, 16)), "count": jnp.zeros((3, 16, 16), jnp.int32),
                         "codes": jnp.zeros((16, 16), jnp.int8)}}
    labels = label_matrices(params)
    assert labels["blocks"]["count"] is None and labels["blocks"]["codes"] is None
    assert labels["blocks"]["w"] == MatrixDims(1, 2)
    tx = memjax.optim.galore(1e-2, rank=4)
    tx.init(params)  # the int leaves get the full inner optimizer's state, like optax.adamw's
    rows = {r.path: r for r in memjax.optim.describe(tx, params).rows}
    assert rows["blocks/w"].treatment == "projected" and rows["blocks/count"].treatment == "full"
    # an explicit label that makes an integer leaf a matrix names the leaf and the cause
    explicit = {"blocks": {"w": MatrixDims(1, 2), "count": MatrixDims(1, 2), "codes": None}}
    with pytest.raises(ValueError, match=r"leaf 'blocks/count' has dtype int32.*floating"):
        memjax.optim.galore(1e-2, rank=4, labels=explicit).init(params)
    with pytest.warns(memjax.optim.NoProjectionWarning, match=r"count \(3, 16, 16\): not float"):
        memjax.optim.galore(1e-2, rank=4).init({"count": params["blocks"]["count"]})


@pytest.mark.parametrize("recipe", ["galore", "fira", "apollo", "apollo_mini", "frugal",
                                    "q_galore"])
def test_learning_rate_is_checked_when_the_recipe_is_built(recipe):
    make = getattr(memjax.optim, recipe)
    with pytest.raises(TypeError, match=r"learning_rate must be a number.*str '1e-3'"):
        make("1e-3")
    with pytest.raises(TypeError, match="learning_rate"):
        make(None)
    for ok in (-1e-3, 1, jnp.float32(1e-3), np.float64(1e-3), optax.linear_schedule(0.0, 1e-3, 10)):
        make(ok)  # a negative rate stays allowed, as in optax
