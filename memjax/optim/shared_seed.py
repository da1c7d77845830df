"""Distributed zeroth-order training with shared randomness: one byte per worker per step.

Zelikman et al. 2023 ("Just One Byte (per gradient)", arXiv 2306.10015): every worker ``k`` of a
data axis of size ``N`` draws its own perturbation from ``fold_in(step_key, k)``, computes its SPSA
scalar(s) on its own data shard, quantises each scalar to one byte (:class:`OneByteCodec`) and
all-gathers the ``N * n`` bytes. Every worker then regenerates all ``N * n`` perturbations from the
known keys and applies the same averaged update::

    theta <- theta - lr * (mean_{k, j valid} decode(c_{k,j}) z_{k,j} + wd * mask * theta)

so replicas stay bit-identical while the only collective moves ``N * n`` bytes per step (versus
``4 * #params`` bytes per worker for a float32 gradient all-reduce).

The whole history is the initial parameters plus, per step, ``(step key, N x n bytes, lr)``:
:func:`replay` rebuilds the parameters from them exactly, which lets a worker join mid-run.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from memjax.optim import _rng
from memjax.optim import zeroth_order as zo

INVALID = -128
"""The code of a non-finite scalar: it is left out of the update (the step is skipped if every
scalar is invalid)."""


class OneByteCodec(NamedTuple):
    """Sign + log-magnitude int8 code of a scalar (after Zelikman et al. 2023).

    ``power = round(resolution * ln|g|) + offset``; the code is ``sign(g) * power`` with ``power``
    clipped to ``[1, 127]``; ``0`` encodes zero (and magnitudes below the range) and ``-128`` a
    non-finite scalar. Decoding: ``sign(c) * exp((|c| - offset) / resolution)``.

    Error bound: for ``lo <= |g| <= hi`` with ``lo = exp((1 - offset) / resolution)`` and
    ``hi = exp((127 - offset) / resolution)``, ``|decode(encode(g)) / g - 1| <=
    exp(0.5 / resolution) - 1`` (6.45 % for the default resolution 8). Larger magnitudes saturate
    at ``hi``, smaller ones flush to 0. Defaults cover ``[3.9e-4, 2.6e3]``.

    Attributes:
      resolution: codes per e-fold of magnitude.
      offset: code of magnitude 1.
    """

    resolution: float = 8.0
    offset: int = 64

    @property
    def relative_error(self) -> float:
        """The worst-case relative error inside the representable range."""
        return math.expm1(0.5 / self.resolution)

    @property
    def range(self) -> tuple[float, float]:
        """``(lo, hi)``: magnitudes coded with the relative error bound."""
        return (math.exp((1 - self.offset) / self.resolution),
                math.exp((127 - self.offset) / self.resolution))

    def encode(self, g: jax.Array) -> jax.Array:
        """float -> int8 codes (same shape)."""
        g = jnp.asarray(g, jnp.float32)
        mag = jnp.abs(g)
        safe = jnp.where(mag > 0, mag, 1.0)
        power = jnp.round(self.resolution * jnp.log(safe)) + self.offset
        flushed = (mag == 0) | (power < 1)
        power = jnp.clip(power, 1, 127)
        code = jnp.where(flushed, 0.0, jnp.sign(g) * power)
        code = jnp.where(jnp.isfinite(g), code, INVALID)
        return code.astype(jnp.int8)

    def decode(self, code: jax.Array) -> jax.Array:
        """int8 codes -> float32 (``INVALID`` and 0 decode to 0)."""
        c = code.astype(jnp.float32)
        mag = jnp.exp((jnp.abs(c) - self.offset) / self.resolution)
        return jnp.where((code == 0) | (code == INVALID), 0.0, jnp.sign(c) * mag)


DEFAULT_CODEC = OneByteCodec()
"""Resolution 8, offset 64: magnitudes in [3.9e-4, 2.6e3] to within 6.45 %."""


def worker_sample_keys(step_key: jax.Array, num_workers: int, n: int) -> jax.Array:
    """(num_workers * n,) keys ``fold_in(fold_in(step_key, k), j)``, worker-major."""
    workers = jax.vmap(_rng.fold_in, (None, 0))(step_key, jnp.arange(num_workers))
    keys = jax.vmap(lambda w: jax.vmap(lambda j: zo.sample_key(w, j))(jnp.arange(n)))(workers)
    return keys.reshape(-1)


def apply_codes(params: Any, step_key: jax.Array, codes: jax.Array, learning_rate: Any, *,
                codec: OneByteCodec = DEFAULT_CODEC, weight_decay: float = 0.0, mask: Any = None,
                stacked_axes: zo.StackedAxes = 0, chunk: int = zo.CHUNK) -> Any:
    """The update of one step from its key and the gathered (N, n) int8 codes (every worker runs
    exactly this, so does :func:`replay`)."""
    num_workers, n = codes.shape
    keys = worker_sample_keys(step_key, num_workers, n)
    flat = codes.reshape(-1)
    return zo.spsa_update(params, keys, codec.decode(flat), learning_rate,
                          weight_decay=weight_decay, mask=mask, stacked_axes=stacked_axes,
                          valid=flat != INVALID, chunk=chunk)


class SharedSeedInfo(NamedTuple):
    """What one shared-seed step reports; ``(step_key_data, codes, learning_rate)`` is its log entry.

    Attributes:
      losses: (N,) float32 per-worker loss estimates (left sharded: no collective).
      codes: (N, n) int8 gathered codes.
      step_key_data: (2,) uint32.
      learning_rate: float32 scalar used by this step.
    """

    losses: jax.Array
    codes: jax.Array
    step_key_data: jax.Array
    learning_rate: jax.Array


class SharedSeedZO(NamedTuple):
    """``init(params)``; ``step(params, state, batch) -> (params, state, SharedSeedInfo)`` (jitted,
    parameters donated); ``replay(initial_params, log) -> params``."""

    init: Callable
    step: Callable
    replay: Callable


class ReplayLog(NamedTuple):
    """The history of a shared-seed run after its initial parameters (host numpy arrays).

    Attributes:
      step_keys: (T, 2) uint32 key data.
      codes: (T, N, n) int8.
      learning_rates: (T,) float32.
    """

    step_keys: np.ndarray
    codes: np.ndarray
    learning_rates: np.ndarray

    @staticmethod
    def empty(num_workers: int, n: int = 1) -> ReplayLog:
        return ReplayLog(np.zeros((0, 2), np.uint32), np.zeros((0, num_workers, n), np.int8),
                         np.zeros((0,), np.float32))

    def append(self, info: SharedSeedInfo) -> ReplayLog:
        """The log with one more step (``info`` from a step; fetched to host)."""
        return ReplayLog(
            np.concatenate([self.step_keys, np.asarray(info.step_key_data, np.uint32)[None]]),
            np.concatenate([self.codes, np.asarray(info.codes, np.int8)[None]]),
            np.concatenate([self.learning_rates, np.asarray(info.learning_rate, np.float32)[None]]))

    def __len__(self) -> int:
        return int(self.step_keys.shape[0])

    @property
    def nbytes_per_step(self) -> int:
        """Bytes that crossed the network per step (the gathered codes)."""
        return int(np.prod(self.codes.shape[1:]))


def replay(initial_params: Any, log: ReplayLog, *, weight_decay: float, stacked_axes: zo.StackedAxes,
           mask: Any = None, codec: OneByteCodec = DEFAULT_CODEC, chunk: int = zo.CHUNK) -> Any:
    """Rebuilds the parameters after ``len(log)`` steps from ``initial_params``.

    Runs the update the training step runs (:func:`apply_codes`), one step at a time; on the same
    backend the result is bit for bit the run's parameters (tested on CPU; another backend may
    fuse the arithmetic differently). The log holds keys, codes and learning rates only: the
    keyword arguments must be the run's, which is why ``weight_decay`` and ``stacked_axes`` have
    no default; :attr:`SharedSeedZO.replay` binds them.
    """
    @jax.jit
    def update(params, key_data, codes, lr):
        return apply_codes(params, jax.random.wrap_key_data(key_data), codes, lr, codec=codec,
                           weight_decay=weight_decay, mask=mask, stacked_axes=stacked_axes,
                           chunk=chunk)

    params = initial_params
    for t in range(len(log)):
        params = update(params, log.step_keys[t], log.codes[t], log.learning_rates[t])
    return params


def mezo_shared_seed(loss_fn: Callable, mesh: jax.sharding.Mesh, learning_rate: float | optax.Schedule,
                     eps: float = 1e-3, n: int = 1, weight_decay: float = 0.0, *,
                     axis_name: str = "data", codec: OneByteCodec = DEFAULT_CODEC, seed: int = 0,
                     mask: Any = None, stacked_axes: zo.StackedAxes = 0,
                     at_use: bool = False, batch_axis: int = 0,
                     chunk: int = zo.CHUNK) -> SharedSeedZO:
    """MeZO over a data axis with shared seeds and one-byte scalars (Zelikman et al. 2023).

    Worker ``k`` (index along ``axis_name``) estimates ``g_{k,j}`` on its shard of the batch with
    ``zo.spsa_estimate(loss_fn, params, shard, fold_in(step_key, k), eps, n)``; the codes
    ``encode(g)`` are all-gathered ((N, n) int8, the step's only collective) and every worker
    applies :func:`apply_codes`. Parameters are replicated over the mesh.

    Args:
      loss_fn: as for :func:`memjax.optim.zeroth_order.spsa_estimate` (per-shard batch).
      mesh: the device mesh; ``axis_name`` is the data axis, other axes must have size 1.
      learning_rate, eps, n, weight_decay, seed, mask, stacked_axes, at_use, chunk: as for
        :func:`memjax.optim.zeroth_order.mezo`.
      axis_name: the mesh axis the batch is split over.
      codec: the one-byte code of each scalar.
      batch_axis: the axis of the batch leaves that is split over the workers (e.g. 1 for
        ``(accumulation, batch, length)`` micro-batches).

    Returns:
      a :class:`SharedSeedZO`; ``step(params, state, batch)`` expects ``batch`` leaves whose
      ``batch_axis`` dimension is divisible by N, and the same ``state`` (a
      :class:`memjax.optim.zeroth_order.ZerothOrderState`) on every process.
    """
    if axis_name not in mesh.axis_names:
        raise ValueError(f"axis_name={axis_name!r} is not an axis of the mesh {mesh.axis_names}")
    others = {a: s for a, s in mesh.shape.items() if a != axis_name and s != 1}
    if others:
        raise ValueError(f"mezo_shared_seed replicates parameters: mesh axes other than "
                         f"{axis_name!r} must have size 1, got {others}")
    base = zo.mezo(learning_rate, eps, n, weight_decay, seed=seed, mask=mask,
                   stacked_axes=stacked_axes, at_use=at_use, chunk=chunk)

    def local(params, state, batch):
        step_key = zo.step_key(state)
        worker = jax.lax.axis_index(axis_name)
        est = zo.spsa_estimate(loss_fn, params, batch, _rng.fold_in(step_key, worker), eps, n,
                               stacked_axes=stacked_axes, at_use=at_use, chunk=chunk)
        scalars = jnp.where(est.finite, est.scalars, jnp.nan)  # a failed sample -> INVALID
        codes = jax.lax.all_gather(codec.encode(scalars), axis_name)  # (N, n) int8
        lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
        lr = jnp.asarray(lr, jnp.float32)
        new = apply_codes(params, step_key, codes, lr, codec=codec, weight_decay=weight_decay,
                          mask=mask, stacked_axes=stacked_axes, chunk=chunk)
        info = SharedSeedInfo(jnp.mean(est.losses)[None], codes, jax.random.key_data(step_key), lr)
        applied = jnp.any(codes != INVALID)  # else nothing changed: the state stays too
        count = jnp.where(applied, state.count + 1, state.count)
        return new, zo.ZerothOrderState(count, state.key), info

    replicated = P()
    info_specs = SharedSeedInfo(P(axis_name), replicated, replicated, replicated)
    if not isinstance(batch_axis, int) or batch_axis < 0:
        raise ValueError(f"batch_axis must be an int >= 0, got {batch_axis!r}")
    batch_spec = P(*([None] * batch_axis), axis_name)
    mapped = jax.shard_map(local, mesh=mesh, in_specs=(replicated, replicated, batch_spec),
                           out_specs=(replicated, replicated, info_specs), check_vma=False)
    step = jax.jit(mapped, donate_argnums=(0,))

    def init(params):
        return jax.device_put(base.init(params), NamedSharding(mesh, replicated))

    def replay_bound(initial_params, log):
        return replay(initial_params, log, codec=codec, weight_decay=weight_decay, mask=mask,
                      stacked_axes=stacked_axes, chunk=chunk)

    return SharedSeedZO(init, step, replay_bound)
