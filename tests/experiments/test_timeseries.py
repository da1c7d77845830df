"""Time-series forecasting data and model: loading, time split, normalisation, windows, training."""

import numpy as np
import pytest

pytest.importorskip("statsmodels")

from experiments import timeseries as ts


@pytest.mark.parametrize("name, length", [("co2", 2284), ("sunspots", 309), ("elnino", 732)])
def test_each_series_loads_without_nan(name, length):
    values = ts.load_series(name)
    assert values.shape == (length,) and values.dtype == np.float64
    assert np.all(np.isfinite(values))


def test_elnino_is_the_year_by_month_table_read_row_by_row():
    from statsmodels.datasets import elnino

    table = elnino.load_pandas().data
    values = ts.load_series("elnino")
    np.testing.assert_array_equal(values[:12], table.iloc[0, 1:].to_numpy(np.float64))
    np.testing.assert_array_equal(values[12:24], table.iloc[1, 1:].to_numpy(np.float64))


def test_co2_gaps_are_interpolated_between_neighbours():
    from statsmodels.datasets import co2

    raw = co2.load_pandas().data["co2"].to_numpy()
    filled = ts.load_series("co2")
    gap = int(np.flatnonzero(np.isnan(raw))[0])
    np.testing.assert_array_equal(filled[~np.isnan(raw)], raw[~np.isnan(raw)])
    lo, hi = sorted((filled[gap - 1], filled[gap + 1]))
    assert lo <= filled[gap] <= hi
    np.testing.assert_allclose(ts.fill_gaps(np.array([np.nan, 1.0, np.nan, 3.0, np.nan])),
                               [1.0, 1.0, 2.0, 3.0, 3.0])


def test_split_is_by_time_and_disjoint():
    data = ts.prepare(np.arange(100.0), window=8, horizon=3, val_fraction=0.2)
    assert data.cut == 80
    train_targets = ts.train_origins(data)[:, None] + np.arange(3)
    val_targets = ts.val_origins(data)[:, None] + np.arange(3)
    assert train_targets.max() < data.cut <= val_targets.min()
    assert not set(train_targets.ravel()) & set(val_targets.ravel())
    assert set(val_targets.ravel()) == set(range(80, 100))  # every validation value is a target
    assert ts.train_origins(data).min() - 8 == 0  # the first window starts at the first value


def test_normalisation_uses_train_statistics_only():
    rng = np.random.default_rng(0)
    values = rng.normal(5.0, 2.0, 200)
    data = ts.prepare(values, window=10, val_fraction=0.25)
    changed = values.copy()
    changed[data.cut:] += 1000.0  # validation values must not move the statistics
    other = ts.prepare(changed, window=10, val_fraction=0.25)
    assert data.normaliser == other.normaliser
    np.testing.assert_array_equal(data.series[:data.cut], other.series[:data.cut])
    assert abs(data.series[:data.cut].mean()) < 1e-5
    assert abs(data.series[:data.cut].std() - 1) < 1e-5
    np.testing.assert_allclose(ts.denormalise(data.series, data.normaliser), values, rtol=1e-5)


def test_windows_are_a_pure_function_of_seed_and_step_and_targets_follow_inputs():
    data = ts.prepare(np.arange(300.0) ** 1.5, window=16, horizon=4)
    a, b = ts.train_windows(data, 8, 3, 5), ts.train_windows(data, 8, 3, 5)
    np.testing.assert_array_equal(a.inputs, b.inputs)
    np.testing.assert_array_equal(a.targets, b.targets)
    assert a.inputs.shape == (8, 16) and a.targets.shape == (8, 4) and a.inputs.dtype == np.float32
    assert not np.array_equal(a.inputs, ts.train_windows(data, 8, 3, 6).inputs)
    assert not np.array_equal(a.inputs, ts.train_windows(data, 8, 4, 5).inputs)
    # Each row is a contiguous piece of the series: inputs then the next `horizon` values.
    for row_in, row_out in zip(a.inputs, a.targets):
        o = int(np.flatnonzero(data.series == row_in[-1])[0]) + 1
        np.testing.assert_array_equal(row_in, data.series[o - 16:o])
        np.testing.assert_array_equal(row_out, data.series[o:o + 4])
    # One epoch visits every train window once.
    count = len(ts.train_origins(data))
    first = np.concatenate([ts.train_windows(data, 1, 0, s).inputs[:, -1] for s in range(count)])
    assert len(set(first.tolist())) == count


def test_real_series_targets_are_the_following_values():
    data = ts.forecast_data("elnino", window=24, horizon=2)
    batch = ts.train_windows(data, 4, 0, 0)
    raw = ts.load_series("elnino")
    for row_in, row_out in zip(batch.inputs, batch.targets):
        starts = [s for s in range(len(raw) - 26) if np.allclose(
            ts.normalise(raw[s:s + 24], data.normaliser), row_in)]
        assert len(starts) == 1
        np.testing.assert_allclose(ts.denormalise(row_out, data.normaliser), raw[starts[0] + 24:starts[0] + 26],
                                   rtol=1e-5)


def test_baselines_on_a_periodic_series():
    values = np.tile([0.0, 1.0, 3.0, 2.0], 50)
    data = ts.prepare(values, window=8, horizon=3, period=4)
    scores = ts.baseline_mse(data)
    assert scores["seasonal naive (m=4)"] == 0.0 and scores["last value"] > 0.1


@pytest.mark.slow
def test_short_training_lowers_validation_mse():
    history = ts.train_forecaster("elnino", steps=40, seed=0, window=24, batch_size=16, d_model=8,
                                  num_layers=1, d_state=4, learning_rate=1e-2, eval_every=20)
    assert history.train_mse.shape == (40,)
    assert list(history.val_steps) == [0, 20, 40]
    assert np.all(np.isfinite(history.val_mse))
    assert history.val_mse[-1] < history.val_mse[0]
    assert set(history.baselines) == {"last value", "seasonal naive (m=12)"}


@pytest.mark.parametrize("kwargs, parameter", [
    ({"series_name": "nile"}, "series_name"),
    ({"series_name": "sunspots", "window": 400}, "window"),
    ({"series_name": "co2", "horizon": 0}, "horizon"),
])
def test_bad_input_raises_a_value_error_naming_the_parameter(kwargs, parameter):
    with pytest.raises(ValueError, match=parameter):
        ts.train_forecaster(steps=1, **kwargs)
    if parameter == "series_name":
        with pytest.raises(ValueError, match=parameter):
            ts.load_series(kwargs["series_name"])
