"""GPU timing of the Pallas kernels against the XLA paths (and linear vs softmax attention).

For every length L in ``--lengths`` (default 1K, 4K, 16K) it times, forward only and forward +
backward (gradient with respect to every input):

* the selective scan (Mamba S6, with D, z, delta bias and softplus): ``impl="pallas"`` (Triton
  kernels) vs ``impl="xla"`` (chunked, rematerialised);
* causal linear attention with Lightning per-head decay: ``impl="pallas"`` vs ``impl="xla"``, and
  causal softmax attention ``jax.nn.dot_product_attention(implementation="cudnn")`` (flash
  attention) on the same q, k, v, to find the length where the linear form starts to win;

and prints markdown tables (time per call in ms, median of ``--repeats`` runs after a warm-up,
plus the compiled temp memory) headed by the GPU name and the JAX version. A row that fails (out
of memory, no cuDNN) says so instead of stopping the run.

    python benchmarks/kernels_gpu.py                       # on a GPU machine
    python benchmarks/kernels_gpu.py --dry-run             # anywhere: tiny sizes, interpreter

``--dry-run`` runs the same code at tiny sizes; on a CPU the Pallas kernels run in the Pallas
interpreter and softmax attention uses ``implementation="xla"`` (cuDNN needs a GPU), so the
numbers only show that the script works.

References: A. Gu and T. Dao, arXiv 2312.00752 (2023); Qin et al. "Lightning Attention-2",
arXiv 2401.04658 (2024).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from memjax.kernels.linear_attention import lightning_decay, linear_attention
from memjax.kernels.selective_scan import selective_scan

DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}


def time_compiled(fn, args, repeats: int) -> tuple[float, float]:
    """(median seconds per call, compiled temp MiB) of ``jax.jit(fn)(*args)``."""
    compiled = jax.jit(fn).lower(*args).compile()
    temp = compiled.memory_analysis()
    temp_mib = float("nan") if temp is None else temp.temp_size_in_bytes / 2**20
    jax.block_until_ready(compiled(*args))  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times), temp_mib


def forward_and_backward(fn, num_args: int):
    """fn -> (forward, forward + backward) where the latter returns the gradient of sum(out)."""
    def loss(*args):
        out = fn(*args)
        return jnp.sum(out.astype(jnp.float32))

    return fn, jax.grad(loss, argnums=tuple(range(num_args)))


def scan_inputs(batch, length, channels, n_state, dtype, seed=0):
    rng = np.random.default_rng(seed)
    rows = (batch, length, channels)
    cast = lambda a, t=dtype: jnp.asarray(a, t)  # noqa: E731
    return (cast(rng.standard_normal(rows)), cast(rng.standard_normal(rows) - 2.0),
            cast(-np.broadcast_to(np.arange(1, n_state + 1), (channels, n_state)), jnp.float32),
            cast(rng.standard_normal((batch, length, n_state))),
            cast(rng.standard_normal((batch, length, n_state))),
            cast(rng.standard_normal(channels), jnp.float32), cast(rng.standard_normal(rows)),
            cast(0.5 * rng.standard_normal(channels), jnp.float32))


def attention_inputs(batch, length, heads, head_dim, dtype, seed=0):
    rng = np.random.default_rng(seed)
    shape = (batch, length, heads, head_dim)
    return tuple(jnp.asarray(rng.standard_normal(shape) / np.sqrt(head_dim), dtype)
                 for _ in range(3))


def run_row(fn, args, repeats) -> str:
    try:
        seconds, temp_mib = time_compiled(fn, args, repeats)
        return f"{seconds * 1e3:.2f} ({temp_mib:.1f} MiB)"
    except Exception as error:  # noqa: BLE001 -- report and carry on (OOM, no cuDNN, ...)
        return f"failed: {type(error).__name__}: {str(error).splitlines()[0][:60]}"


def milliseconds(cell: str) -> float:
    """The time of a table cell, inf for a failed one."""
    return float("inf") if cell.startswith("failed") else float(cell.split()[0])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--channels", type=int, default=1536, help="scan channels (d_inner)")
    parser.add_argument("--state", type=int, default=16, help="scan state size N")
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--scan-chunk", type=int, default=16, help="selective scan chunk T")
    parser.add_argument("--attention-chunk", type=int, default=64, help="linear attention C")
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny sizes; on CPU the Pallas kernels run in the interpreter")
    opts = parser.parse_args(argv)
    if opts.dry_run:
        opts.lengths, opts.batch, opts.channels, opts.state = [16, 48], 1, 8, 4
        opts.heads, opts.head_dim, opts.repeats = 2, 16, 1
        opts.scan_chunk, opts.attention_chunk = 8, 16

    on_cpu = jax.default_backend() == "cpu"
    interpret = on_cpu  # the Pallas kernels need the interpreter without a GPU / TPU
    softmax_impl = "xla" if on_cpu else "cudnn"
    dtype = DTYPES[opts.dtype]
    device = jax.devices()[0]
    print(f"# memjax kernels: {getattr(device, 'device_kind', device.platform)} "
          f"({jax.default_backend()}), jax {jax.__version__}, {opts.dtype}"
          f"{' [dry run: Pallas interpreter]' if interpret else ''}\n")
    print("Median ms per call over", opts.repeats, "runs (compiled temp memory).\n")

    # Selective scan.
    print(f"## Selective scan: batch {opts.batch}, channels {opts.channels}, N {opts.state}, "
          f"D, z, delta bias, softplus; chunk {opts.scan_chunk}\n")
    print("| L | pallas fwd | xla fwd | pallas fwd+bwd | xla fwd+bwd |")
    print("|---:|---:|---:|---:|---:|")
    for length in opts.lengths:
        args = scan_inputs(opts.batch, length, opts.channels, opts.state, dtype)
        cells = []
        for impl in ("pallas", "xla"):
            scan = functools.partial(selective_scan, delta_softplus=True, impl=impl,
                                     chunk_size=opts.scan_chunk,
                                     interpret=interpret and impl == "pallas")
            cells.append(forward_and_backward(scan, len(args)))
        row = [run_row(cells[0][0], args, opts.repeats),
               run_row(cells[1][0], args, opts.repeats),
               run_row(cells[0][1], args, opts.repeats),
               run_row(cells[1][1], args, opts.repeats)]
        print(f"| {length} | " + " | ".join(row) + " |", flush=True)

    # Linear attention vs softmax attention.
    decay = lightning_decay(opts.heads)
    print(f"\n## Causal attention: batch {opts.batch}, heads {opts.heads}, head dim "
          f"{opts.head_dim}; linear with Lightning decay, chunk {opts.attention_chunk}; softmax "
          f"= dot_product_attention(implementation={softmax_impl!r})\n")
    print("| L | linear pallas fwd | linear xla fwd | softmax fwd | linear pallas fwd+bwd "
          "| linear xla fwd+bwd | softmax fwd+bwd |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    linear_wins = {"fwd": [], "fwd+bwd": []}  # per length: does linear (pallas) beat softmax?
    for length in opts.lengths:
        args = attention_inputs(opts.batch, length, opts.heads, opts.head_dim, dtype)
        fns = {}
        for impl in ("pallas", "xla"):
            fns[impl] = forward_and_backward(functools.partial(
                linear_attention, decay=decay, chunk_size=opts.attention_chunk, impl=impl,
                interpret=interpret and impl == "pallas"), 3)
        fns["softmax"] = forward_and_backward(functools.partial(
            jax.nn.dot_product_attention, is_causal=True, implementation=softmax_impl), 3)
        cells = {(name, which): run_row(fns[name][which], args, opts.repeats)
                 for which in (0, 1) for name in ("pallas", "xla", "softmax")}
        print(f"| {length} | " + " | ".join(cells[(name, which)] for which in (0, 1)
                                            for name in ("pallas", "xla", "softmax")) + " |",
              flush=True)
        for which, label in ((0, "fwd"), (1, "fwd+bwd")):
            linear, softmax = (milliseconds(cells[(name, which)]) for name in ("pallas", "softmax"))
            linear_wins[label].append((length, linear < softmax))  # a failure counts as inf
    for label, wins in linear_wins.items():
        # The crossover: the shortest measured L from which linear attention wins at every longer L.
        tail = [length for i, (length, _) in enumerate(wins) if all(w for _, w in wins[i:])]
        where = f"from L = {tail[0]} on" if tail else "at none of the measured lengths"
        print(f"\nLinear attention (pallas) beats softmax attention ({label}): {where}.")


if __name__ == "__main__":
    main()
