"""INT8 weights in the LM and in both kinds of step (memjax.optim.quantized_weights).

The layerwise step is checked against the standard step with the same INT8 weights: both draw the
same rounding bits from the weights' own keys, so they differ only where a float32 rounding
difference in the update lands a value on the other side of its random threshold (a one-level
code change, about 1e-5 of the entries).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import memjax
from memjax.models.lm import LM, generate, layered, lm_preset, next_token_loss
from memjax.optim import quantized_weights as qw

VOCAB = 64


def _model(**overrides):
    config = lm_preset("tiny", weight_bits=8, weight_group_size=128, **overrides)
    graphdef, params = nnx.split(LM(config, rngs=nnx.Rngs(0)), nnx.Param)
    return config, graphdef, nnx.to_pure_dict(params)


def _batch(seed=0, poison=False):
    rng = np.random.default_rng(seed)
    tokens = jnp.asarray(rng.integers(0, VOCAB, (1, 4, 16)), jnp.int32)
    mask = jnp.ones((1, 4, 15), jnp.float32)
    return tokens, mask.at[0, 0, 3].set(jnp.inf) if poison else mask


@pytest.mark.slow
def test_lm_holds_int8_block_kernels_and_its_forward_equals_the_float_twin():
    """The blocks' seven linear kernels are INT8 (per-layer groups and keys), the embedding, head
    and norms float and equal to the float model's; the forward (and cached decoding) equals the
    float model's with the dequantised kernels, exactly."""
    config, graphdef, params = _model()
    float_config = lm_preset("tiny")
    float_def, float_params = nnx.split(LM(float_config, rngs=nnx.Rngs(0)), nnx.Param)
    float_params = nnx.to_pure_dict(float_params)
    kernels = [jax.tree_util.keystr(p) for p, x in jax.tree_util.tree_flatten_with_path(
        params, is_leaf=qw.is_quantized)[0] if qw.is_quantized(x)]
    assert len(kernels) == 7 and all("blocks" in k and "kernel" in k for k in kernels)
    for path, x in jax.tree_util.tree_flatten_with_path(params, is_leaf=qw.is_quantized)[0]:
        want = float_params
        for key in path:
            want = want[key.key]
        if qw.is_quantized(x):
            assert x.codes.dtype == jnp.uint8 and x.key.shape == (config.num_layers, 2)
            step = np.asarray(x.scale).max()
            assert np.abs(np.asarray(qw.dequantize(x)) - np.asarray(want)).max() <= 0.5 * step
        else:
            np.testing.assert_array_equal(x, want)
    twin = memjax.optim.dequantize_weights(params)
    tokens = _batch()[0][0]

    @jax.jit
    def logits(p, graph):
        return nnx.merge(graph, p)(tokens)

    np.testing.assert_array_equal(logits(params, graphdef), logits(twin, float_def))
    model_q, model_f = nnx.merge(graphdef, params), nnx.merge(float_def, twin)
    np.testing.assert_array_equal(generate(model_q, tokens[:, :4], 4),
                                  generate(model_f, tokens[:, :4], 4))
    assert memjax.models.lm.num_params(config) == memjax.models.lm.num_params(float_config)


def _steps(tx, config, graphdef):
    standard = jax.jit(memjax.training.gradient_step(
        lambda p, mb: next_token_loss(nnx.merge(graphdef, p), mb[0], mb[1]), tx))
    layerwise = jax.jit(memjax.training.layerwise_step(layered(config), tx, guard="step",
                                                       micro_batched=True))
    return standard, layerwise


@pytest.mark.slow
def test_layerwise_step_equals_standard_step_on_int8_weights():
    """Three steps of APOLLO-Mini over INT8 weights (Q-APOLLO-Mini) with stochastic rounding,
    each from the standard trajectory's state (a rounding-level difference may flip one code by
    one level, which moves the next step's gradient; compounded over steps, that is the CPU's
    summation order, not the layerwise step): the same codes (but a few one-level changes), the
    same keys, the same float leaves and state to float32 rounding; then a step with a
    non-finite gradient changes nothing."""
    config, graphdef, params = _model()
    tx = memjax.optim.apollo_mini(1e-2, update_proj_gap=2, skip_nonfinite=False)
    standard, layerwise = _steps(tx, config, graphdef)
    (p1, s1), (p2, s2) = (params, tx.init(params)), (params, tx.init(params))
    for t in range(3):  # teacher forced: a one-level code change must not compound
        p2, s2 = p1, s1
        p1, s1, m1 = standard(p1, s1, _batch(t))
        p2, s2, m2 = layerwise(p2, s2, _batch(t))
        np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-5)
    changed = 0
    leaves = lambda tree: jax.tree.leaves(tree, is_leaf=qw.is_quantized)  # noqa: E731
    for a, b, a0 in zip(leaves(p1), leaves(p2), leaves(params)):
        if qw.is_quantized(a):
            np.testing.assert_array_equal(a.key, b.key)
            diff = np.abs(np.asarray(a.codes, int) - np.asarray(b.codes, int))
            assert diff.max() <= 1
            changed += int((diff > 0).sum())
            np.testing.assert_allclose(a.scale, b.scale, rtol=1e-4)
            moved = np.asarray(qw.dequantize(a)) != np.asarray(qw.dequantize(a0))
            assert moved.mean() > 0.2  # stochastic rounding moved the weights
        else:
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(np.abs(a).max()))
    assert changed <= 1e-3 * sum(x.size for x in leaves(p1))
    for a, b in zip(jax.tree.leaves(s1), jax.tree.leaves(s2)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(np.abs(a).max() + 1e-30))
    # a non-finite gradient: the layerwise step re-quantises nothing (codes, scales, keys)
    p3, s3, m3 = layerwise(p2, s2, _batch(poison=True))
    assert int(m3["skipped"]) == 1
    for a, b in zip(jax.tree.leaves((p2, s2)), jax.tree.leaves((p3, s3))):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_skipped_gradient_step_leaves_int8_weights_untouched():
    """A step skipped for a non-finite gradient re-quantises nothing: codes, scales and keys stay
    bit for bit (the layerwise step's skip: in the equivalence test above)."""
    config, graphdef, params = _model()
    tx = memjax.optim.on_float_view(memjax.optim.skip_nonfinite(optax.sgd(1e-2)))
    standard = jax.jit(memjax.training.gradient_step(
        lambda p, mb: next_token_loss(nnx.merge(graphdef, p), mb[0], mb[1]), tx))
    new, _, metrics = standard(params, tx.init(params), _batch(poison=True))
    assert int(metrics["skipped"]) == 1
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(new)):
        np.testing.assert_array_equal(a, b)


def test_int8_shardings_follow_the_float_weights():
    """On a (data 2, fsdp 4) mesh: an INT8 kernel's codes shard exactly as the float kernel,
    its scales and keys along the layers only; gradients and optimizer state see the float view."""
    from experiments import sharding, trainer
    from experiments.config import MeshConfig

    config = lm_preset("tiny", weight_bits=8, weight_group_size=128)
    _, abstract, logical = trainer.abstract_model(config)
    mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=4))
    rules = (("embed", "fsdp"),)
    param_sh, float_sh = trainer.param_shardings(abstract, logical, rules, mesh)
    up = param_sh["blocks"]["mlp"]["up"]["kernel"]
    up_float = float_sh["blocks"]["mlp"]["up"]["kernel"]
    assert qw.is_quantized(up) and not qw.is_quantized(up_float)
    assert up.codes == up_float and tuple(up_float.spec)[:2] == (None, "fsdp")
    assert tuple(up.scale.spec) == (None, None) and tuple(up.key.spec) == (None, None)
    assert param_sh["embed"]["embedding"] == float_sh["embed"]["embedding"]
