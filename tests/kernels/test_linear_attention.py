"""Tests of memjax.kernels.linear_attention.

The chain of trust: an independent NumPy float64 loop (below) checks ``reference.py`` (quadratic and
recurrent forms); the references check the chunked XLA form and ``linear_attention_step``.

Tolerances: float32 ``rtol=1e-4, atol=1e-5`` (forward and gradients); bfloat16 inputs/outputs
``rtol=2e-2, atol=2e-2`` against the float32 reference on the same bf16-rounded inputs (every
implementation computes in float32, so the gap is the bf16 rounding of outputs and cotangents).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memjax.kernels.linear_attention import (
    LinearAttentionState,
    lightning_decay,
    lightning_slopes,
    linear_attention,
    linear_attention_quadratic,
    linear_attention_recurrent,
    linear_attention_step,
)
from tests.trees import assert_trees_close

# Shapes are tiny, so compile time dominates: compile at XLA's lowest backend optimisation level.
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0,
                                                   "xla_llvm_disable_expensive_passes": True})
F32 = dict(rtol=1e-4, atol=1e-5)
BF16 = dict(rtol=2e-2, atol=2e-2)
DECAY = np.array([0.6, 0.95])  # two heads; a strong and a weak decay


def numpy_linear_attention(q, k, v, decay=None, causal=True, normalize=False, eps=1e-6,
                           initial_state=None):
    """Float64 double loop over (i, j) of the definition; returns (out, last kv, last k_sum)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    batch, length, heads, d_k = q.shape
    d_v = v.shape[-1]
    lam = np.ones(heads) if decay is None else np.asarray(decay, np.float64)
    if initial_state is None:
        kv0, k_sum0 = np.zeros((batch, heads, d_k, d_v)), np.zeros((batch, heads, d_k))
    else:
        kv0, k_sum0 = (np.asarray(s, np.float64) for s in initial_state)
    out = np.zeros((batch, length, heads, d_v))
    for b in range(batch):
        for h in range(heads):
            for i in range(length):
                num, den = np.zeros(d_v), 0.0
                for j in range(length):
                    if causal and j > i:
                        continue
                    score = lam[h] ** abs(i - j) * (q[b, i, h] @ k[b, j, h])
                    num += score * v[b, j, h]
                    den += score
                num += lam[h] ** (i + 1) * (q[b, i, h] @ kv0[b, h])
                den += lam[h] ** (i + 1) * (q[b, i, h] @ k_sum0[b, h])
                out[b, i, h] = num / (den + eps) if normalize else num
    kv, k_sum = kv0.copy(), k_sum0.copy()
    for t in range(length):
        kv = lam[None, :, None, None] * kv + np.einsum("bhd,bhe->bhde", k[:, t], v[:, t])
        k_sum = lam[None, :, None] * k_sum + k[:, t]
    return out, kv, k_sum


def normal(seed, shape):
    """Standard normal float32 array from NumPy (cheaper in tests than compiling jax.random)."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def make_inputs(seed, batch=2, length=11, heads=2, d_k=4, d_v=3, positive=False, dtype=jnp.float32):
    """q, k (batch, L, heads, d_k), v (batch, L, heads, d_v); q, k positive when ``positive``."""
    q = normal(seed, (batch, length, heads, d_k))
    k = normal(seed + 1000, (batch, length, heads, d_k))
    v = normal(seed + 2000, (batch, length, heads, d_v))
    if positive:  # the Katharopoulos denominator needs positive features
        q, k = jax.nn.elu(q) + 1.0, jax.nn.elu(k) + 1.0
    return q.astype(dtype), k.astype(dtype), v.astype(dtype)


def make_state(seed, batch=2, heads=2, d_k=4, d_v=3, normalize=False):
    """kv (batch, heads, d_k, d_v), or LinearAttentionState(kv, positive k_sum) if normalize."""
    kv = normal(seed, (batch, heads, d_k, d_v))
    if not normalize:
        return kv
    return LinearAttentionState(kv, jnp.abs(normal(seed + 1, (batch, heads, d_k))) + 0.5)


def output_and_grads(fn, q, k, v, cotangent):
    """fn(q, k, v) and the (q, k, v) gradients of <fn(q, k, v), cotangent>, under one jit."""
    def loss(q, k, v):
        out = fn(q, k, v)
        return jnp.sum(out.astype(jnp.float32) * cotangent), out
    grad_fn = jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))
    grads, out = grad_fn(q, k, v)
    return out, grads


# --- reference.py against the NumPy loop -------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("decay", [None, DECAY])
@pytest.mark.parametrize("normalize", [False, True])
def test_references_match_numpy_loop(causal, decay, normalize):
    q, k, v = make_inputs(0, length=6, positive=normalize)
    state = make_state(1, normalize=True) if causal else None
    state_arg = None if state is None else (state if normalize else state.kv)
    want, want_kv, want_sum = numpy_linear_attention(q, k, v, decay, causal, normalize,
                                                     initial_state=state)
    for fn in (linear_attention_quadratic, linear_attention_recurrent):
        fn = jit(fn, static_argnames=("causal", "normalize", "return_last_state"))
        if causal:
            out, last = fn(q, k, v, decay=decay, normalize=normalize, initial_state=state_arg,
                           return_last_state=True)
            np.testing.assert_allclose(last.kv if normalize else last, want_kv, **F32)
            if normalize:
                np.testing.assert_allclose(last.k_sum, want_sum, **F32)
        else:
            out = fn(q, k, v, decay=decay, causal=False, normalize=normalize)
        np.testing.assert_allclose(out, want, **F32)


# --- chunked (impl="xla") against the references -----------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("decay", [None, DECAY])
@pytest.mark.parametrize("normalize", [False, True])
def test_chunked_matches_references_float32(causal, decay, normalize):
    q, k, v = make_inputs(2, length=11, positive=normalize)  # 11 = 2 chunks of 4 + 3 padded
    cotangent = normal(3, v.shape)
    kwargs = dict(decay=decay, causal=causal, normalize=normalize)
    want_out, want_grads = output_and_grads(
        lambda q, k, v: linear_attention_quadratic(q, k, v, **kwargs), q, k, v, cotangent)
    got_out, got_grads = output_and_grads(
        lambda q, k, v: linear_attention(q, k, v, chunk_size=4, **kwargs), q, k, v, cotangent)
    np.testing.assert_allclose(got_out, want_out, **F32)
    for got, want in zip(got_grads, want_grads):
        np.testing.assert_allclose(got, want, **F32)


def test_recurrent_gradients_match_quadratic():
    """The non-causal recurrent form runs the causal scan forwards and backwards."""
    q, k, v = make_inputs(2, length=7)
    cotangent = normal(3, v.shape)
    kwargs = dict(decay=DECAY, causal=False)
    want_out, want_grads = output_and_grads(
        lambda q, k, v: linear_attention_quadratic(q, k, v, **kwargs), q, k, v, cotangent)
    got_out, got_grads = output_and_grads(
        lambda q, k, v: linear_attention_recurrent(q, k, v, **kwargs), q, k, v, cotangent)
    np.testing.assert_allclose(got_out, want_out, **F32)
    for got, want in zip(got_grads, want_grads):
        np.testing.assert_allclose(got, want, **F32)


@pytest.mark.parametrize("length, chunk_size", [(1, 4), (5, 1), (8, 4)])
def test_chunked_lengths_and_chunk_sizes(length, chunk_size):
    """Length 1, chunk 1, chunk > length, length divisible by the chunk; impl names dispatch."""
    q, k, v = make_inputs(4, batch=1, length=length)
    run = jit(linear_attention, static_argnames=("chunk_size", "impl"))
    want = run(q, k, v, decay=DECAY, impl="reference")
    got = run(q, k, v, decay=DECAY, chunk_size=chunk_size, impl="xla")
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, **F32)


@pytest.mark.parametrize("normalize", [False, True])
def test_chunked_matches_reference_bfloat16(normalize):
    q, k, v = make_inputs(5, length=9, positive=normalize, dtype=jnp.bfloat16)
    cotangent = normal(6, v.shape)
    kwargs = dict(decay=DECAY, normalize=normalize)
    want, want_grads = output_and_grads(
        lambda q, k, v: linear_attention_quadratic(q, k, v, **kwargs),
        *(x.astype(jnp.float32) for x in (q, k, v)), cotangent)
    got, got_grads = output_and_grads(
        lambda q, k, v: linear_attention(q, k, v, chunk_size=4, **kwargs), q, k, v, cotangent)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(got.astype(jnp.float32), want, **BF16)
    for got_grad, want_grad in zip(got_grads, want_grads):
        assert got_grad.dtype == jnp.bfloat16
        np.testing.assert_allclose(got_grad.astype(jnp.float32), want_grad, **BF16)


@pytest.mark.parametrize("normalize", [False, True])
def test_initial_and_last_state(normalize):
    """Outputs, last states and the gradients through the state agree across implementations."""
    q, k, v = make_inputs(7, length=10, positive=normalize)
    state = make_state(8, normalize=normalize)

    def run(fn):
        def loss(q, state):
            out, last = fn(q, k, v, decay=DECAY, normalize=normalize, initial_state=state,
                           return_last_state=True)
            total = jnp.sum(out) + sum(jnp.sum(leaf) for leaf in jax.tree.leaves(last))
            return total, (out, last)
        return jit(jax.grad(loss, argnums=(0, 1), has_aux=True))(q, state)

    want_grads, (want_out, want_state) = run(linear_attention_quadratic)
    chunked = lambda *a, **kw: linear_attention(*a, chunk_size=3, **kw)  # noqa: E731
    got_grads, (got_out, got_state) = run(chunked)
    np.testing.assert_allclose(got_out, want_out, **F32)
    assert_trees_close(got_state, want_state, **F32)
    assert_trees_close(got_grads, want_grads, **F32)
    rec_out, rec_state = jit(linear_attention_recurrent, static_argnames=(
        "normalize", "return_last_state"))(q, k, v, decay=DECAY, normalize=normalize,
                                           initial_state=state, return_last_state=True)
    np.testing.assert_allclose(rec_out, want_out, **F32)
    assert_trees_close(rec_state, want_state, **F32)


def test_split_sequence_with_carried_state():
    """Running [0, 6) then [6, 13) from the carried state equals one pass over [0, 13)."""
    normalize = True  # the state is the (kv, k_sum) pair
    q, k, v = make_inputs(9, length=13, positive=normalize)

    @jit
    def run(q, k, v):
        kwargs = dict(decay=DECAY, normalize=normalize, chunk_size=4, return_last_state=True)
        whole = linear_attention(q, k, v, **kwargs)
        first, state = linear_attention(q[:, :6], k[:, :6], v[:, :6], **kwargs)
        second, last = linear_attention(q[:, 6:], k[:, 6:], v[:, 6:], initial_state=state,
                                        **kwargs)
        return whole, (jnp.concatenate([first, second], axis=1), last)

    whole, split = run(q, k, v)
    assert_trees_close(split, whole, **F32)


@pytest.mark.parametrize("normalize, decay", [(False, None), (True, DECAY)])
def test_step_matches_parallel(normalize, decay):
    q, k, v = make_inputs(10, length=6, positive=normalize)
    state = jax.tree.map(jnp.zeros_like, make_state(0, normalize=normalize))

    @jit
    def decode(q, k, v, state):
        def body(state, qkv_t):
            out, state = linear_attention_step(*qkv_t, state, decay, normalize=normalize)
            return state, out
        state, outs = jax.lax.scan(body, state, tuple(jnp.moveaxis(x, 1, 0) for x in (q, k, v)))
        return jnp.moveaxis(outs, 0, 1), state

    want = jit(lambda q, k, v: linear_attention(
        q, k, v, decay=decay, normalize=normalize, chunk_size=4, return_last_state=True))(q, k, v)
    assert_trees_close(decode(q, k, v, state), want, **F32)


def test_step_keeps_state_dtype():
    q, k, v = make_inputs(10, length=1, dtype=jnp.bfloat16)
    state = LinearAttentionState(jnp.zeros((2, 2, 4, 3), jnp.bfloat16),
                                 jnp.zeros((2, 2, 4), jnp.float32))
    out, new_state = linear_attention_step(q[:, 0], k[:, 0], v[:, 0], state, normalize=True)
    assert out.dtype == jnp.bfloat16 and out.shape == (2, 2, 3)
    assert new_state.kv.dtype == jnp.bfloat16 and new_state.k_sum.dtype == jnp.float32


def test_decay_gradient_under_jit():
    """``decay`` may be a traced (learnable) argument; its gradient matches the reference."""
    q, k, v = make_inputs(11, length=9)

    def grad_of(fn):
        return jit(jax.grad(lambda d: jnp.sum(fn(q, k, v, decay=d) ** 2)))
    decay = jnp.asarray(DECAY, jnp.float32)
    chunked = lambda *a, **kw: linear_attention(*a, chunk_size=4, **kw)  # noqa: E731
    np.testing.assert_allclose(grad_of(chunked)(decay), grad_of(linear_attention_quadratic)(decay),
                               **F32)


def test_lightning_slopes_and_decay():
    np.testing.assert_allclose(lightning_slopes(8), 2.0 ** -np.arange(1, 9), rtol=1e-6)
    np.testing.assert_allclose(lightning_slopes(4), 2.0 ** (-2.0 * np.arange(1, 5)), rtol=1e-6)
    decay = lightning_decay(6)
    np.testing.assert_allclose(decay, np.exp(-(2.0 ** (-8.0 * np.arange(1, 7) / 6))), rtol=1e-6)
    assert np.all((decay > 0) & (decay < 1)) and np.all(np.diff(decay) > 0)


Q = K = np.ones((1, 3, 2, 4), np.float32)  # (batch, L, heads, d_k)
V = np.ones((1, 3, 2, 3), np.float32)      # (batch, L, heads, d_v)
STATE = np.zeros((1, 2, 4, 3), np.float32)  # (batch, heads, d_k, d_v)
BAD_CALLS = {  # id: (error message pattern, call)
    "q_rank": ("q must have shape", lambda: linear_attention(Q[0], K[0], V[0])),
    "k_shape": ("k must have the shape", lambda: linear_attention(Q, K[..., :2], V)),
    "v_shape": ("v must have shape", lambda: linear_attention(Q, K, V[:, :2])),
    "decay_shape": ("decay must have shape", lambda: linear_attention(Q, K, V, decay=np.ones(3))),
    "decay_above_1": ("decay values", lambda: linear_attention(Q, K, V, decay=[0.5, 1.5])),
    "decay_zero": ("decay values", lambda: linear_attention(Q, K, V, decay=[0.0, 0.5])),
    "chunk_size": ("chunk_size", lambda: linear_attention(Q, K, V, chunk_size=0)),
    "impl": ("impl must be one of", lambda: linear_attention(Q, K, V, impl="cuda")),
    "non_causal_state": ("causal=True", lambda: linear_attention(Q, K, V, causal=False,
                                                                return_last_state=True)),
    "state_shape": ("initial_state must have shape",
                    lambda: linear_attention(Q, K, V, initial_state=STATE[..., :2])),
    "state_not_pair": ("initial_state must be a LinearAttentionState",
                       lambda: linear_attention(Q, K, V, normalize=True, initial_state=STATE)),
    "num_heads": ("num_heads", lambda: lightning_slopes(0)),
    "step_state": ("state must have shape",
                   lambda: linear_attention_step(Q[:, 0], K[:, 0], V[:, 0], STATE[:, :, :2])),
    "step_v": ("v_t must have shape",
               lambda: linear_attention_step(Q[:, 0], K[:, 0], V[:, :, 0], STATE)),
}


@pytest.mark.parametrize("name", list(BAD_CALLS))
def test_bad_input_raises_value_error(name):
    match, call = BAD_CALLS[name]
    with pytest.raises(ValueError, match=match):
        call()
