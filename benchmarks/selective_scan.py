"""Memory and time of the selective scan's forward + backward pass: naive vs chunked.

Measures `jax.grad(sum(selective_scan(u, delta, A, B, C)))` with respect to (u, delta, A, B, C):

* naive associative scan: `jax.lax.associative_scan` over the full (batch, length, channels, N)
  tensors (what a direct parallel-scan port does);
* sequential reference: `lax.scan` over time (memjax.kernels.selective_scan.reference);
* chunked XLA (memjax `impl="xla"`): sequential within chunks of `--chunk-size` steps, and the
  associative-scan-within-chunk variant.

For each: compiled temporary memory (`compile().memory_analysis().temp_size_in_bytes`), compile time
and the mean wall time over `--repeats` runs, with ratios against the naive scan. Prints a markdown
table. Timings on a shared CPU are noisy.

    python benchmarks/selective_scan.py --length 2048 --batch 2 --channels 256 --state 16 --repeats 5

Reference: A. Gu and T. Dao, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces",
arXiv 2312.00752 (2023).
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from memjax.kernels.selective_scan import selective_scan
from memjax.kernels.selective_scan import xla as selective_scan_xla


def naive_associative_scan(u, delta, A, B, C):
    """y (batch, length, channels) via one associative scan over the full (batch, length, channels, N)."""
    decay = jnp.exp(delta[..., None] * A[None, None])
    drive = (delta * u)[..., None] * B[:, :, None, :]

    def combine(left, right):
        a1, b1 = left
        a2, b2 = right
        return a1 * a2, a2 * b1 + b2

    _, states = jax.lax.associative_scan(combine, (decay, drive), axis=1)
    return jnp.einsum("bldn,bln->bld", states, C)


def make_inputs(batch, length, channels, state, seed=0):
    rng = np.random.default_rng(seed)
    f32 = np.float32
    u = rng.standard_normal((batch, length, channels)).astype(f32)
    delta = np.log1p(np.exp(rng.standard_normal((batch, length, channels)) - 2.0)).astype(f32)
    A = -np.broadcast_to(np.arange(1, state + 1, dtype=f32), (channels, state))
    B = rng.standard_normal((batch, length, state)).astype(f32)
    C = rng.standard_normal((batch, length, state)).astype(f32)
    return tuple(jnp.asarray(a) for a in (u, delta, A, B, C))


def measure(scan_fn, args, repeats):
    """(temp bytes, compile seconds, mean run seconds, gradients) of grad(sum(scan_fn(*args)))."""
    grad_fn = jax.jit(jax.grad(lambda *a: jnp.sum(scan_fn(*a)), argnums=(0, 1, 2, 3, 4)))
    start = time.perf_counter()
    compiled = grad_fn.lower(*args).compile()
    compile_s = time.perf_counter() - start
    temp = compiled.memory_analysis().temp_size_in_bytes
    grads = jax.block_until_ready(compiled(*args))  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    return temp, compile_s, float(np.mean(times)), grads


def relative_error(a, b):
    """max |a - b| / max |b|."""
    return float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-30))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--channels", type=int, default=256)
    parser.add_argument("--state", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--chunk-size", type=int, default=selective_scan_xla.DEFAULT_CHUNK_SIZE)
    parser.add_argument("--associative-chunk-size", type=int, default=64)
    parser.add_argument("--skip-reference", action="store_true", help="leave out the sequential lax.scan row")
    opts = parser.parse_args(argv)

    args = make_inputs(opts.batch, opts.length, opts.channels, opts.state)
    methods = {"naive associative_scan (full B,L,D,N)": naive_associative_scan}
    if not opts.skip_reference:
        methods["sequential reference (lax.scan)"] = functools.partial(selective_scan, impl="reference")
    methods[f"chunked xla, sequential, chunk {opts.chunk_size} (default)"] = functools.partial(
        selective_scan, impl="xla", chunk_size=opts.chunk_size
    )
    methods[f"chunked xla, associative, chunk {opts.associative_chunk_size}"] = functools.partial(
        selective_scan_xla.selective_scan_xla,
        chunk_size=opts.associative_chunk_size,
        chunk_method="associative",
    )

    full_state_mib = 4 * opts.batch * opts.length * opts.channels * opts.state / 2**20
    print(
        f"selective scan forward + backward (grad wrt u, delta, A, B, C), float32, {jax.default_backend()}: "
        f"batch {opts.batch}, length {opts.length}, channels {opts.channels}, N {opts.state}; "
        f"one (B, L, D, N) tensor = {full_state_mib:.1f} MiB; mean of {opts.repeats} runs\n"
    )
    header = ("method", "temp memory (MiB)", "memory vs naive", "compile (s)", "time (ms)", "time vs naive")
    print("| " + " | ".join((*header, "max grad err")) + " |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    base = None
    for name, fn in methods.items():
        temp, compile_s, run_s, grads = measure(fn, args, opts.repeats)
        if base is None:
            base = (temp, run_s, grads)
        err = max(relative_error(g, g0) for g, g0 in zip(grads, base[2], strict=True))
        print(
            f"| {name} | {temp / 2**20:.2f} | {temp / base[0]:.3f}x | {compile_s:.1f} | {run_s * 1e3:.1f} | "
            f"{run_s / base[1]:.2f}x | {err:.1e} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
