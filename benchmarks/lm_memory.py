"""Compiled memory and CPU time of one LM train step, per sequence mixer and remat policy.

One train step = forward + backward of ``next_token_loss`` (loss and gradients of every parameter) of a
tiny :class:`memjax.models.lm.LM` (default d_model 64, 2 layers, batch 1). Memory comes from XLA's
buffer assignment of the compiled step (``compiled.memory_analysis()``): ``temp`` is the scratch
memory (activations kept for the backward pass, attention scores, ...), ``args`` the parameters and
tokens, ``out`` the loss and gradients. Nothing is allocated to measure memory; only the timing
table runs steps.

Expected: temp grows linearly in L for mamba / linear / combiner / scatterbrain and quadratically for
softmax attention (the XLA path of ``jax.nn.dot_product_attention`` materialises the L x L scores);
remat "selective" keeps the matmul outputs and recomputes scores, softmax and elementwise ops
(Korthikanti et al. 2022), "full" keeps only each layer's input.

Run by hand (prints markdown tables)::

    python benchmarks/lm_memory.py
    python benchmarks/lm_memory.py --lengths 1024 2048 --mixers attention mamba --time-steps 0
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from memjax.models.lm import LM, MIXERS, REMAT_POLICIES, LMConfig, next_token_loss

MiB = 2**20


def make_config(args: argparse.Namespace, mixer: str, remat: str, max_length: int) -> LMConfig:
    return LMConfig(
        vocab_size=args.vocab_size,
        d_model=args.d_model,
        num_layers=args.num_layers,
        num_heads=args.num_heads,
        ffn_dim=args.ffn_dim,
        max_length=max_length,
        mixer=mixer,
        remat=remat,
    )


def train_step_fn(config: LMConfig):
    """(graphdef, abstract params, step) with step(params, tokens) -> (loss, grads)."""
    abstract = nnx.eval_shape(lambda: LM(config, rngs=nnx.Rngs(0)))
    graphdef, params = nnx.split(abstract)

    def step(params, tokens):
        return jax.value_and_grad(lambda p: next_token_loss(nnx.merge(graphdef, p), tokens))(params)

    return graphdef, params, step


def compiled_memory(config: LMConfig, batch: int, length: int) -> dict[str, float]:
    """MiB of temp / argument / output buffers of the compiled train step."""
    _, params, step = train_step_fn(config)
    tokens = jax.ShapeDtypeStruct((batch, length), jnp.int32)
    stats = jax.jit(step).lower(params, tokens).compile().memory_analysis()
    return {
        "temp": stats.temp_size_in_bytes / MiB,
        "args": stats.argument_size_in_bytes / MiB,
        "out": stats.output_size_in_bytes / MiB,
    }


def step_time(config: LMConfig, batch: int, length: int, steps: int) -> float:
    """Median seconds of a compiled train step (after one warm-up step)."""
    _, _, step = train_step_fn(config)
    params = jax.jit(lambda: nnx.state(LM(config, rngs=nnx.Rngs(0))))()
    tokens = jax.random.randint(jax.random.key(0), (batch, length), 0, config.vocab_size, jnp.int32)
    compiled = jax.jit(step).lower(params, tokens).compile()
    jax.block_until_ready(compiled(params, tokens))
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        jax.block_until_ready(compiled(params, tokens))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--mixers", nargs="+", default=list(MIXERS), choices=MIXERS)
    parser.add_argument("--remat-length", type=int, default=4096, help="L of the remat table")
    parser.add_argument("--time-length", type=int, default=4096, help="L of the timing table")
    parser.add_argument("--time-steps", type=int, default=3, help="timed steps per mixer; 0 skips")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--num-layers", type=int, default=2)
    parser.add_argument("--num-heads", type=int, default=4)
    parser.add_argument("--ffn-dim", type=int, default=172)
    parser.add_argument("--vocab-size", type=int, default=256)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    max_length = max([*args.lengths, args.remat_length, args.time_length])
    print(
        f"# LM train-step memory: d_model {args.d_model}, {args.num_layers} layers, "
        f"{args.num_heads} heads, ffn {args.ffn_dim}, vocab {args.vocab_size}, batch {args.batch}, "
        f"{jax.devices()[0].platform}\n"
    )

    print("## temp MiB of one train step (remat none); args / out MiB in the last column\n")
    print("| mixer | " + " | ".join(f"L={n}" for n in args.lengths) + " | args / out |")
    print("|---" * (len(args.lengths) + 2) + "|")
    for mixer in args.mixers:
        config = make_config(args, mixer, "none", max_length)
        row = [compiled_memory(config, args.batch, n) for n in args.lengths]
        cells = " | ".join(f"{r['temp']:.1f}" for r in row)
        print(f"| {mixer} | {cells} | {row[-1]['args']:.2f} / {row[-1]['out']:.2f} |", flush=True)

    if "attention" in args.mixers:
        print(f"\n## remat policies, attention, L={args.remat_length}\n")
        print("| remat | temp MiB | args MiB | out MiB |")
        print("|---|---|---|---|")
        for remat in REMAT_POLICIES:
            config = make_config(args, "attention", remat, max_length)
            r = compiled_memory(config, args.batch, args.remat_length)
            print(f"| {remat} | {r['temp']:.1f} | {r['args']:.2f} | {r['out']:.2f} |", flush=True)

    if args.time_steps > 0:
        print(f"\n## CPU time per train step, L={args.time_length} (median of {args.time_steps})\n")
        print("| mixer | ms / step | relative to first |")
        print("|---|---|---|")
        base = None
        for mixer in args.mixers:
            config = make_config(args, mixer, "none", max_length)
            t = step_time(config, args.batch, args.time_length, args.time_steps)
            base = base or t
            print(f"| {mixer} | {1e3 * t:.1f} | {t / base:.2f} |", flush=True)


if __name__ == "__main__":
    main()
