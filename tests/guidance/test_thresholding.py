"""Dynamic thresholding (Imagen sec. 2.3): equal to diffusers' scheduler-internal thresholding, bounded,
the identity on samples already inside [-1, 1], and usable with every solver (it is a Denoiser wrapper)."""

import math

import pytest
import torch

from condiff.core.grids import make_grid
from condiff.core.sampling import sample
from condiff.core.schedules import VPLinear
from condiff.errors import ConfigError
from condiff.guidance import CFG, DynamicThresholding, dynamic_threshold
from condiff.solvers import SOLVERS, get_solver

diffusers = pytest.importorskip("diffusers")


@pytest.mark.parametrize("ratio, max_value", [(0.995, 1.0), (0.9, 3.0), (0.5, 1e9)])
def test_equals_diffusers(ratio, max_value):
    g = torch.Generator().manual_seed(0)
    x0 = 3.0 * torch.randn(6, 3, 8, 8, generator=g)
    sch = diffusers.DPMSolverMultistepScheduler(
        thresholding=True, dynamic_thresholding_ratio=ratio, sample_max_value=max_value
    )
    assert torch.allclose(dynamic_threshold(x0, ratio, max_value), sch._threshold_sample(x0.clone()), rtol=0, atol=1e-6)


def test_bounds_and_identity_inside():
    g = torch.Generator().manual_seed(1)
    big = 4.0 * torch.randn(5, 64, generator=g, dtype=torch.float64)
    small = 0.5 * torch.rand(5, 64, generator=g, dtype=torch.float64)
    out = dynamic_threshold(torch.cat([big, small]), 0.9)
    assert float(out.abs().max()) <= 1.0 + 1e-12
    assert torch.equal(out[5:], small)  # quantile <= 1: only clipping, and nothing to clip
    s = torch.quantile(big.abs(), 0.9, dim=1, keepdim=True)
    assert torch.allclose(out[:5], big.clamp(-s, s) / s)


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_every_solver_ends_inside_the_bounds(gmm, name):
    """The last step of every solver (into sigma = 0) returns a thresholded x0 estimate."""
    sch = VPLinear()
    grid = make_grid(sch, 6)
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    cond = {"y": torch.arange(16) % 2, "null": gmm.null_cond(16)}
    den = DynamicThresholding(CFG(gmm.denoiser(sch), 5.0), ratio=0.9)
    out = sample(den, get_solver(name), grid, x, cond).x
    assert bool(torch.isfinite(out).all())
    assert float(out.abs().max()) <= 1.0 + 1e-9


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(ratio=0.0),
        dict(ratio=1.5),
        dict(ratio=math.nan),
        dict(max_value=0.5),
        dict(max_value=math.nan),
        dict(ratio=True),
    ],
)
def test_bad_options(gmm, kwargs):
    with pytest.raises(ConfigError, match="dynamic thresholding"):
        DynamicThresholding(gmm.denoiser(VPLinear()), **kwargs)
