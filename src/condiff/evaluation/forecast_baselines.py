"""Classical forecast baselines with Gaussian predictives, scored by the closed-form Gaussian CRPS
(``condiff.evaluation.crps.crps_gaussian``) on rolling-origin test windows (``condiff.data.series``).

Every forecaster takes the whole series ``values`` (N,), the end of its training part ``fit_end``, the forecast
origins and the horizon H, and returns a ``GaussianForecast`` of (W, H) means and standard deviations. Parameters
are fitted on ``values[:fit_end]`` only; the forecast at origin o conditions on ``values[:o]`` with those
parameters held fixed (statsmodels' ``MLEResults.apply``, no refit), so no point at or past an origin is seen.

- seasonal naive: the last season repeated, ``mean_h = y_{o - P + ((h - 1) mod P)}``; its standard deviation is
  ``s sqrt(k_h)`` with ``k_h = floor((h - 1) / P) + 1`` seasons ahead (the seasonal random walk) and ``s`` the
  root mean square of the in-sample residuals ``y_t - y_{t - P}`` on the training part.
- ETS: statsmodels' linear Gaussian state-space ``ExponentialSmoothing`` (additive errors; optional additive and
  damped trend, additive season), initial states estimated as parameters.
- ARIMA: statsmodels' ``SARIMAX`` with a small fixed order per series.

Metrics (TSDiff, Kollovieh et al., NeurIPS 2023, sec. 5): the mean CRPS over all forecast points and the normalised
CRPS, ``sum CRPS / sum |y|``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

from condiff.data.series import ForecastSeries
from condiff.errors import ConfigError, check_int, one_of
from condiff.evaluation.crps import crps_gaussian

Tensor = torch.Tensor
F64 = torch.float64


@dataclass(frozen=True, eq=False)
class GaussianForecast:
    """Predictive means and standard deviations, both (W, H) float64."""

    mean: Tensor
    std: Tensor


def _check(values, fit_end, origins, horizon):
    if not torch.is_tensor(values) or values.dim() != 1 or not values.is_floating_point():
        raise ConfigError("series values must be a 1-D floating tensor")
    if not bool(torch.all(torch.isfinite(values))):
        raise ConfigError("series values must be finite")
    N = values.numel()
    fit_end = check_int("fit end", fit_end, lo=2, hi=N)
    H = check_int("horizon", horizon, lo=1)
    origins = list(origins)
    if not origins:
        raise ConfigError("forecast origins must not be empty")
    for o in origins:
        check_int("forecast origin", o, lo=fit_end, hi=N - H, accepted=f"an integer in [fit end {fit_end}, {N - H}]")
    return values.to(F64), fit_end, [int(o) for o in origins], H


def seasonal_naive_forecast(values, fit_end: int, origins, horizon: int, season: int = 1) -> GaussianForecast:
    """Seasonal naive with the seasonal-random-walk Gaussian predictive (module docstring)."""
    y, fit_end, origins, H = _check(values, fit_end, origins, horizon)
    P = check_int("season length", season, lo=1, hi=fit_end - 1)
    resid = y[P:fit_end] - y[: fit_end - P]
    scale = float(resid.pow(2).mean().sqrt())
    h = torch.arange(H)
    mean = torch.stack([y[o - P + h % P] for o in origins])
    std = scale * torch.sqrt((h // P + 1).to(F64)).expand(len(origins), H)
    return GaussianForecast(mean, std.clone())


def _statespace(model_cls, kwargs, y: Tensor, fit_end: int, origins, H: int) -> GaussianForecast:
    arr = y.numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # statsmodels' convergence and frequency chatter
        fit = model_cls(arr[:fit_end], **kwargs).fit(disp=False)
        means, stds = [], []
        for o in origins:
            pred = fit.apply(arr[:o]).get_forecast(H)
            means.append(torch.as_tensor(pred.predicted_mean, dtype=F64))
            stds.append(torch.as_tensor(pred.var_pred_mean, dtype=F64).clamp_min(0).sqrt())
    mean, std = torch.stack(means), torch.stack(stds)
    if not (bool(torch.all(torch.isfinite(mean))) and bool(torch.all(torch.isfinite(std)))):
        raise ConfigError(f"{model_cls.__name__} gave a non-finite forecast")
    return GaussianForecast(mean, std)


def ets_forecast(
    values, fit_end: int, origins, horizon: int, trend: bool = False, damped: bool = False, season: int = 1
) -> GaussianForecast:
    """Additive-error ETS (statsmodels' state-space ExponentialSmoothing); ``season`` > 1 adds an additive
    season of that length."""
    from statsmodels.tsa.statespace.exponential_smoothing import ExponentialSmoothing

    y, fit_end, origins, H = _check(values, fit_end, origins, horizon)
    P = check_int("season length", season, lo=1, hi=fit_end // 2)
    if damped and not trend:
        raise ConfigError("a damped trend needs trend=True")
    kwargs = dict(trend=bool(trend), damped_trend=bool(damped), initialization_method="estimated")
    if P > 1:
        kwargs["seasonal"] = P
    return _statespace(ExponentialSmoothing, kwargs, y, fit_end, origins, H)


def arima_forecast(
    values, fit_end: int, origins, horizon: int, order=(1, 0, 0), seasonal_order=(0, 0, 0, 0), trend: str = "n"
) -> GaussianForecast:
    """SARIMAX(order) x (seasonal_order) with ``trend`` ('n', 'c', 't' or 'ct'), fitted by maximum likelihood."""
    from statsmodels.tsa.statespace.sarimax import SARIMAX

    y, fit_end, origins, H = _check(values, fit_end, origins, horizon)
    order, seasonal_order = tuple(order), tuple(seasonal_order)
    if len(order) != 3 or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 0 for k in order):
        raise ConfigError(f"ARIMA order must be three integers (p, d, q) >= 0, got {order!r}")
    ok = len(seasonal_order) == 4 and all(isinstance(k, int) and not isinstance(k, bool) for k in seasonal_order)
    if not ok or min(seasonal_order) < 0 or (any(seasonal_order[:3]) and seasonal_order[3] < 2):
        raise ConfigError(f"seasonal order must be (P, D, Q, s) >= 0 with s >= 2 when used, got {seasonal_order!r}")
    if trend not in ("n", "c", "t", "ct"):
        raise one_of("ARIMA trend", trend, ["n", "c", "t", "ct"])
    kwargs = dict(order=order, seasonal_order=seasonal_order, trend=trend)
    return _statespace(SARIMAX, kwargs, y, fit_end, origins, H)


def score(forecast: GaussianForecast, targets) -> dict:
    """Mean CRPS over all points and normalised CRPS (sum CRPS / sum |y|) of ``forecast`` at ``targets``."""
    y = torch.as_tensor(targets, dtype=F64)
    if y.shape != forecast.mean.shape:
        raise ConfigError(f"targets have shape {tuple(y.shape)} but the forecast has {tuple(forecast.mean.shape)}")
    crps = crps_gaussian(forecast.mean, forecast.std, y)
    denom = float(y.abs().sum())
    return {"crps": float(crps.mean()), "ncrps": float(crps.sum()) / denom if denom > 0 else math.nan}


# per series: ETS options and ARIMA options (small fixed orders)
SPECS = {
    "co2": (
        dict(trend=True, damped=True, season=12),
        dict(order=(1, 1, 1), seasonal_order=(0, 1, 1, 12)),
    ),
    "sunspots": (
        dict(season=11),
        dict(order=(3, 0, 0), trend="c"),
    ),
    "nile": (
        dict(),
        dict(order=(0, 1, 1)),
    ),
}

METHODS = ("seasonal-naive", "ets", "arima")


def forecast(series: ForecastSeries, method: str) -> GaussianForecast:
    """The ``method`` forecast (one of ``METHODS``) of ``series``' test windows, with the options in ``SPECS``."""
    if method not in METHODS:
        raise one_of("forecast method", method, METHODS)
    if series.name not in SPECS and method != "seasonal-naive":
        raise one_of("series with ETS / ARIMA options", series.name, sorted(SPECS))
    args = (series.values, series.train_end, series.origins, series.horizon)
    if method == "seasonal-naive":
        return seasonal_naive_forecast(*args, season=series.season)
    ets, arima = SPECS[series.name]
    return ets_forecast(*args, **ets) if method == "ets" else arima_forecast(*args, **arima)


def evaluate(series: ForecastSeries, methods=METHODS) -> dict:
    """``{method: {"crps", "ncrps"}}`` on ``series``' test windows."""
    _, targets = series.windows()
    return {m: score(forecast(series, m), targets) for m in methods}
