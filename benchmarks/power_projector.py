"""How much gradient energy the warm-started power projector captures, next to the exact SVD.

Run by hand (prints a markdown report; nothing here is asserted):

    python -m benchmarks.power_projector                # the main job's LM, 2000 steps, T = 50
    python -m benchmarks.power_projector --steps 200    # a quick look

The main job's model and data (``experiments/configs/default.py``: d 64, 2 layers, the stdlib
byte corpus) train with its GaLore row (SVD projector, rank 16). At every refresh step ``t``
(``t mod T = 0``) the gradient of every projected matrix (each layer of a stacked leaf on its
own) is taken, and two bases of the same side are compared on it:

* the exact top-``r`` singular vectors (what the ``"svd"`` projector would store), and
* the ``"power"`` projector's basis, refreshed on the same gradient stream: a random start and
  ``POWER_INIT_ITERATIONS`` iterations at ``t = 0``, then one warm iteration per refresh.

The captured energy of a basis ``B`` is ``||B^T G||^2 / ||G||^2`` on the projected side; the
report gives, over all matrices, the worst and the mean ratio power / svd at every refresh.
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
from experiments import configs, data, run, trainer
from memjax.models import lm as lmlib
from memjax.optim import projectors


def _energy(mat, basis, side):
    low = basis.T @ mat if side == "left" else mat @ basis
    return jnp.sum(low * low) / jnp.sum(mat * mat)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=2000)
    args = ap.parse_args(argv)

    config = configs.load("default")
    galore_cfg = next(o for o in config.optimizers if o.name == "galore")
    rank, gap = galore_cfg.rank, galore_cfg.update_proj_gap
    lm_config = run.lm_config(config)
    graphdef = trainer.abstract_model(lm_config, config.seed)[0]
    params = trainer.initial_params(lm_config, config.seed)  # the trainer's, bit for bit
    source = data.make_source(config.data, vocab_size=lm_config.vocab_size, num_val_batches=1,
                              seed=config.seed)
    tx = memjax.optim.galore(galore_cfg.learning_rate, rank=rank, update_proj_gap=gap,
                             scale=galore_cfg.scale)
    state = tx.init(params)

    def loss_fn(p, tokens):
        return lmlib.next_token_loss(nnx.merge(graphdef, p), tokens)

    @jax.jit
    def step(p, s, tokens):
        loss, grads = jax.value_and_grad(loss_fn)(p, tokens)
        updates, s = tx.update(grads, s, p)
        return optax.apply_updates(p, updates), s, loss, grads

    # the projected matrices: every (layer of a) leaf the GaLore plan projects, and its side
    views = memjax.optim.resolve_labels(params, None, rank)
    leaves = jax.tree.leaves(params)
    mats = []
    for i, (leaf, view) in enumerate(zip(leaves, views)):
        if view is None:
            continue
        side = projectors.side_for("std", view.m, view.n)
        for b in range(int(np.prod(view.batch_shape)) if view.batched else 1):
            mats.append((i, b, view, side))
    power, refresh = {}, {}
    for i, b, view, side in mats:
        p = projectors.make_projector("power", view.m, view.n, rank, side)
        refresh[(i, b)] = jax.jit(p.refresh)
        power[(i, b)] = p.init(jax.random.key(0))

    rows, t0 = [], time.perf_counter()
    for t in range(args.steps):
        tokens = jnp.asarray(source.train_batch(config.seed, t).tokens)  # the trainer's batches
        params, state, loss, grads = step(params, state, tokens)
        if t % gap:
            continue
        g_leaves = jax.tree.leaves(grads)
        ratios = []
        for i, b, view, side in mats:
            mat = memjax.optim.labels.to_matrix(g_leaves[i], view)
            mat = mat[b] if view.batched else mat
            key = jax.random.fold_in(jax.random.key(1), i * 1000 + b)
            power[(i, b)] = refresh[(i, b)](mat, power[(i, b)], key)
            u, _, vh = jnp.linalg.svd(mat, full_matrices=False)
            exact = u[:, :rank] if side == "left" else vh[:rank].T
            ratios.append(float(_energy(mat, power[(i, b)], side) / _energy(mat, exact, side)))
        rows.append((t, float(loss), min(ratios), float(np.mean(ratios))))
    elapsed = time.perf_counter() - t0

    print(f"## Power projector vs SVD: gradient energy captured (main job LM, rank {rank}, "
          f"T {gap}, {args.steps} steps, {len(mats)} matrices, {elapsed:.0f} s)\n")
    print(f"jax {jax.__version__}, {jax.devices()[0].platform}\n")
    print("| step | train loss | worst power / svd | mean power / svd |")
    print("|---:|---:|---:|---:|")
    for t, loss, worst, mean in rows:
        print(f"| {t} | {loss:.3f} | {worst:.4f} | {mean:.4f} |")
    print(f"\nworst over every refresh and matrix: {min(r[2] for r in rows):.4f}; "
          f"mean {np.mean([r[3] for r in rows]):.4f}")


if __name__ == "__main__":
    main()
