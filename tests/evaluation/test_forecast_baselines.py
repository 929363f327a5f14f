"""Classical forecast baselines (condiff.evaluation.forecast_baselines): seasonal naive is exact on a pure season,
ETS and ARIMA approach the exact conditional CRPS of a Gaussian AR(1), nothing at or past an origin is seen, and
bad inputs are one-line ConfigErrors."""

import math

import pytest
import torch

from condiff.data.series import ForecastSeries
from condiff.errors import ConfigError
from condiff.evaluation.crps import crps_gaussian
from condiff.evaluation.forecast_baselines import (
    GaussianForecast,
    arima_forecast,
    ets_forecast,
    forecast,
    score,
    seasonal_naive_forecast,
)

F64 = torch.float64


def _ar1(n: int, phi: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    e = torch.randn(n, generator=g, dtype=F64)
    y = torch.empty(n, dtype=F64)
    y[0] = e[0] / math.sqrt(1 - phi**2)
    for t in range(1, n):
        y[t] = phi * y[t - 1] + e[t]
    return y


def test_seasonal_naive_is_exact_on_a_pure_season():
    P = 7
    pattern = torch.tensor([3.0, -1.0, 4.0, 1.5, -5.0, 9.0, 2.6], dtype=F64)
    y = pattern.repeat(20)
    origins, H = [100, 110, 125], 10
    f = seasonal_naive_forecast(y, 100, origins, H, season=P)
    targets = torch.stack([y[o : o + H] for o in origins])
    assert torch.equal(f.mean, targets)
    assert torch.equal(f.std, torch.zeros_like(f.std))  # in-sample residuals are all zero
    assert score(f, targets) == {"crps": 0.0, "ncrps": 0.0}


def test_seasonal_naive_scale_is_the_seasonal_random_walk():
    y = _ar1(300, 0.5, 3)
    f = seasonal_naive_forecast(y, 200, [200], 9, season=4)
    s = float((y[4:200] - y[:196]).pow(2).mean().sqrt())
    k = torch.tensor([1, 1, 1, 1, 2, 2, 2, 2, 3], dtype=F64)
    assert torch.allclose(f.std[0], s * k.sqrt())
    assert torch.equal(f.mean[0], y[196:200].repeat(3)[:9])


@pytest.mark.parametrize("method", ["ets", "arima"])
def test_crps_near_the_exact_conditional_on_ar1(method):
    phi, n, fit_end, H = 0.9, 900, 600, 1
    y = _ar1(n, phi, 0)
    origins = list(range(fit_end, n - H + 1))
    if method == "ets":
        f = ets_forecast(y, fit_end, origins, H)
    else:
        f = arima_forecast(y, fit_end, origins, H, order=(1, 0, 0))
    targets = torch.stack([y[o : o + H] for o in origins])
    h = torch.arange(1, H + 1, dtype=F64)
    last = torch.stack([y[o - 1] for o in origins]).unsqueeze(1)
    exact_mean = last * phi**h
    exact_std = torch.sqrt((1 - phi ** (2 * h)) / (1 - phi**2)).expand_as(exact_mean)
    exact = float(crps_gaussian(exact_mean, exact_std, targets).mean())
    got = score(f, targets)["crps"]
    assert got == pytest.approx(exact, rel=0.10)


def test_arima_multi_step_matches_the_exact_ar1_law():
    phi = 0.8
    y = _ar1(500, phi, 1)
    f = arima_forecast(y, 400, [420, 450], 4, order=(1, 0, 0))
    h = torch.arange(1, 5, dtype=F64)
    exact_std = torch.sqrt((1 - phi ** (2 * h)) / (1 - phi**2))
    assert torch.allclose(f.std[0], exact_std, rtol=0.1)
    assert torch.allclose(f.mean[1], y[449] * phi**h, atol=0.15 * float(y[449].abs()) + 0.1)


@pytest.mark.parametrize("method", ["seasonal-naive", "ets", "arima"])
def test_forecast_never_sees_the_origin_or_later(method):
    y = _ar1(240, 0.7, 2)
    s = ForecastSeries("nile", y, 1, 20, 5, 4)
    v = y.clone()
    v[s.origins[0] :] += 100.0  # every test point moved
    moved = ForecastSeries("nile", v, 1, 20, 5, 4)
    a, b = forecast(s, method), forecast(moved, method)
    assert torch.allclose(a.mean[0], b.mean[0]) and torch.allclose(a.std[0], b.std[0])


def test_score_normalised_crps():
    f = GaussianForecast(torch.zeros(2, 2, dtype=F64), torch.ones(2, 2, dtype=F64))
    y = torch.tensor([[1.0, -2.0], [0.5, 0.0]], dtype=F64)
    crps = crps_gaussian(f.mean, f.std, y)
    got = score(f, y)
    assert got["crps"] == pytest.approx(float(crps.mean()))
    assert got["ncrps"] == pytest.approx(float(crps.sum()) / 3.5)


def test_bad_inputs_are_one_line_config_errors():
    y = _ar1(100, 0.5, 0)
    s = ForecastSeries("nile", y, 1, 20, 5, 4)
    cases = [
        lambda: seasonal_naive_forecast(y, 80, [70], 5),
        lambda: seasonal_naive_forecast(y, 80, [97], 5),
        lambda: seasonal_naive_forecast(y, 80, [], 5),
        lambda: seasonal_naive_forecast(y, 80, [80], 0),
        lambda: seasonal_naive_forecast(y, 80, [80], 5, season=80),
        lambda: seasonal_naive_forecast(y.reshape(10, 10), 8, [8], 1),
        lambda: seasonal_naive_forecast(torch.full((100,), math.nan, dtype=F64), 80, [80], 5),
        lambda: ets_forecast(y, 80, [80], 5, damped=True),
        lambda: ets_forecast(y, 80, [80], 5, season=50),
        lambda: arima_forecast(y, 80, [80], 5, order=(1, 0)),
        lambda: arima_forecast(y, 80, [80], 5, order=(1, -1, 0)),
        lambda: arima_forecast(y, 80, [80], 5, seasonal_order=(1, 0, 0, 1)),
        lambda: arima_forecast(y, 80, [80], 5, trend="x"),
        lambda: forecast(s, "prophet"),
        lambda: score(GaussianForecast(torch.zeros(1, 2, dtype=F64), torch.ones(1, 2, dtype=F64)), torch.zeros(2)),
    ]
    for case in cases:
        with pytest.raises(ConfigError) as e:
            case()
        assert "\n" not in str(e.value)
