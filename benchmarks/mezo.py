"""MeZO (zeroth-order SPSA) on the decoder LM: memory, communication and fine-tuning quality.

Three parts, all on the built-in byte corpus (``experiments.data``, stdlib sources):

1. **Memory** (XLA buffer assignment, deterministic): the compiled peak of one SPSA step
   (:func:`memjax.optim.mezo`, perturbation at the point of use inside the scan body, parameters
   donated) against a forward-only evaluation of the same batch and against backprop + AdamW.
2. **Communication** per step and worker: the shared-seed variant
   (:func:`memjax.optim.mezo_shared_seed`) all-gathers ``N * n`` bytes; data-parallel backprop
   all-reduces ``4 * #params`` bytes (float32 gradients).
3. **Quality**: pre-train the LM briefly with AdamW, then fine-tune from that checkpoint with MeZO
   (forward passes only) and, as the baseline, with backprop + AdamW; validation loss every
   ``--eval-every`` steps.

Run by hand (prints markdown)::

    python benchmarks/mezo.py                      # defaults: see --help
    python benchmarks/mezo.py --memory-only --d-model 512 --num-layers 8 --batch 4 --seq-len 256
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import memjax
from experiments.config import DataConfig
from experiments.data import make_source
from experiments.optimizers import stacked_layer_axes
from memjax.models.lm import LM, LMConfig, next_token_loss
from memjax.optim import zeroth_order as zo

MB = 1e6


def build(args):
    cfg = LMConfig(vocab_size=256, d_model=args.d_model, num_layers=args.num_layers, num_heads=4,
                   ffn_dim=args.d_model * 8 // 3 // 8 * 8, max_length=args.seq_len)
    graphdef, params, rest = nnx.split(LM(cfg, rngs=nnx.Rngs(args.seed)), nnx.Param, ...)

    def loss(p, tokens):
        return next_token_loss(nnx.merge(graphdef, p, rest), tokens)

    def loss_at_use(p, tokens, noise):
        return next_token_loss(nnx.merge(graphdef, p, rest), tokens, param_hook=zo.param_hook(noise))

    return params, loss, loss_at_use


def memory(args) -> None:
    params, loss, loss_at_use = build(args)
    tokens = jax.ShapeDtypeStruct((args.batch, args.seq_len), jnp.int32)
    forward = memjax.optim.compiled_memory(loss, params, tokens).peak
    rows = []
    for label, at_use, fn in (("SPSA step, params + eps z materialised", False, loss),
                              ("SPSA step, perturbed at use (scan body)", True, loss_at_use)):
        opt = zo.mezo(1e-4, n=args.n, stacked_axes=stacked_layer_axes, at_use=at_use)
        peak = memjax.optim.compiled_memory(lambda p, s, t, opt=opt, fn=fn: opt.step(fn, p, s, t),
                                            params, opt.init(params), tokens,
                                            donate_argnums=(0,)).peak
        rows.append((label, peak))
    tx = optax.adamw(1e-3)

    def backprop(p, o, t):
        updates, o = tx.update(jax.grad(loss)(p, t), o, p)
        return optax.apply_updates(p, updates), o

    rows.append(("backprop + AdamW step", memjax.optim.compiled_memory(
        backprop, params, tx.init(params), tokens, donate_argnums=(0, 1)).peak))
    num = sum(x.size for x in jax.tree.leaves(params))
    print(f"\nLM d_model {args.d_model}, {args.num_layers} layers, {num / 1e6:.2f}M parameters "
          f"({memjax.optim.state_bytes(params) / MB:.1f} MB), batch {args.batch} x {args.seq_len}, "
          f"n = {args.n}\n")
    print("| computation | compiled peak MB | vs forward |")
    print("|---|---:|---:|")
    print(f"| forward only (eval loss) | {forward / MB:.1f} | 1.00x |")
    for label, peak in rows:
        print(f"| {label} | {peak / MB:.1f} | {peak / forward:.2f}x |")
    print(f"\nbackprop + AdamW / SPSA at use: {rows[-1][1] / rows[1][1]:.1f}x")
    print("\n| data-parallel workers N | shared-seed MeZO bytes/step/worker | backprop all-reduce "
          "bytes/step/worker (4 x #params) | ratio |")
    print("|---:|---:|---:|---:|")
    for workers in (8, 64):
        print(f"| {workers} | {workers * args.n} | {4 * num:,} | {4 * num / (workers * args.n):,.0f}x |")


def quality(args) -> None:
    params, loss, loss_at_use = build(args)
    source = make_source(DataConfig(seq_len=args.seq_len, batch_size=args.batch),
                         vocab_size=256, num_val_batches=args.val_batches, seed=args.seed)
    val = [jnp.asarray(b.tokens) for b in source.val_batches]
    eval_loss = jax.jit(loss)

    def validate(p):
        return float(np.mean([eval_loss(p, b) for b in val]))

    def batch(step):
        return jnp.asarray(source.train_batch(args.seed, step).tokens)

    tx = optax.adamw(args.pretrain_lr)

    @jax.jit
    def adam_step(p, o, t):
        value, grads = jax.value_and_grad(loss)(p, t)
        updates, o = tx.update(grads, o, p)
        return optax.apply_updates(p, updates), o, value

    opt_state = tx.init(params)
    t0 = time.perf_counter()
    for step in range(args.pretrain_steps):
        params, opt_state, _ = adam_step(params, opt_state, batch(step))
    print(f"\npre-trained {args.pretrain_steps} AdamW steps (lr {args.pretrain_lr}) in "
          f"{time.perf_counter() - t0:.0f} s: validation loss {validate(params):.4f}\n")
    start = jax.tree.map(jnp.copy, params)
    offset = args.pretrain_steps
    curves, seconds = {}, {}

    # baseline: backprop + AdamW fine-tuning
    tx = optax.adamw(args.finetune_lr)

    @jax.jit
    def ft_step(p, o, t):
        grads = jax.grad(loss)(p, t)
        updates, o = tx.update(grads, o, p)
        return optax.apply_updates(p, updates), o

    p, o = jax.tree.map(jnp.copy, start), tx.init(start)
    curve, t0 = [(0, validate(p))], time.perf_counter()
    for step in range(1, args.steps + 1):
        p, o = ft_step(p, o, batch(offset + step))
        if step % args.eval_every == 0:
            curve.append((step, validate(p)))
    curves[f"backprop AdamW lr {args.finetune_lr}"] = curve
    seconds[f"backprop AdamW lr {args.finetune_lr}"] = time.perf_counter() - t0

    for lr in args.mezo_lr:
        opt = zo.mezo(lr, eps=args.eps, n=args.n, stacked_axes=stacked_layer_axes, at_use=True, seed=args.seed)
        step_fn = jax.jit(lambda p, s, t, opt=opt: opt.step(loss_at_use, p, s, t),
                          donate_argnums=(0,))
        p, s = jax.tree.map(jnp.copy, start), opt.init(start)
        curve, t0 = [(0, validate(p))], time.perf_counter()
        for step in range(1, args.steps + 1):
            p, s, _ = step_fn(p, s, batch(offset + step))
            if step % args.eval_every == 0:
                curve.append((step, validate(p)))
        label = f"MeZO lr {lr} eps {args.eps} n {args.n}"
        curves[label] = curve
        seconds[label] = time.perf_counter() - t0

    steps = [s for s, _ in next(iter(curves.values()))]
    print("| fine-tuning step | " + " | ".join(curves) + " |")
    print("|---:|" + "---:|" * len(curves))
    for i, step in enumerate(steps):
        print(f"| {step} | " + " | ".join(f"{c[i][1]:.4f}" for c in curves.values()) + " |")
    print("| wall s | " + " | ".join(f"{seconds[k]:.0f}" for k in curves) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--n", type=int, default=1, help="SPSA samples per step")
    parser.add_argument("--eps", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pretrain-steps", type=int, default=300)
    parser.add_argument("--pretrain-lr", type=float, default=2e-3)
    parser.add_argument("--steps", type=int, default=1000, help="fine-tuning steps")
    parser.add_argument("--finetune-lr", type=float, default=2e-4)
    parser.add_argument("--mezo-lr", type=float, nargs="+", default=[1e-4, 3e-4])
    parser.add_argument("--eval-every", type=int, default=200)
    parser.add_argument("--val-batches", type=int, default=4)
    parser.add_argument("--memory-only", action="store_true")
    args = parser.parse_args()
    memory(args)
    if not args.memory_only:
        quality(args)


if __name__ == "__main__":
    main()
