"""The second-order final step (condiff.solvers.final): exact for rho-linear denoised estimates, identical to
its base before the last step, and more accurate than the first-order jump at low NFE on the GMM oracle."""

import math

import pytest
import torch

from condiff.data.gmm import GMM, reference_pf_ode
from condiff.grids import UniformLogSNR, make_grid
from condiff.peers import trailing_grid
from condiff.sampling import sample
from condiff.schedules import EDM, VPDiscrete, VPLinear
from condiff.solvers import ExtrapolatedFinal, get_solver

F64 = torch.float64


class RhoLinear:
    """A denoiser whose output is a + b rho(t) whatever x is, so the exact ODE end point is a."""

    def __init__(self, schedule, a, b):
        self.schedule, self.a, self.b = schedule, a, b

    def __call__(self, x, t, cond=None):
        tt = torch.tensor(float(t), dtype=F64)
        rho = float(self.schedule.sigma(tt) / self.schedule.alpha(tt))
        return (self.a + self.b * rho).expand_as(x).clone()


@pytest.mark.parametrize("schedule", [VPLinear(), EDM()], ids=lambda s: type(s).__name__)
@pytest.mark.parametrize("base", ["ddim", "dpmpp-2m", "dpmpp-3m", "unipc", "heun", "dpmpp-2s"])
def test_exact_for_rho_linear_denoiser(schedule, base):
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, generator=g, dtype=F64), torch.randn(3, generator=g, dtype=F64)
    den = RhoLinear(schedule, a, b)
    grid = make_grid(schedule, 5, UniformLogSNR())
    x = torch.randn(4, 3, generator=g, dtype=F64)
    plain = sample(den, get_solver(base), grid, x).x
    out = sample(den, ExtrapolatedFinal(get_solver(base)), grid, x).x
    assert torch.allclose(out, a.expand_as(out), rtol=0, atol=1e-12)
    assert float((plain - a).abs().max()) > 1e-3  # the first-order jump is not exact here


@pytest.mark.parametrize("base", ["dpmpp-2m", "unipc"])
def test_identical_to_base_before_the_last_step(gmm, base):
    sch = VPLinear()
    grid = make_grid(sch, 6, UniformLogSNR())
    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(1), dtype=F64)
    cond = {"y": torch.arange(8) % 2}
    seen_a, seen_b = [], []
    a = sample(gmm.denoiser(sch), get_solver(base), grid, x, cond, callbacks=[seen_a.append])
    b = sample(gmm.denoiser(sch), ExtrapolatedFinal(get_solver(base)), grid, x, cond, callbacks=[seen_b.append])
    assert a.nfe == b.nfe
    for sa, sb in zip(seen_a[:-1], seen_b[:-1]):
        assert torch.equal(sa.x, sb.x)
    assert not torch.equal(a.x, b.x)


@pytest.mark.parametrize("seed,dim,k", [(0, 4, 6), (1, 8, 8), (2, 3, 5)])
@pytest.mark.parametrize("nfe", [8, 10])
def test_lower_error_at_low_nfe_on_the_gmm(seed, dim, k, nfe):
    """On diffusers' trailing grid, where the last noisy point has sigma/alpha ~ 0.3-0.4, the final
    extrapolation lowers the terminal error against the RK4 reference for DPM-Solver++(2M) and UniPC."""
    sch = VPDiscrete.from_betas("linear")
    gmm = GMM.random(dim=dim, components=k, num_classes=2, seed=seed)
    n = 128
    x = torch.randn(n, dim, generator=torch.Generator().manual_seed(seed), dtype=F64)
    cond = {"y": torch.arange(n) % 2}
    den = gmm.denoiser(sch)
    t_end = float(sch.t_from_log_snr(torch.tensor(2 * math.log(1e6), dtype=F64)))
    ref = den(reference_pf_ode(den, x, 999.0, t_end, cond, steps=1024), t_end, cond)
    grid = trailing_grid(1000, nfe)
    for base in ("dpmpp-2m", "unipc"):
        err = lambda s: float((sample(den, s, grid, x, cond).x - ref).norm(dim=1).mean())  # noqa: E731
        assert err(ExtrapolatedFinal(get_solver(base))) < err(get_solver(base))
