"""Tests of memjax.kernels.selective_scan: NumPy float64 loop -> reference -> chunked XLA.

Tolerances: float32 rtol 1e-4, atol 1e-5 (tighter than the authors' fp32 rtol 6e-4 / atol 2e-3);
bfloat16 inputs rtol 3e-2, atol 5e-2 (the authors' bf16 tolerance).
"""

import functools
import math

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memjax.kernels.selective_scan import (
    selective_scan,
    selective_scan_reference,
    selective_state_update,
    xla,
)

F32_TOL = dict(rtol=1e-4, atol=1e-5)
BF16_TOL = dict(rtol=3e-2, atol=5e-2)
BATCH, CHANNELS, STATE = 2, 8, 4
# The sequential reference, compiled once per shape (eager op-by-op dispatch is slow in tests).
reference = jax.jit(selective_scan_reference, static_argnames=("delta_softplus", "return_last_state"))
OPTION_SETS = {
    "plain": dict(),
    "all": dict(D=True, z=True, delta_bias=True, delta_softplus=True),
    "D_softplus": dict(D=True, delta_softplus=True),
    "z_bias": dict(z=True, delta_bias=True),
}


def make_inputs(length, options, seed=0, dtype=jnp.float32):
    """Random scan inputs (NumPy RNG: no compilation); delta > 0 when it is not softplus'ed."""
    rng = np.random.default_rng(seed)
    shape = (BATCH, length, CHANNELS)
    softplus = options.get("delta_softplus", False)
    delta = rng.standard_normal(shape) - 1.0
    args = dict(
        u=rng.standard_normal(shape),
        delta=delta if softplus else np.log1p(np.exp(delta)),
        A=-np.exp(0.5 * rng.standard_normal((CHANNELS, STATE))),
        B=rng.standard_normal((BATCH, length, STATE)),
        C=rng.standard_normal((BATCH, length, STATE)),
        D=rng.standard_normal(CHANNELS) if options.get("D") else None,
        z=rng.standard_normal(shape) if options.get("z") else None,
        delta_bias=0.5 * rng.standard_normal(CHANNELS) if options.get("delta_bias") else None,
    )
    return {name: None if a is None else jnp.asarray(a, dtype) for name, a in args.items()}


def numpy_selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """Independent float64 loop over batch and time; returns (y, last_state)."""
    u, delta, A, B, C = (np.asarray(a, np.float64) for a in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + np.asarray(delta_bias, np.float64)
    if delta_softplus:
        delta = np.log1p(np.exp(delta))
    batch, length, channels = u.shape
    y = np.zeros((batch, length, channels))
    state = np.zeros((batch, channels, A.shape[1]))
    for b in range(batch):
        for t in range(length):
            for d in range(channels):
                state[b, d] = (
                    np.exp(delta[b, t, d] * A[d]) * state[b, d] + delta[b, t, d] * B[b, t] * u[b, t, d]
                )
                y[b, t, d] = np.dot(C[b, t], state[b, d])
    if D is not None:
        y = y + u * np.asarray(D, np.float64)
    if z is not None:
        z = np.asarray(z, np.float64)
        y = y * z / (1.0 + np.exp(-z))
    return y, state


def run(fn, args, options, **kw):
    return fn(**args, delta_softplus=options.get("delta_softplus", False), return_last_state=True, **kw)


@pytest.mark.parametrize("options", ["plain", "all"])
def test_reference_matches_numpy_loop(options):
    opts = OPTION_SETS[options]
    args = make_inputs(9, opts, seed=1)
    y, last = run(reference, args, opts)
    y_np, last_np = numpy_selective_scan(**args, delta_softplus=opts.get("delta_softplus", False))
    np.testing.assert_allclose(y, y_np, **F32_TOL)
    np.testing.assert_allclose(last, last_np, **F32_TOL)


@pytest.mark.parametrize(
    "length,options,chunk_size",
    [(1, "plain", 4), (7, "z_bias", 4), (33, "D_softplus", 4), (64, "plain", None), (64, "all", 4)],
)
@pytest.mark.slow
def test_xla_forward_matches_reference(length, options, chunk_size):
    """Forward only; `chunk_size=None` uses the default chunk and `impl="auto"` under an outer jit."""
    opts = OPTION_SETS[options]
    args = make_inputs(length, opts, seed=length)
    y_ref, last_ref = run(reference, args, opts)
    if chunk_size is None:
        y, last = jax.jit(lambda a: run(selective_scan, a, opts))(args)
    else:
        y, last = run(selective_scan, args, opts, chunk_size=chunk_size, impl="xla")
    assert y.shape == (BATCH, length, CHANNELS) and y.dtype == jnp.float32
    assert last.shape == (BATCH, CHANNELS, STATE) and last.dtype == jnp.float32
    np.testing.assert_allclose(y, y_ref, **F32_TOL)
    np.testing.assert_allclose(last, last_ref, **F32_TOL)


ARG_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


@functools.cache
def _value_and_grads_fn(fn, softplus, **kw):
    """Jitted (y, last_state) and gradients wrt all 8 inputs of a loss mixing y and last_state (cached)."""

    def loss(*inputs):
        y, last = fn(*inputs, softplus, True, **kw)
        wy = jnp.cos(jnp.arange(y.size, dtype=jnp.float32)).reshape(y.shape)
        return jnp.sum(y.astype(jnp.float32) * wy) + jnp.sum(jnp.sin(last)), (y, last)

    return jax.jit(jax.value_and_grad(loss, argnums=tuple(range(8)), has_aux=True))


def _value_and_grads(fn, args, softplus, **kw):
    (_, (y, last)), grads = _value_and_grads_fn(fn, softplus, **kw)(*(args[name] for name in ARG_NAMES))
    return y, last, grads


@pytest.mark.slow
@pytest.mark.parametrize("length,chunk_method", [(1, "sequential"), (33, "sequential"), (33, "associative")])
def test_xla_forward_and_gradients_match_reference(length, chunk_method):
    """All options on; length 33 with chunk 4 is 9 balanced chunks of 4 with 3 padded steps."""
    args = make_inputs(length, OPTION_SETS["all"], seed=100 + length)
    y_ref, last_ref, g_ref = _value_and_grads(reference, args, True)
    y, last, g = _value_and_grads(xla.selective_scan_xla, args, True, chunk_size=4, chunk_method=chunk_method)
    np.testing.assert_allclose(y, y_ref, **F32_TOL)
    np.testing.assert_allclose(last, last_ref, **F32_TOL)
    for name, a, b in zip(ARG_NAMES, g, g_ref, strict=True):
        np.testing.assert_allclose(a, b, **F32_TOL, err_msg=name)


@pytest.mark.slow
def test_bfloat16_inputs_forward_and_gradients():
    """bf16 inputs against the float32 reference on the same (bf16-rounded) values: rtol 3e-2, atol 5e-2."""
    args16 = make_inputs(33, OPTION_SETS["all"], seed=3, dtype=jnp.bfloat16)
    args32 = {k: v.astype(jnp.float32) for k, v in args16.items()}
    y, last, g = _value_and_grads(xla.selective_scan_xla, args16, True, chunk_size=4)
    y_ref, last_ref, g_ref = _value_and_grads(reference, args32, True)
    assert y.dtype == jnp.bfloat16 and last.dtype == jnp.float32
    np.testing.assert_allclose(y.astype(jnp.float32), y_ref, **BF16_TOL)
    np.testing.assert_allclose(last, last_ref, **BF16_TOL)
    for name, a, b in zip(ARG_NAMES, g, g_ref, strict=True):
        assert a.dtype == jnp.bfloat16, name
        np.testing.assert_allclose(a.astype(jnp.float32), b, **BF16_TOL, err_msg=name)


def test_initial_state_continues_a_sequence():
    opts = OPTION_SETS["all"]
    args = make_inputs(12, opts, seed=5)
    halves = [
        {k: (v[:, sl] if v is not None and v.ndim == 3 else v) for k, v in args.items()}
        for sl in (slice(0, 6), slice(6, 12))
    ]
    y_full, last_full = run(selective_scan, args, opts, chunk_size=4)
    zeros = jnp.zeros((BATCH, CHANNELS, STATE))
    y1, s1 = run(selective_scan, halves[0], opts, chunk_size=4, initial_state=zeros)
    y2, s2 = run(selective_scan, halves[1], opts, chunk_size=4, initial_state=s1)
    np.testing.assert_allclose(jnp.concatenate([y1, y2], axis=1), y_full, **F32_TOL)
    np.testing.assert_allclose(s2, last_full, **F32_TOL)
    y2_ref, s2_ref = run(reference, halves[1], opts, initial_state=s1)
    np.testing.assert_allclose(y2, y2_ref, **F32_TOL)
    np.testing.assert_allclose(s2, s2_ref, **F32_TOL)


def test_state_update_steps_match_parallel_scan():
    opts = OPTION_SETS["all"]
    args = make_inputs(6, opts, seed=11)
    y_par, last_par = run(selective_scan, args, opts, chunk_size=4)
    step = jax.jit(selective_state_update, static_argnames="delta_softplus")
    state = jnp.zeros((BATCH, CHANNELS, STATE))
    ys = []
    for t in range(6):
        y_t, state = step(
            state,
            args["u"][:, t],
            args["delta"][:, t],
            args["A"],
            args["B"][:, t],
            args["C"][:, t],
            args["D"],
            args["z"][:, t],
            args["delta_bias"],
            delta_softplus=True,
        )
        ys.append(y_t)
    np.testing.assert_allclose(jnp.stack(ys, axis=1), y_par, **F32_TOL)
    np.testing.assert_allclose(state, last_par, **F32_TOL)


@pytest.mark.slow
def test_chunked_backward_memory_is_below_one_full_state_tensor():
    """The chunked scan never keeps a (batch, length, channels, N) tensor; the reference keeps several."""
    batch, length, channels, n = 1, 512, 32, 32
    f32 = jnp.float32
    seq = jax.ShapeDtypeStruct((batch, length, channels), f32)
    proj = jax.ShapeDtypeStruct((batch, length, n), f32)
    args = (seq, seq, jax.ShapeDtypeStruct((channels, n), f32), proj, proj)
    full_state_bytes = 4 * batch * length * channels * n

    def temp_bytes(impl):
        f = jax.grad(lambda *a: selective_scan(*a, chunk_size=8, impl=impl).sum(), argnums=(0, 1, 2, 3, 4))
        return jax.jit(f).lower(*args).compile().memory_analysis().temp_size_in_bytes

    assert temp_bytes("xla") < 0.5 * full_state_bytes
    assert temp_bytes("reference") > full_state_bytes


@hypothesis.settings(max_examples=200, deadline=None)
@hypothesis.given(length=st.integers(1, 5000), chunk_size=st.integers(1, 300))
def test_chunk_layout_is_balanced(length, chunk_size):
    n_chunks, T = xla.chunk_layout(length, chunk_size)
    assert n_chunks == math.ceil(length / chunk_size)
    assert 1 <= T <= chunk_size
    assert 0 <= n_chunks * T - length < n_chunks


def _valid_args():
    return make_inputs(5, OPTION_SETS["all"])


@pytest.mark.parametrize(
    "name,bad_shape,match",
    [
        ("u", (BATCH, 5), "u"),
        ("delta", (BATCH, 6, CHANNELS), "delta"),
        ("A", (CHANNELS + 1, STATE), "A"),
        ("A", (CHANNELS,), "A"),
        ("B", (BATCH, 5, STATE + 1), "B"),
        ("C", (BATCH, 4, STATE), "C"),
        ("D", (CHANNELS, 1), "D"),
        ("z", (BATCH, 5, CHANNELS + 1), "z"),
        ("delta_bias", (CHANNELS + 2,), "delta_bias"),
    ],
)
def test_mismatched_shapes_raise(name, bad_shape, match):
    args = _valid_args()
    args[name] = jnp.zeros(bad_shape)
    with pytest.raises(ValueError, match=rf"^{match} "):
        selective_scan(**args)


def test_bad_initial_state_length_chunk_size_and_impl_raise():
    args = _valid_args()
    with pytest.raises(ValueError, match="^initial_state "):
        selective_scan(**args, initial_state=jnp.zeros((BATCH, CHANNELS, STATE + 1)))
    empty = {k: (v[:, :0] if v is not None and v.ndim == 3 else v) for k, v in args.items()}
    with pytest.raises(ValueError, match="at least one time step"):
        selective_scan(**empty)
    for chunk_size in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="chunk_size"):
            selective_scan(**args, chunk_size=chunk_size)
    with pytest.raises(ValueError, match="impl"):
        selective_scan(**args, impl="cuda")
