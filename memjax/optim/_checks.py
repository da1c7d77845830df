"""Argument checks shared by every transform: one message per kind of mistake, naming the
argument (hyperparameters may arrive as traced arrays under ``optax.inject_hyperparams``: only
Python numbers are checked)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_int(name: str, value, minimum: int) -> None:
    """``TypeError`` unless ``value`` is an int, ``ValueError`` if it is below ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= {minimum}, got {type(value).__name__} "
                        f"{value!r}.")
    if value < minimum:
        raise ValueError(f"{name}={value} must be an int >= {minimum}.")


def check_choice(name: str, value, choices: Sequence) -> None:
    """``ValueError`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name}={value!r} is unknown; choose one of {tuple(choices)}.")


def check_nonnegative(name: str, value) -> None:
    """``ValueError`` for a Python number below 0."""
    if _number(value) and value < 0:
        raise ValueError(f"{name}={value} must be >= 0.")


def check_fraction(name: str, value) -> None:
    """``ValueError`` unless ``value`` is a number in ``(0, 1]``."""
    if not _number(value) or not 0 < value <= 1:
        raise ValueError(f"{name}={value!r} must lie in (0, 1].")


def check_adam(b1, b2, eps) -> None:
    """``ValueError`` for Adam decays outside ``[0, 1)`` or a negative ``eps``."""
    for name, value in (("b1", b1), ("b2", b2)):
        if _number(value) and not 0.0 <= value < 1.0:
            raise ValueError(f"{name}={value} must lie in [0, 1).")
    check_nonnegative("eps", eps)


def check_learning_rate(value, name: str = "learning_rate") -> None:
    """``TypeError`` unless ``value`` is a number, a numeric scalar array (traced under
    ``optax.inject_hyperparams``) or a schedule (a callable ``step -> rate``). A negative rate
    stays allowed, as in optax."""
    if callable(value) or _number(value):
        return
    dtype = getattr(value, "dtype", None)
    if dtype is not None and np.issubdtype(np.dtype(dtype), np.number) and np.ndim(value) == 0:
        return
    raise TypeError(f"{name} must be a number, a scalar array or an optax schedule (a callable "
                    f"step -> rate), got {type(value).__name__} {value!r}.")
