"""Optimizer-state memory, update-step time and projector-refresh time on a LLaMA-60M-shaped tree.

Run by hand (prints a markdown report; nothing here is asserted):

    python -m benchmarks.optim_memory            # full: T = 200, 2 T timed steps per optimizer
    python -m benchmarks.optim_memory --quick    # the README main job: a few steps, ~1-2 min

Measured in one run, so the ratios compare like with like:
  * optimizer-state bytes (from the state pytree) for optax.adamw, optax.contrib.galore,
    memjax.optim.galore with svd / dct / random projectors, proj_type "std" and "min_state",
    8-bit AdamW, Fira, APOLLO, APOLLO-Mini (also with an 8-bit inner Adam), FRUGAL (SVD and
    blockwise subspaces) and Q-GaLore, as ratios to optax.adamw and to memjax's GaLore;
  * mean update-step time over ``steps`` steps, refreshes included (every ``T`` steps);
  * compiled memory of the jitted update step (XLA ``memory_analysis``);
  * one projector refresh (svd vs dct vs random) on 1376x512 (r 128) and 4096x1024 (r 256).
"""

from __future__ import annotations

import argparse
import functools
import platform
import time

import jax
import jax.numpy as jnp
import optax
from optax import contrib

import memjax
from memjax.optim import make_projector

MB = 1024**2


def llama_tree(d=512, ffn=1376, layers=8, vocab=32000, dtype=jnp.float32):
    """Parameter shapes of the GaLore paper's LLaMA-60M (untied embedding and head)."""
    sds = lambda *s: jax.ShapeDtypeStruct(s, dtype)  # noqa: E731
    tree = {"embed_tokens": sds(vocab, d), "norm": {"scale": sds(d)}, "lm_head": sds(d, vocab)}
    for i in range(layers):
        tree[f"layer_{i}"] = {
            "attn": {k: sds(d, d) for k in ("q_proj", "k_proj", "v_proj", "o_proj")},
            "mlp": {"gate_proj": sds(d, ffn), "up_proj": sds(d, ffn), "down_proj": sds(ffn, d)},
            "input_norm": {"scale": sds(d)}, "post_attn_norm": {"scale": sds(d)},
        }
    return tree


def optimizers(rank, gap, lr=1e-3):
    def optax_galore_dims(params):
        labels = memjax.optim.label_matrices(params, rank)
        return jax.tree.map(lambda l: contrib.GaLoreDimensionNumbers() if l else None, labels,
                            is_leaf=lambda x: x is None or isinstance(x, memjax.optim.MatrixDims))

    out = {
        "optax.adamw": optax.adamw(lr, eps=1e-6),
        "optax.contrib.galore": contrib.galore(lr, rank=rank, update_proj_gap=gap, scale=0.25,
                                               weight_dimension_numbers=optax_galore_dims),
    }
    # Like optax's optimizers, timed without the non-finite guard; one row shows its cost.
    galore = functools.partial(memjax.optim.galore, lr, rank=rank, update_proj_gap=gap,
                               skip_nonfinite=False)
    for projector in ("svd", "dct", "random", "power"):
        for proj_type in ("std", "min_state"):
            out[f"memjax galore {projector} {proj_type}"] = galore(projector=projector,
                                                                   proj_type=proj_type)
    out["memjax galore svd std staggered"] = galore(refresh="staggered")
    out["memjax galore svd std + skip_nonfinite"] = galore(skip_nonfinite=True)
    # Fira / APOLLO / FRUGAL / quantized state (all without the non-finite guard, like optax).
    out["memjax adamw 8-bit"] = optax.chain(memjax.optim.scale_by_adam_8bit(eps=1e-6),
                                            optax.scale_by_learning_rate(lr))
    out["memjax fira"] = memjax.optim.fira(lr, rank=rank, update_proj_gap=gap,
                                           skip_nonfinite=False)
    out["memjax apollo"] = memjax.optim.apollo(lr, rank=rank, update_proj_gap=gap,
                                               skip_nonfinite=False)
    out["memjax apollo-mini"] = memjax.optim.apollo_mini(lr, update_proj_gap=gap,
                                                         skip_nonfinite=False)
    out["memjax apollo-mini + adam 8-bit"] = memjax.optim.apollo_mini(
        lr, update_proj_gap=gap, inner=memjax.optim.scale_by_adam_8bit(eps=1e-6),
        skip_nonfinite=False)
    out["memjax frugal svd"] = memjax.optim.frugal(lr, density=0.25, update_proj_gap=gap,
                                                   skip_nonfinite=False)
    out["memjax frugal block"] = memjax.optim.frugal(lr, density=0.25, subspace="block",
                                                     update_proj_gap=gap, skip_nonfinite=False)
    out["memjax q-galore"] = memjax.optim.q_galore(lr, rank=rank, update_proj_gap=gap,
                                                   skip_nonfinite=False)
    return out


def _materialize(tree, seed):
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return treedef.unflatten([0.02 * jax.random.normal(k, x.shape, x.dtype)
                              for k, x in zip(keys, leaves)])


def compile_step(tx, params, grads):
    """(the compiled, donated ``update + apply_updates`` step of ``tx``, its initial state)."""
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    state = jax.jit(tx.init)(params)
    return jax.jit(step, donate_argnums=(0, 1)).lower(params, state, grads).compile(), state


def time_steps(tx, params, grads, steps):
    compiled, state = compile_step(tx, params, grads)
    mem = compiled.memory_analysis()
    params = jax.tree.map(jnp.copy, params)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        params, state = compiled(params, state, grads)
        jax.block_until_ready(params)
        times.append(time.perf_counter() - t0)
    return sum(times) / len(times), mem


def refresh_times(shapes, repeats=7):
    """Median time of one jitted refresh per projector, the projectors interleaved per repeat
    (so a slow spell of the machine hits all of them alike). ``power`` is the warm refresh (one
    iteration from the previous basis, the steady state); ``power first`` starts from random."""
    rows = []
    for (m, n), r in shapes:
        g = jax.random.normal(jax.random.key(0), (m, n))
        side = "right" if m >= n else "left"
        calls = {}
        for name in ("svd", "dct", "random", "power"):
            p = make_projector(name, m, n, r, side)
            fn = jax.jit(lambda g, s, k, p=p: p.refresh(g, s, k))
            s0, key = p.init(jax.random.key(0)), jax.random.key(1)
            if name == "power":
                calls["power first"] = (fn, (g, s0, key))
                s0 = jax.block_until_ready(fn(g, s0, key))  # warm: from the previous basis
                g = g + 0.01 * jax.random.normal(jax.random.key(2), (m, n))
            calls[name] = (fn, (g, s0, key))
        for fn, args in calls.values():
            jax.block_until_ready(fn(*args))  # compile
        times = {name: [] for name in calls}
        for _ in range(repeats):
            for name, (fn, args) in calls.items():
                t0 = time.perf_counter()
                jax.block_until_ready(fn(*args))
                times[name].append(time.perf_counter() - t0)
        rows.append(((m, n), r, {k: sorted(v)[len(v) // 2] for k, v in times.items()}))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rank", type=int, default=128)
    ap.add_argument("--gap", type=int, default=200, help="update_proj_gap T")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 2 T)")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--quick", action="store_true", help="T = 4, 8 timed steps, 2 layers")
    ap.add_argument("--only", default=None,
                    help="comma-separated optimizer names to time (optax.adamw is always kept)")
    args = ap.parse_args(argv)
    if args.quick:
        args.gap, args.layers = 4, 2
    steps = args.steps or 2 * args.gap

    shapes = llama_tree(layers=args.layers)
    params = _materialize(shapes, 0)
    grads = _materialize(shapes, 1)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    print(f"## Optimizer memory and speed: LLaMA-60M-shaped tree ({args.layers} layers, "
          f"{n_params / 1e6:.1f}M params), rank {args.rank}, T {args.gap}, {steps} timed steps\n")
    print(f"machine: {platform.machine()} {jax.devices()[0].platform} x{jax.device_count()}, "
          f"jax {jax.__version__}, optax {optax.__version__}\n")

    results = {}
    txs = optimizers(args.rank, args.gap)
    if args.only:
        keep = set(args.only.split(","))
        txs = {k: v for k, v in txs.items() if k in keep or k == "optax.adamw"}
    for name, tx in txs.items():
        sbytes = memjax.optim.state_bytes(jax.eval_shape(tx.init, shapes))
        t, mem = time_steps(tx, params, grads, steps)
        results[name] = (sbytes, t, mem)

    base_bytes, base_t, _ = results["optax.adamw"]
    ref = results.get("optax.contrib.galore")
    galore_bytes = memjax.optim.state_bytes(jax.eval_shape(
        memjax.optim.galore(1e-3, rank=args.rank, update_proj_gap=args.gap).init, shapes))
    print("| optimizer | state MB | vs adamw | state vs memjax galore | step ms | vs adamw | "
          "vs optax galore | compiled temp MB | compiled peak MB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, (sbytes, t, mem) in results.items():
        peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes
                - mem.alias_size_in_bytes + mem.temp_size_in_bytes)
        vs_galore = f"{t / ref[1]:.2f}x" if ref else "-"
        print(f"| {name} | {sbytes / MB:.1f} | {sbytes / base_bytes:.3f}x | "
              f"{sbytes / galore_bytes:.3f}x | {1e3 * t:.1f} | "
              f"{t / base_t:.2f}x | {vs_galore} | {mem.temp_size_in_bytes / MB:.1f} | "
              f"{peak / MB:.1f} |")

    print("\n### One projector refresh (jitted, float32, median of 7 interleaved runs)\n")
    print("| matrix | rank | svd ms | dct ms | random ms | power ms | power first ms | dct / svd "
          "| power / svd | random / svd |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    sizes = [((1376, 512), 128)] if args.quick else [((1376, 512), 128), ((4096, 1024), 256)]
    for (m, n), r, row in refresh_times(sizes):
        print(f"| {m}x{n} | {r} | {1e3 * row['svd']:.1f} | {1e3 * row['dct']:.1f} | "
              f"{1e3 * row['random']:.2f} | {1e3 * row['power']:.1f} | "
              f"{1e3 * row['power first']:.1f} | {row['dct'] / row['svd']:.3f} | "
              f"{row['power'] / row['svd']:.3f} | {row['random'] / row['svd']:.4f} |")


if __name__ == "__main__":
    main()
