"""Guidance-scale schedules as functions of t: end points, shapes, per-sample evaluation, and their use as
CFG's scale (each evaluation mixes with w(t))."""

import math

import pytest
import torch

from condiff.core.schedules import VPLinear
from condiff.data.gmm import GMM
from condiff.errors import ConfigError
from condiff.guidance import CFG
from condiff.guidance.schedules import CosineScale, IntervalScale, LinearScale, per_row, scale_at

F64 = torch.float64


def test_linear_end_points_midpoint_and_clamping():
    s = LinearScale(7.0, 1.0, t_start=0.8, t_end=0.2)
    assert s(0.8) == 7.0 and s(0.2) == 1.0 and s(0.5) == pytest.approx(4.0, abs=1e-12)
    assert s(0.95) == 7.0 and s(0.05) == 1.0
    assert isinstance(s(0.5), float)


def test_wang_linear_schedule_has_mean_w():
    """Wang et al. 2024's increasing linear schedule LinearScale(0, 2w, T, 0) averages w over t in [0, T]
    (trapezoid rule is exact for a linear function)."""
    w, T = 4.5, 1.0
    t = torch.linspace(0, T, 101, dtype=F64)
    vals = LinearScale(0.0, 2 * w, T, 0.0)(t)
    assert float(torch.trapezoid(vals, t)) / T == pytest.approx(w, abs=1e-12)


def test_cosine_end_points_midpoint_flatness_and_power():
    s = CosineScale(5.0, 1.0, 1.0, 0.0)
    assert s(1.0) == pytest.approx(5.0, abs=1e-12) and s(0.0) == pytest.approx(1.0, abs=1e-12)
    assert s(0.5) == pytest.approx(3.0, abs=1e-12)
    h = 1e-4  # flat at both ends: the slope vanishes (second order in h)
    assert abs(s(1.0 - h) - 5.0) < 1e-6 and abs(s(h) - 1.0) < 1e-6
    t = torch.linspace(0, 1, 50, dtype=F64)  # ascending t: w rises from w_end to w_start
    assert bool((s(t)[1:] >= s(t)[:-1]).all())
    p = CosineScale(5.0, 1.0, 1.0, 0.0, power=2.0)  # u^2 = 1/2 at u = 1/sqrt(2): the midpoint value
    assert p(1.0 - 2**-0.5) == pytest.approx(3.0, abs=1e-12)


def test_interval_is_half_open():
    s = IntervalScale(6.0, 0.2, 0.6)
    assert s(0.6) == 6.0 and s(0.2) == 1.0 and s(0.4) == 6.0 and s(0.7) == 1.0
    assert IntervalScale(6.0, 0.2, 0.6, outside=0.0)(0.9) == 0.0


@pytest.mark.parametrize(
    "sched",
    [LinearScale(7.0, 1.0, 0.9, 0.1), CosineScale(2.0, 6.0, 0.9, 0.1, power=1.5), IntervalScale(4.0, 0.3, 0.7)],
    ids=lambda s: type(s).__name__,
)
def test_per_sample_t_gives_the_pointwise_values(sched):
    t = torch.linspace(0.0, 1.0, 11, dtype=F64)
    vals = sched(t)
    assert isinstance(vals, torch.Tensor) and vals.shape == (11,)
    assert torch.allclose(vals, torch.tensor([sched(float(v)) for v in t], dtype=F64), rtol=0, atol=1e-15)
    assert torch.equal(scale_at(sched, t), vals)


def test_scale_at_and_per_row():
    assert scale_at(3.0, torch.rand(4)) == 3.0
    assert scale_at(lambda t: 2 * t, 0.25) == 0.5
    x = torch.zeros(3, 2, 5)
    assert per_row(2.0, x) == 2.0
    assert per_row(torch.tensor([1.0, 2.0, 3.0], dtype=F64), x).shape == (3, 1, 1)


def test_cfg_with_a_schedule_mixes_with_w_of_t(gmm):
    """CFG(D, schedule) at time t is the affine mix with weight schedule(t), for several t."""
    sch = VPLinear()
    den = gmm.denoiser(sch)
    n = 8
    x = torch.randn(n, gmm.dim, generator=torch.Generator().manual_seed(0), dtype=F64)
    y = torch.arange(n) % 2
    cond = {"y": y, "null": GMM.null_cond(n)}
    s = CosineScale(6.0, 1.5, 0.9, 0.1)
    for t in (0.95, 0.7, 0.3, 0.05):
        want = den(x, t) + s(t) * (den(x, t, {"y": y}) - den(x, t))
        assert torch.allclose(CFG(den, s)(x, t, cond), want, rtol=1e-12, atol=1e-12)


def test_errors():
    with pytest.raises(ConfigError, match="t_start > t_end"):
        LinearScale(1.0, 2.0, 0.2, 0.5)
    with pytest.raises(ConfigError, match="w_start"):
        LinearScale(math.inf, 2.0, 0.5, 0.2)
    with pytest.raises(ConfigError, match="power"):
        CosineScale(1.0, 2.0, 0.5, 0.2, power=0.0)
    with pytest.raises(ConfigError, match="t_lo < t_hi"):
        IntervalScale(3.0, 0.5, 0.5)
    with pytest.raises(ConfigError, match="t_hi"):
        IntervalScale(3.0, 0.1, math.nan)
