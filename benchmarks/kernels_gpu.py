"""GPU timing of the Pallas kernels against the XLA paths, and of the optimizer steps.

One script, one run (about 6-8 minutes on an H100 / H200; ``--budget-s`` skips what would not fit):

* the selective scan (Mamba S6, with D, z, delta bias and softplus), forward and forward +
  backward (gradient with respect to every input), for every dtype in ``--dtypes`` and length in
  ``--lengths`` (1K, 4K, 16K): ``impl="pallas"`` (Triton kernels) vs ``impl="xla"`` (chunked,
  rematerialised) vs the associative scan over the full (batch, L, D, N) state tensor
  (``benchmarks/selective_scan.py``), with the target: Pallas >= 5x the associative scan at 4K;
* causal linear attention with Lightning per-head decay (``impl="pallas"`` and ``"xla"``) vs
  causal softmax attention ``jax.nn.dot_product_attention(implementation="cudnn")`` (flash
  attention) from L = 1K to 32K in bfloat16, to find the crossover (target: linear faster from 4K);
* the optimizer step of optax.adamw, optax.contrib.galore, memjax galore (svd, dct, power;
  ``proj_type="min_state"``), apollo_mini and 8-bit Adam on the LLaMA-60M and LLaMA-1B parameter
  trees (``benchmarks/optim_memory.py``), as ratios to adamw at T = 200 (targets: apollo_mini <=
  1.0x, galore power or dct <= 1.3x). Each optimizer runs with ``update_proj_gap=2``, so its steps
  alternate a refresh and a plain step; the step at T is ``plain + (refresh - plain) / T`` with
  the medians of each (the warm refresh, as every refresh after the first one).

Every row is the median of ``--repeats`` runs after a warm-up, with the compiled temp memory. A row
that fails (out of memory, no cuDNN) says so instead of stopping the run. Headed by the GPU name
and the JAX version; paste the output into BENCHMARKS.md.

    python -m benchmarks.kernels_gpu                       # on a GPU machine
    python -m benchmarks.kernels_gpu --dry-run             # anywhere: tiny sizes, interpreter

``--dry-run`` runs the same code at tiny sizes; on a CPU the Pallas kernels run in the Pallas
interpreter and softmax attention uses ``implementation="xla"`` (cuDNN needs a GPU), so the
numbers only show that the script works.

References: A. Gu and T. Dao, arXiv 2312.00752 (2023); Qin et al. "Lightning Attention-2",
arXiv 2401.04658 (2024); Zhao et al. "GaLore", arXiv 2403.03507 (2024); Zhu et al. "APOLLO",
arXiv 2412.05270 (2024).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks.optim_memory import _materialize, compile_step, llama_tree, optimizers
from benchmarks.selective_scan import naive_associative_scan
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


def associative_scan(u, delta, A, B, C, D, z, delta_bias, *, delta_softplus=True):
    """The scan of `selective_scan` (D, z, delta bias, softplus) by one associative scan over the
    full (batch, L, channels, N) state tensor, in float32."""
    f32 = [x.astype(jnp.float32) for x in (u, delta, B, C, z)]
    u32, delta32, B32, C32, z32 = f32
    dt = delta32 + delta_bias
    dt = jax.nn.softplus(dt) if delta_softplus else dt
    y = naive_associative_scan(u32, dt, A, B32, C32) + D * u32
    return (y * jax.nn.silu(z32)).astype(u.dtype)


class Budget:
    """Wall-clock budget: sections check it before each row and skip what would not fit."""

    def __init__(self, seconds: float):
        self.deadline = time.perf_counter() + seconds

    def left(self) -> float:
        return self.deadline - time.perf_counter()


def scan_section(opts, dtype_name, interpret, budget):
    dtype = DTYPES[dtype_name]
    print(f"## Selective scan, {dtype_name}: batch {opts.batch}, channels {opts.channels}, "
          f"N {opts.state}, D, z, delta bias, softplus; chunk {opts.scan_chunk}\n")
    print("| L | pallas fwd | xla fwd | associative fwd | pallas fwd+bwd | xla fwd+bwd "
          "| associative fwd+bwd |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    speedups = {}
    for length in opts.lengths:
        if budget.left() < 0:
            print(f"| {length} | skipped (time budget) |")
            continue
        args = scan_inputs(opts.batch, length, opts.channels, opts.state, dtype)
        fns = {impl: forward_and_backward(functools.partial(
            selective_scan, delta_softplus=True, impl=impl, chunk_size=opts.scan_chunk,
            interpret=interpret and impl == "pallas"), len(args)) for impl in ("pallas", "xla")}
        fns["associative"] = forward_and_backward(associative_scan, len(args))
        cells = {(name, which): run_row(fns[name][which], args, opts.repeats)
                 for which in (0, 1) for name in ("pallas", "xla", "associative")}
        print(f"| {length} | " + " | ".join(cells[(name, which)] for which in (0, 1)
                                            for name in ("pallas", "xla", "associative")) + " |",
              flush=True)
        speedups[length] = [milliseconds(cells[("associative", w)])
                            / milliseconds(cells[("pallas", w)]) for w in (0, 1)]
    target = 4096 if 4096 in speedups else max(speedups, default=None)
    if target is not None:
        fwd, both = speedups[target]
        print(f"\nPallas scan vs associative scan at L = {target}: fwd {fwd:.1f}x, fwd+bwd "
              f"{both:.1f}x (target >= 5x: {'met' if min(fwd, both) >= 5 else 'not met'}).\n")


def attention_section(opts, interpret, softmax_impl, budget):
    dtype = DTYPES[opts.attention_dtype]
    decay = lightning_decay(opts.heads)
    print(f"## Causal attention, {opts.attention_dtype}: batch {opts.batch}, heads {opts.heads}, "
          f"head dim {opts.head_dim}; linear with Lightning decay, chunk {opts.attention_chunk}; "
          f"softmax = dot_product_attention(implementation={softmax_impl!r})\n")
    print("| L | linear pallas fwd | linear xla fwd | softmax fwd | linear pallas fwd+bwd "
          "| linear xla fwd+bwd | softmax fwd+bwd |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    linear_wins = {"fwd": [], "fwd+bwd": []}  # per length: does linear (pallas) beat softmax?
    for length in opts.attention_lengths:
        if budget.left() < 0:
            print(f"| {length} | skipped (time budget) |")
            continue
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
    print()


OPTIMIZER_ROWS = ("optax.adamw", "optax.contrib.galore", "memjax galore svd min_state",
                  "memjax galore dct min_state", "memjax galore power min_state",
                  "memjax apollo-mini", "memjax adamw 8-bit")
TREES = {  # name: (llama_tree arguments, GaLore rank), the GaLore paper's shapes and ranks
    "LLaMA-60M": (dict(d=512, ffn=1376, layers=8), 128),
    "LLaMA-1B": (dict(d=2048, ffn=5461, layers=24), 512),
    "dry-run": (dict(d=64, ffn=172, layers=2, vocab=256), 8),
}


def alternating_step_times(tx, params, grads, pairs: int) -> tuple[float, float, float]:
    """(plain step s, refresh step s, compiled temp MiB) of a donated update + apply step.

    ``tx`` refreshes every 2 steps; step 0 (the cold refresh) is the warm-up, then ``pairs``
    (plain, refresh) pairs are timed one step at a time; medians of each kind.
    """
    compiled, state = compile_step(tx, params, grads)
    temp = compiled.memory_analysis()
    params = jax.tree.map(jnp.copy, params)
    params, state = jax.block_until_ready(compiled(params, state, grads))  # step 0
    times = []
    for _ in range(2 * pairs):
        start = time.perf_counter()
        params, state = jax.block_until_ready(compiled(params, state, grads))
        times.append(time.perf_counter() - start)
    plain, refresh = statistics.median(times[0::2]), statistics.median(times[1::2])
    return plain, refresh, (float("nan") if temp is None else temp.temp_size_in_bytes / 2**20)


def optimizer_section(opts, budget, gap=200):
    names = ("dry-run",) if opts.dry_run else opts.trees
    for tree_name in names:
        shape_args, rank = TREES[tree_name]
        shapes = llama_tree(**shape_args)
        params, grads = _materialize(shapes, 0), _materialize(shapes, 1)
        n_params = sum(x.size for x in jax.tree.leaves(params))
        print(f"## Optimizer step, {tree_name} tree ({n_params / 1e6:.0f}M params, float32), "
              f"rank {rank}, at T = {gap}: plain + (refresh - plain) / T\n")
        print("| optimizer | plain step ms | refresh step ms | step at T ms | vs adamw "
              "| compiled temp MiB |")
        print("|---|---:|---:|---:|---:|---:|")
        txs = optimizers(rank, 2)
        at_t = {}
        for name in OPTIMIZER_ROWS:
            if budget.left() < 0:
                print(f"| {name} | skipped (time budget) |")
                continue
            try:
                plain, refresh, temp = alternating_step_times(txs[name], params, grads,
                                                              opts.opt_pairs)
            except Exception as error:  # noqa: BLE001 -- report and carry on (OOM, ...)
                print(f"| {name} | failed: {type(error).__name__}: "
                      f"{str(error).splitlines()[0][:60]} |")
                continue
            at_t[name] = plain + (refresh - plain) / gap
            base = at_t.get("optax.adamw")
            ratio = f"{at_t[name] / base:.2f}x" if base else "-"
            print(f"| {name} | {1e3 * plain:.2f} | {1e3 * refresh:.2f} | "
                  f"{1e3 * at_t[name]:.2f} | {ratio} | {temp:.1f} |", flush=True)
        base = at_t.get("optax.adamw")
        if base:
            mini = at_t.get("memjax apollo-mini", float("inf")) / base
            fast = min(at_t.get(f"memjax galore {p} min_state", float("inf"))
                       for p in ("power", "dct")) / base
            print(f"\nTargets at T = {gap}: apollo_mini {mini:.2f}x adamw (<= 1.0x: "
                  f"{'met' if mini <= 1.0 else 'not met'}); galore power / dct {fast:.2f}x "
                  f"(<= 1.3x: {'met' if fast <= 1.3 else 'not met'}).\n")
        del params, grads


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384],
                        help="selective scan lengths")
    parser.add_argument("--attention-lengths", type=int, nargs="+",
                        default=[1024, 2048, 4096, 8192, 16384, 32768])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--channels", type=int, default=1536, help="scan channels (d_inner)")
    parser.add_argument("--state", type=int, default=16, help="scan state size N")
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--dtypes", choices=sorted(DTYPES), nargs="+",
                        default=["bfloat16", "float32"], help="selective scan dtypes")
    parser.add_argument("--attention-dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--scan-chunk", type=int, default=16, help="selective scan chunk T")
    parser.add_argument("--attention-chunk", type=int, default=64, help="linear attention C")
    parser.add_argument("--trees", choices=["LLaMA-60M", "LLaMA-1B"], nargs="*",
                        default=["LLaMA-60M", "LLaMA-1B"], help="optimizer-step trees")
    parser.add_argument("--opt-pairs", type=int, default=3,
                        help="timed (plain, refresh) step pairs per optimizer")
    parser.add_argument("--budget-s", type=float, default=450.0,
                        help="skip the rows that would start after this many seconds")
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny sizes; on CPU the Pallas kernels run in the interpreter")
    opts = parser.parse_args(argv)
    if opts.dry_run:
        opts.lengths, opts.attention_lengths = [16, 48], [16, 48]
        opts.batch, opts.channels, opts.state = 1, 8, 4
        opts.heads, opts.head_dim, opts.repeats = 2, 16, 1
        opts.scan_chunk, opts.attention_chunk, opts.opt_pairs = 8, 16, 1

    budget = Budget(opts.budget_s)
    on_cpu = jax.default_backend() == "cpu"
    interpret = on_cpu  # the Pallas kernels need the interpreter without a GPU / TPU
    softmax_impl = "xla" if on_cpu else "cudnn"
    device = jax.devices()[0]
    print(f"# memjax kernels and optimizer steps: {getattr(device, 'device_kind', device.platform)}"
          f" ({jax.default_backend()}), jax {jax.__version__}, optax {optax.__version__}"
          f"{' [dry run: Pallas interpreter]' if interpret else ''}\n")
    print("Median ms per call over", opts.repeats, "runs (compiled temp memory).\n")
    for dtype_name in opts.dtypes:
        scan_section(opts, dtype_name, interpret, budget)
    attention_section(opts, interpret, softmax_impl, budget)
    optimizer_section(opts, budget)


if __name__ == "__main__":
    main()
