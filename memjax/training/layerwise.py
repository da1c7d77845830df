r"""The optimizer inside the backward pass: a training step that never holds a gradient tree.

A model written as three functions over parameters ``{stack: <layers stacked on axis 0>,
...rest}``::

    h_0 = before(rest, batch)                # e.g. the embedding
    h_{l+1} = layer(stack[l], h_l)           # one layer, l = 0 .. L-1 (a scan)
    loss = after(rest, h_L, batch)           # e.g. final norm, head, cross-entropy

is trained by :func:`layerwise_step` as follows (one step, ``A`` micro-batches):

1. Forward: for each micro-batch, the scan over layers keeps each layer's VJP residuals *except
   its weights* (a layer's weights are read back from the current stack in the backward, so the
   residuals hold no second copy of the stack); under ``jax.checkpoint(layer)`` (remat "full")
   that is the layer's input only. ``after``'s VJP gives the loss, the cotangent of ``h_L`` and
   the gradient of ``rest`` through ``after``.
2. Optional norm pass (``clip_norm`` or ``guard="step"``): a reverse scan that computes each
   layer's gradient and keeps only its squared norm, then ``before``'s VJP. This gives the exact
   global norm :math:`\lVert g \rVert` (for clipping by :math:`\min(1, c / \lVert g\rVert)`)
   and whether any gradient is non-finite, before any parameter changes (as LOMO does: Lv et
   al. 2023, arXiv 2306.09782).
3. Update pass: a reverse scan over layers ``l = L-1 .. 0`` that carries the stacked parameters
   and the per-layer optimizer state; at layer ``l`` it recomputes ``G_l`` (summed over the
   micro-batches into one layer-sized buffer), scales it, runs ``tx.update`` on layer ``l``'s
   slice of the parameters and state (:mod:`memjax.training.stack_plan`), writes the new slice in
   place and drops ``G_l``. Then ``rest`` is updated from its gradient (``before``'s and
   ``after``'s VJPs), with the stacked leaves whose state cannot be sliced per layer (if any).

No tree of all gradients exists; the largest gradient buffer is one layer's.

Non-finite gradients: with ``guard="step"`` (the default) the norm pass doubles as the check and
a step whose global norm is not finite changes no parameter and no state (every write selects
the old value). With ``guard="layer"`` there is no norm pass: a layer (or the rest) whose own
gradient is non-finite keeps its parameters and state, the others are updated. ``guard=None``
applies every update.

Gradient accumulation: the micro-batches are summed inside each layer's backward (each
micro-batch's saved residuals and cotangent are kept; one layer-sized accumulator), so the
update sees the exact mean gradient, for every recipe and at refresh steps.

INT8 weights (:class:`memjax.optim.QuantizedWeight` leaves, e.g. ``LMConfig(weight_bits=8)``):
each layer is dequantised where it is used (forward, backward, update), ``tx`` sees the float
view, and the update pass writes the layer back re-quantised with the weight's rounding
(:func:`memjax.optim.quantized_weights.apply_update`): no float copy of the stack exists (but
for a stacked leaf that is held, whose update comes after the scan). The rounding bits come from
each layer's own key, so they equal the standard step's.

Reference: the per-layer weight update of GaLore (Zhao et al. 2024, arXiv 2403.03507, Sec. 4.3),
done in the authors' code with PyTorch's ``register_post_accumulate_grad_hook``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from memjax.optim import layouts
from memjax.optim import quantized_weights as qw
from memjax.training import dependence
from memjax.training import stack_plan as plan_lib

GUARDS = ("step", "layer", None)


class Layered(NamedTuple):
    """A model as the three functions of a layerwise step (see the module docstring).

    Attributes:
      before: ``(rest, batch) -> h``: everything before the layers; ``rest`` is the parameter
        dict without the ``stack`` entry.
      layer: ``(layer_params, h) -> h``: one layer (``layer_params`` is one slice of the stack);
        wrap it in ``jax.checkpoint`` to keep only its input for the backward.
      after: ``(rest, h, batch) -> loss``: everything after the layers, to a scalar loss.
      stack: the key of the parameter dict that holds the stacked layers.
    """

    before: Callable[[Any, Any], Any]
    layer: Callable[[Any, Any], Any]
    after: Callable[[Any, Any, Any], jax.Array]
    stack: str = "blocks"


class _Residuals(NamedTuple):
    """Where the weights sit among the leaves of a layer's VJP (static)."""

    treedef: Any
    weight_of: tuple[int | None, ...]  # per residual leaf: the weight leaf it is, or None


def _residual_layout(layer, w, h) -> _Residuals:
    """Which leaves of ``jax.vjp(layer, w, h)``'s function are ``w``'s leaves themselves."""
    w_leaves = jax.tree.leaves(w)

    def residuals(w, h):
        return jax.tree.leaves(jax.vjp(layer, w, h)[1])

    jaxpr = jax.make_jaxpr(residuals)(w, h).jaxpr
    invars = jaxpr.invars[:len(w_leaves)]
    weight_of = tuple(invars.index(v) if v in invars else None for v in jaxpr.outvars)
    treedef = jax.tree.structure(jax.eval_shape(lambda w, h: jax.vjp(layer, w, h)[1], w, h))
    return _Residuals(treedef, weight_of)


def _abstract_state(tx, leaves, treedef):
    """``tx.init`` of a layer's (or the rest's) tree, shape-only."""
    return plan_lib.abstract_init(tx, treedef.unflatten(list(leaves)))


def _check_leafwise(tx, plan: plan_lib.StackPlan, treedef) -> None:
    grads = treedef.unflatten(list(plan.layer_tree))
    state = _abstract_state(tx, plan.layer_tree, treedef)
    n = len(plan.layer_tree)
    deps = dependence.output_dependence(lambda g, s, p: tx.update(g, s, p)[0], n, grads, state,
                                        grads)
    crossed = [i for i, d in enumerate(deps) if d - {i}]
    if crossed:
        raise ValueError(
            "layerwise_step: the optimizer computes a leaf's update from other leaves' gradients "
            "(e.g. clip_by_global_norm or skip_nonfinite inside the chain, or a recipe built "
            "with skip_nonfinite=True); in a layerwise step no full gradient exists. Pass the "
            "bare recipe (memjax recipes: skip_nonfinite=False) and use "
            "layerwise_step(clip_norm=...) for exact global-norm clipping; non-finite gradients "
            "are handled by layerwise_step(guard=...).")


def _select(ok, new, old):
    """``new`` where ``ok`` (a scalar; ``None``: always), else ``old``."""
    return new if ok is None else optax.tree.where(ok, new, old)


def _slice(x, start, size=1):
    """Rows ``[start, start + size)`` of every array of ``x`` (an array or a quantised weight)."""
    return jax.tree.map(lambda a: jax.lax.dynamic_slice_in_dim(a, start, size, 0), x)


def _write(stacks, values, at):
    """Each ``values[n]`` (one row) written into ``stacks[n]`` at row ``at``."""
    return [jax.tree.map(lambda x, v: jax.lax.dynamic_update_slice_in_dim(x, v, at, 0), s, v)
            for s, v in zip(stacks, values)]


def _sq_norm(tree) -> jax.Array:
    """Squared L2 norm summed in float32 (``optax.tree.norm`` sums in the leaves' dtype)."""
    leaves = jax.tree.leaves(tree)
    if not leaves:
        return jnp.zeros([], jnp.float32)
    return sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves)


def layerwise_step(model: Layered, tx: optax.GradientTransformation, *,
                   clip_norm: float | None = None, guard: str | None = "step",
                   micro_batched: bool = False,
                   param_shardings: Any = None) -> Callable[..., tuple[Any, Any, dict]]:
    r"""A training step that updates each layer inside the backward pass.

    Args:
      model: the model as a :class:`Layered`.
      tx: an optax transform that acts leaf by leaf (optax ``adam``/``adamw``/``sgd``/``lion``,
        every memjax recipe with ``skip_nonfinite=False``); its state is ``tx.init(params)``, the
        same as for a standard step. A transform that mixes leaves (``clip_by_global_norm``,
        ``skip_nonfinite``) is refused with a ``ValueError``: use ``clip_norm`` and ``guard``.
      clip_norm: exact global-norm clipping :math:`g \leftarrow g\min(1, c/\lVert g\rVert)`
        (costs one more backward pass: the norm pass); a float > 0, or a scalar array (e.g. a
        traced argument, so one compiled step serves several values; ``inf`` clips nothing);
        ``None``: no clipping.
      guard: ``"step"`` (a non-finite gradient anywhere skips the whole step; runs the norm
        pass), ``"layer"`` (no norm pass; a layer with a non-finite gradient is left as is) or
        ``None``.
      micro_batched: the batch's leaves carry a leading axis of ``A`` micro-batches whose mean
        gradient makes one step (gradient accumulation); else the batch is one micro-batch.
      param_shardings: optional tree like the parameters of ``NamedSharding`` s; each layer's
        gradient is constrained to its slice's sharding inside the reverse scan (so it is reduced
        there, one layer at a time).

    Returns:
      ``step(params, opt_state, batch) -> (params, opt_state, metrics)`` (pure; jit it, donating
      ``params`` and ``opt_state``); ``metrics``: ``loss`` (mean over micro-batches),
      ``grad_norm`` (global, before clipping) and ``skipped`` (int32, 1 if anything was left
      unchanged for a non-finite gradient).

    Example (a stacked MLP in plain JAX)::

      def layer(w, h):                                     # w: {"w": (d, d)}
          return h + jnp.tanh(h @ w["w"])

      model = memjax.training.Layered(
          before=lambda rest, batch: batch[0] @ rest["w_in"],
          layer=jax.checkpoint(layer),
          after=lambda rest, h, batch: jnp.mean((h @ rest["w_out"] - batch[1]) ** 2),
          stack="layers")
      params = {"w_in": ..., "layers": {"w": jnp.zeros((L, d, d))}, "w_out": ...}
      tx = memjax.optim.galore(1e-3, rank=4, skip_nonfinite=False)
      step = jax.jit(memjax.training.layerwise_step(model, tx, clip_norm=1.0),
                     donate_argnums=(0, 1))
      params, opt_state, metrics = step(params, tx.init(params), (x, y))
    """
    if guard not in GUARDS:
        raise ValueError(f"layerwise_step: guard={guard!r} must be one of {GUARDS}")
    if (clip_norm is not None and not isinstance(clip_norm, jax.Array)
            and (isinstance(clip_norm, bool) or not clip_norm > 0)):
        raise ValueError(f"layerwise_step: clip_norm={clip_norm!r} must be > 0 or None")
    if not isinstance(model, Layered):
        raise TypeError(f"layerwise_step: model must be a memjax.training.Layered, got "
                        f"{type(model).__name__}")
    norm_pass = clip_norm is not None or guard == "step"
    cache: dict = {}

    def static_plan(params):
        key = jax.tree.structure(params), tuple((x.shape, x.dtype) for x in jax.tree.leaves(params))
        if key not in cache:
            view = qw.float_shapes(params)
            plan = plan_lib.plan_stack(tx, view, model.stack)
            treedef = jax.tree.structure(view)
            _check_leafwise(tx, plan, treedef)
            cache[key] = (plan, treedef, _abstract_state(tx, plan.layer_tree, treedef),
                          _abstract_state(tx, plan.rest_tree, treedef))
        return cache[key]

    def step(params, opt_state, batch):
        if not isinstance(params, Mapping):
            raise TypeError(f"layerwise_step: params must be a dict holding the stack under "
                            f"{model.stack!r}, got {type(params).__name__}")
        plan, treedef, layer_abstract, rest_abstract = static_plan(params)
        if qw.has_quantized(params):
            qw.check_float_state(tx, params, opt_state, "layerwise_step")
        mbs = batch if micro_batched else jax.tree.map(lambda x: x[None], batch)
        num_micro = jax.tree.leaves(mbs)[0].shape[0]
        stack = params[model.stack]
        # the leaves outside the stack, as floats (a quantised one dequantised whole: it is small)
        rest = qw.dequantize_weights({k: v for k, v in params.items() if k != model.stack})
        leaves = treedef.flatten_up_to(params)
        stack_idx = [i for i, s in enumerate(plan.stacked) if s]
        sep_idx = [i for i in stack_idx if plan.separable[i]]
        held_idx = [i for i in stack_idx if not plan.separable[i]]
        stack_def = jax.tree.structure(stack, is_leaf=qw.is_quantized)
        # position of each stacked param leaf in the stack subtree's own flattening
        pos_in_stack = {i: n for n, i in enumerate(stack_idx)}
        sh_leaves = (treedef.flatten_up_to(param_shardings) if param_shardings is not None
                     else None)

        def slice_sharding(i):
            if sh_leaves is None:
                return None
            s = sh_leaves[i]
            s = s.codes if qw.is_quantized(s) else s  # a quantised weight's gradient: as its codes
            spec = tuple(s.spec) + (None,) * (len(leaves[i].shape) - len(s.spec))
            return jax.sharding.NamedSharding(s.mesh, jax.sharding.PartitionSpec(*spec[1:]))

        # ---- forward: residuals (without weights) of every layer, for every micro-batch
        w0 = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype),
                          qw.float_shapes(stack))
        mb0 = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), mbs)
        h_abs = jax.eval_shape(model.before, rest, mb0)
        layout = _residual_layout(model.layer, w0, h_abs)

        def keep(res_leaves):
            return [r for r, wi in zip(res_leaves, layout.weight_of) if wi is None]

        def restore(kept, w):
            w_leaves, it = jax.tree.leaves(w), iter(kept)
            full = [w_leaves[wi] if wi is not None else next(it) for wi in layout.weight_of]
            return layout.treedef.unflatten(full)

        hs0 = jax.lax.map(lambda mb: model.before(rest, mb), mbs)

        def fwd_layer(hs, w):
            w = qw.dequantize_weights(w)  # one layer dequantised, never the whole stack

            def one(h):
                h2, vjp = jax.vjp(model.layer, w, h)
                return h2, keep(jax.tree.leaves(vjp))
            return jax.lax.map(one, hs)

        hs_last, saved = jax.lax.scan(fwd_layer, hs0, stack)  # saved: (L, A, ...) per leaf

        def fwd_after(g_rest, mb_h):
            mb, h = mb_h
            loss, vjp = jax.vjp(lambda r, h: model.after(r, h, mb), rest, h)
            g_r, ct = vjp(jnp.ones_like(loss) / num_micro)
            return jax.tree.map(jnp.add, g_rest, g_r), (loss, ct)

        g_rest, (losses, cts_last) = jax.lax.scan(
            fwd_after, jax.tree.map(jnp.zeros_like, rest), (mbs, hs_last))

        def layer_grad(w, saved_l, cts):
            """``sum_a G_l^(a)`` and the cotangents of the layer's inputs."""
            def one(g_sum, res_ct):
                res, ct = res_ct
                g_w, ct_in = restore(res, w)(ct)
                return jax.tree.map(jnp.add, g_sum, g_w), ct_in
            g, cts_in = jax.lax.scan(one, jax.tree.map(jnp.zeros_like, w), (saved_l, cts))
            if sh_leaves is not None:
                g_leaves = jax.tree.leaves(g)
                g = stack_def.unflatten([
                    jax.lax.with_sharding_constraint(x, slice_sharding(i))
                    for x, i in zip(g_leaves, stack_idx)])
            return g, cts_in

        def before_grad(cts0):
            def one(acc, mb_ct):
                mb, ct = mb_ct
                _, vjp = jax.vjp(lambda r: model.before(r, mb), rest)
                return jax.tree.map(jnp.add, acc, vjp(ct)[0]), None
            return jax.lax.scan(one, jax.tree.map(jnp.zeros_like, rest), (mbs, cts0))[0]

        layers = jnp.arange(plan.num_layers)

        # ---- norm pass
        if norm_pass:
            def norm_body(carry, xs):
                cts, sq = carry
                saved_l, l = xs
                w = jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, l, keepdims=False),
                                 stack)
                g, cts = layer_grad(qw.dequantize_weights(w), saved_l, cts)
                return (cts, sq + _sq_norm(g)), None

            (cts0, sq_layers), _ = jax.lax.scan(
                norm_body, (cts_last, jnp.zeros([], jnp.float32)), (saved, layers),
                reverse=True)
            g_rest_full = jax.tree.map(jnp.add, g_rest, before_grad(cts0))
            total_sq = sq_layers + _sq_norm(g_rest_full)
            grad_norm = jnp.sqrt(total_sq)
            finite = jnp.isfinite(grad_norm)
            scale = (jnp.minimum(1.0, clip_norm / grad_norm) if clip_norm is not None
                     else jnp.ones([], jnp.float32))
            step_ok = finite if guard == "step" else None
        else:
            scale, step_ok = jnp.ones([], jnp.float32), None

        # ---- update pass
        state_leaves = jax.tree.leaves(opt_state)
        per_layer_idx = [j for j, p in enumerate(plan.per_layer) if p]
        shared_idx = [j for j, p in enumerate(plan.layer_shared) if p]

        # Each layer's new slices are written one iteration late, from the loop carry: a value
        # written into one carried stack that was computed from a slice read of another carried
        # stack in the same iteration makes XLA copy every whole stack inside the loop (jax 0.10,
        # XLA:CPU, with or without a barrier); written from the carry after the reads, every stack
        # is updated in place.
        sep_pos = [n for n, i in enumerate(stack_idx) if plan.separable[i]]

        def update_body(carry, xs):
            cts, stacks, pl_states, held, pending, at, s_slices, shared, sq, bad = carry
            saved_l, l = xs
            p_w, p_s, p_h = pending
            stacks, pl_states, held = (_write(stacks, p_w, at), _write(pl_states, p_s, at),
                                       _write(held, p_h, at))
            all_stacks = list(stack_leaves)
            for n, x in zip(sep_pos, stacks):
                all_stacks[n] = x
            w_stack = [_slice(x, l) for x in all_stacks]
            wf_stack = [qw.dequantize_weights(x) for x in w_stack]  # this layer's float weights
            # this layer's state rows were read one iteration early (below): a row read here
            # and consumed inside a lax.cond of the optimizer (a projector refresh) gets fused
            # through this iteration's write, and XLA copies the whole stack
            prefetch = [jax.lax.dynamic_slice_in_dim(x, jnp.maximum(l - 1, 0), 1, 0)
                        for x in pl_states]
            w = stack_def.unflatten([x[0] for x in wf_stack])
            g, cts = layer_grad(w, saved_l, cts)
            g_leaves = jax.tree.leaves(g)
            sq_l = _sq_norm(g)
            ok = jnp.isfinite(sq_l) if guard == "layer" else step_ok
            grads_t, params_t = [], []
            for i, x in enumerate(plan.layer_tree):
                if plan.separable[i]:
                    gi = g_leaves[pos_in_stack[i]]
                    grads_t.append((gi * scale.astype(gi.dtype))[None])
                    params_t.append(wf_stack[pos_in_stack[i]])
                else:
                    grads_t.append(plan_lib.zeros(x))
                    params_t.append(plan_lib.zeros(x))
            slices = dict(zip(per_layer_idx, s_slices))
            st = plan_lib.build_state(plan.layer_parts, opt_state, layer_abstract, slices)
            upd, new_st = tx.update(treedef.unflatten(grads_t), st, treedef.unflatten(params_t))
            upd_leaves = treedef.flatten_up_to(upd)
            new_slices = plan_lib.read_state(plan.layer_parts, opt_state, new_st, plan_lib.SLICE)
            new_whole = plan_lib.read_state(plan.layer_parts, opt_state, new_st, plan_lib.WHOLE)
            p_w = [_select(ok, qw.apply_update(w_stack[n], upd_leaves[stack_idx[n]]),
                           w_stack[n]) for n in sep_pos]
            p_s = [_select(ok, new_slices[j], slices[j]) for j in per_layer_idx]
            p_h = [(g_leaves[pos_in_stack[i]] * scale.astype(g_leaves[0].dtype))[None]
                   for i in held_idx]
            shared = [_select(ok, new_whole[j], state_leaves[j]) for j in shared_idx]
            bad = bad | (jnp.logical_not(ok) if ok is not None else False)
            return (cts, stacks, pl_states, held, (p_w, p_s, p_h), l, prefetch, shared,
                    sq + sq_l, bad), None

        stack_leaves = jax.tree.leaves(stack, is_leaf=qw.is_quantized)
        last = plan.num_layers - 1
        sep_stacks = [stack_leaves[n] for n in sep_pos]
        pl_init = [state_leaves[j] for j in per_layer_idx]
        held_init = [jnp.zeros(leaves[i].shape, leaves[i].dtype) for i in held_idx]
        pending0 = tuple([_slice(x, last) for x in xs]
                         for xs in (sep_stacks, pl_init, held_init))
        init = (cts_last, sep_stacks, pl_init, held_init, pending0, jnp.int32(last), pending0[1],
                [state_leaves[j] for j in shared_idx], jnp.zeros([], jnp.float32),
                jnp.zeros([], bool))
        (cts0, sep_stacks, pl_states, held, pending, at, _, shared, sq_layers_u, bad), _ = (
            jax.lax.scan(update_body, init, (saved, layers), reverse=True))
        sep_stacks = _write(sep_stacks, pending[0], at)
        pl_states = _write(pl_states, pending[1], at)
        held = _write(held, pending[2], at)
        new_stacks = list(stack_leaves)
        for n, x in zip(sep_pos, sep_stacks):
            new_stacks[n] = x

        if not norm_pass:
            g_rest_full = jax.tree.map(jnp.add, g_rest, before_grad(cts0))
            grad_norm = jnp.sqrt(sq_layers_u + _sq_norm(g_rest_full))

        # ---- the rest (and held stacked leaves)
        rest_leaves_g = dict(zip([i for i, s in enumerate(plan.stacked) if not s],
                                 jax.tree.leaves(g_rest_full)))
        for n, i in enumerate(held_idx):
            rest_leaves_g[i] = held[n]
        grads_r, params_r = [], []
        for i, x in enumerate(plan.rest_tree):
            if plan.stacked[i] and plan.separable[i]:
                grads_r.append(plan_lib.zeros(x))
                params_r.append(plan_lib.zeros(x))
            else:
                gi = rest_leaves_g[i]
                grads_r.append(gi if plan.stacked[i] else gi * scale.astype(gi.dtype))
                params_r.append(qw.dequantize_weights(leaves[i]))
        rest_ok = step_ok
        if guard == "layer":
            rest_ok = jnp.isfinite(_sq_norm(grads_r))
        st = plan_lib.build_state(plan.rest_parts, opt_state, rest_abstract, {})
        upd, new_st = tx.update(treedef.unflatten(grads_r), st, treedef.unflatten(params_r))
        upd_leaves = treedef.flatten_up_to(upd)
        new_whole = plan_lib.read_state(plan.rest_parts, opt_state, new_st, plan_lib.WHOLE)

        new_state_leaves = list(state_leaves)
        for j, x in zip(per_layer_idx, pl_states):
            new_state_leaves[j] = x
        for j, x in zip(shared_idx, shared):
            new_state_leaves[j] = x
        for j, x in new_whole.items():
            new_state_leaves[j] = _select(rest_ok, x, state_leaves[j])
        new_leaves = list(leaves)
        for n, i in enumerate(stack_idx):
            new_leaves[i] = new_stacks[n]
        for i in range(len(leaves)):
            if not (plan.stacked[i] and plan.separable[i]):
                new_leaves[i] = _select(rest_ok, qw.apply_update(leaves[i], upd_leaves[i]),
                                        leaves[i])
        skipped = bad
        if rest_ok is not None:
            skipped = skipped | jnp.logical_not(rest_ok)
        metrics = {"loss": jnp.mean(losses), "grad_norm": grad_norm,
                   "skipped": skipped.astype(jnp.int32)}
        return (treedef.unflatten(new_leaves),
                jax.tree.unflatten(jax.tree.structure(opt_state), new_state_leaves), metrics)

    def declared(params, opt_state, batch):
        with layouts.declared_layer_axis((model.stack,), 0):  # the stack's layout, fixed
            return step(params, opt_state, batch)

    return functools.wraps(step)(declared)
