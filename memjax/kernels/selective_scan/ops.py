"""Public selective scan: input validation and dispatch between implementations.

    delta_t = softplus(delta_t + delta_bias)                  (both optional)
    x_t     = exp(delta_t * A) * x_{t-1} + delta_t * B_t * u_t
    y_t     = (<C_t, x_t> + D * u_t) * silu(z_t)              (D, z optional)

Shapes: u, delta, z: (batch, length, channels); A: (channels, N); B, C: (batch, length, N);
D, delta_bias: (channels,); states: (batch, channels, N).

Implementations (`impl=`):

* ``"reference"``: `reference.selective_scan_reference`, a sequential `lax.scan` over time (readable,
  stores every step's state for the backward pass).
* ``"xla"``: `xla.selective_scan_xla`, chunked and rematerialised (memory linear in the length, with
  only chunk-boundary states saved for the backward pass); differentiated by JAX autodiff.
* ``"pallas"``: `pallas.selective_scan_pallas`, Pallas kernels (Triton on GPU, Mosaic on TPU) that
  carry the state in fast memory, with a `jax.custom_vjp` whose backward kernel recomputes the states
  from chunk-entry states. On CPU they run in the Pallas interpreter (slow; for tests).
* ``"auto"`` (default): ``"pallas"`` on GPU and TPU, ``"xla"`` elsewhere (CPU).

The platform is the one the computation is lowered for (`jax.lax.platform_dependent`), not the
host's default backend: exporting from a CPU host for ``platforms=["tpu"]`` builds the Mosaic
kernel, and a multi-platform export holds each platform's implementation.

Reference: A. Gu and T. Dao, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces",
arXiv 2312.00752 (2023).
"""

from __future__ import annotations

import functools
import numbers
from collections.abc import Callable
from typing import Literal

import jax

from memjax.kernels._platform import platform_dependent
from memjax.kernels.selective_scan import pallas, xla
from memjax.kernels.selective_scan.reference import selective_scan_reference

Array = jax.Array
Impl = Literal["auto", "xla", "pallas", "reference"]

DEFAULT_CHUNK_SIZE = xla.DEFAULT_CHUNK_SIZE


def _reference_impl(*args, chunk_size: int, initial_state: Array | None, interpret: bool):
    del chunk_size, interpret  # the reference has no chunks and no kernels
    return selective_scan_reference(*args, initial_state=initial_state)


def _xla_impl(*args, chunk_size: int, initial_state: Array | None, interpret: bool):
    del interpret
    return xla.selective_scan_xla(*args, chunk_size=chunk_size, initial_state=initial_state)


def _pallas_impl(*args, chunk_size: int, initial_state: Array | None, interpret: bool,
                 backend: str | None = None):
    return pallas.selective_scan_pallas(
        *args, chunk_size=chunk_size, initial_state=initial_state, interpret=interpret,
        backend=backend,
    )


def _auto_impl(*args, chunk_size: int, initial_state: Array | None, interpret: bool):
    """The Pallas kernels where Pallas compiles (CUDA / ROCm: Triton, TPU: Mosaic), else "xla",
    chosen per lowering platform (see `memjax.kernels._platform.platform_dependent`)."""
    arrays, flags = args[:8], args[8:]

    def branch(impl, **options):
        def run(arrays, initial_state):
            return impl(*arrays, *flags, chunk_size=chunk_size, initial_state=initial_state,
                        interpret=interpret, **options)
        return run

    return platform_dependent(arrays, initial_state,
                              gpu=branch(_pallas_impl, backend="triton"),
                              tpu=branch(_pallas_impl, backend="tpu"), other=branch(_xla_impl))


_IMPLEMENTATIONS: dict[str, Callable[..., Array | tuple[Array, Array]]] = {
    "auto": _auto_impl,
    "xla": _xla_impl,
    "pallas": _pallas_impl,
    "reference": _reference_impl,
}
IMPLS = tuple(_IMPLEMENTATIONS)


def check_impl(impl: str) -> str:
    """Check `impl`; the name itself ("auto" is resolved per lowering platform, not here)."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    return impl


def _check_shape(name: str, array: Array | None, expected: tuple[int, ...], meaning: str) -> None:
    if array is not None and tuple(array.shape) != expected:
        raise ValueError(f"{name} must have shape {meaning} = {expected}, got {tuple(array.shape)}")


def validate_inputs(
    u: Array,
    delta: Array,
    A: Array,
    B: Array,
    C: Array,
    D: Array | None = None,
    z: Array | None = None,
    delta_bias: Array | None = None,
    initial_state: Array | None = None,
) -> None:
    """Raise a `ValueError` naming the first argument whose shape does not fit the others."""
    if u.ndim != 3:
        raise ValueError(f"u must have shape (batch, length, channels), got {tuple(u.shape)}")
    batch, length, channels = u.shape
    if length < 1:
        raise ValueError(f"u must have at least one time step, got length {length}")
    if A.ndim != 2:
        raise ValueError(f"A must have shape (channels, N), got {tuple(A.shape)}")
    n = A.shape[1]
    _check_shape("delta", delta, (batch, length, channels), "(batch, length, channels)")
    _check_shape("A", A, (channels, n), "(channels, N)")
    _check_shape("B", B, (batch, length, n), "(batch, length, N)")
    _check_shape("C", C, (batch, length, n), "(batch, length, N)")
    _check_shape("D", D, (channels,), "(channels,)")
    _check_shape("z", z, (batch, length, channels), "(batch, length, channels)")
    _check_shape("delta_bias", delta_bias, (channels,), "(channels,)")
    _check_shape("initial_state", initial_state, (batch, channels, n), "(batch, channels, N)")


def selective_scan(
    u: Array,
    delta: Array,
    A: Array,
    B: Array,
    C: Array,
    D: Array | None = None,
    z: Array | None = None,
    delta_bias: Array | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    *,
    initial_state: Array | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    impl: Impl = "auto",
    interpret: bool = False,
) -> Array | tuple[Array, Array]:
    """Selective scan (Mamba's S6), computed in float32.

    Args:
      u: (batch, length, channels) input.
      delta: (batch, length, channels) raw step size.
      A: (channels, N) diagonal state matrix (negative real, e.g. `-exp(A_log)`).
      B, C: (batch, length, N) input-dependent projections.
      D: (channels,) skip weight, or None.
      z: (batch, length, channels) gate (output multiplied by `silu(z)`), or None.
      delta_bias: (channels,) added to delta, or None.
      delta_softplus: apply softplus to `delta + delta_bias`.
      return_last_state: also return the state after the last step.
      initial_state: (batch, channels, N) state before the first step (zeros when None), e.g. to
        continue a sequence from a previous call's last state.
      chunk_size: maximum chunk length of the "xla" implementation, and the chunk length of the
        "pallas" kernels (a positive int; rounded up to a multiple of 8 on TPU).
      impl: "auto", "xla", "pallas" or "reference" (see the module docstring); "auto" and
        "pallas" pick the kernel per lowering platform.
      interpret: run the Pallas kernels in the Pallas interpreter on every platform.

    Returns:
      y (batch, length, channels) in `u`'s dtype; with `return_last_state`, `(y, last_state)` where
      last_state (batch, channels, N) is float32.

    Raises:
      ValueError: on mismatched shapes, a non-positive `chunk_size` or an unknown `impl`.

    Example:
      >>> import jax.numpy as jnp
      >>> u = jnp.ones((1, 5, 3)); A = -jnp.ones((3, 2)); B = C = jnp.ones((1, 5, 2))
      >>> selective_scan(u, 0.1 * u, A, B, C).shape
      (1, 5, 3)
    """
    name = check_impl(impl)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    validate_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state)
    return _dispatch(
        u,
        delta,
        A,
        B,
        C,
        D,
        z,
        delta_bias,
        initial_state,
        delta_softplus=bool(delta_softplus),
        return_last_state=bool(return_last_state),
        chunk_size=int(chunk_size),
        impl=name,
        interpret=interpret,
    )


@functools.partial(
    jax.jit,
    static_argnames=("delta_softplus", "return_last_state", "chunk_size", "impl", "interpret"),
)
def _dispatch(
    u,
    delta,
    A,
    B,
    C,
    D,
    z,
    delta_bias,
    initial_state,
    *,
    delta_softplus,
    return_last_state,
    chunk_size,
    impl,
    interpret,
):
    """Validated call of one implementation, compiled once per shape (inlined under an outer jit)."""
    return _IMPLEMENTATIONS[impl](
        u,
        delta,
        A,
        B,
        C,
        D,
        z,
        delta_bias,
        delta_softplus,
        return_last_state,
        chunk_size=chunk_size,
        initial_state=initial_state,
        interpret=interpret,
    )
