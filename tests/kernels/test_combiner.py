"""Combiner attention: blocked ops vs the dense reference, the single-region reduction to softmax
attention, the probability structure (full support), causality, the O(L sqrt L) memory bound, and
argument checking. Float32 tolerances: rtol 1e-5 / atol 1e-6 (forward), rtol 1e-4 / atol 1e-5
(gradients); bfloat16: 1e-2 (one bf16 rounding of the output, 2^-8 relative)."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memjax.kernels.combiner import (
    MODES,
    combiner_attention,
    combiner_attention_reference,
    combiner_probabilities,
    combiner_regions,
)
from tests.kernels.helpers import max_intermediate_size

COMBOS = [(mode, causal) for mode in MODES for causal in (True, False)]
# (length, block_size): the default block with padding (7 -> 3, two padded slots), length 1, and a
# block that divides the length; blocks above the length are in the reduction test
GRADIENT_CASE = (7, None)
FORWARD_CASES = [(1, None), (12, 4)]


_NO_LLVM_OPT = {"xla_backend_optimization_level": 0}


def _jit(function, **kwargs):
    """``function`` with keyword arguments bound, jitted. The test shapes are tiny, so compile time
    dominates: compile without LLVM optimisation (numerics are unchanged, IEEE float32), and the
    tests below batch all their configurations into one compilation per function."""
    return jax.jit(functools.partial(function, **kwargs), compiler_options=_NO_LLVM_OPT)


def _qkv(seed: int, length: int, *, batch=2, heads=2, dim=4, dim_v=3, dtype=jnp.float32):
    """Standard normal q, k (B, L, H, dim) and v (B, L, H, dim_v); numpy draws (no compilation)."""
    rng = np.random.default_rng(seed)
    shapes = [(batch, length, heads, dim)] * 2 + [(batch, length, heads, dim_v)]
    return tuple(jnp.asarray(rng.standard_normal(shape, dtype=np.float32), dtype) for shape in shapes)


def _all_combos(grad_inputs, cotangent, forward_inputs, *, fn):
    """For every (mode, causal): fn's output and (dq, dk, dv) on GRADIENT_CASE, and its outputs on
    FORWARD_CASES."""
    results = {}
    for mode, causal in COMBOS:
        kw = dict(mode=mode, causal=causal)
        out, vjp = jax.vjp(functools.partial(fn, block_size=GRADIENT_CASE[1], **kw), *grad_inputs)
        forward = [
            fn(*qkv, block_size=block, **kw) for qkv, (_, block) in zip(forward_inputs, FORWARD_CASES)
        ]
        results[mode, causal] = (out, vjp(cotangent), forward)
    return results


@functools.cache
def _ops_and_reference():
    grad_inputs = _qkv(GRADIENT_CASE[0], GRADIENT_CASE[0])
    cotangent = _qkv(7, grad_inputs[2].shape[1])[2]
    forward_inputs = [_qkv(length, length) for length, _ in FORWARD_CASES]
    args = (grad_inputs, cotangent, forward_inputs)
    return (
        _jit(_all_combos, fn=combiner_attention)(*args),
        _jit(_all_combos, fn=combiner_attention_reference)(*args),
    )


@pytest.mark.slow
@pytest.mark.parametrize("mode, causal", COMBOS)
def test_forward_and_gradients_match_reference(mode, causal):
    ops, reference = (results[mode, causal] for results in _ops_and_reference())
    (out, grads, forward), (ref, ref_grads, ref_forward) = ops, reference
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
    for name, g, e in zip("qkv", grads, ref_grads):
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-5, err_msg=f"d{name}")
    for case, out, ref in zip(FORWARD_CASES, forward, ref_forward):
        assert out.shape == (2, case[0], 2, 3) and out.dtype == jnp.float32
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6, err_msg=f"(L, b) = {case}")


def _bfloat16_pairs(q, k, v):
    """Per mode: (ops on bf16 inputs, float32 reference on the same values)."""
    up = [x.astype(jnp.float32) for x in (q, k, v)]
    return {
        mode: (
            combiner_attention(q, k, v, block_size=3, mode=mode),
            combiner_attention_reference(*up, block_size=3, mode=mode),
        )
        for mode in MODES
    }


def test_bfloat16_matches_reference():
    pairs = _jit(_bfloat16_pairs)(*_qkv(3, 10, dtype=jnp.bfloat16))
    for mode, (out, ref) in pairs.items():
        assert out.dtype == jnp.bfloat16
        # same bf16 inputs, float32 reference: the only difference is the bf16 rounding of the output
        np.testing.assert_allclose(out.astype(jnp.float32), ref, rtol=1e-2, atol=1e-2, err_msg=mode)


def _naive_softmax_attention(q, k, v, causal):
    logits = jnp.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(q.shape[-1])
    if causal:
        length = q.shape[1]
        logits = jnp.where(jnp.tril(jnp.ones((length, length), bool))[None, None], logits, -jnp.inf)
    return jnp.einsum("bhij,bjhd->bihd", jax.nn.softmax(logits, axis=-1), v)


def _single_region(q, k, v):
    """Per causal: softmax attention (jax.nn and naive), and per mode Combiner (ops, reference)
    with one block (row) of 12 >= L = 9 covering the sequence."""
    results = {}
    for causal in (True, False):
        results[causal] = {
            "dot_product_attention": jax.nn.dot_product_attention(q, k, v, is_causal=causal),
            "naive": _naive_softmax_attention(q, k, v, causal),
        }
        for mode in MODES:
            kw = dict(block_size=12, mode=mode, causal=causal)
            results[causal][mode] = combiner_attention(q, k, v, **kw)
            results[causal][mode + " reference"] = combiner_attention_reference(q, k, v, **kw)
    return results


@functools.cache
def _single_region_results():
    return _jit(_single_region)(*_qkv(5, 9, dim_v=4))


@pytest.mark.parametrize("causal", [True, False])
def test_single_region_is_exact_softmax_attention(causal):
    results = dict(_single_region_results()[causal])
    expected = results.pop("dot_product_attention")
    for name, out in results.items():
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6, err_msg=name)


@functools.cache
def _probabilities():
    length, block = 11, 3
    q, k, _ = _qkv(11, length)
    regions = {combo: combiner_regions(length, block, *combo) for combo in COMBOS}

    def all_probabilities(q, k):
        return {combo: combiner_probabilities(q, k, *regions[combo]) for combo in COMBOS}

    return regions, _jit(all_probabilities)(q, k)


@pytest.mark.parametrize("mode, causal", COMBOS)
def test_regions_partition_and_full_support(mode, causal):
    regions, probabilities = _probabilities()
    direct, member = regions[mode, causal]
    length = direct.shape[0]
    allowed = np.tril(np.ones((length, length), bool)) if causal else np.ones((length, length), bool)
    # every visible key is in exactly one region of the query: direct or one span
    np.testing.assert_array_equal(direct.astype(int) + member.sum(1), allowed.astype(int))
    probs = np.asarray(probabilities[mode, causal])
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-6)
    assert (probs[..., ~allowed] == 0).all()  # nothing outside the allowed set (causality)
    assert (probs[..., allowed] > 0).all()  # full attention: every allowed key has mass


def _dependencies(q, k, v):
    """Per mode: sum |d out_i / d x_j| over batch, heads and features, (L_out, L_in) for x = q, k, v."""

    def jacobians(mode):
        def per_position(q, k, v):
            return combiner_attention(q, k, v, block_size=3, mode=mode, causal=True).sum(axis=(0, 2, 3))

        jac = jax.jacrev(per_position, argnums=(0, 1, 2))(q, k, v)  # (L_out, B, L_in, H, D)
        return {name: jnp.abs(j).sum(axis=(1, 3, 4)) for name, j in zip("qkv", jac)}

    return {mode: jacobians(mode) for mode in MODES}


@functools.cache
def _causal_dependencies():
    return _jit(_dependencies)(*_qkv(21, 11, batch=1))


@pytest.mark.parametrize("mode", MODES)
def test_causal_output_depends_on_past_only(mode):
    dep = {name: np.asarray(d) for name, d in _causal_dependencies()[mode].items()}
    past = np.tril(np.ones(dep["v"].shape, bool))
    for name, d in dep.items():
        assert (d[~past] == 0).all(), f"output depends on future {name}"
    assert (dep["v"][past] > 0).all(), "full attention: every past value reaches every output"


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("mode", MODES)
def test_no_length_squared_intermediates(mode, causal):
    length = 256  # block 16: O(L sqrt L) arrays are ~L * 32 elements, L^2 / 4 = L * 64
    q, k, v = (jax.ShapeDtypeStruct((1, length, 1, 2), jnp.float32),) * 3

    def loss(q, k, v):
        return combiner_attention(q, k, v, mode=mode, causal=causal).sum()

    grad_fn = jax.value_and_grad(loss, argnums=(0, 1, 2))
    assert max_intermediate_size(grad_fn, q, k, v) < length * length // 4


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(block_size=0), "block_size"),
        (dict(block_size=-3), "block_size"),
        (dict(block_size=2.5), "block_size"),
        (dict(mode="dense"), "mode"),
    ],
)
def test_bad_arguments(kwargs, match):
    q, k, v = _qkv(0, 6)
    with pytest.raises(ValueError, match=match):
        combiner_attention(q, k, v, **kwargs)


def test_bad_shapes():
    q, k, v = _qkv(0, 6)
    with pytest.raises(ValueError, match="q, k, v"):
        combiner_attention(q, k[:, :5], v)
    with pytest.raises(ValueError, match="q must"):
        combiner_attention(q[0], k, v)
    with pytest.raises(ValueError, match="head_dim"):
        combiner_attention(q, k[..., :3], v)
