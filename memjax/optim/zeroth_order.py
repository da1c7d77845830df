"""Zeroth-order optimisation: SPSA with perturbations regenerated from a key (MeZO).

MeZO (Malladi et al. 2023, "Fine-Tuning Language Models with Just Forward Passes",
arXiv 2305.17333) estimates the gradient's projection on a random direction ``z ~ N(0, I)`` from two
forward passes (simultaneous perturbation stochastic approximation, SPSA)::

    g = (L(theta + eps z) - L(theta - eps z)) / (2 eps)          # a scalar: ~ <grad L, z>
    theta <- theta - lr (g z + wd * mask * theta)                 # no decay on biases / norms

``z`` is never stored: it is regenerated from a PRNG key whenever it is needed, so the optimizer
holds a counter and a key, and the update is applied leaf by leaf from ``(key, g)`` without any
gradient-sized tree. n-SPSA averages ``n`` such estimates (independent keys).

**The perturbation's key schedule** (the contract every function here and
:mod:`memjax.optim.shared_seed` follows, and what makes a run replayable)::

    sample key    k_j       = fold_in(step_key, j)                j = 0..n-1
    leaf key      k_{j,i}   = fold_in(k_j, i)                     i = index in jax.tree.leaves(params)
    stacked slice k_{j,i,l} = fold_in(k_{j,i}, l)                 l = row-major index over the
                                                                  leaf's leading ``stacked`` axes
    z_{j,i}[l]              = normal(k_{j,i,l}, leaf.shape[stacked:], float32)

Stacked axes (a scan-over-layers axis) get one key per slice so a model can perturb one layer's
slice inside its scan body (:class:`Noise` + ``at_use=True``) without ever building the
perturbed stack: with a naive ``params + eps z`` the step needs a second copy of the parameters,
with perturbation at the point of use its peak memory is that of inference.

Non-floating leaves (integer buffers) are never perturbed nor updated.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import re
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from memjax.optim import _rng
from memjax.optim.labels import path_str

Params = Any
StackedAxes = int | Callable[[str, jax.Array], int] | Any

DEFAULT_NO_DECAY = r"norm|bias|(^|/)ln[_0-9]*(/|$)"
"""Paths matching this regex (searched, case-insensitive) get no weight decay by default, as in
MeZO (no decay on biases and layer norms); 1-D leaves (after the stacked axes) never decay either."""


CHUNK = 1 << 16
"""Default elements per noise chunk: a slice with more elements draws its ``z`` chunk by chunk
(chunk ``c`` of its flattened view from ``fold_in(slice_key, c)``), so generating ``z`` for one
slice never needs more than one chunk of random bits, however large the matrix. The chunk size is
part of the definition of ``z``; ``chunk=0`` draws every slice whole, which is what sharded (FSDP)
parameters need: chunking the flattened view of a sharded leaf would gather it."""



@functools.partial(jax.tree_util.register_dataclass, data_fields=["keys", "scale"],
                   meta_fields=["chunk"])
@dataclasses.dataclass(frozen=True)
class Noise:
    """A perturbation ``params + scale * z`` described by keys only (a pytree).

    Attributes:
      keys: pytree with the structure of the parameters; each leaf is a typed PRNG key array of
        shape ``leaf.shape[:stacked]`` (a scalar key for an unstacked leaf).
      scale: float32 scalar (``+eps`` or ``-eps``).
      chunk: static; elements per noise chunk (:data:`CHUNK`; 0: no chunking).
    """

    keys: Any
    scale: jax.Array
    chunk: int = CHUNK


class SPSAEstimate(NamedTuple):
    """The result of :func:`spsa_estimate`.

    Attributes:
      scalars: (n,) float32 projected gradients ``g_j = (L+ - L-) / (2 eps)``.
      losses: (n,) float32 ``(L+ + L-) / 2``, the loss estimate of each sample.
      finite: bool scalar, whether every ``L+`` and ``L-`` was finite.
      sample_keys: (n, 2) uint32 raw key data of the samples' keys ``fold_in(key, j)``: with
        ``scalars`` they are all :func:`spsa_update` needs.
    """

    scalars: jax.Array
    losses: jax.Array
    finite: jax.Array
    sample_keys: jax.Array


def _is_float(leaf) -> bool:
    return jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)


def resolve_stacked(params: Params, stacked_axes: StackedAxes) -> list[int]:
    """Number of leading stacked (batch) axes of every leaf, in ``jax.tree.leaves`` order.

    ``stacked_axes``: an int for every leaf, a callable ``(path_str, leaf) -> int``, or a pytree of
    ints with the structure of ``params`` (or a prefix of it).
    """
    leaves_with_path = jax.tree.flatten_with_path(params)[0]
    if isinstance(stacked_axes, (int, np.integer)):
        counts = [int(stacked_axes)] * len(leaves_with_path)
    elif callable(stacked_axes):
        counts = [int(stacked_axes(path_str(p), leaf)) for p, leaf in leaves_with_path]
    else:
        full = jax.tree.broadcast(stacked_axes, params)
        counts = [int(c) for c in jax.tree.leaves(full)]
    for (path, leaf), count in zip(leaves_with_path, counts):
        if not 0 <= count <= jnp.ndim(leaf):
            raise ValueError(
                f"stacked_axes={count} for leaf {path_str(path)!r} of shape {jnp.shape(leaf)}: "
                "must lie in [0, ndim]")
    return counts


def _slice_keys(leaf_key: jax.Array, stack_shape: tuple[int, ...]) -> jax.Array:
    if not stack_shape:
        return leaf_key
    flat = jax.vmap(_rng.fold_in, (None, 0))(leaf_key, jnp.arange(math.prod(stack_shape)))
    return flat.reshape(stack_shape)


def noise_keys(params: Params, key: jax.Array, stacked_axes: StackedAxes = 0) -> Any:
    """The keys of one perturbation ``z`` (see the module docstring for the schedule).

    Args:
      params: the parameter pytree (arrays or ``ShapeDtypeStruct`` s).
      key: the sample key ``k_j`` (a typed key).
      stacked_axes: leading stacked axes per leaf (see :func:`resolve_stacked`).

    Returns:
      a pytree like ``params`` whose leaves are key arrays of shape ``leaf.shape[:stacked]``.
    """
    leaves, treedef = jax.tree.flatten(params)
    counts = resolve_stacked(params, stacked_axes)
    keys = [_slice_keys(_rng.fold_in(key, i), tuple(jnp.shape(leaf)[:s]))
            for i, (leaf, s) in enumerate(zip(leaves, counts))]
    return jax.tree.unflatten(treedef, keys)


def _chunk_noise(key: jax.Array, chunk: jax.Array | None, shape: tuple[int, ...]) -> jax.Array:
    if chunk is None:
        return _rng.key_normal(key, shape)
    return _rng.key_normal(_rng.fold_in(key, chunk), shape)


def _chunk_map(value: jax.Array, fn: Callable[[jax.Array, Any], jax.Array], chunk: int) -> jax.Array:
    """``fn(piece, index)`` over the flattened ``value`` in chunks of ``chunk`` elements.

    A slice of at most ``chunk`` elements (or any slice if ``chunk`` is 0) is one piece of its own
    shape with ``index=None``;
    otherwise the flat slice is split into full chunks (a ``fori_loop`` writing in place) and a
    remainder, ``chunk`` being the chunk index.
    """
    size = value.size
    if not chunk or size <= chunk:
        return fn(value, None)
    flat = value.reshape(-1)
    full, rem = divmod(size, chunk)

    def body(c, out):
        start = c * chunk
        piece = jax.lax.dynamic_slice_in_dim(out, start, chunk)
        return jax.lax.dynamic_update_slice_in_dim(out, fn(piece, c), start, 0)

    flat = jax.lax.fori_loop(0, full, body, flat)
    if rem:
        tail = fn(flat[full * chunk:], jnp.int32(full))
        flat = jax.lax.dynamic_update_slice_in_dim(flat, tail, full * chunk, 0)
    return flat.reshape(value.shape)


def _perturb_slice(value: jax.Array, key: jax.Array, scale: jax.Array, chunk: int) -> jax.Array:
    dtype = value.dtype

    def fn(piece, chunk):
        z = _chunk_noise(key, chunk, piece.shape)
        return (piece.astype(jnp.float32) + scale * z).astype(dtype)

    return _chunk_map(value, fn, chunk)


def perturb(value: jax.Array, keys: jax.Array, scale: jax.Array, chunk: int = CHUNK) -> jax.Array:
    """``value + scale * z`` for one leaf (or one stacked slice with its slice of keys).

    ``keys`` has shape ``value.shape[:s]`` (``s`` stacked axes). Computed in float32 and cast back
    to ``value.dtype``; integer leaves are returned unchanged.
    """
    if not _is_float(value):
        return value
    if keys.ndim == 0:
        return _perturb_slice(value, keys, scale, chunk)
    stack = keys.shape
    rows = value.reshape((-1,) + value.shape[len(stack):])
    out = jax.vmap(lambda v, k: _perturb_slice(v, k, scale, chunk))(rows, keys.reshape(-1))
    return out.reshape(value.shape)


def sample_noise(keys: jax.Array, shape: tuple[int, ...], chunk: int = CHUNK) -> jax.Array:
    """``z`` (float32) for one leaf of ``shape`` from its key array (shape ``shape[:keys.ndim]``)."""
    return perturb(jnp.zeros(shape, jnp.float32), keys, jnp.float32(1.0), chunk)


def add_noise(params: Params, noise: Noise) -> Params:
    """``params + noise.scale * z`` for every leaf (materialises a perturbed copy of ``params``)."""
    return jax.tree.map(lambda p, k: perturb(p, k, noise.scale, noise.chunk), params, noise.keys)


def param_hook(noise: Noise) -> Callable[[str, Any, Any], Any]:
    """A perturb-at-use hook for models whose parameter tree is keyed by part name.

    ``hook(name, params, layer)`` returns ``params + scale * z`` for the part ``name`` using
    ``noise.keys[name]`` (sliced at ``layer`` on the stacked axis when ``layer`` is not None), i.e.
    exactly the values :func:`add_noise` gives that part. Made for
    :meth:`memjax.models.lm.LM.__call__` (``param_hook=``), whose stacked blocks are perturbed one
    layer at a time inside the scan body.
    """

    def hook(name, params, layer):
        keys = jax.tree.leaves(noise.keys[name])
        values, treedef = jax.tree.flatten(params)  # an nnx.State or a pure dict: same leaf order
        if len(keys) != len(values):
            raise ValueError(f"param_hook: part {name!r} has {len(values)} arrays but the noise has "
                             f"{len(keys)} keys; build the noise from the same parameter tree.")
        if layer is not None:
            if any(k.ndim == 0 for k in keys):
                raise ValueError(f"param_hook: part {name!r} is called per layer but its noise has no "
                                 "stacked axis; build the noise with stacked_axes=1 for its leaves.")
            keys = [k[layer] for k in keys]
        return jax.tree.unflatten(
            treedef, [perturb(v, k, noise.scale, noise.chunk) for v, k in zip(values, keys)])

    return hook


def sample_key(step_key: jax.Array, j: int | jax.Array) -> jax.Array:
    """The key of sample ``j`` of a step (``fold_in(step_key, j)``)."""
    return _rng.fold_in(step_key, j)


def _scalar_loss(value: Any) -> jax.Array:
    if jnp.shape(value) != ():
        raise ValueError(f"loss_fn must return a scalar, got shape {jnp.shape(value)}; "
                         "reduce it (e.g. jnp.mean) inside loss_fn.")
    return jnp.asarray(value, jnp.float32)


def spsa_estimate(loss_fn: Callable, params: Params, batch: Any, key: jax.Array, eps: float,
                  n: int = 1, *, stacked_axes: StackedAxes = 0, at_use: bool = False,
                  chunk: int = CHUNK) -> SPSAEstimate:
    """n-SPSA estimate of the projected gradients (MeZO, Malladi et al. 2023, Algorithm 1).

    For each sample ``j < n`` with ``z_j`` from ``noise_keys(params, fold_in(key, j))``::

        g_j = (L(params + eps z_j, batch) - L(params - eps z_j, batch)) / (2 eps)

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``; with ``at_use=True``
        ``loss_fn(params, batch, noise: Noise) -> scalar`` must return the loss at
        ``add_noise(params, noise)``, e.g. by perturbing each layer's parameters where they are
        used (:meth:`memjax.models.lm.LM.__call__` ``param_hook``), which saves a parameter copy.
        Evaluate in eval mode (no dropout).
      params: parameter pytree.
      batch: anything ``loss_fn`` takes.
      key: the step key (typed PRNG key).
      eps: perturbation scale, > 0 (MeZO: 1e-3).
      n: number of samples, >= 1.
      stacked_axes: leading stacked axes per leaf (:func:`resolve_stacked`).
      at_use: see ``loss_fn``.
      chunk: elements per noise chunk (:data:`CHUNK`); 0 for sharded (FSDP) parameters.

    Returns:
      an :class:`SPSAEstimate`; the samples run one after the other (``lax.map``) so only one
      forward pass is live at a time.
    """
    _check_eps_n(eps, n)

    def loss_at(scale, keys):
        noise = Noise(keys, jnp.asarray(scale, jnp.float32), chunk)
        value = loss_fn(params, batch, noise) if at_use else loss_fn(add_noise(params, noise), batch)
        return _scalar_loss(value)

    def one(j):
        sample = sample_key(key, j)
        keys = noise_keys(params, sample, stacked_axes)
        plus = loss_at(eps, keys)
        minus = loss_at(-eps, keys)
        g = (plus - minus) / (2.0 * eps)
        finite = jnp.isfinite(plus) & jnp.isfinite(minus) & jnp.isfinite(g)
        return g, 0.5 * (plus + minus), finite, jax.random.key_data(sample)

    scalars, losses, finite, keys = jax.lax.map(one, jnp.arange(n))
    return SPSAEstimate(scalars, losses, jnp.all(finite), keys)


def _check_eps_n(eps, n) -> None:
    if not isinstance(eps, numbers.Real) or not eps > 0 or not math.isfinite(eps):
        raise ValueError(f"eps must be a finite number > 0 (MeZO uses 1e-3), got {eps!r}")
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n (the number of SPSA samples) must be an int >= 1, got {n!r}")


def decay_mask(params: Params, stacked_axes: StackedAxes = 0,
               exclude: str | None = DEFAULT_NO_DECAY) -> Any:
    """MeZO's weight-decay mask: True for leaves with >= 2 non-stacked axes whose path does not
    match ``exclude`` (biases, norms), False otherwise."""
    counts = resolve_stacked(params, stacked_axes)
    leaves_with_path, treedef = jax.tree.flatten_with_path(params)
    pattern = re.compile(exclude, re.IGNORECASE) if exclude else None
    mask = [jnp.ndim(leaf) - s >= 2 and _is_float(leaf)
            and not (pattern and pattern.search(path_str(path)))
            for (path, leaf), s in zip(leaves_with_path, counts)]
    return jax.tree.unflatten(treedef, mask)


def spsa_update(params: Params, sample_keys: jax.Array, scalars: jax.Array, learning_rate: Any,
                *, weight_decay: float = 0.0, mask: Any = None, stacked_axes: StackedAxes = 0,
                valid: jax.Array | None = None, chunk: int = CHUNK) -> Params:
    """Apply ``theta <- theta - lr (mean_k g_k z_k + wd mask theta)`` leaf by leaf.

    Args:
      params: parameter pytree.
      sample_keys: (m,) typed keys ``k_k`` (``jax.random.wrap_key_data`` of
        :attr:`SPSAEstimate.sample_keys`); ``z_k`` is rebuilt from ``noise_keys(params, k_k)``.
      scalars: (m,) float32 projected gradients ``g_k``.
      learning_rate: float or float scalar array.
      weight_decay: decoupled decay coefficient (MeZO: ``lr * wd * theta``).
      mask: pytree of bools like ``params`` (or None = :func:`decay_mask`).
      stacked_axes: as in :func:`noise_keys`.
      valid: optional (m,) bools; invalid samples contribute nothing and the mean is over the
        valid ones. When no sample is valid, ``params`` are returned bit for bit unchanged
        (weight decay included).
      chunk: elements per noise chunk; must be the one the estimate used.

    Returns:
      the updated parameters (same dtypes). Each leaf's update is one fused elementwise pass that
      regenerates its ``z_k``; no gradient-sized pytree is ever built.
    """
    scalars = scalars.astype(jnp.float32)
    if valid is None:
        valid = jnp.isfinite(scalars)
    scalars = jnp.where(valid, scalars, 0.0)
    num_valid = jnp.sum(valid.astype(jnp.float32))
    step = jnp.where(num_valid > 0, jnp.asarray(learning_rate, jnp.float32), 0.0)
    weights = scalars / jnp.maximum(num_valid, 1.0)
    if mask is None:
        mask = decay_mask(params, stacked_axes)
    counts = resolve_stacked(params, stacked_axes)
    leaves, treedef = jax.tree.flatten(params)
    mask_leaves = jax.tree.leaves(jax.tree.broadcast(mask, params))
    out = []
    for i, (p, s, decays) in enumerate(zip(leaves, counts, mask_leaves)):
        if not _is_float(p):
            out.append(p)
            continue
        leaf_keys = jax.vmap(_rng.fold_in, (0, None))(sample_keys, i)  # (m,)
        if weight_decay and isinstance(decays, (bool, np.bool_)):
            decay = weight_decay if decays else None
        elif weight_decay:
            decay = weight_decay * jnp.asarray(decays, jnp.float32)
        else:
            decay = None
        out.append(_update_leaf(p, s, leaf_keys, weights, step, decay, chunk))
    return jax.tree.unflatten(treedef, out)


def _update_leaf(p, stacked, leaf_keys, weights, step, decay, chunk):
    """One leaf, slice by slice (in place in a ``fori_loop``) and chunk by chunk, so at most one
    chunk of ``z`` is ever live."""
    m = weights.shape[0]

    def new_slice(value, slice_keys):  # slice_keys(k) -> the key of sample k for this slice

        def fn(piece, chunk):
            direction = weights[0] * _chunk_noise(slice_keys(0), chunk, piece.shape)
            if m <= 8:
                for k in range(1, m):
                    direction = direction + weights[k] * _chunk_noise(slice_keys(k), chunk,
                                                                      piece.shape)
            else:
                direction = jax.lax.fori_loop(
                    1, m, lambda k, acc: acc + weights[k] * _chunk_noise(slice_keys(k), chunk,
                                                                         piece.shape),
                    direction)
            v32 = piece.astype(jnp.float32)
            if decay is not None:
                direction = direction + decay * v32
            return (v32 - step * direction).astype(piece.dtype)

        return _chunk_map(value, fn, chunk)

    if stacked == 0:
        return new_slice(p, lambda k: leaf_keys[k])
    stack = p.shape[:stacked]
    rows = p.reshape((math.prod(stack),) + p.shape[stacked:])

    def body(r, rows):
        row = new_slice(rows[r], lambda k: _rng.fold_in(leaf_keys[k], r))
        return jax.lax.dynamic_update_index_in_dim(rows, row, r, 0)

    return jax.lax.fori_loop(0, rows.shape[0], body, rows).reshape(p.shape)


# ----------------------------------------------------------------------------- the recipe


class ZerothOrderState(NamedTuple):
    """State of :func:`mezo`: everything a resumed run needs.

    Attributes:
      count: int32 scalar, steps applied (a skipped step does not count).
      key: (2,) uint32 raw key data of the base key; ``step_key = fold_in(key, count)``.
    """

    count: jax.Array
    key: jax.Array


class StepInfo(NamedTuple):
    """What one zeroth-order step reports.

    Attributes:
      loss: float32 scalar, mean of ``(L+ + L-) / 2`` over the samples.
      scalars: (n,) float32 projected gradients used by the update (0 when skipped).
      skipped: bool scalar, True when a non-finite loss made the step a no-op on the parameters.
    """

    loss: jax.Array
    scalars: jax.Array
    skipped: jax.Array


class ZerothOrderTransformation(NamedTuple):
    """A zeroth-order optimizer: ``init(params) -> state``;
    ``step(loss_fn, params, state, batch) -> (params, state, StepInfo)``.

    Unlike an optax transform it needs the loss, not a gradient: ``step`` runs the forward passes
    itself. Jit it with the parameters donated (``donate_argnums``) so the update is in place.
    """

    init: Callable[[Params], ZerothOrderState]
    step: Callable[..., tuple[Params, ZerothOrderState, StepInfo]]


def step_key(state: ZerothOrderState) -> jax.Array:
    """``fold_in(base_key, count)`` as a typed key."""
    return _rng.fold_in(jax.random.wrap_key_data(state.key), state.count)


def mezo(learning_rate: float | optax.Schedule, eps: float = 1e-3, n: int = 1,
         weight_decay: float = 0.0, *, seed: int = 0, mask: Any = None,
         stacked_axes: StackedAxes = 0, at_use: bool = False,
         chunk: int = CHUNK) -> ZerothOrderTransformation:
    """MeZO: memory-efficient zeroth-order SGD (Malladi et al. 2023, arXiv 2305.17333).

    One step::

        step_key = fold_in(PRNGKey(seed), count)
        g_j      = (L(theta + eps z_j) - L(theta - eps z_j)) / (2 eps)      j < n   (n-SPSA)
        theta   <- theta - lr(count) * (mean_j g_j z_j + wd * mask * theta)

    A step whose losses are not all finite leaves the parameters and the state bit for bit
    unchanged (``StepInfo.skipped``).

    Args:
      learning_rate: float or optax schedule of the step count (MeZO: constant 1e-6 / 1e-7 for
        full fine-tuning of large LMs; small models tolerate far larger rates).
      eps: perturbation scale (MeZO: 1e-3).
      n: SPSA samples per step.
      weight_decay: decoupled decay coefficient.
      seed: seed of the base key.
      mask: decay mask pytree (default :func:`decay_mask`: no decay on biases, norms, vectors).
      stacked_axes: leading stacked axes per leaf (e.g. 1 for a scan-over-layers stack).
      at_use: ``loss_fn(params, batch, noise)`` perturbs at the point of use (see
        :func:`spsa_estimate`).
      chunk: elements per noise chunk (:data:`CHUNK`); 0 for sharded (FSDP) parameters.

    Returns:
      a :class:`ZerothOrderTransformation`.
    """
    _check_eps_n(eps, n)
    if not callable(learning_rate) and not (isinstance(learning_rate, numbers.Real)
                                            and learning_rate >= 0):
        raise ValueError(f"learning_rate must be a number >= 0 or a schedule, got {learning_rate!r}")
    if not isinstance(chunk, (int, np.integer)) or chunk < 0:
        raise ValueError(f"chunk must be an int >= 0 (0: no chunking), got {chunk!r}")
    if not isinstance(weight_decay, numbers.Real) or weight_decay < 0:
        raise ValueError(f"weight_decay must be a number >= 0, got {weight_decay!r}")

    def init(params):
        from memjax.optim.quantized_weights import has_quantized

        if has_quantized(params):
            raise ValueError("mezo: the parameters hold INT8 weights (QuantizedWeight); MeZO "
                             "perturbs float weights: pass memjax.optim.dequantize_weights(params)")
        return ZerothOrderState(jnp.zeros([], jnp.int32),
                                jax.random.key_data(jax.random.key(seed)))

    def step(loss_fn, params, state, batch):
        key = step_key(state)
        est = spsa_estimate(loss_fn, params, batch, key, eps, n, stacked_axes=stacked_axes,
                            at_use=at_use, chunk=chunk)
        lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
        keys = jax.random.wrap_key_data(est.sample_keys)
        valid = jnp.broadcast_to(est.finite, (n,))
        new = spsa_update(params, keys, est.scalars, lr, weight_decay=weight_decay,
                          mask=mask, stacked_axes=stacked_axes, valid=valid, chunk=chunk)
        info = StepInfo(jnp.mean(est.losses), jnp.where(valid, est.scalars, 0.0), ~est.finite)
        count = jnp.where(est.finite, state.count + 1, state.count)
        return new, ZerothOrderState(count, state.key), info

    return ZerothOrderTransformation(init, step)
