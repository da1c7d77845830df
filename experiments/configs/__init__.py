"""Named experiments: ``experiments/configs/<name>.py`` defines ``CONFIG``, a :class:`Config`."""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil

from ..config import Config, ConfigError, run_config


def names() -> list[str]:
    """The available experiment names."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def load(name: str) -> Config:
    """The ``CONFIG`` of ``experiments/configs/<name>.py`` with ``name`` filled in, or, for a path
    ending in ``.json``, the config saved in a run directory (:func:`experiments.config.run_config`)."""
    if name.endswith(".json"):
        return run_config(name)
    if name not in names():
        raise ConfigError(f"unknown config {name!r}; available: {', '.join(names())}")
    config = importlib.import_module(f"{__name__}.{name}").CONFIG
    if not isinstance(config, Config):
        raise ConfigError(f"experiments/configs/{name}.py: CONFIG must be an experiments.config.Config")
    return dataclasses.replace(config, name=name)
