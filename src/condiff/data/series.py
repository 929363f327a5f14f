"""Real series for TSDiff-style forecasting (Kollovieh et al., NeurIPS 2023, sec. 5), from the datasets bundled with
statsmodels (measured with statsmodels 0.15.0; no network):

- ``co2``: Mauna Loa CO2 (``statsmodels.datasets.co2``, 2284 weekly values 1958-03 .. 2001-12, 59 missing),
  resampled to monthly means, the 5 empty months linearly interpolated: 526 points; season 12, context 72,
  horizon 12, 5 test windows, training part 466.
- ``sunspots``: yearly sunspot activity (``statsmodels.datasets.sunspots``, 1700 .. 2008): 309 points; season 11,
  context 44, horizon 11, 5 test windows, training part 254.
- ``nile``: yearly Nile flow at Aswan (``statsmodels.datasets.nile``, 1871 .. 1970): 100 points; no season
  (season length 1), context 20, horizon 5, 4 test windows, training part 80.

Rolling-origin evaluation: the test windows sit at the end of the series, their horizons back to back. With N
points, horizon H and W windows, window w (0-based) forecasts ``values[o_w : o_w + H]`` from its context
``values[o_w - C : o_w]``, where ``o_w = N - H - (W - 1 - w) H``. The training part is ``values[:o_0]``: every
point a test window forecasts lies at or past it, and the standardisation statistics (mean and standard deviation)
and any forecaster's parameters are fitted on it alone. Later windows' contexts contain earlier windows' targets,
as in any rolling-origin evaluation: they are conditioned on, never fitted.

Pools (``POOLS``, ``pool_series``): other yearly series statsmodels ships, for training one model over many series
as TSDiff does (sec. 5: one unconditional model per dataset of many series): ``nile``, ``sunspots`` (above),
``elnino`` (``statsmodels.datasets.elnino``: yearly means of the monthly sea-surface temperature, 1950 .. 2010,
61 points) and ``fertility`` (``statsmodels.datasets.fertility``: the World Bank's yearly fertility rate per
country, 1960 .. 2013, each country's values up to its first missing year, countries with at least 30 of them).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from condiff.errors import ConfigError, check_int, one_of

Tensor = torch.Tensor
F64 = torch.float64


@dataclass(frozen=True, eq=False)
class ForecastSeries:
    """One series (float64, 1-D) with its season length and rolling-origin split (module docstring)."""

    name: str
    values: Tensor
    season: int
    context_length: int
    horizon: int
    num_windows: int
    train_end: int = field(init=False)
    mean: float = field(init=False)
    std: float = field(init=False)

    def __post_init__(self):
        v = self.values
        if not torch.is_tensor(v) or v.dim() != 1 or v.dtype != F64:
            raise ConfigError(f"series {self.name!r} must be a 1-D float64 tensor")
        if not bool(torch.all(torch.isfinite(v))):
            raise ConfigError(f"series {self.name!r} has non-finite values")
        check_int("season length", self.season, lo=1)
        C = check_int("context length", self.context_length, lo=1)
        H = check_int("horizon", self.horizon, lo=1)
        W = check_int("number of test windows", self.num_windows, lo=1)
        train_end = v.numel() - W * H
        if train_end < max(C, 2 * self.season, 2):
            raise ConfigError(
                f"series {self.name!r} has {v.numel()} points, too few for {W} windows of horizon {H} "
                f"after a training part of at least max(context {C}, two seasons, 2) points"
            )
        train = v[:train_end]
        object.__setattr__(self, "train_end", train_end)
        object.__setattr__(self, "mean", float(train.mean()))
        object.__setattr__(self, "std", float(train.std(unbiased=False)))
        if not self.std > 0:
            raise ConfigError(f"series {self.name!r} is constant on its training part")

    @property
    def train(self) -> Tensor:
        """The training part ``values[:train_end]``."""
        return self.values[: self.train_end]

    @property
    def origins(self) -> list[int]:
        """The test windows' forecast origins (index of each window's first target point), ascending."""
        return [self.train_end + w * self.horizon for w in range(self.num_windows)]

    def windows(self) -> tuple[Tensor, Tensor]:
        """The test windows as (contexts (W, C), targets (W, H)), on the original scale."""
        C, H = self.context_length, self.horizon
        contexts = torch.stack([self.values[o - C : o] for o in self.origins])
        targets = torch.stack([self.values[o : o + H] for o in self.origins])
        return contexts, targets

    def standardise(self, x) -> Tensor:
        """``(x - mean) / std`` with the training part's statistics."""
        return (torch.as_tensor(x, dtype=F64) - self.mean) / self.std

    def unstandardise(self, z) -> Tensor:
        """The inverse of ``standardise``."""
        return torch.as_tensor(z, dtype=F64) * self.std + self.mean


def _co2():
    from statsmodels.datasets import co2

    weekly = co2.load_pandas().data["co2"]
    return weekly.resample("MS").mean().interpolate(method="linear").to_numpy(dtype="float64", copy=True)


def _sunspots():
    from statsmodels.datasets import sunspots

    return sunspots.load_pandas().data["SUNACTIVITY"].to_numpy(dtype="float64", copy=True)


def _nile():
    from statsmodels.datasets import nile

    return nile.load_pandas().data["volume"].to_numpy(dtype="float64", copy=True)


def _elnino():
    from statsmodels.datasets import elnino

    return [elnino.load_pandas().data.iloc[:, 1:].mean(axis=1).to_numpy(dtype="float64", copy=True)]


def _fertility():
    import numpy as np
    from statsmodels.datasets import fertility

    rows = fertility.load_pandas().data.iloc[:, 4:].to_numpy(dtype="float64", copy=True)
    out = []
    for row in rows:
        bad = np.flatnonzero(~np.isfinite(row))
        run = row[: bad[0]] if bad.size else row
        if run.size >= 30:
            out.append(run)
    return out


# pool name -> loader of a list of 1-D arrays (module docstring)
POOLS = {
    "nile": lambda: [_nile()],
    "sunspots": lambda: [_sunspots()],
    "elnino": _elnino,
    "fertility": _fertility,
}


def pool_series(name: str) -> list[Tensor]:
    """The series (float64, 1-D each) of the pool ``name`` (one of ``POOLS``)."""
    if name not in POOLS:
        raise one_of("pool series", name, sorted(POOLS))
    return [torch.as_tensor(v, dtype=F64) for v in POOLS[name]()]


# name -> (loader, season, context length, horizon, test windows)
SERIES = {
    "co2": (_co2, 12, 72, 12, 5),
    "sunspots": (_sunspots, 11, 44, 11, 5),
    "nile": (_nile, 1, 20, 5, 4),
}


def load_series(name: str) -> ForecastSeries:
    """The bundled series ``name`` (one of ``SERIES``) with its split (module docstring)."""
    if name not in SERIES:
        raise one_of("series", name, sorted(SERIES))
    loader, season, context, horizon, windows = SERIES[name]
    values = torch.as_tensor(loader(), dtype=F64)
    return ForecastSeries(name, values, season, context, horizon, windows)
