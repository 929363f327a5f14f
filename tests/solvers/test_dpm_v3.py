"""DPM-Solver-v3 (condiff.solvers.dpm_v3) against exact answers: degenerate statistics are DDIM / DPM-Solver++
(Taylor form) over whole trajectories, the coefficients against brute-force quadrature and closed forms, exact
l on Gaussian data reproduces the closed-form flow, the measured order on the GMM, and the acceptance check:
with statistics of the exact GMM denoiser it beats DPM-Solver++ 2M and 3M at 5, 8 and 10 NFE."""

import math

import numpy as np
import pytest
import torch

from condiff.core.grids import UniformLogSNR, UniformT, make_grid
from condiff.core.sampling import initial_noise, sample
from condiff.core.schedules import EDM, Flow, VPCosine, VPDiscrete, VPLinear
from condiff.data.gmm import GMM, gaussian_pf_ode, reference_pf_ode
from condiff.errors import ConfigError
from condiff.guidance import CFG
from condiff.solvers import DDIM, DPMSolverPP3M, DPMSolverV3, get_solver
from condiff.solvers.base import begin
from condiff.solvers.dpm_v3 import V3State, derivative_weights, step_coefficients
from condiff.solvers.dpmpp_3m import History
from condiff.solvers.ems import EMS, gmm_ems

F64 = torch.float64
SCHEDULES = [VPLinear(), VPCosine(), VPDiscrete.from_betas("squaredcos_cap_v2"), EDM(), Flow()]


def start(schedule, steps=10, spacing=UniformLogSNR(), n=32, dim=2, final_zero=True, seed=0):
    grid = make_grid(schedule, steps, spacing, final_zero=final_zero)
    x = initial_noise(schedule, float(grid[0]), (n, dim), torch.Generator().manual_seed(seed), dtype=F64)
    return grid, x


def labels(n):
    return {"y": torch.arange(n) % 2}


# ---- degenerate statistics: the DPM-Solver++ family --------------------------------------------------------


@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: type(s).__name__)
@pytest.mark.parametrize("final_zero", [True, False])
def test_degenerate_first_order_is_ddim_over_a_trajectory(gmm, schedule, final_zero):
    """l = 1, s = b = 0 (ems=None, or an explicit degenerate EMS of the sample shape) and order 1 is DDIM."""
    grid, x = start(schedule, final_zero=final_zero)
    den = gmm.denoiser(schedule)
    ref = sample(den, DDIM(), grid, x, labels(32)).x
    for ems in (None, EMS.degenerate((2,), lam_range=(0.3, 0.4))):
        out = sample(den, DPMSolverV3(ems=ems, order=1, corrector=False), grid, x, labels(32)).x
        assert torch.allclose(out, ref, rtol=0, atol=1e-12), float((out - ref).abs().max())


def taylor_2m_step(D, x, t, t_next, state):
    """DPM-Solver++(2M) in its Taylor form (spec sec. 3a): x_i = x' + alpha_i (phi1/h + 1) D1, D1 = (D - D_prev)/r."""
    p, q, d = begin(D, x, t, t_next)
    if q.sigma == 0:
        return d, (d, p.lam)
    h = q.lam - p.lam
    phi1 = math.expm1(-h)
    x_next = (q.sigma / p.sigma) * x - q.alpha * phi1 * d
    if state is not None:
        d_prev, lam_prev = state
        x_next = x_next + q.alpha * (phi1 / h + 1) * (d - d_prev) * h / (p.lam - lam_prev)
    return x_next, (d, p.lam)


class Taylor2M:
    name, stochastic = "taylor-2m", False

    def init_state(self, grid=None):
        return None

    step = staticmethod(lambda D, x, t, t_next, state, noise: taylor_2m_step(D, x, t, t_next, state))


class Taylor3M:
    """Warm-up with DDIM and Taylor-2M, then DPMSolverPP3M(taylor_exact=True) with the same history."""

    name, stochastic = "taylor-3m", False

    def init_state(self, grid=None):
        return History()

    def step(self, D, x, t, t_next, state, noise):
        if len(state.ds) < 2:
            prev = None if not state.ds else (state.ds[-1], state.lams[-1])
            x_next, (d, lam) = taylor_2m_step(D, x, t, t_next, prev)
            return x_next, History(state.ds + (d,), state.lams + (lam,))
        return DPMSolverPP3M(lower_order_final=False, taylor_exact=True).step(D, x, t, t_next, state, noise)


@pytest.mark.parametrize("schedule", [VPLinear(), EDM()], ids=lambda s: type(s).__name__)
@pytest.mark.parametrize("order, reference", [(2, Taylor2M()), (3, Taylor3M())], ids=["2M", "3M"])
def test_degenerate_higher_orders_are_dpm_solver_pp_taylor(gmm, schedule, order, reference):
    """Degenerate statistics, no corrector: order 2 is DPM-Solver++(2M) in Taylor form, order 3 is
    DPMSolverPP3M(taylor_exact=True) (after the same warm-up), over a whole trajectory. (condiff's dpmpp-2m and
    the default dpmpp-3m use the 'midpoint' form and diffusers' half-weight D2 term, so they differ at O(h^3).)"""
    grid, x = start(schedule, steps=12, final_zero=False)
    den = gmm.denoiser(schedule)
    ref = sample(den, reference, grid, x, labels(32)).x
    out = sample(den, DPMSolverV3(order=order, corrector=False, lower_order_final=False), grid, x, labels(32)).x
    assert torch.allclose(out, ref, rtol=0, atol=1e-10), float((out - ref).abs().max())


def phi_closed(h, n):
    """int_0^h e^{u - h} u^n / n! du: I_0 = 1 - e^{-h}, I_n = h^n / n! - I_{n-1}."""
    v = -math.expm1(-h)
    for k in range(1, n + 1):
        v = h**k / math.factorial(k) - v
    return v


@pytest.mark.parametrize("lams", [(-3.0, -2.2), (-3.0, 4.6), (1.0, 1.001), (2.0, -1.0)])
def test_degenerate_coefficients_match_closed_forms(lams):
    """Decay e^{-h} and Phi_n = h^{n+1} phi_{n+1}(h) (the DPM-Solver++ functions) to round-off, any direction."""
    a, b = lams
    c = step_coefficients(EMS.degenerate(), a, b, 3)
    h = b - a
    assert math.isclose(float(c.decay), math.exp(-h), rel_tol=1e-13)
    for n in range(4):
        assert math.isclose(float(c.phi[n]), phi_closed(h, n), rel_tol=1e-11, abs_tol=1e-16), n


def brute_force(ems, a, b, n_max, points=400_001):
    """The step integrals by the trapezoid rule on a very fine uniform grid (numpy, independent of the solver)."""
    lam = ems.lam.numpy()
    lo = float(lam[0])
    if min(a, b) < lo < max(a, b):  # the statistics jump at the grid start: two segments meeting there
        first = np.linspace(a, lo, points // 2)
        u = np.concatenate([first, np.linspace(lo, b, points // 2)])
        below = np.arange(u.size) < first.size if a < b else np.arange(u.size) >= first.size
    else:
        u = np.linspace(a, b, points)
        below = u < lo
    flat = {k: getattr(ems, k).reshape(len(lam), -1).numpy() for k in "lsb"}
    val = {k: np.stack([np.interp(u, lam, flat[k][:, i]) for i in range(flat[k].shape[1])], 1) for k in "lsb"}
    # the high-noise limit l = 1, s = b = 0 below the grid; constant above it
    for k, limit in (("l", 1.0), ("s", 0.0), ("b", 0.0)):
        val[k][below] = limit

    def cum(f):
        return np.concatenate([np.zeros((1, f.shape[1])), np.cumsum(0.5 * np.diff(u)[:, None] * (f[1:] + f[:-1]), 0)])

    dl, ds = cum(val["l"]), cum(val["s"])
    beta = cum(np.exp(-ds) * val["b"])
    e = np.exp(dl - dl[-1] + ds)
    integ = lambda f: (0.5 * np.diff(u)[:, None] * (f[1:] + f[:-1])).sum(0)  # noqa: E731
    phis = [integ(e * ((u - a) ** n / math.factorial(n))[:, None]) for n in range(n_max + 1)]
    return np.exp(-dl[-1]), np.stack(phis), integ(e * beta), ds[-1], beta[-1]


@pytest.mark.parametrize("a, b", [(-2.5, -1.1), (-1.0, 2.7), (0.4, 0.45), (2.0, -0.5), (-4.0, 4.5)])
def test_coefficients_of_general_statistics_match_brute_force_quadrature(a, b):
    """Random piecewise-linear l, s, b (9 grid points in [-3, 3], 3 dimensions; the last case also extends
    beyond the grid: l = 1, s = b = 0 below it, constant above): decay, Phi_0..3, B, dS(t), beta(t) agree with a
    400k-point
    trapezoid rule to its accuracy (~1e-9)."""
    g = torch.Generator().manual_seed(2)
    lam = torch.linspace(-3, 3, 9, dtype=F64)
    mk = lambda scale, off=0.0: off + scale * torch.rand(9, 3, generator=g, dtype=F64)  # noqa: E731
    ems = EMS(lam, mk(1.0, 0.2), mk(1.0, -0.5), mk(2.0, -1.0))
    c = step_coefficients(ems, a, b, 3)
    decay, phi, bterm, ds_t, beta_t = brute_force(ems, a, b, 3)
    for got, want in [(c.decay, decay), (c.phi, phi), (c.bterm, bterm), (c.ds_t, ds_t), (c.beta_t, beta_t)]:
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-7, atol=1e-9)


def test_derivative_weights_are_exact_for_polynomials():
    """Normal weights give the exact derivatives of a cubic at the anchor from 4 points; pseudo weights give
    n! times the divided differences (exact for the leading coefficient: 3! g[...] = g''' of a cubic)."""
    poly = np.polynomial.Polynomial([0.3, -1.2, 0.7, 0.25])
    offsets = [-0.6, -1.5, 0.8]
    g = np.array([poly(0.0)] + [poly(d) for d in offsets])
    w = derivative_weights(offsets, pseudo=False)
    np.testing.assert_allclose(w @ g, [poly.deriv(k)(0.0) for k in (1, 2, 3)], rtol=1e-12)
    wp = derivative_weights(offsets, pseudo=True)
    assert math.isclose(float(wp[2] @ g), poly.deriv(3)(0.0), rel_tol=1e-12)
    assert math.isclose(float(wp[0] @ g), (poly(offsets[0]) - poly(0.0)) / offsets[0], rel_tol=1e-12)


# ---- exact statistics: Gaussian data ---------------------------------------------------------------------------


def exact_gaussian_ems(schedule, sd, n_grid=1200):
    """l_i = sigma^2 / (alpha^2 s_i^2 + sigma^2) on a uniform lambda grid over the sampling range, s = b = 0."""
    lam = torch.linspace(
        float(schedule.half_log_snr(schedule.default_t_start())),
        float(schedule.half_log_snr(schedule.t_min)),
        n_grid + 1,
        dtype=F64,
    )
    a = torch.exp(schedule.log_alpha(schedule.t_from_log_snr(2 * lam)))[:, None]
    s = a * torch.exp(-lam)[:, None]
    l = s**2 / (a**2 * sd**2 + s**2)
    return EMS(lam, l, torch.zeros_like(l), torch.zeros_like(l))


@pytest.mark.parametrize("schedule", [VPLinear(), EDM(), Flow()], ids=lambda s: type(s).__name__)
def test_exact_l_makes_one_first_order_step_exact_on_gaussian_data(schedule):
    """Data N(0, diag(s_i^2)) with the exact l: N = 0, so one first-order step from t_start to t_min (lambda
    -3 -> ~5) reproduces the closed form sqrt((alpha_t^2 s^2 + sigma_t^2)/(alpha_s^2 s^2 + sigma_s^2)) x_s to
    < 1e-4 (1200-interval grid; the residual is the piecewise-linear interpolation of l)."""
    sd = torch.tensor([0.2, 0.6, 1.0, 1.7], dtype=F64)
    g = GMM.gaussian(torch.zeros(4, dtype=F64), torch.diag(sd**2))
    ems = exact_gaussian_ems(schedule, sd)
    grid = torch.tensor([schedule.default_t_start(), schedule.t_min], dtype=F64)
    x = initial_noise(schedule, float(grid[0]), (64, 4), torch.Generator().manual_seed(0), dtype=F64)
    out = sample(g.denoiser(schedule), DPMSolverV3(ems=ems, order=1, corrector=False), grid, x).x
    exact = gaussian_pf_ode(torch.zeros(4, dtype=F64), torch.diag(sd**2), schedule, x, float(grid[0]), float(grid[1]))
    err = float((out - exact).abs().max() / exact.abs().max())
    assert err < 1e-4, err
    ddim = sample(g.denoiser(schedule), DDIM(), grid, x).x
    assert float((ddim - exact).abs().max() / exact.abs().max()) > 100 * err  # the oracle is not trivial


def test_sampling_below_the_ems_range_uses_the_high_noise_limit():
    """Below the EMS grid the statistics are their lambda -> -inf limits l = 1, s = b = 0: a trajectory that
    stays below the EMS range equals the degenerate solver (DPM-Solver++), and one that enters it does not."""
    sch = VPLinear()
    sd = torch.tensor([0.5, 1.2], dtype=F64)
    full = exact_gaussian_ems(sch, sd, n_grid=50)
    ems = EMS(full.lam[25:], full.l[25:], full.s[25:], full.b[25:])  # starts mid-way through the sampling range
    lo, start = float(ems.lam[0]), float(full.lam[0])
    g = GMM.random(dim=2, components=3, seed=4)
    t_of = lambda lam: float(sch.t_from_log_snr(torch.tensor(2 * lam, dtype=F64)))  # noqa: E731
    grid = make_grid(sch, 6, UniformLogSNR(), t_start=t_of(start), t_end=t_of(lo - 0.2), final_zero=False)
    x = initial_noise(sch, float(grid[0]), (8, 2), torch.Generator().manual_seed(0), dtype=F64)
    a = sample(g.denoiser(sch), DPMSolverV3(ems=ems, order=3), grid, x).x
    b = sample(g.denoiser(sch), DPMSolverV3(order=3), grid, x).x
    assert torch.allclose(a, b, rtol=0, atol=1e-12)
    into = make_grid(sch, 6, UniformLogSNR(), t_start=t_of(start), t_end=t_of(lo + 1.0), final_zero=False)
    c = sample(g.denoiser(sch), DPMSolverV3(ems=ems, order=3), into, x).x
    d = sample(g.denoiser(sch), DPMSolverV3(order=3), into, x).x
    assert not torch.allclose(c, d, rtol=0, atol=1e-6)


# ---- options, state and shapes -----------------------------------------------------------------------------


def step_orders(solver, D, grid, x):
    """The predictor order of every step, read from the explicit state (no mutation of the solver)."""
    state, orders = solver.init_state(grid), []
    for t, t_next in zip(grid[:-1].tolist(), grid[1:].tolist()):
        x, state = solver.step(D, x, t, t_next, state, None)
        orders.append(state.pending.order if state.pending is not None else "D")
    return orders


def test_warm_up_and_lower_order_final(gmm):
    sch = VPLinear()
    D = lambda x, t: gmm.denoiser(sch)(x, t, labels(x.shape[0]))  # noqa: E731
    D.schedule = sch
    grid, x = start(sch, steps=5, final_zero=False)
    assert step_orders(DPMSolverV3(order=3), D, grid, x) == [1, 2, 3, 2, 1]
    assert step_orders(DPMSolverV3(order=3, lower_order_final=False), D, grid, x) == [1, 2, 3, 3, 3]
    zgrid, _ = start(sch, steps=5)
    assert step_orders(DPMSolverV3(order=3), D, zgrid, x) == [1, 2, 3, 2, "D"]
    assert isinstance(DPMSolverV3().init_state(zgrid), V3State) and DPMSolverV3().init_state() is None


def test_half_runs_the_corrector_only_in_the_noisy_half(gmm):
    """The official code's rule (t > 0.5 in VP time; README says the opposite): a grid entirely in the noisy
    half behaves as corrector=True, one entirely in the clean half as corrector=False."""
    sch = VPLinear()
    den = gmm.denoiser(sch)
    ems = gmm_ems(gmm, sch, n_data=64, n_grid=40)
    for (t0, t1), same_as in [((0.95, 0.55), True), ((0.45, 0.05), False)]:
        grid = torch.linspace(t0, t1, 7, dtype=F64)
        x = initial_noise(sch, t0, (16, 2), torch.Generator().manual_seed(0), dtype=F64)
        half = sample(den, DPMSolverV3(ems=ems, half=True), grid, x, labels(16)).x
        ref = sample(den, DPMSolverV3(ems=ems, corrector=same_as), grid, x, labels(16)).x
        other = sample(den, DPMSolverV3(ems=ems, corrector=not same_as), grid, x, labels(16)).x
        assert torch.equal(half, ref) and not torch.allclose(half, other)


def test_any_sample_shape_float32_and_gradients(gmm):
    """Image-shaped samples with a denoiser acting per pixel, float32 in and out, gradients to the start."""
    sch = VPLinear()
    inner = GMM.gaussian(torch.zeros(1, dtype=F64), torch.eye(1, dtype=F64) * 0.3).denoiser(sch)

    class PerPixel:
        schedule = sch

        def __call__(self, x, t, cond=None):
            return inner(x.reshape(-1, 1).double(), t).reshape(x.shape).to(x.dtype)

    shape = (3, 2, 4)
    lam = torch.linspace(-3, 5, 9, dtype=F64)
    gen = torch.Generator().manual_seed(0)
    noise = lambda: 0.1 * torch.randn(9, *shape, generator=gen, dtype=F64)  # noqa: E731
    ems = EMS(lam, 0.5 + 0.4 * torch.rand(9, *shape, generator=gen, dtype=F64), noise(), noise())
    grid = make_grid(sch, 6, UniformT())
    x = initial_noise(sch, float(grid[0]), (5, *shape), torch.Generator().manual_seed(1), dtype=F64)
    out64 = sample(PerPixel(), DPMSolverV3(ems=ems, order=3), grid, x).x
    x32 = x.float().requires_grad_(True)
    out32 = sample(PerPixel(), DPMSolverV3(ems=ems, order=3), grid, x32).x
    assert out32.dtype == torch.float32 and torch.allclose(out32.double(), out64, atol=1e-4)
    (grad,) = torch.autograd.grad(out32.square().sum(), x32)
    assert bool(torch.isfinite(grad).all()) and float(grad.abs().max()) > 0
    deg = sample(PerPixel(), DPMSolverV3(ems=EMS.degenerate(shape)), grid, x).x
    assert torch.allclose(deg, sample(PerPixel(), DPMSolverV3(), grid, x).x, rtol=0, atol=1e-13)


def test_refuses_mismatched_statistics_and_bad_options(gmm):
    sch = VPLinear()
    grid, x = start(sch)
    with pytest.raises(ConfigError, match=r"\(3,\).*\(2,\)"):
        sample(gmm.denoiser(sch), DPMSolverV3(ems=EMS.degenerate((3,))), grid, x, labels(32))
    with pytest.raises(ConfigError, match="order"):
        DPMSolverV3(order=4)
    with pytest.raises(ConfigError, match="half"):
        DPMSolverV3(half="yes")
    with pytest.raises(ConfigError, match="EMS"):
        DPMSolverV3(ems="file.safetensors")
    assert get_solver("dpm-v3").name == "dpm-v3" and get_solver("dpm-v3", order=3).order == 3


# ---- the GMM oracle: order and the comparison with DPM-Solver++ --------------------------------------------


ORDER_CASES = [  # (options, expected slope): the predictor alone, then with the corrector
    (dict(order=1, corrector=False), 1),
    (dict(order=2, corrector=False), 2),
    (dict(order=3, corrector=False), 3),
    (dict(order=2), 2),
    (dict(order=3), 2),
    (dict(order=3, corrector_pseudo=False), 3),
]


@pytest.mark.slow
def test_order_of_convergence_on_the_gmm(gmm):
    """Protocol sec. 0.3: EMS of the exact denoiser (1200 intervals), logSNR grids, NFE 8..128, float64, no
    lower-order final steps, stop at sigma/alpha = 1e-2: the least-squares slope of log err against log NFE
    over all five NFE is -1, -2, -3 within 0.3 for the normal (non-pseudo) predictor orders 1, 2, 3. With the
    corrector the slope is ``convergence_order``: the pseudo-order corrector's first derivative is a secant, so
    order 3 + pseudo corrector converges at 2; the non-pseudo corrector keeps order 3."""
    sch = VPLinear()
    ems = gmm_ems(gmm, sch, n_data=1024, n_grid=1200)
    den = gmm.denoiser(sch)
    nfes = [8, 16, 32, 64, 128]
    t0, t1 = sch.default_t_start(), sch.t_for_sigma_ratio(1e-2)
    x = initial_noise(sch, t0, (256, 2), torch.Generator().manual_seed(1), dtype=F64)
    ref = reference_pf_ode(den, x, t0, t1, labels(256), steps=4096)
    for options, order in ORDER_CASES:
        solver = DPMSolverV3(ems=ems, lower_order_final=False, **options)
        errs = []
        for nfe in nfes:
            grid = make_grid(sch, nfe, UniformLogSNR(), t_start=t0, t_end=t1, final_zero=False)
            errs.append(float((sample(den, solver, grid, x, labels(256)).x - ref).norm(dim=1).mean()))
        slope = np.polyfit(np.log(nfes), np.log(errs), 1)[0]
        print(
            f"\n[dpm-v3 order] {options}: slope {slope:.2f} (expected -{order}); err "
            + " ".join(f"{e:.2e}" for e in errs)
        )
        assert solver.convergence_order == order
        assert abs(slope + order) <= 0.3, (options, slope, errs)


CASES = [(0, 2, 4), (1, 8, 6), (2, 16, 3)]  # (seed, dim, components) of GMM.random


def comparison(seed, dim, comps, scale, spacing, nfes=(5, 8, 10), n=256, n_data=2048, n_grid=400, ref_steps=1024):
    """Terminal errors (mean ||x - x_ref||) of dpm-v3 (EMS of the exact denoiser), dpmpp-2m and dpmpp-3m."""
    sch = VPLinear()
    gmm = GMM.random(dim=dim, components=comps, num_classes=2, seed=seed)
    ems = gmm_ems(gmm, sch, scale=scale, n_data=n_data, n_grid=n_grid)
    den = gmm.denoiser(sch) if scale is None else CFG(gmm.denoiser(sch), scale)
    cond = labels(n) if scale is None else {**labels(n), "null": GMM.null_cond(n)}
    rows = {}
    x = ref = None
    for nfe in nfes:
        grid = make_grid(sch, nfe, spacing, final_zero=False)  # the same end points for every NFE
        if x is None:
            x = initial_noise(sch, float(grid[0]), (n, dim), torch.Generator().manual_seed(1), dtype=F64)
            ref = reference_pf_ode(den, x, float(grid[0]), float(grid[-1]), cond, steps=ref_steps)
        rows[nfe] = {
            name: float((sample(den, solver, grid, x, cond).x - ref).norm(dim=1).mean())
            for name, solver in [
                ("dpm-v3", DPMSolverV3(ems=ems)),
                ("dpmpp-2m", get_solver("dpmpp-2m")),
                ("dpmpp-3m", get_solver("dpmpp-3m")),
            ]
        }
    return rows


def report(tag, rows):
    for nfe, errs in rows.items():
        print(f"\n[dpm-v3 vs dpm++] {tag} NFE {nfe}: " + " ".join(f"{k} {v:.4f}" for k, v in errs.items()))


def test_beats_dpm_solver_pp_on_one_guided_gmm():
    """The acceptance check below on one case, cheaper (seed 0, d = 2, CFG 3, the CLI's default uniform-t grid;
    EMS from 256 points on 200 intervals; reference with 256 RK4 steps, 2e-8 from the 4096-step one)."""
    rows = comparison(0, 2, 4, 3.0, UniformT(), n=128, n_data=256, n_grid=200, ref_steps=256)
    report("seed 0 d 2 cfg 3 uniform-t", rows)
    for errs in rows.values():
        assert errs["dpm-v3"] < min(errs["dpmpp-2m"], errs["dpmpp-3m"])


@pytest.mark.slow
@pytest.mark.parametrize("scale", [None, 3.0], ids=["cond", "cfg3"])
@pytest.mark.parametrize("seed, dim, comps", CASES)
def test_beats_dpm_solver_pp_on_gmms(seed, dim, comps, scale):
    """Acceptance: on GMM.random with three (seed, dim, K), conditional and with CFG 3, dpm-v3 (defaults: order
    2, pseudo-order corrector) with EMS of the exact denoiser (2048 points, 400 intervals) ends closer to the
    reference PF-ODE solution than DPM-Solver++ 2M and 3M at 5, 8 and 10 NFE, on the same uniform-t grid (the
    CLI default). On uniform-logSNR grids it does not always: see the report in docs (benchmark table)."""
    rows = comparison(seed, dim, comps, scale, UniformT())
    report(f"seed {seed} d {dim} K {comps} cfg {scale} uniform-t", rows)
    for errs in rows.values():
        assert errs["dpm-v3"] < min(errs["dpmpp-2m"], errs["dpmpp-3m"])
