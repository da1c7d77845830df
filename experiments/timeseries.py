"""Univariate time-series forecasting with a small Mamba model, on data statsmodels ships.

Series (:data:`SERIES`; loaded from the CSV files inside ``statsmodels.datasets``, no network):

* ``"co2"``: weekly atmospheric CO2 at Mauna Loa, 1958-2001 (ppm; 2284 points, the 59 missing
  weeks filled by linear interpolation in time), seasonal period 52.
* ``"sunspots"``: yearly sunspot numbers, 1700-2008 (309 points), period 11 (the solar cycle).
* ``"elnino"``: monthly sea-surface temperature of the El Nino region, 1950-2010 (degrees C; the
  year x month table read row by row, 732 points), period 12.

Data, for a series ``x`` of ``N`` points, window ``L`` and horizon ``H``:

* split by time: ``x[:cut]`` is train, ``x[cut:]`` validation, ``cut = N - round(val_fraction N)``;
* normalised with the train part's statistics only, ``z = (x - mean(x[:cut])) / std(x[:cut])``;
* a window with forecast origin ``o`` is ``(inputs z[o - L : o], targets z[o : o + H])``. Train
  windows have every target before ``cut`` (``L <= o <= cut - H``); validation windows have every
  target at or after ``cut`` (``cut <= o <= N - H``; their inputs may reach back into the train
  part, which is the past and known at forecast time). No target is in both sets.

Training batch ``step`` for ``seed`` takes the windows ``p = step * B + i`` (``i < B``) of a
sequence that visits every train window once per epoch, in the permutation
``numpy.random.default_rng([seed, 0, p // W]).permutation(W)`` of epoch ``p // W``: a pure function
of ``(seed, step)``, so a resumed run sees exactly the batches the first run would have seen.

Model (:class:`Forecaster`): the inputs are centred on the window's mean (a per-window
normalisation in the spirit of NLinear, Zeng et al. 2023), projected 1 -> ``d_model``, run through
``num_layers`` pre-norm residual Mamba blocks (``x + Mamba(RMSNorm(x))``, stacked and scanned), and
the last position is mapped to ``H`` changes added back onto the last value. The loss is the MSE
over the ``H`` targets, in normalised units. Baselines on the same validation targets: the last
value ``z[o - 1]`` and the seasonal naive forecast ``z[o + h - m * ceil((h + 1) / m)]`` for
``h = 0 .. H - 1`` and period ``m``.

``python -m experiments.timeseries --series co2 --steps 200`` trains one model and prints a table.

References:
  A. Gu and T. Dao, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces", arXiv
  2312.00752 (2023). A. Zeng, M. Chen, L. Zhang, Q. Xu, "Are Transformers Effective for Time Series
  Forecasting?", AAAI 2023, arXiv 2205.13504. R. J. Hyndman and G. Athanasopoulos, "Forecasting:
  Principles and Practice", 3rd ed., Sec. 5.2 (naive and seasonal naive methods).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from . import data as data_lib
from memjax.models.layers import RMSNorm
from memjax.models.lm import stack_layers
from memjax.models.mamba import Mamba

class SeriesInfo(NamedTuple):
    """What a series is: its sampling, seasonal period (in steps) and unit."""

    frequency: str
    period: int
    unit: str


SERIES: dict[str, SeriesInfo] = {
    "co2": SeriesInfo("weekly", 52, "ppm"),
    "sunspots": SeriesInfo("yearly", 11, "sunspot number"),
    "elnino": SeriesInfo("monthly", 12, "deg C"),
}


class Normaliser(NamedTuple):
    """``z = (x - mean) / std`` with the train part's statistics."""

    mean: float
    std: float


class ForecastData(NamedTuple):
    """A normalised series, its time split and its window shape.

    Attributes:
      name: the series' name.
      series: (N,) float32, the whole series normalised with the train statistics.
      cut: first validation index; ``series[:cut]`` is train, ``series[cut:]`` validation.
      window: L, input values per window.
      horizon: H, values forecast per window.
      normaliser: the train statistics (to go back to the series' units).
      period: the seasonal period m (steps).
    """

    name: str
    series: np.ndarray
    cut: int
    window: int
    horizon: int
    normaliser: Normaliser
    period: int


class Windows(NamedTuple):
    """A batch of windows. ``inputs``: (B, L) float32; ``targets``: (B, H) float32, the H values
    that follow each input window."""

    inputs: np.ndarray
    targets: np.ndarray


class ForecastHistory(NamedTuple):
    """What :func:`train_forecaster` measured (MSE in normalised units).

    Attributes:
      train_mse: (steps,) the training-batch MSE of every step (before its update).
      val_steps: the steps at which the validation MSE was measured (0 = before training).
      val_mse: the validation MSE at ``val_steps``.
      baselines: ``{"last value": mse, "seasonal naive (m=..)": mse}`` on the same targets.
      data: the :class:`ForecastData` trained on.
    """

    train_mse: np.ndarray
    val_steps: np.ndarray
    val_mse: np.ndarray
    baselines: dict[str, float]
    data: ForecastData


# ----------------------------------------------------------------------------- series


def _require_series(series_name: str) -> SeriesInfo:
    if series_name not in SERIES:
        raise ValueError(f"series_name={series_name!r} is not one of {tuple(SERIES)}")
    return SERIES[series_name]


def fill_gaps(values: np.ndarray) -> np.ndarray:
    """Missing values (NaN) replaced by linear interpolation between their neighbours (the nearest
    value at either end); (N,) -> (N,) float64."""
    values = np.asarray(values, np.float64)
    known = np.isfinite(values)
    if not known.any():
        raise ValueError("values has no finite entry to interpolate from")
    index = np.arange(len(values))
    return np.interp(index, index[known], values[known])


def load_series(series_name: str) -> np.ndarray:
    """The raw series ``series_name`` (one of :data:`SERIES`) as (N,) float64, no NaN, in time order.

    Raises:
      ValueError: ``series_name`` is unknown.
      ImportError: statsmodels is not installed.
    """
    _require_series(series_name)
    try:
        from statsmodels import datasets
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "experiments.timeseries reads its series from statsmodels: pip install statsmodels "
            "(or pip install 'memjax[experiments]')") from e
    if series_name == "co2":
        frame = datasets.co2.load_pandas().data
        return fill_gaps(frame["co2"].to_numpy())
    if series_name == "sunspots":
        return datasets.sunspots.load_pandas().data["SUNACTIVITY"].to_numpy(np.float64)
    frame = datasets.elnino.load_pandas().data.sort_values("YEAR")
    return frame.drop(columns="YEAR").to_numpy(np.float64).reshape(-1)  # year by year, Jan..Dec


def split_point(length: int, val_fraction: float) -> int:
    """First validation index when the last ``val_fraction`` of ``length`` values is validation."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction={val_fraction} must be in (0, 1)")
    return length - max(1, round(length * val_fraction))


def fit_normaliser(train: np.ndarray) -> Normaliser:
    """Mean and standard deviation of the (T,) train values (std 1 if they are constant)."""
    std = float(np.std(train))
    return Normaliser(float(np.mean(train)), std if std > 0 else 1.0)


def normalise(values: np.ndarray, normaliser: Normaliser) -> np.ndarray:
    """(...,) -> (...,) float32, ``(x - mean) / std``."""
    return ((np.asarray(values, np.float64) - normaliser.mean) / normaliser.std).astype(np.float32)


def denormalise(values: np.ndarray, normaliser: Normaliser) -> np.ndarray:
    """Inverse of :func:`normalise`, (...,) -> (...,) float64."""
    return np.asarray(values, np.float64) * normaliser.std + normaliser.mean


def prepare(values: np.ndarray, *, window: int, horizon: int = 1, val_fraction: float = 0.2,
            period: int = 1, name: str = "series") -> ForecastData:
    """Split ``values`` (N,) by time, normalise it with the train part and fix the window shape.

    Raises:
      ValueError: ``horizon < 1``, ``window < 1``, ``val_fraction`` outside (0, 1), a validation
        part shorter than ``horizon``, or a train part with no window of ``window + horizon`` values.
    """
    values = np.asarray(values, np.float64)
    if values.ndim != 1:
        raise ValueError(f"values must be a 1-D series, got shape {values.shape}")
    if horizon < 1:
        raise ValueError(f"horizon={horizon} must be >= 1")
    if window < 1:
        raise ValueError(f"window={window} must be >= 1")
    if period < 1:
        raise ValueError(f"period={period} must be >= 1")
    if not np.all(np.isfinite(values)):
        raise ValueError("values has NaN or infinite entries; fill them first (fill_gaps)")
    cut = split_point(len(values), val_fraction)
    if cut < window + horizon:
        raise ValueError(
            f"window={window} is too long for the {name} series: its train part has {cut} values, "
            f"fewer than window + horizon = {window + horizon}")
    if len(values) - cut < horizon:
        raise ValueError(
            f"horizon={horizon} is longer than the {name} validation part ({len(values) - cut} "
            f"values); raise val_fraction")
    normaliser = fit_normaliser(values[:cut])
    return ForecastData(name, normalise(values, normaliser), cut, window, horizon, normaliser, period)


def forecast_data(series_name: str, *, window: int = 64, horizon: int = 1,
                  val_fraction: float = 0.2) -> ForecastData:
    """:func:`prepare` applied to :func:`load_series` ``(series_name)`` with its seasonal period."""
    info = _require_series(series_name)
    return prepare(load_series(series_name), window=window, horizon=horizon,
                   val_fraction=val_fraction, period=info.period, name=series_name)


# ----------------------------------------------------------------------------- windows


def train_origins(data: ForecastData) -> np.ndarray:
    """Forecast origins o of the train windows, ``window <= o <= cut - horizon``."""
    return np.arange(data.window, data.cut - data.horizon + 1)


def val_origins(data: ForecastData) -> np.ndarray:
    """Forecast origins o of the validation windows, ``cut <= o <= N - horizon``."""
    return np.arange(data.cut, len(data.series) - data.horizon + 1)


def gather(series: np.ndarray, origins: np.ndarray, window: int, horizon: int) -> Windows:
    """(B,) origins -> :class:`Windows`: inputs ``series[o - L : o]``, targets ``series[o : o + H]``."""
    inputs = series[origins[:, None] + np.arange(-window, 0)[None, :]]
    targets = series[origins[:, None] + np.arange(horizon)[None, :]]
    return Windows(inputs.astype(np.float32), targets.astype(np.float32))


def train_windows(data: ForecastData, batch_size: int, seed: int, step: int) -> Windows:
    """Training batch ``step`` of the run seeded ``seed``: a pure function of ``(seed, step)``.

    Window ``p = step * batch_size + i`` is train window ``perm_e[p mod W]`` of epoch ``e = p // W``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    if step < 0:
        raise ValueError(f"step={step} must be >= 0")
    origins = train_origins(data)
    # The LM data's epoch schedule over "windows" of one origin each (offset 0, no shift).
    picked = origins[data_lib.window_starts(len(origins), 1, batch_size, seed, step)]
    return gather(data.series, picked, data.window, data.horizon)


def val_windows(data: ForecastData) -> Windows:
    """Every validation window, in time order (fixed)."""
    return gather(data.series, val_origins(data), data.window, data.horizon)


# ----------------------------------------------------------------------------- baselines


def last_value_forecast(series: np.ndarray, origins: np.ndarray, horizon: int) -> np.ndarray:
    """(B,) origins -> (B, H): every step forecast as ``series[o - 1]``."""
    return np.repeat(series[origins - 1][:, None], horizon, axis=1)


def seasonal_naive_forecast(series: np.ndarray, origins: np.ndarray, horizon: int,
                            period: int) -> np.ndarray:
    """(B,) origins -> (B, H): step ``o + h`` forecast as ``series[o + h - m * ceil((h + 1) / m)]``,
    the value one season earlier (Hyndman and Athanasopoulos, Sec. 5.2)."""
    h = np.arange(horizon)
    lag = period * ((h + period) // period)  # m * ceil((h + 1) / m)
    index = origins[:, None] + (h - lag)[None, :]
    if index.min() < 0:
        raise ValueError(f"period={period} reaches before the start of the series")
    return series[index]


def baseline_mse(data: ForecastData) -> dict[str, float]:
    """Validation MSE (normalised units) of the last-value and seasonal naive forecasts."""
    origins, targets = val_origins(data), val_windows(data).targets
    forecasts = {
        "last value": last_value_forecast(data.series, origins, data.horizon),
        f"seasonal naive (m={data.period})":
            seasonal_naive_forecast(data.series, origins, data.horizon, data.period),
    }
    return {k: float(np.mean((f - targets) ** 2)) for k, f in forecasts.items()}


# ----------------------------------------------------------------------------- model


class MambaBlock(nnx.Module):
    """Pre-norm residual Mamba block: (B, L, d_model) -> (B, L, d_model), ``x + Mamba(RMSNorm(x))``."""

    def __init__(self, d_model: int, *, d_state: int, rngs: nnx.Rngs):
        self.norm = RMSNorm(d_model)
        self.mixer = Mamba(d_model, d_state=d_state, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return x + self.mixer(self.norm(x))


class Forecaster(nnx.Module):
    """Mamba forecaster: (B, L) windows -> (B, H) forecasts of the next H values.

    Args:
      horizon: H, values forecast per window.
      d_model: model width.
      num_layers: Mamba blocks (stacked, run with ``lax.scan``).
      d_state: SSM state size N per channel.
      rngs: ``nnx.Rngs`` seeding every parameter.
    """

    def __init__(self, horizon: int = 1, *, d_model: int = 16, num_layers: int = 2,
                 d_state: int = 16, rngs: nnx.Rngs):
        for name, value in (("horizon", horizon), ("d_model", d_model), ("num_layers", num_layers),
                            ("d_state", d_state)):
            if value < 1:
                raise ValueError(f"{name}={value} must be >= 1")
        self.horizon = horizon
        self.in_proj = nnx.Linear(1, d_model, rngs=rngs)
        self.blocks = stack_layers(lambda r: MambaBlock(d_model, d_state=d_state, rngs=r),
                                   num_layers, rngs.params())
        self.final_norm = RMSNorm(d_model)
        self.head = nnx.Linear(d_model, horizon, rngs=rngs)

    def __call__(self, inputs: jax.Array) -> jax.Array:
        """(B, L) float -> (B, H) float32 forecasts in the inputs' units."""
        if inputs.ndim != 2:
            raise ValueError(f"inputs must be (batch, window), got shape {inputs.shape}")
        last = inputs[:, -1:]  # (B, 1)
        centred = inputs - jnp.mean(inputs, axis=1, keepdims=True)
        x = self.in_proj(centred[..., None])  # (B, L, d_model)
        graphdef, state = nnx.split(self.blocks)

        def body(h, layer_state):
            return nnx.merge(graphdef, layer_state)(h), None

        x, _ = jax.lax.scan(body, x, state)
        change = self.head(self.final_norm(x[:, -1]))  # (B, H)
        return (last + change).astype(jnp.float32)


def forecast_mse(model: Forecaster, windows: Windows) -> jax.Array:
    """Mean squared error of ``model``'s forecasts over every target of ``windows`` (a scalar)."""
    return jnp.mean(jnp.square(model(jnp.asarray(windows.inputs)) - jnp.asarray(windows.targets)))


# ----------------------------------------------------------------------------- training


def train_forecaster(series_name: str, steps: int = 200, seed: int = 0, *, window: int = 64,
                     horizon: int = 1, batch_size: int = 32, d_model: int = 16, num_layers: int = 2,
                     d_state: int = 16, learning_rate: float = 3e-3, eval_every: int = 50,
                     val_fraction: float = 0.2, data: ForecastData | None = None) -> ForecastHistory:
    """Train a :class:`Forecaster` on ``series_name`` with Adam and report its MSE history.

    Args:
      series_name: one of :data:`SERIES` (ignored when ``data`` is given).
      steps: optimizer steps.
      seed: seeds the parameters and the batch order (batch ``step`` is a function of both).
      window, horizon, val_fraction: see :func:`prepare`.
      batch_size: windows per step.
      d_model, num_layers, d_state: the model's size.
      learning_rate: Adam step size (constant).
      eval_every: validation MSE every this many steps (and before the first and after the last).
      data: already prepared data (e.g. from :func:`prepare` on your own series).

    Returns:
      A :class:`ForecastHistory`.

    Raises:
      ValueError: an unknown series, a bad shape (see :func:`prepare`), ``steps < 1`` or
        ``eval_every < 1``.
    """
    if steps < 1:
        raise ValueError(f"steps={steps} must be >= 1")
    if eval_every < 1:
        raise ValueError(f"eval_every={eval_every} must be >= 1")
    if data is None:
        data = forecast_data(series_name, window=window, horizon=horizon, val_fraction=val_fraction)
    model = Forecaster(data.horizon, d_model=d_model, num_layers=num_layers, d_state=d_state,
                       rngs=nnx.Rngs(seed))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.adam(learning_rate)
    opt_state = tx.init(params)

    def loss_fn(params, inputs, targets):
        return forecast_mse(nnx.merge(graphdef, params, rest), Windows(inputs, targets))

    @jax.jit
    def train_step(params, opt_state, inputs, targets):
        loss, grads = jax.value_and_grad(loss_fn)(params, inputs, targets)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    val = val_windows(data)
    eval_loss = jax.jit(loss_fn)
    train_mse, val_steps, val_mse = [], [0], [float(eval_loss(params, val.inputs, val.targets))]
    for step in range(steps):
        batch = train_windows(data, batch_size, seed, step)
        params, opt_state, loss = train_step(params, opt_state, batch.inputs, batch.targets)
        train_mse.append(loss)
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            val_steps.append(step + 1)
            val_mse.append(float(eval_loss(params, val.inputs, val.targets)))
    return ForecastHistory(np.asarray(jax.device_get(train_mse), np.float64), np.asarray(val_steps),
                           np.asarray(val_mse), baseline_mse(data), data)


# ----------------------------------------------------------------------------- command line


def format_table(history: ForecastHistory) -> str:
    """The validation MSE (normalised) and RMSE (series units) of the model and the baselines."""
    data, info = history.data, SERIES.get(history.data.name)
    unit = info.unit if info else "units"
    rows = [(f"mamba forecaster, step {s}", m) for s, m in zip(history.val_steps, history.val_mse)
            if s in (0, history.val_steps[-1])]
    rows += list(history.baselines.items())
    n = len(data.series)
    head = (f"{data.name}: {n} points, train {data.cut} / validation {n - data.cut}, "
            f"window {data.window}, horizon {data.horizon}")
    width = max(len(name) for name, _ in rows)
    lines = [head, f"{'method':<{width}}  {'val MSE':>9}  val RMSE ({unit})"]
    for name, mse in rows:
        lines.append(f"{name:<{width}}  {mse:9.4f}  {math.sqrt(mse) * data.normaliser.std:.4g}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m experiments.timeseries --series co2 --steps 200``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--series", default="co2", choices=tuple(SERIES))
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--horizon", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--d-model", type=int, default=16)
    parser.add_argument("--num-layers", type=int, default=2)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--val-fraction", type=float, default=0.2)
    args = parser.parse_args(argv)
    history = train_forecaster(
        args.series, args.steps, args.seed, window=args.window, horizon=args.horizon,
        batch_size=args.batch_size, d_model=args.d_model, num_layers=args.num_layers,
        learning_rate=args.learning_rate, val_fraction=args.val_fraction)
    print(format_table(history))


if __name__ == "__main__":
    main()
