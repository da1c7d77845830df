"""MeZO on the decoder LM: perturbation at the point of use (inside the scan body) gives the same
loss as a materialised ``params + eps z``, and one SPSA step needs inference-level memory."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from memjax.models import lm as lmlib
from memjax.optim import accounting
from memjax.optim import zeroth_order as zo


def stacked(path, leaf):
    return 1 if path.startswith("blocks/") else 0


def _model(d_model, num_layers, length, tie=False):
    cfg = lmlib.LMConfig(vocab_size=256, d_model=d_model, num_layers=num_layers, num_heads=4,
                         ffn_dim=d_model * 8 // 3 // 8 * 8, max_length=length, tie_embeddings=tie)
    graphdef, params, rest = nnx.split(lmlib.LM(cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)

    def loss(p, tokens):
        return lmlib.next_token_loss(nnx.merge(graphdef, p, rest), tokens)

    def loss_at_use(p, tokens, noise):
        return lmlib.next_token_loss(nnx.merge(graphdef, p, rest), tokens,
                                     param_hook=zo.param_hook(noise))

    return params, loss, loss_at_use


@pytest.mark.slow
@pytest.mark.parametrize("tie", [False, True])
def test_perturbation_at_use_equals_materialised(tie):
    params, loss, loss_at_use = _model(32, 2, 16, tie)
    tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, 256)
    noise = zo.Noise(zo.noise_keys(params, jax.random.key(1), stacked), jnp.float32(0.05))
    a = jax.jit(loss)(zo.add_noise(params, noise), tokens)
    b = jax.jit(loss_at_use)(params, tokens, noise)
    np.testing.assert_allclose(a, b, rtol=1e-6)
    assert abs(float(a) - float(jax.jit(loss)(params, tokens))) > 1e-4  # the noise does something
    opt_a = zo.mezo(1e-2, stacked_axes=stacked)
    opt_b = zo.mezo(1e-2, stacked_axes=stacked, at_use=True)
    pa, _, ia = jax.jit(lambda p, s: opt_a.step(loss, p, s, tokens))(params, opt_a.init(params))
    pb, _, ib = jax.jit(lambda p, s: opt_b.step(loss_at_use, p, s, tokens))(params, opt_b.init(params))
    np.testing.assert_allclose(ia.scalars, ib.scalars, rtol=1e-3, atol=1e-4)
    for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_spsa_step_needs_inference_memory():
    """d_model 256, 8 layers, batch 8 x 256 tokens: SPSA step <= 1.15x forward, backprop+AdamW >= 3x."""
    params, loss, loss_at_use = _model(256, 8, 256)
    tokens = jax.ShapeDtypeStruct((8, 256), jnp.int32)
    forward = accounting.compiled_memory(loss, params, tokens).peak
    opt = zo.mezo(1e-4, stacked_axes=stacked, at_use=True)
    state = opt.init(params)
    spsa = accounting.compiled_memory(lambda p, s, t: opt.step(loss_at_use, p, s, t), params, state,
                                      tokens, donate_argnums=(0,))
    assert spsa.alias >= accounting.state_bytes(params)  # the parameters are updated in place
    tx = optax.adamw(1e-3)

    def backprop(p, o, t):
        grads = jax.grad(loss)(p, t)
        updates, o = tx.update(grads, o, p)
        return optax.apply_updates(p, updates), o

    adamw = accounting.compiled_memory(backprop, params, tx.init(params), tokens,
                                       donate_argnums=(0, 1)).peak
    assert spsa.peak <= 1.15 * forward, (spsa.peak, forward)
    assert adamw >= 3 * spsa.peak, (adamw, spsa.peak)
