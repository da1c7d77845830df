"""The device mesh and the shardings of parameters and batches.

The mesh has two axes, ``("data", "fsdp")``, both ``AxisType.Auto`` (memjax's low-rank optimizers
support automatic axes, not explicit ones). Batches are split over both axes; parameters are
sharded by their logical axis names (``nnx.with_partitioning`` metadata such as ``"embed"``,
``"mlp"``, ``"vocab"``, ``"layers"``) through ``MeshConfig.rules`` (e.g. ``embed -> fsdp``), and a
dimension that the mesh axis does not divide stays replicated. Optimizer state follows the
parameters (:func:`memjax.optim.state_shardings`).
"""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import NamedSharding, PartitionSpec

from .config import ConfigError, MeshConfig

AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")


def mesh_shape(cfg: MeshConfig, num_devices: int) -> tuple[int, int]:
    """``(data, fsdp)`` with one ``-1`` resolved; raises :class:`ConfigError` if it does not fit."""
    sizes = [cfg.data, cfg.fsdp]
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ConfigError(f"mesh: data={cfg.data}, fsdp={cfg.fsdp}; use positive sizes and at most one -1")
    known = abs(sizes[0] * sizes[1]) if -1 in sizes else sizes[0] * sizes[1]
    if -1 in sizes:
        if num_devices % known:
            raise ConfigError(
                f"mesh: {num_devices} devices cannot be split into data={cfg.data} x fsdp={cfg.fsdp}")
        sizes[sizes.index(-1)] = num_devices // known
    if sizes[0] * sizes[1] != num_devices:
        raise ConfigError(
            f"mesh: data={sizes[0]} x fsdp={sizes[1]} = {sizes[0] * sizes[1]} devices, but "
            f"{num_devices} are available")
    return sizes[0], sizes[1]


def make_mesh(cfg: MeshConfig, devices: Any = None) -> jax.sharding.Mesh:
    """The ``(data, fsdp)`` mesh over ``devices`` (default all devices)."""
    devices = jax.devices() if devices is None else devices
    shape = mesh_shape(cfg, len(devices))
    unknown = {mesh_axis for _, mesh_axis in cfg.rules} - set(AXES)
    if unknown:
        raise ConfigError(f"mesh.rules name unknown mesh axes {sorted(unknown)}; use {AXES}")
    return jax.make_mesh(shape, AXES, devices=devices, axis_types=(jax.sharding.AxisType.Auto,) * 2)


def check_batch(mesh: jax.sharding.Mesh, batch_size: int, grad_accum: int) -> None:
    """Raises :class:`ConfigError` unless every micro-batch splits evenly over the batch axes."""
    ways = mesh.shape["data"] * mesh.shape["fsdp"]
    micro = batch_size // grad_accum
    if micro % ways:
        raise ConfigError(
            f"data.batch_size={batch_size} / schedule.grad_accum={grad_accum} = {micro} sequences per "
            f"micro-batch cannot be split over the mesh's {ways} batch shards (data x fsdp)")


def logical_spec(names: tuple, shape: tuple[int, ...], rules: dict[str, str],
                 mesh: jax.sharding.Mesh) -> PartitionSpec:
    """Logical axis names -> a ``PartitionSpec``; each mesh axis is used once, where it divides."""
    used, out = set(), []
    for name, size in zip(tuple(names) + (None,) * (len(shape) - len(names)), shape):
        axis = rules.get(name) if name is not None else None
        if axis is None or axis in used or size % mesh.shape[axis]:
            out.append(None)
        else:
            out.append(axis)
            used.add(axis)
    return PartitionSpec(*out)


def param_shardings(params: Any, logical: Any, rules: tuple[tuple[str, str], ...],
                    mesh: jax.sharding.Mesh) -> Any:
    """``NamedSharding`` per parameter.

    Args:
      params: pytree of arrays or ``ShapeDtypeStruct``.
      logical: pytree like ``params`` of ``PartitionSpec`` s of logical names (``nnx.get_partition_spec``).
      rules: logical name -> mesh axis pairs.
      mesh: the mesh.
    """
    table = dict(rules)
    return jax.tree.map(
        lambda p, spec: NamedSharding(mesh, logical_spec(tuple(spec), p.shape, table, mesh)),
        params, logical, is_leaf=lambda x: isinstance(x, PartitionSpec))


def batch_sharding(mesh: jax.sharding.Mesh, ndim: int, batch_axis: int = 1) -> NamedSharding:
    """Split axis ``batch_axis`` of an ``ndim``-D array over every batch mesh axis."""
    spec = [None] * ndim
    spec[batch_axis] = BATCH_AXES
    return NamedSharding(mesh, PartitionSpec(*spec))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())
