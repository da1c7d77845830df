"""Tests of the Pallas selective-scan kernels (memjax.kernels.selective_scan.pallas).

On CPU the kernels run in the Pallas interpreter (``interpret=True``), both ways of walking the
chunks ("triton": a loop inside each program; "tpu": a sequential grid axis with VMEM scratch),
against the sequential reference (itself checked against a NumPy loop in test_selective_scan.py).
Lowering for the real backends is checked with ``jax.export`` (no GPU / TPU needed), and the
compiled memory of forward + backward is checked to grow like batch * L * D, not batch * L * D * N.

Tolerances: float32 ``rtol=1e-4, atol=1e-4`` for outputs and gradients (tighter than the authors'
fp32 ``rtol=6e-4, atol=2e-3``); bfloat16 inputs ``rtol=3e-2, atol=5e-2`` (the authors' bf16
tolerance) against the reference on the same bf16 inputs.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memjax.kernels.selective_scan import selective_scan, selective_scan_reference
from memjax.kernels.selective_scan.pallas import selective_scan_pallas

# Tiny shapes: compile time dominates, so compile at XLA's lowest optimisation level.
COMPILER_OPTIONS = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
jit = functools.partial(jax.jit, compiler_options=COMPILER_OPTIONS)
F32 = dict(rtol=1e-4, atol=1e-4)
BF16 = dict(rtol=3e-2, atol=5e-2)
TRITON_CALL = "__gpu$xla.gpu.triton"
ALL_OPTIONS = dict(D=True, z=True, delta_bias=True, delta_softplus=True)


def make_inputs(batch, length, channels, n_state, options, *, state=True, seed=0,
                dtype=jnp.float32):
    """Scan inputs as keyword arguments; delta > 0 when it is not softplus'ed. A stays float32."""
    rng = np.random.default_rng(seed)
    shape = (batch, length, channels)
    softplus = options.get("delta_softplus", False)
    delta = rng.standard_normal(shape) - 1.0
    args = dict(
        u=rng.standard_normal(shape),
        delta=delta if softplus else np.log1p(np.exp(delta)),
        A=-np.exp(0.5 * rng.standard_normal((channels, n_state))),
        B=rng.standard_normal((batch, length, n_state)),
        C=rng.standard_normal((batch, length, n_state)),
        D=rng.standard_normal(channels) if options.get("D") else None,
        z=rng.standard_normal(shape) if options.get("z") else None,
        delta_bias=0.5 * rng.standard_normal(channels) if options.get("delta_bias") else None,
        initial_state=rng.standard_normal((batch, channels, n_state)) if state else None,
    )
    return {name: None if a is None else jnp.asarray(a, jnp.float32 if name == "A" else dtype)
            for name, a in args.items()}


def value_and_grads(fn, inputs, seed=1):
    """(y, last_state) and the gradients of a random linear functional of both."""
    names = [name for name, a in inputs.items() if a is not None]
    y, last = jax.eval_shape(lambda: fn(**inputs))
    rng = np.random.default_rng(seed)
    w_y = jnp.asarray(rng.standard_normal(y.shape), jnp.float32)
    w_last = jnp.asarray(rng.standard_normal(last.shape), jnp.float32)

    def loss(*arrays):
        y, last = fn(**{**inputs, **dict(zip(names, arrays))})
        return (y.astype(jnp.float32) * w_y).sum() + (last * w_last).sum(), (y, last)

    grads, (y, last) = jit(jax.grad(loss, argnums=tuple(range(len(names))), has_aux=True))(
        *(inputs[n] for n in names))
    return y, last, dict(zip(names, grads))


def assert_close(actual, expected, tol, what=""):
    np.testing.assert_allclose(np.asarray(actual, np.float32), np.asarray(expected, np.float32),
                               err_msg=what, **tol)


def assert_matches_reference(backend, inputs, softplus, tol, **kernel_options):
    kernel_options = {"interpret": True, **kernel_options}
    kernel = functools.partial(selective_scan_pallas, delta_softplus=softplus,
                               return_last_state=True, backend=backend, **kernel_options)
    reference = functools.partial(selective_scan_reference, delta_softplus=softplus,
                                  return_last_state=True)
    y, last, grads = value_and_grads(kernel, inputs)
    y_ref, last_ref, grads_ref = value_and_grads(reference, inputs)
    assert y.dtype == inputs["u"].dtype and last.dtype == jnp.float32
    assert_close(y, y_ref, tol, "y")
    assert_close(last, last_ref, tol, "last state")
    for name in grads_ref:
        assert grads[name].dtype == grads_ref[name].dtype, name
        assert_close(grads[name], grads_ref[name], tol, f"d{name}")


# (backend, (batch, L, channels, N), scan options, kernel options). L = 21 and 12 are not
# multiples of the chunk (padded, identity steps); channels 12 with block_d 8 on Triton gives two
# channel tiles, the second padded; N = 5 is padded to 8 on Triton.
CASES = {
    "triton-all-options": ("triton", (2, 21, 12, 5), ALL_OPTIONS, dict(chunk_size=4, block_d=8)),
    "tpu-all-options": ("tpu", (2, 21, 12, 5), ALL_OPTIONS, dict(chunk_size=8)),
    "triton-state-1-plain": ("triton", (1, 16, 8, 1), {}, dict(chunk_size=8)),
    "tpu-state-32": ("tpu", (1, 12, 8, 32), dict(D=True, delta_softplus=True), dict(chunk_size=8)),
    "triton-state-32": ("triton", (1, 10, 16, 32), dict(z=True, delta_bias=True),
                        dict(chunk_size=4, block_d=16)),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_matches_reference_float32(case):
    backend, shape, options, kernel_options = CASES[case]
    inputs = make_inputs(*shape, options)
    assert_matches_reference(backend, inputs, options.get("delta_softplus", False), F32,
                             **kernel_options)


@pytest.mark.slow
def test_tpu_interpreter():
    """The "tpu" kernels under the TPU-faithful interpreter (sequential grid, VMEM scratch that
    starts as NaN, so a read before the first write would show)."""
    from jax.experimental.pallas import tpu as pltpu

    inputs = make_inputs(1, 11, 8, 4, ALL_OPTIONS)
    assert_matches_reference("tpu", inputs, True, F32, chunk_size=8,
                             interpret=pltpu.InterpretParams())


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["triton", "tpu"])
def test_matches_reference_bfloat16(backend):
    inputs = make_inputs(2, 13, 8, 4, ALL_OPTIONS, dtype=jnp.bfloat16, state=False)
    assert_matches_reference(backend, inputs, True, BF16, chunk_size=8)


def test_dispatch():
    """``impl="pallas"`` equals ``impl="xla"`` (the per-platform choice: test_platform.py)."""
    inputs = make_inputs(1, 9, 4, 2, ALL_OPTIONS, state=False)
    del inputs["initial_state"]
    run = jit(selective_scan, static_argnames=("delta_softplus", "chunk_size", "impl",
                                               "interpret"))
    expected = run(**inputs, delta_softplus=True, chunk_size=4, impl="xla")
    actual = run(**inputs, delta_softplus=True, chunk_size=4, impl="pallas", interpret=True)
    assert_close(actual, expected, F32)


def test_invalid_arguments():
    inputs = make_inputs(1, 8, 200, 2, {}, state=False)
    del inputs["initial_state"]
    with pytest.raises(ValueError, match="backend"):
        selective_scan_pallas(**inputs, backend="cuda")
    with pytest.raises(ValueError, match="chunk_size"):
        selective_scan_pallas(**inputs, chunk_size=0)
    with pytest.raises(ValueError, match="block_d"):
        selective_scan_pallas(**inputs, block_d=64, backend="tpu")


@pytest.mark.slow
def test_memory_grows_with_channels_not_channels_times_state():
    """Compiled temp memory of grad(sum(scan)) from N = 4 to N = 32 grows far less than one
    (batch, L, D, N) float32 tensor would (the reference, which stores every state, grows more).

    What does grow with N: the chunk-entry states (batch L D N / T floats, held twice by the
    interpreter: the forward's output and the backward kernel's operand) and the B, C-sized
    arrays and their per-tile partial gradients (a few batch L N), i.e. about 2 / T + 6 / D of
    the materialised tensor: 0.17 here (T = 16, D = 128).
    """
    batch, length, channels = 1, 128, 128

    def temp_bytes(scan, n_state):
        def loss(u, delta, A, B, C):
            return scan(u, delta, A, B, C).sum()

        shapes = [(batch, length, channels)] * 2 + [(channels, n_state)] + [
            (batch, length, n_state)] * 2
        args = [jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes]
        compiled = jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4))).lower(*args).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    kernel = functools.partial(selective_scan_pallas, backend="triton", interpret=True,
                               chunk_size=16)
    materialised = batch * length * channels * (32 - 4) * 4  # bytes of the extra (B, L, D, N)
    kernel_growth = temp_bytes(kernel, 32) - temp_bytes(kernel, 4)
    reference_growth = temp_bytes(selective_scan_reference, 32) - temp_bytes(
        selective_scan_reference, 4)
    assert reference_growth > materialised
    assert kernel_growth < 0.25 * materialised, (kernel_growth, materialised)


# ------------------------------------------------------------------------------------------------
# Lowering for the real backends, without the hardware: Triton (GPU) and Mosaic (TPU).


@pytest.mark.slow
@pytest.mark.parametrize("platform, backend", [("cuda", "triton"), ("tpu", "tpu")])
def test_export_lowers_forward_and_gradient(platform, backend):
    batch, length, channels, n_state = 2, 100, 256, 16
    rows = jax.ShapeDtypeStruct((batch, length, channels), jnp.bfloat16)
    columns = jax.ShapeDtypeStruct((batch, length, n_state), jnp.bfloat16)
    A = jax.ShapeDtypeStruct((channels, n_state), jnp.float32)
    per_channel = jax.ShapeDtypeStruct((channels,), jnp.float32)
    state = jax.ShapeDtypeStruct((batch, channels, n_state), jnp.float32)

    def forward(u, delta, A, B, C, D, z, bias, state):
        return selective_scan_pallas(u, delta, A, B, C, D, z, bias, True, True,
                                     initial_state=state, backend=backend)

    def loss(*args):
        y, last = forward(*args)
        return y.astype(jnp.float32).sum() + last.sum()

    gradient = jax.grad(loss, argnums=tuple(range(9)))
    # The Triton call has no export compatibility guarantee: allow it explicitly.
    checks = [jax.export.DisabledSafetyCheck.custom_call(TRITON_CALL)]
    expected_call = TRITON_CALL if backend == "triton" else "tpu_custom_call"
    for fn in (forward, gradient):
        exported = jax.export.export(jax.jit(fn), platforms=[platform], disabled_checks=checks)(
            rows, rows, A, columns, columns, per_channel, rows, per_channel, state)
        calls = re.findall(r"custom_call @([\w$.]+)", exported.mlir_module())
        assert calls and set(calls) == {expected_call}, calls
        assert exported.platforms == (platform,)
