"""EDM's samplers (Karras et al. 2022, Alg. 1 and 2) on the exact GMM denoiser: the sigma grid of eq. 5,
2N - 1 evaluations, second-order convergence (spec sec. 0.3 protocol on the sigma grid), exact equality with
``heun`` without churn, and the churn itself (where noise is added, how much, and gamma)."""

import math

import pytest
import torch

from condiff.core.grids import Karras, make_grid
from condiff.core.sampling import Gaussian, NoiseSource, Recorded, sample
from condiff.core.schedules import EDM, Flow, VPCosine, VPDiscrete, VPLinear
from condiff.data.gmm import reference_pf_ode
from condiff.errors import ConfigError
from condiff.solvers import EDMSDE, SOLVERS, EDMHeun, Heun, Solver
from condiff.solvers.edm import GAMMA_CAP

F64 = torch.float64
SCHEDULES = [VPLinear(), VPCosine(), VPDiscrete.from_betas("squaredcos_cap_v2"), EDM(), Flow()]


def starts(n=32, dim=2, sigma=20.0, seed=0):
    return sigma * torch.randn(n, dim, generator=torch.Generator().manual_seed(seed), dtype=F64)


def cond(n):
    return {"y": torch.arange(n) % 2}


class Recorder:
    """A denoiser that records every (x, t) it is called at."""

    def __init__(self, den):
        self.den, self.calls = den, []

    @property
    def schedule(self):
        return self.den.schedule

    def __call__(self, x, t, c=None):
        self.calls.append((x.clone(), float(t)))
        return self.den(x, t, c)


class Counting(NoiseSource):
    def __init__(self, seed=0):
        self.g, self.draws = torch.Generator().manual_seed(seed), 0

    def sample(self, like):
        self.draws += 1
        return torch.randn(like.shape, generator=self.g, dtype=like.dtype)


def test_registered_with_karras_as_default_spacing():
    """Both samplers are in the registry and declare the Karras grid; other solvers declare none."""
    assert SOLVERS["edm-heun"] is EDMHeun and SOLVERS["edm-sde"] is EDMSDE
    assert EDMHeun.default_spacing == Karras() and EDMSDE().default_spacing == Karras()
    assert Solver.default_spacing is None and Heun().default_spacing is None


def test_karras_grid_on_edm_is_eq5():
    """make_grid(EDM, N, Karras) from sigma_max = 80 is eq. 5 with sigma_min = 0.002, rho = 7, then sigma_N = 0."""
    n = 18
    grid = make_grid(EDM(), n, Karras(), t_start=80.0)
    i = torch.arange(n, dtype=F64)
    want = (80 ** (1 / 7) + i / (n - 1) * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    assert torch.allclose(grid[:-1], want, rtol=1e-12, atol=0) and grid[-1] == 0


def test_edm_heun_costs_2n_minus_1(gmm):
    """N steps ending at sigma = 0 cost 2N - 1 evaluations (35 NFE for N = 18, EDM's CIFAR-10 setting)."""
    grid = make_grid(EDM(), 18, Karras(), t_start=80.0)
    out = sample(gmm.denoiser(EDM()), EDMHeun(), grid, starts(8, sigma=80.0), cond(8))
    assert out.nfe == 35


@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: type(s).__name__)
def test_edm_heun_and_churn_free_sde_equal_heun_exactly(gmm, schedule):
    """edm-heun, and edm-sde with S_churn = 0, are Heun's steps on the same grid, bit for bit, on every
    schedule (the rescaled ODE in y = x / alpha); the churn-free SDE draws no noise."""
    grid = make_grid(schedule, 7, Karras())
    x = schedule.sigma(grid[0]) * starts(16, sigma=1.0)
    den = gmm.denoiser(schedule)
    ref = sample(den, Heun(), grid, x, cond(16)).x
    assert torch.equal(sample(den, EDMHeun(), grid, x, cond(16)).x, ref)
    noise = Counting()
    assert torch.equal(sample(den, EDMSDE(S_churn=0.0), grid, x, cond(16), noise).x, ref)
    assert noise.draws == 0


def test_sde_without_levels_in_range_equals_heun(gmm):
    """With no grid level in [S_min, S_max] nothing is churned: no noise drawn, output equal to Heun."""
    sch = EDM()
    grid = make_grid(sch, 8, Karras(), t_start=10.0)  # levels <= 10
    den = gmm.denoiser(sch)
    x = starts(16, sigma=10.0)
    noise = Counting()
    out = sample(den, EDMSDE(S_churn=40.0, S_min=20.0, S_max=50.0), grid, x, cond(16), noise).x
    assert noise.draws == 0 and torch.equal(out, sample(den, Heun(), grid, x, cond(16)).x)


@pytest.mark.parametrize("s_churn", [2.0, 40.0])
def test_churn_only_in_range_with_exact_gamma_and_amount(gmm, s_churn):
    """Noise is drawn exactly at the levels sigma_i in [S_min, S_max]; there the first evaluation is at
    sigma_hat = sigma_i (1 + gamma), gamma = min(S_churn / N, sqrt 2 - 1), on x_i + sqrt(sigma_hat^2 -
    sigma_i^2) S_noise z (Alg. 2 lines 4-6); elsewhere at sigma_i on x_i."""
    sch, n = EDM(), 10
    grid = make_grid(sch, n, Karras(), t_start=80.0)
    solver = EDMSDE(S_churn=s_churn, S_min=0.5, S_max=10.0, S_noise=1.003)
    gamma = min(s_churn / n, math.sqrt(2) - 1)
    in_range = [0.5 <= float(s) <= 10.0 for s in grid[:-1]]
    assert 0 < sum(in_range) < n
    g = torch.Generator().manual_seed(5)
    zs = [torch.randn(16, 2, generator=g, dtype=F64) for _ in range(sum(in_range))]
    rec = Recorder(gmm.denoiser(sch))
    x = starts(16, sigma=80.0)
    xs = [x]
    sample(rec, solver, grid, x, cond(16), Recorded(zs), callbacks=[lambda info: xs.append(info.x)])
    firsts = [0]
    for i in range(n - 1):  # the last step (into sigma = 0) has one evaluation
        firsts.append(firsts[-1] + 2)
    used = 0
    for i in range(n):
        x_call, t_call = rec.calls[firsts[i]]
        sig = float(grid[i])
        if in_range[i]:
            s_hat = sig * (1 + gamma)
            assert t_call == pytest.approx(s_hat, rel=1e-13)
            want = xs[i] + math.sqrt(t_call**2 - sig**2) * 1.003 * zs[used]
            assert torch.allclose(x_call, want, rtol=1e-13, atol=1e-12)
            used += 1
        else:
            assert t_call == sig and torch.equal(x_call, xs[i])
    assert used == len(zs)


def test_gamma_rule_and_unknown_steps():
    """gamma = min(S_churn/N, sqrt 2 - 1) inside [S_min, S_max], 0 outside; N unknown (init_state()) gives
    the cap; init_state(grid) is the number of steps."""
    s = EDMSDE(S_churn=40.0, S_min=0.05, S_max=50.0)
    assert s.gamma(1.0, 256) == 40.0 / 256 and s.gamma(1.0, 18) == GAMMA_CAP == math.sqrt(2) - 1
    assert s.gamma(0.01, 256) == 0 and s.gamma(60.0, 256) == 0 and s.gamma(1.0, None) == GAMMA_CAP
    assert s.init_state() is None and s.init_state(make_grid(EDM(), 12, Karras())) == 12


def test_sde_same_seed_same_output_and_seed_matters(gmm):
    """Same noise seed, same samples (bit for bit); another seed, other samples."""
    sch = VPLinear()
    grid = make_grid(sch, 8, Karras())
    x = sch.sigma(grid[0]) * starts(16, sigma=1.0)
    den = gmm.denoiser(sch)
    run = lambda seed: sample(den, EDMSDE(), grid, x.clone(), cond(16), Gaussian(torch.Generator().manual_seed(seed))).x  # noqa: E731
    a, b = run(3), run(3)
    assert torch.equal(a, b) and not torch.equal(a, run(4))


def test_churn_never_goes_past_t_max(gmm):
    """On a VP schedule sigma_hat is capped at t_max (where the schedule ends); samples stay finite."""
    sch = VPLinear()
    grid = make_grid(sch, 6, Karras(), t_start=sch.t_max)
    rec = Recorder(gmm.denoiser(sch))
    x = sch.sigma(grid[0]) * starts(16, sigma=1.0)
    out = sample(
        rec,
        EDMSDE(S_churn=40.0, S_min=0.0, S_max=math.inf),
        grid,
        x,
        cond(16),
        Gaussian(torch.Generator().manual_seed(0)),
    )
    assert max(t for _, t in rec.calls) <= sch.t_max and bool(torch.isfinite(out.x).all())


@pytest.mark.parametrize(
    "kw",
    [dict(S_churn=-1.0), dict(S_min=2.0, S_max=1.0), dict(S_noise=math.nan), dict(S_churn=True), dict(S_max=-math.inf)],
)
def test_bad_options_are_config_errors(kw):
    with pytest.raises(ConfigError, match="edm-sde"):
        EDMSDE(**kw)


def _order_errors(gmm, nsteps, batch, ref_steps=1024):
    """err(NFE) of edm-heun on the Karras sigma grid from sigma 80 to 0.01 (EDM schedule, no final jump),
    against RK4 (``ref_steps`` steps uniform in lambda), and the RK4 step-halving error estimate."""
    sch = EDM()
    den = gmm.denoiser(sch)
    g = torch.Generator().manual_seed(1)
    x0, _ = gmm.sample(batch, g)
    x = x0 + 80.0 * torch.randn(x0.shape, generator=g, dtype=F64)
    ref = reference_pf_ode(den, x, 80.0, 0.01, steps=ref_steps)
    ref_err = float((ref - reference_pf_ode(den, x, 80.0, 0.01, steps=ref_steps // 2)).norm(dim=1).mean()) / 15
    errs = []
    for n in nsteps:
        grid = make_grid(sch, n, Karras(), t_start=80.0, t_end=0.01, final_zero=False)
        out = sample(den, EDMHeun(), grid, x.clone())
        assert out.nfe == 2 * n
        errs.append(float((out.x - ref).norm(dim=1).mean()))
    return errs, ref_err


def _slope(nfes, errs):
    lx = torch.log(torch.tensor(nfes, dtype=F64))
    ly = torch.log(torch.tensor(errs, dtype=F64))
    lx = lx - lx.mean()
    return float((lx * (ly - ly.mean())).sum() / (lx * lx).sum())


def test_edm_heun_second_order_fast(gmm):
    """Quick version of the protocol: NFE 32, 64, 128 on 32 start points; slope within 0.3 of -2."""
    steps = (16, 32, 64)
    errs, ref_err = _order_errors(gmm, steps, 32, ref_steps=512)
    assert ref_err < 1e-4 * min(errs)
    assert abs(_slope([2 * n for n in steps], errs) + 2) <= 0.3


@pytest.mark.slow
def test_edm_heun_second_order_protocol(gmm):
    """Spec sec. 0.3 / 16(d) on the sigma grid: 256 start points, NFE 16..256, slope within 0.3 of -2."""
    steps = (8, 16, 32, 64, 128)
    errs, ref_err = _order_errors(gmm, steps, 256)
    assert ref_err < 1e-4 * min(errs)
    slope = _slope([2 * n for n in steps], errs)
    print(f"\n[order] edm-heun on the Karras sigma grid: slope {slope:.3f}; err {errs}")
    assert abs(slope + 2) <= 0.3
