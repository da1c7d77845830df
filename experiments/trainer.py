"""The compiled pieces of a run: train state, sharded init, train step and evaluation.

The model is split once (``nnx.split``) into a static graph definition and a pure dict of
parameters; the jitted functions rebuild it with ``nnx.merge`` at trace time only, so no Python
graph traversal happens per step. One step::

    grads = mean over A micro-batches of grad(next_token_loss)     # lax.scan, gradient accumulation
    updates, opt_state = tx.update(grads, opt_state, params)       # clip -> recipe, skip if non-finite
    params = params + updates

That is the ``"gradient"`` kind (:func:`memjax.training.gradient_step`). The other kinds
(:data:`STEP_KINDS`, picked from the config by :func:`experiments.optimizers.step_kind`) implement
the same :class:`memjax.training.Step` protocol: ``"layerwise"``
(:func:`memjax.training.layerwise_step`: each layer updated inside the backward pass, no gradient
tree), ``"zeroth_order"`` (:func:`memjax.optim.mezo`: two perturbed forward passes per SPSA
sample, the perturbation applied inside the model's scan body, no backward pass compiled) and
``"shared_seed"`` (:func:`memjax.optim.mezo_shared_seed`, whose replay-log entry is the step's
``record``).

The step is compiled once with explicit in/out shardings (parameters by logical axis names,
optimizer state following them, batches over ``(data, fsdp)``) and the state donated.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils

import memjax
from . import sharding
from .data import Batch
from memjax.models.lm import LM, LMConfig, layered, next_token_loss
from memjax.optim import quantized_weights as qw


class TrainState(NamedTuple):
    """Everything a step changes. ``rng`` is raw ``uint32`` key data (checkpoint friendly)."""

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array


@dataclasses.dataclass(frozen=True)
class Trainer:
    """Compiled functions of one run and the shardings they use.

    Attributes:
      graphdef: the model's static graph.
      tx: the optimizer.
      schedule: its learning-rate schedule.
      kind: the step kind (:data:`STEP_KINDS`).
      abstract_state: ``TrainState`` of ``jax.ShapeDtypeStruct`` s.
      state_shardings: ``TrainState`` of ``NamedSharding`` s.
      batch_shardings: ``Batch`` of ``NamedSharding`` s for (A, B / A, L) arrays.
      init: ``() -> TrainState`` (sharded).
      step: compiled ``(TrainState, Batch) -> (TrainState, metrics, record)``; donates the state.
        ``metrics``: scalars (loss, grad_norm, lr, skipped); ``record``: what the step leaves for
        the run's hooks (a shared-seed step's replay-log entry, else ``None``).
      eval_loss: ``(params, Batch) -> loss``.
      compiled_memory: XLA's memory figures of ``step`` (per device).
    """

    graphdef: Any
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    kind: str
    abstract_state: TrainState
    state_shardings: TrainState
    batch_shardings: Batch
    init: Any
    step: Any
    eval_loss: Any
    compiled_memory: memjax.optim.CompiledMemory


def init_model_params(lm_config: LMConfig, seed: int) -> Any:
    """The model's parameters as a pure dict (``nnx.to_pure_dict`` of its ``nnx.Param`` state)."""
    model = LM(lm_config, rngs=nnx.Rngs(params=seed))
    _, params, rest = nnx.split(model, nnx.Param, ...)
    if jax.tree.leaves(rest):
        raise NotImplementedError("the trainer supports models whose only state is nnx.Param")
    return nnx.to_pure_dict(params)


def initial_params(lm_config: LMConfig, seed: int) -> Any:
    """The parameters every run of ``(lm_config, seed)`` starts from, bit for bit (computed under
    ``jax.jit``, as the trainer's init is: eager initialisation may round differently). With a
    shared-seed MeZO replay log they rebuild a run's parameters (:func:`memjax.optim.replay`)."""
    return jax.jit(init_model_params, static_argnums=(0, 1))(lm_config, seed)


def abstract_model(lm_config: LMConfig, seed: int = 0) -> tuple[Any, Any, Any]:
    """``(graphdef, abstract params (pure dict), logical PartitionSpecs (pure dict))``; with INT8
    weights, the specs are the float weights' (see :func:`param_shardings`)."""
    model = nnx.eval_shape(lambda: LM(lm_config, rngs=nnx.Rngs(params=seed)))
    graphdef, params = nnx.split(model, nnx.Param, ...)[:2]
    if lm_config.weight_bits is not None:
        float_model = nnx.eval_shape(lambda: LM(dataclasses.replace(lm_config, weight_bits=None),
                                                rngs=nnx.Rngs(params=seed)))
        logical = nnx.get_partition_spec(nnx.state(float_model, nnx.Param))
    else:
        logical = nnx.get_partition_spec(params)
    return graphdef, nnx.to_pure_dict(params), nnx.to_pure_dict(logical)


def param_shardings(abstract_params: Any, logical: Any, rules: tuple,
                    mesh: jax.sharding.Mesh) -> tuple[Any, Any]:
    """``(shardings of the parameters, shardings of their float view)``: an INT8 weight's codes
    shard as the float weight it replaces, its scales and keys along the layers only
    (:func:`memjax.optim.quantized_weights.weight_shardings`); the float view (gradients,
    optimizer state) shards as the float weights."""
    float_sh = sharding.param_shardings(qw.float_shapes(abstract_params), logical, rules, mesh)
    param_sh = jax.tree.map(
        lambda a, s: qw.weight_shardings(a, s) if qw.is_quantized(a) else s,
        abstract_params, float_sh, is_leaf=qw.is_quantized)
    return param_sh, float_sh


def micro_batches(batch: Batch, grad_accum: int) -> Batch:
    """(B, ...) -> (A, B / A, ...) for gradient accumulation."""
    return Batch(*(x.reshape((grad_accum, x.shape[0] // grad_accum) + x.shape[1:]) for x in batch))


def to_device(batch: Batch, shardings: Batch) -> Batch:
    """Host arrays (identical on every process) -> global sharded arrays."""
    return Batch(*(jax.make_array_from_callback(x.shape, s, lambda idx, x=x: x[idx])
                   for x, s in zip(batch, shardings)))


def _compiled_memory(compiled: Any) -> memjax.optim.CompiledMemory:
    a = compiled.memory_analysis()
    return memjax.optim.CompiledMemory(
        argument=int(a.argument_size_in_bytes), output=int(a.output_size_in_bytes),
        alias=int(a.alias_size_in_bytes), temp=int(a.temp_size_in_bytes),
        generated_code=int(a.generated_code_size_in_bytes))


STEP_KINDS = ("gradient", "layerwise", "zeroth_order", "shared_seed")
"""The kinds of step a run can take (:func:`experiments.optimizers.step_kind` picks one from the
config)."""


def lr_step(kind: str, state: TrainState) -> jax.Array:
    """The step count the learning rate of this step was read at (a zeroth-order optimizer counts
    its own applied steps)."""
    return state.opt_state.count if kind == "zeroth_order" else state.step


def _make_step(kind, tx, lm_config, loss_fn, zo_loss, param_sh, clip_norm):
    """``(params, opt_state, batch) -> (params, opt_state, metrics, record)`` of ``kind``:
    a :class:`memjax.training.Step` plus what the step leaves for the run's hooks (``record``:
    the replay-log entry of a shared-seed step, else ``None``)."""
    if kind == "shared_seed":
        codec = memjax.optim.shared_seed.DEFAULT_CODEC

        def shared(params, opt_state, batch):
            # The update's only collective is the int8 all-gather of the codes; the logged loss
            # (mean of the workers' losses) adds an all-reduce of one float32 scalar.
            params, opt_state, info = tx.step(params, opt_state, batch)
            invalid = info.codes == memjax.optim.shared_seed.INVALID
            metrics = {"loss": jnp.nanmean(info.losses),
                       "grad_norm": jnp.mean(jnp.abs(codec.decode(info.codes))),
                       "lr": info.learning_rate, "skipped": jnp.all(invalid).astype(jnp.int32),
                       "dropped_samples": jnp.sum(invalid)}
            return params, opt_state, metrics, info._replace(losses=None)

        return shared
    if kind == "zeroth_order":
        step = memjax.training.zeroth_order_step(zo_loss, tx)
    elif kind == "layerwise":
        step = memjax.training.layerwise_step(
            layered(lm_config), tx, clip_norm=clip_norm or None, guard="step",
            micro_batched=True, param_shardings=param_sh)
    else:
        step = memjax.training.gradient_step(lambda p, mb: loss_fn(p, mb.tokens, mb.mask), tx,
                                             grad_shardings=param_sh)
    return lambda *args: (*step(*args), None)


def build(lm_config: LMConfig, tx: Any, schedule: optax.Schedule, *,
          mesh: jax.sharding.Mesh, rules: tuple, seed: int, micro_batch: int, grad_accum: int,
          seq_len: int, kind: str = "gradient", clip_norm: float = 0.0,
          initial_params: Callable[[], Any] | None = None) -> Trainer:
    """Shardings and compiled init / step / eval of one run (nothing is allocated but the init).

    ``kind`` (one of :data:`STEP_KINDS`) names the step; ``tx`` is what that kind takes (an optax
    transform for gradient and layerwise steps, a zeroth-order transformation, or a
    :class:`experiments.optimizers.SharedSeedMezo`). ``clip_norm``: the layerwise step's exact
    global-norm clipping (0: none); a gradient step's clipping is inside ``tx``.
    ``initial_params``: a function returning the starting parameters (a pure dict of host
    arrays, e.g. a pretrained checkpoint's), called by ``init``; ``None``: initialise from ``seed``.
    """
    graphdef, abstract_params, logical = abstract_model(lm_config, seed)
    rep = sharding.replicated(mesh)

    def zo_loss(params, batch: Batch, noise):  # the loss at params + noise, perturbed at use
        hook = memjax.optim.zeroth_order.param_hook(noise)
        return jnp.mean(jax.lax.map(
            lambda mb: next_token_loss(nnx.merge(graphdef, params), mb.tokens, mb.mask,
                                       param_hook=hook), batch))

    if kind not in STEP_KINDS:
        raise ValueError(f"unknown step kind {kind!r}; expected one of {STEP_KINDS}")
    if kind == "shared_seed":  # replicated parameters, one byte per worker
        tx = tx.make(zo_loss, mesh)
        param_sh = float_sh = jax.tree.map(lambda _: rep, abstract_params)
    else:
        param_sh, float_sh = param_shardings(abstract_params, logical, rules, mesh)
    if lm_config.weight_bits is not None and kind not in ("gradient", "layerwise"):
        raise ValueError(f"INT8 weights (weight_bits) need a gradient or layerwise step, not "
                         f"{kind!r}")
    float_params = qw.float_shapes(abstract_params)  # what the optimizer sees
    abstract_opt = jax.eval_shape(tx.init, float_params)
    opt_sh = memjax.optim.state_shardings(abstract_opt, float_params, float_sh)
    state_sh = TrainState(rep, param_sh, opt_sh, rep)

    def init(params=None) -> TrainState:
        params = init_model_params(lm_config, seed) if params is None else params
        rng = jax.random.key_data(jax.random.fold_in(jax.random.key(seed), 1))
        opt_state = tx.init(qw.dequantize_weights(params))
        return TrainState(jnp.zeros([], jnp.int32), params, opt_state, rng)

    def loss_fn(params, tokens, mask):
        return next_token_loss(nnx.merge(graphdef, params), tokens, mask)

    step_fn = _make_step(kind, tx, lm_config, loss_fn, zo_loss,
                         param_sh if kind == "layerwise" else float_sh, clip_norm)

    def train_step(state: TrainState, batch: Batch):
        params, opt_state, metrics, record = step_fn(state.params, state.opt_state, batch)
        params = jax.lax.with_sharding_constraint(params, param_sh)
        rng = jax.random.key_data(jax.random.split(jax.random.wrap_key_data(state.rng))[0])
        lr = metrics.pop("lr", None)
        metrics["lr"] = schedule(lr_step(kind, state)) if lr is None else lr
        return TrainState(state.step + 1, params, opt_state, rng), metrics, record

    def eval_loss(params, batch: Batch):
        return jnp.mean(jax.lax.map(lambda mb: loss_fn(params, mb.tokens, mb.mask), batch))

    spec = lambda *shape, dtype: jax.ShapeDtypeStruct(shape, dtype)  # noqa: E731
    abstract_batch = Batch(spec(grad_accum, micro_batch, seq_len, dtype=jnp.int32),
                           spec(grad_accum, micro_batch, seq_len - 1, dtype=jnp.float32))
    batch_sh = Batch(sharding.batch_sharding(mesh, 3), sharding.batch_sharding(mesh, 3))
    if initial_params is None:
        init_jit = jax.jit(init, out_shardings=state_sh)
        abstract_state = jax.eval_shape(init_jit)
    else:
        loaded_init = jax.jit(init, in_shardings=(param_sh,), out_shardings=state_sh)
        abstract_state = jax.eval_shape(loaded_init, abstract_params)
        init_jit = lambda: loaded_init(initial_params())  # noqa: E731
    step = jax.jit(train_step, in_shardings=(state_sh, batch_sh),
                   out_shardings=(state_sh, rep, rep),
                   donate_argnums=0).lower(abstract_state, abstract_batch).compile()
    eval_jit = jax.jit(eval_loss, in_shardings=(param_sh, batch_sh), out_shardings=rep)
    return Trainer(graphdef, tx, schedule, kind, abstract_state, state_sh, batch_sh, init_jit,
                   step, eval_jit, _compiled_memory(step))


def abstract_with_shardings(abstract: Any, shardings: Any) -> Any:
    """``ShapeDtypeStruct`` s carrying shardings (the restore target of a checkpoint)."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def host_metrics(metrics: dict) -> dict:
    """Device scalars -> Python floats / ints."""
    return {k: (int(v) if np.issubdtype(np.asarray(v).dtype, np.integer) else float(v))
            for k, v in jax.device_get(metrics).items()}


def replay_entry(record) -> memjax.optim.shared_seed.SharedSeedInfo:
    """The replay-log entry (host arrays) of a shared-seed MeZO step's record."""
    return jax.tree.map(np.asarray, jax.device_get(record))


def params_digest(params: Any) -> str:
    """First 16 hex digits of the sha256 of every parameter's bytes (in tree order).

    A replicated parameter is hashed from this process's own copy, so processes (or runs) whose
    digests agree hold bit-identical parameters; sharded ones are gathered first.
    """
    h = hashlib.sha256()
    for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
        if x.is_fully_replicated:
            value = np.asarray(x.addressable_data(0))
        elif x.is_fully_addressable:
            value = np.asarray(x)
        else:
            value = np.asarray(multihost_utils.process_allgather(x, tiled=True))
        h.update(jax.tree_util.keystr(path).encode() + value.tobytes())
    return h.hexdigest()[:16]
