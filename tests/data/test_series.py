"""The bundled real series (condiff.data.series): shapes, finiteness, a split that keeps test points out of the
fit, determinism."""

import pytest
import torch

from condiff.data.series import SERIES, ForecastSeries, load_series
from condiff.errors import ConfigError

F64 = torch.float64
SIZES = {"co2": (526, 12), "sunspots": (309, 11), "nile": (100, 1)}


@pytest.mark.parametrize("name", sorted(SERIES))
def test_shapes_and_finite(name):
    s = load_series(name)
    n, season = SIZES[name]
    assert s.values.dtype == F64 and s.values.shape == (n,) and s.season == season
    assert bool(torch.all(torch.isfinite(s.values)))
    contexts, targets = s.windows()
    assert contexts.shape == (s.num_windows, s.context_length) and targets.shape == (s.num_windows, s.horizon)
    assert bool(torch.all(torch.isfinite(contexts))) and bool(torch.all(torch.isfinite(targets)))
    # the test windows' horizons are back to back and end at the series' end
    assert s.origins[-1] + s.horizon == n
    assert torch.equal(targets.flatten(), s.values[s.train_end :])


@pytest.mark.parametrize("name", sorted(SERIES))
def test_split_never_leaks_test_points_into_the_fit(name):
    s = load_series(name)
    assert s.train_end == s.origins[0] and s.train.numel() == s.train_end
    assert s.mean == pytest.approx(float(s.values[: s.train_end].mean()), rel=1e-12)
    assert s.std == pytest.approx(float(s.values[: s.train_end].std(unbiased=False)), rel=1e-12)
    for o, (c, t) in zip(s.origins, zip(*s.windows())):
        assert o >= s.train_end
        assert torch.equal(c, s.values[o - s.context_length : o]) and torch.equal(t, s.values[o : o + s.horizon])
    # changing every test point leaves the fitted statistics exactly as they were
    v = s.values.clone()
    v[s.train_end :] = 1e6
    other = ForecastSeries(name, v, s.season, s.context_length, s.horizon, s.num_windows)
    assert (other.mean, other.std, other.train_end) == (s.mean, s.std, s.train_end)


def test_standardise_roundtrip_and_determinism():
    a, b = load_series("co2"), load_series("co2")
    assert torch.equal(a.values, b.values) and (a.mean, a.std) == (b.mean, b.std)
    z = a.standardise(a.train)
    assert abs(float(z.mean())) < 1e-10 and float(z.std(unbiased=False)) == pytest.approx(1.0)
    assert torch.allclose(a.unstandardise(z), a.train)


def test_co2_is_monthly_with_gaps_filled():
    s = load_series("co2")
    assert 310 < float(s.values.min()) and float(s.values.max()) < 380  # ppm, 1958 .. 2001


def test_bad_inputs_are_one_line_config_errors():
    v = torch.arange(50, dtype=F64)
    cases = [
        lambda: load_series("mauna"),
        lambda: ForecastSeries("x", v.float(), 1, 10, 5, 2),
        lambda: ForecastSeries("x", v, 1, 10, 0, 2),
        lambda: ForecastSeries("x", v, 1, 10, 5, 9),
        lambda: ForecastSeries("x", torch.ones(50, dtype=F64), 1, 10, 5, 2),
        lambda: ForecastSeries("x", torch.full((50,), float("nan"), dtype=F64), 1, 10, 5, 2),
    ]
    for case in cases:
        with pytest.raises(ConfigError) as e:
            case()
        assert "\n" not in str(e.value)
