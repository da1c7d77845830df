"""The per-platform choice of a kernel implementation, made when the computation is lowered.

:func:`platform_dependent` picks a branch per lowering platform (``jax.lax.platform_dependent``).
In a multi-platform lowering (``jax.export.export(..., platforms=["cpu", "cuda", "tpu"])``) JAX
lowers every kept branch for every platform of the module, and a ``pallas_call`` cannot lower
for a platform it was not written for (a Triton kernel on CPU or TPU, a Mosaic kernel on GPU).
:func:`only_on` wraps such a kernel call so that it lowers for its own platforms and to a
placeholder elsewhere. The placeholder never runs: the enclosing :func:`platform_dependent`
selects the branch of the platform the artifact is compiled for.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.extend import core as jex_core
from jax.interpreters import batching, mlir

GPU_PLATFORMS = ("cuda", "rocm")
TPU_PLATFORMS = ("tpu",)
_LOWERING_PLATFORMS = ("cpu", "cuda", "rocm", "tpu")


def platform_dependent(*args, gpu: Callable, tpu: Callable, other: Callable):
    """``gpu(*args)`` lowered for CUDA / ROCm, ``tpu(*args)`` for TPU, ``other(*args)`` elsewhere.

    The branch is chosen per *lowering* platform (:func:`jax.lax.platform_dependent`), not by the
    host's ``jax.default_backend()``: jitting runs the branch of the device the computation is
    compiled for, exporting or AOT-compiling for another platform from this host builds that
    platform's branch, and a multi-platform export (``platforms=["cpu", "cuda", "tpu"]``) holds
    one branch per platform and picks it when the artifact is compiled. Every branch is traced
    (not lowered), so each must trace on any host; kernel calls inside a branch go through
    :func:`only_on`. Outside ``jit`` only the host's branch runs. Branches that are the same
    callable are traced once.

    Args:
      *args: arrays (pytrees) passed to the branch.
      gpu, tpu, other: callables of ``*args`` with the same output shapes and dtypes.

    Returns:
      The chosen branch's output.
    """
    if gpu is tpu is other:
        return other(*args)
    return jax.lax.platform_dependent(*args, cuda=gpu, rocm=gpu, tpu=tpu, default=other)


def only_on(platforms: Sequence[str], fn: Callable, *args):
    """``fn(*args)``, lowered only for ``platforms``; a NaN placeholder for any other platform.

    For a kernel call that exists on some platforms only (a ``pallas_call`` compiled by Triton or
    Mosaic), inside a branch of :func:`platform_dependent` for those platforms. ``fn`` is not
    differentiated through (call it inside a ``custom_vjp``'s forward or backward) and may be
    batched (``vmap`` batches ``fn``).

    Args:
      platforms: the lowering platforms ``fn`` is meant for, e.g. :data:`GPU_PLATFORMS`.
      fn: a function of arrays returning a pytree of arrays.
      *args: its array arguments (pytrees).

    Returns:
      ``fn(*args)``.
    """
    flat, in_tree = jax.tree.flatten(args)
    out_shapes = jax.eval_shape(fn, *args)
    out_flat_shapes, out_tree = jax.tree.flatten(out_shapes)

    def flat_fn(*flat_args):
        return jax.tree.leaves(fn(*jax.tree.unflatten(in_tree, flat_args)))

    outs = _only_on_p.bind(*flat, fn=flat_fn, platforms=tuple(platforms),
                           out_shapes=tuple(out_flat_shapes))
    return jax.tree.unflatten(out_tree, outs)


_only_on_p = jex_core.Primitive("memjax_only_on")
_only_on_p.multiple_results = True


def _impl(*args, fn, platforms, out_shapes):
    del platforms, out_shapes
    return jax.jit(fn)(*args)


def _abstract_eval(*avals, fn, platforms, out_shapes):
    del avals, fn, platforms
    return [jax.core.ShapedArray(s.shape, s.dtype) for s in out_shapes]


def _placeholder(ctx, *args, fn, platforms, out_shapes):
    """Never executed (see the module docstring): NaN (or zero) outputs of the right types."""
    del fn

    def fill(s):
        if jnp.issubdtype(s.dtype, jnp.inexact):
            return jnp.full(s.shape, jnp.nan, s.dtype)
        return jnp.zeros(s.shape, s.dtype)

    return mlir.lower_fun(lambda *_: [fill(s) for s in out_shapes],
                          multiple_results=True)(ctx, *args)


def _lowering(platform: str | None):
    def rule(ctx, *args, fn, platforms, out_shapes):
        if platform in platforms:
            return mlir.lower_fun(fn, multiple_results=True)(ctx, *args)
        return _placeholder(ctx, *args, fn=fn, platforms=platforms, out_shapes=out_shapes)
    return rule


def _batch(args, dims, *, fn, platforms, out_shapes):
    del out_shapes
    outs = only_on(platforms, jax.vmap(fn, in_axes=tuple(dims), out_axes=0), *args)
    return outs, [0] * len(outs)


_only_on_p.def_impl(_impl)
_only_on_p.def_abstract_eval(_abstract_eval)
for _platform in _LOWERING_PLATFORMS:
    mlir.register_lowering(_only_on_p, _lowering(_platform), platform=_platform)
mlir.register_lowering(_only_on_p, _lowering(None))
batching.primitive_batchers[_only_on_p] = _batch


def for_backend(call: Callable, backend: str, interpret) -> Callable:
    """A ``pallas_call`` of a ``"triton"`` or ``"tpu"`` style kernel, guarded by :func:`only_on`
    for that style's platforms (unchanged when ``interpret``: the interpreter lowers anywhere)."""
    if interpret:
        return call
    platforms = GPU_PLATFORMS if backend == "triton" else TPU_PLATFORMS
    return functools.partial(only_on, platforms, call)
