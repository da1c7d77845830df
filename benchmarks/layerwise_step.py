"""Time and memory of the layerwise step against the standard step (memjax.training).

For one LLaMA preset (default ``llama_60m``, the GaLore paper's shapes, 256 tokens per sequence),
every row compiles one train step of ``next_token_loss`` with the same optimizer and measures its
compiled memory (``memory_analysis()``: peak = arguments + outputs - aliased + temp, donated
parameters and state) and its CPU time (median of ``--repeats`` steps after ``--warmup``):

* ``standard``: :func:`memjax.training.gradient_step` (value_and_grad, then ``tx.update``);
  ``+clip``: with :func:`memjax.optim.clip_by_global_norm` before the recipe.
* ``layerwise guard=layer``: :func:`memjax.training.layerwise_step` without a norm pass (a layer
  with a non-finite gradient keeps its values).
* ``layerwise guard=step``: with the norm pass (a non-finite gradient anywhere skips the step).
* ``layerwise clip``: exact global-norm clipping (the same norm pass).

Ratios are to the ``standard`` row of the same run. Run by hand (prints a markdown table)::

    python benchmarks/layerwise_step.py
    python benchmarks/layerwise_step.py --preset llama_130m --recipe adamw --remat full
"""

from __future__ import annotations

import argparse
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import memjax
from memjax.models.lm import LM, layered, lm_preset, next_token_loss

GiB = 2**30


def recipe(name: str) -> optax.GradientTransformation:
    nf = {"skip_nonfinite": False}
    return {"galore": lambda: memjax.optim.galore(1e-3, rank=128, **nf),
            "apollo_mini": lambda: memjax.optim.apollo_mini(1e-3, **nf),
            "adamw": lambda: optax.adamw(1e-3)}[name]()


def rows(args, config, graphdef):
    """``(label, step, tx)`` of every measured step."""
    tx = recipe(args.recipe)

    def loss_fn(p, mb):
        return next_token_loss(nnx.merge(graphdef, p), mb[0], mb[1])

    clipped = optax.chain(memjax.optim.clip_by_global_norm(1.0), tx)
    model = layered(config)
    yield "standard", memjax.training.gradient_step(loss_fn, tx), tx
    yield "standard +clip", memjax.training.gradient_step(loss_fn, clipped), clipped
    for label, kw in (("layerwise guard=layer", {"guard": "layer"}),
                      ("layerwise guard=step", {"guard": "step"}),
                      ("layerwise clip", {"clip_norm": 1.0})):
        yield label, memjax.training.layerwise_step(model, tx, micro_batched=True, **kw), tx


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="llama_60m")
    parser.add_argument("--recipe", default="galore", choices=("galore", "apollo_mini", "adamw"))
    parser.add_argument("--remat", default="none")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    config = lm_preset(args.preset, max_length=args.seq_len, remat=args.remat)
    graphdef, params = nnx.split(LM(config, rngs=nnx.Rngs(0)), nnx.Param)
    params = nnx.to_pure_dict(params)
    rng = np.random.default_rng(0)
    batch = (jnp.asarray(rng.integers(0, config.vocab_size, (1, args.batch, args.seq_len)),
                         jnp.int32), jnp.ones((1, args.batch, args.seq_len - 1), jnp.float32))
    print(f"{args.preset}, {args.recipe}, remat {args.remat}, batch {args.batch} x "
          f"{args.seq_len}, float32, {jax.devices()[0].platform} ({jax.device_count()} device)\n")
    print("| step | peak GiB | temp GiB | ms / step | time / standard |")
    print("|---|---:|---:|---:|---:|")
    base = None
    for label, step, tx in rows(args, config, graphdef):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            state = tx.init(params)
        compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, state, batch).compile()
        m = compiled.memory_analysis()
        peak = (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
                + m.temp_size_in_bytes)
        p = jax.tree.map(jnp.copy, params)
        times = []
        for i in range(args.warmup + args.repeats):
            start = time.perf_counter()
            p, state, metrics = compiled(p, state, batch)
            jax.block_until_ready(metrics)
            if i >= args.warmup:
                times.append(time.perf_counter() - start)
        ms = 1e3 * float(np.median(times))
        base = base or ms
        print(f"| {label} | {peak / GiB:.3f} | {m.temp_size_in_bytes / GiB:.3f} | {ms:.0f} | "
              f"{ms / base:.2f}x |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
