"""Tests of the Pallas linear-attention kernels (memjax.kernels.linear_attention.pallas).

On CPU the kernels run in the Pallas interpreter (``interpret=True``), both ways of walking the
chunks ("triton": a loop inside each program; "tpu": a sequential grid axis with VMEM scratch),
against the quadratic reference (itself checked against a NumPy loop in test_linear_attention.py).
Lowering for the real backends is checked with ``jax.export`` (no GPU / TPU needed).

Tolerances: float32 ``rtol=1e-4, atol=1e-4`` for outputs and gradients (tighter than Mamba's
fp32 ``rtol=6e-4, atol=2e-3``); bfloat16 inputs ``rtol=3e-2, atol=5e-2`` against the float32
reference on the same bf16-rounded inputs.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memjax.kernels.linear_attention import linear_attention, linear_attention_quadratic
from memjax.kernels.linear_attention.pallas import linear_attention_pallas

# Tiny shapes: compile time dominates, so compile at XLA's lowest optimisation level.
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0,
                                                   "xla_llvm_disable_expensive_passes": True})
F32 = dict(rtol=1e-4, atol=1e-4)
BF16 = dict(rtol=3e-2, atol=5e-2)
TRITON_CALL = "__gpu$xla.gpu.triton"


def make_inputs(batch, length, heads, d_k, d_v, *, decay=True, state=True, seed=0,
                dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    args = dict(
        q=rng.standard_normal((batch, length, heads, d_k)) / np.sqrt(d_k),
        k=rng.standard_normal((batch, length, heads, d_k)),
        v=rng.standard_normal((batch, length, heads, d_v)),
        decay=rng.uniform(0.5, 1.0, heads) if decay else None,
        initial_state=rng.standard_normal((batch, heads, d_k, d_v)) if state else None,
    )
    return {name: None if a is None else jnp.asarray(a, jnp.float32 if name == "decay" else dtype)
            for name, a in args.items()}


def value_and_grads(fn, inputs, seed=1):
    """(out, last_state) and the gradients of a random linear functional of both.

    Differentiates with respect to every non-None input (q, k, v, decay, initial_state).
    """
    names = [name for name, a in inputs.items() if a is not None]
    out, last = jax.eval_shape(lambda: fn(**inputs))
    rng = np.random.default_rng(seed)
    w_out = jnp.asarray(rng.standard_normal(out.shape), jnp.float32)
    w_last = jnp.asarray(rng.standard_normal(last.shape), jnp.float32)

    def loss(*arrays):
        o, s = fn(**{**inputs, **dict(zip(names, arrays))})
        return (o.astype(jnp.float32) * w_out).sum() + (s * w_last).sum(), (o, s)

    grads, (o, s) = jit(jax.grad(loss, argnums=tuple(range(len(names))), has_aux=True))(
        *(inputs[n] for n in names))
    return o, s, dict(zip(names, grads))


def reference(**inputs):
    """The quadratic form, output in q's dtype (as ``linear_attention`` returns it)."""
    out, last = linear_attention_quadratic(**inputs, return_last_state=True)
    return out.astype(inputs["q"].dtype), last


def pallas(backend, **options):
    options = {"interpret": True, **options}
    return functools.partial(linear_attention_pallas, backend=backend, return_last_state=True,
                             **options)


def assert_close(actual, expected, tol, what=""):
    np.testing.assert_allclose(np.asarray(actual, np.float32), np.asarray(expected, np.float32),
                               err_msg=what, **tol)


def assert_matches_reference(fn, inputs, tol):
    out, last, grads = value_and_grads(fn, inputs)
    out_ref, last_ref, grads_ref = value_and_grads(reference, inputs)
    assert out.dtype == inputs["q"].dtype and last.dtype == jnp.float32
    assert_close(out, out_ref, tol, "out")
    assert_close(last, last_ref, tol, "last state")
    for name in grads_ref:
        assert grads[name].dtype == grads_ref[name].dtype, name
        assert_close(grads[name], grads_ref[name], tol, f"d{name}")


# (backend, shape (batch, L, heads, d_k, d_v), kernel options, input options). L = 37 is not a
# multiple of any chunk: the last chunk is padded and masked.
CASES = {
    "triton-odd-length": ("triton", (2, 37, 2, 8, 12), dict(chunk_size=16), {}),
    "triton-v-tiles": ("triton", (1, 40, 2, 32, 40), dict(chunk_size=16, block_v=16), {}),
    "triton-no-decay-no-state": ("triton", (1, 19, 1, 16, 16), dict(chunk_size=16),
                                 dict(decay=False, state=False)),
    "triton-one-chunk": ("triton", (1, 5, 3, 4, 4), dict(chunk_size=64), {}),
    "tpu-odd-length": ("tpu", (2, 37, 2, 8, 12), dict(chunk_size=16), {}),
    "tpu-large-state": ("tpu", (1, 24, 1, 64, 64), dict(chunk_size=8), {}),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_matches_reference_float32(case):
    backend, shape, options, input_options = CASES[case]
    inputs = make_inputs(*shape, **input_options)
    assert_matches_reference(pallas(backend, **options), inputs, F32)


def test_tpu_interpreter():
    """The "tpu" kernels under the TPU-faithful interpreter (sequential grid, VMEM scratch that
    starts as NaN, so a read before the first write would show)."""
    from jax.experimental.pallas import tpu as pltpu

    inputs = make_inputs(1, 11, 2, 8, 8)
    assert_matches_reference(pallas("tpu", chunk_size=8, interpret=pltpu.InterpretParams()),
                             inputs, F32)


@pytest.mark.parametrize("backend", ["triton", "tpu"])
def test_matches_reference_bfloat16(backend):
    inputs = make_inputs(2, 29, 2, 16, 16, dtype=jnp.bfloat16, state=False)
    assert_matches_reference(pallas(backend, chunk_size=16), inputs, BF16)


def test_dispatch_pallas_and_fallbacks():
    """``impl="pallas"`` equals ``impl="xla"``; normalised / non-causal fall back to XLA."""
    inputs = make_inputs(1, 13, 2, 4, 4, state=False)
    del inputs["initial_state"]
    run = jit(linear_attention, static_argnames=("causal", "normalize", "chunk_size", "impl",
                                                 "interpret"))
    for options in (dict(), dict(normalize=True), dict(causal=False)):
        expected = run(**inputs, **options, chunk_size=4, impl="xla")
        actual = run(**inputs, **options, chunk_size=4, impl="pallas", interpret=True)
        assert_close(actual, expected, F32, str(options))


def test_invalid_arguments():
    inputs = make_inputs(1, 8, 1, 4, 4, state=False)
    with pytest.raises(ValueError, match="backend"):
        linear_attention_pallas(inputs["q"], inputs["k"], inputs["v"], backend="cuda")
    with pytest.raises(ValueError, match="chunk_size"):
        linear_attention_pallas(inputs["q"], inputs["k"], inputs["v"], chunk_size=0)
    big_v = jnp.zeros((1, 8, 1, 256))
    with pytest.raises(ValueError, match="block_v"):
        linear_attention_pallas(inputs["q"], inputs["k"], big_v, block_v=100, backend="tpu")


# ------------------------------------------------------------------------------------------------
# Lowering for the real backends, without the hardware: Triton (GPU) and Mosaic (TPU).


@pytest.mark.parametrize("platform, backend", [("cuda", "triton"), ("tpu", "tpu")])
def test_export_lowers_forward_and_gradient(platform, backend):
    batch, length, heads, d_k, d_v = 2, 300, 4, 64, 128
    q = jax.ShapeDtypeStruct((batch, length, heads, d_k), jnp.bfloat16)
    v = jax.ShapeDtypeStruct((batch, length, heads, d_v), jnp.bfloat16)
    state = jax.ShapeDtypeStruct((batch, heads, d_k, d_v), jnp.float32)
    decay = jax.ShapeDtypeStruct((heads,), jnp.float32)

    def forward(q, k, v, decay, state):
        return linear_attention_pallas(q, k, v, decay=decay, initial_state=state,
                                       return_last_state=True, backend=backend)

    def loss(*args):
        out, last = forward(*args)
        return out.astype(jnp.float32).sum() + last.sum()

    gradient = jax.grad(loss, argnums=(0, 1, 2, 3, 4))
    # The Triton call has no export compatibility guarantee: allow it explicitly.
    checks = [jax.export.DisabledSafetyCheck.custom_call(TRITON_CALL)]
    expected_call = TRITON_CALL if backend == "triton" else "tpu_custom_call"
    for fn in (forward, gradient):
        exported = jax.export.export(jax.jit(fn), platforms=[platform], disabled_checks=checks)(
            q, q, v, decay, state)
        calls = re.findall(r"custom_call @([\w$.]+)", exported.mlir_module())
        assert calls and set(calls) == {expected_call}, calls
        assert exported.platforms == (platform,)
