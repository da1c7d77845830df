"""The kernels choose their implementation per lowering platform, not by the host's backend.

The public ``selective_scan`` and ``linear_attention`` with default arguments (``impl="auto"``)
are exported from this CPU host for ``["cuda"]``, ``["tpu"]`` and ``["cpu", "cuda", "tpu"]``,
forward and gradient: each single-platform module holds exactly its kernel's custom call (Triton
for CUDA, Mosaic for TPU), the multi-platform module holds both, and its CPU lowering runs and
matches the sequential references (float32, ``rtol=atol=1e-4`` as in the kernels' own tests).
``impl="pallas"`` on CPU runs the Pallas interpreter. :func:`memjax.kernels._platform.only_on`
lowers a kernel for its platforms only, and batches.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memjax.kernels._platform import GPU_PLATFORMS, only_on, platform_dependent
from memjax.kernels.linear_attention import (
    lightning_decay,
    linear_attention,
    linear_attention_quadratic,
)
from memjax.kernels.selective_scan import selective_scan, selective_scan_reference

TRITON_CALL = "__gpu$xla.gpu.triton"
MOSAIC_CALL = "tpu_custom_call"
CHECKS = [jax.export.DisabledSafetyCheck.custom_call(TRITON_CALL)]
F32 = dict(rtol=1e-4, atol=1e-4)
EXPECTED_CALLS = {("cuda",): {TRITON_CALL}, ("tpu",): {MOSAIC_CALL},
                  ("cpu", "cuda", "tpu"): {TRITON_CALL, MOSAIC_CALL}}


def scan_case():
    """(public fn, reference fn, float32 inputs): a scan with D, z, bias, softplus."""
    rng = np.random.default_rng(0)
    batch, length, channels, n_state = 2, 37, 16, 4
    rows = (batch, length, channels)
    args = (rng.standard_normal(rows), rng.standard_normal(rows) - 1.0,
            -np.exp(0.5 * rng.standard_normal((channels, n_state))),
            rng.standard_normal((batch, length, n_state)),
            rng.standard_normal((batch, length, n_state)), rng.standard_normal(channels),
            rng.standard_normal(rows), 0.5 * rng.standard_normal(channels))
    args = tuple(jnp.asarray(a, jnp.float32) for a in args)
    options = dict(delta_softplus=True)
    return (functools.partial(selective_scan, **options),
            functools.partial(selective_scan_reference, **options), args)


def attention_case():
    rng = np.random.default_rng(1)
    shape = (1, 45, 2, 16)
    args = tuple(jnp.asarray(rng.standard_normal(shape) / 4.0, jnp.float32) for _ in range(3))
    decay = lightning_decay(2)
    return (functools.partial(linear_attention, decay=decay),
            functools.partial(linear_attention_quadratic, decay=decay, causal=True,
                              normalize=False, eps=1e-6, initial_state=None,
                              return_last_state=False), args)


def forward_and_gradient(fn, num_args):
    def loss(*args):
        return jnp.sum(jnp.sin(fn(*args).astype(jnp.float32)))
    return fn, jax.grad(loss, argnums=tuple(range(num_args)))


CASES = {"selective_scan": scan_case, "linear_attention": attention_case}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request):
    public, reference, args = CASES[request.param]()
    return request.param, forward_and_gradient(public, len(args)), \
        forward_and_gradient(reference, len(args)), args


@pytest.mark.slow
@pytest.mark.parametrize("platforms", sorted(EXPECTED_CALLS, key=len))
def test_export_holds_each_platforms_kernel(case, platforms):
    name, public, reference, args = case
    for kind, fn, ref in zip(("forward", "gradient"), public, reference):
        exported = jax.export.export(jax.jit(fn), platforms=platforms, disabled_checks=CHECKS)(
            *args)
        calls = set(re.findall(r"custom_call @([\w$.]+)", exported.mlir_module()))
        assert calls == EXPECTED_CALLS[platforms], (name, kind, calls)
        assert exported.platforms == platforms
        if "cpu" in platforms:  # the multi-platform artifact runs here, with the XLA path
            actual, expected = exported.call(*args), ref(*args)
            for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
                np.testing.assert_allclose(np.asarray(a), np.asarray(e), **F32,
                                           err_msg=f"{name} {kind}")


@pytest.mark.slow
def test_vmap_exports_per_platform():
    """A batched kernel (vmap over a leading axis) still lowers per platform."""
    public, _, args = scan_case()
    batched = jax.vmap(public, in_axes=(0, 0, None, 0, 0, None, 0, None))
    stacked = tuple(jnp.stack([a, a]) if a.ndim == 3 else a for a in args)
    exported = jax.export.export(jax.jit(batched), platforms=("cpu", "cuda"),
                                 disabled_checks=CHECKS)(*stacked)
    assert set(re.findall(r"custom_call @([\w$.]+)", exported.mlir_module())) == {TRITON_CALL}
    np.testing.assert_allclose(np.asarray(exported.call(*stacked))[1],
                               np.asarray(public(*args)), **F32)


@pytest.mark.slow
def test_auto_is_xla_on_cpu_and_pallas_runs_the_interpreter():
    for make in CASES.values():
        public, reference, args = make()
        auto = jax.jit(public)(*args)
        np.testing.assert_array_equal(np.asarray(auto),
                                      np.asarray(jax.jit(functools.partial(public, impl="xla"))(
                                          *args)))
        lowered = jax.jit(functools.partial(public, impl="pallas")).lower(*args)
        assert "custom_call" not in lowered.as_text()  # the interpreter: plain HLO on CPU
        np.testing.assert_allclose(np.asarray(lowered.compile()(*args)),
                                   np.asarray(reference(*args)), **F32)


def test_only_on_lowers_for_its_platforms():
    def kernel(x):
        return {"y": jnp.cumsum(x) * 2.0, "n": jnp.argmax(x)}

    def program(x):
        other = lambda x: {"y": jnp.cumsum(x) * 2.0, "n": jnp.argmax(x)}  # noqa: E731
        return platform_dependent(x, gpu=functools.partial(only_on, GPU_PLATFORMS, kernel),
                                  tpu=other, other=other)

    x = jnp.arange(5.0)
    out = jax.jit(program)(x)
    np.testing.assert_array_equal(np.asarray(out["y"]), np.cumsum(np.arange(5.0)) * 2.0)
    # Outside platform_dependent the guard shows: on this CPU host a GPU-only call lowers to the
    # NaN placeholder, a CPU one to the kernel.
    guarded = jax.jit(lambda x: only_on(GPU_PLATFORMS, kernel, x))(x)
    assert np.isnan(np.asarray(guarded["y"])).all()
    np.testing.assert_array_equal(np.asarray(jax.jit(lambda x: only_on(("cpu",), kernel, x))(x)["y"]),
                                  np.asarray(out["y"]))
    both = jax.export.export(jax.jit(program), platforms=("cpu", "cuda"))(x)
    np.testing.assert_array_equal(np.asarray(both.call(x)["y"]), np.asarray(out["y"]))
    batched = jax.vmap(lambda x: only_on(("cpu",), kernel, x))(jnp.ones((3, 4)))
    np.testing.assert_array_equal(np.asarray(batched["y"]), 2.0 * np.cumsum(np.ones((3, 4)), 1))
