"""Universal guidance against closed forms: the forward term on a Gaussian prior (exact Jacobian of the exact
denoiser), backward guidance on a quadratic loss ((1 - lr)^m contraction), combined terms as sums, scale 0
and k = 1 bit for bit, quadratic-loss guidance on the GMM moving samples toward the target as the scale grows,
and self-recurrence leaving p_t invariant when the step is exact (moment check)."""

import math

import pytest
import torch

from condiff.core.grids import UniformT, make_grid
from condiff.core.sampling import Gaussian, initial_noise, sample
from condiff.core.schedules import EDM, VPLinear
from condiff.data.gmm import GMM
from condiff.errors import ConfigError
from condiff.guidance.steered import Projection, SuperResolution
from condiff.guidance.universal import Backward, Forward, SelfRecurrence, UniversalGuidance, backward_delta, renoise
from condiff.solvers import SOLVERS
from condiff.solvers.analytic import GaussianFit
from condiff.solvers.base import Solver, point

F64 = torch.float64


def quadratic(c):
    """l(x0) = 1/2 ||x0 - c||^2 per sample."""
    c = torch.as_tensor(c, dtype=F64)
    return lambda x0, cond: 0.5 * ((x0 - c) ** 2).sum(-1)


def noisy(gmm, sch, t, n, seed):
    g = torch.Generator().manual_seed(seed)
    tt = torch.tensor(t, dtype=F64)
    return float(sch.alpha(tt)) * gmm.sample(n, g)[0] + float(sch.sigma(tt)) * torch.randn(
        n, gmm.dim, generator=g, dtype=F64
    )


@pytest.mark.parametrize("schedule", [VPLinear(), EDM()], ids=lambda s: type(s).__name__)
@pytest.mark.parametrize("s", [0.3, 2.0])
def test_forward_term_on_a_gaussian_prior_is_the_closed_form(schedule, s):
    """N(mu, S): x0_hat(x) = mu + a S (a^2 S + sig^2 I)^-1 (x - a mu), Jacobian J = a S (a^2 S + sig^2 I)^-1,
    so x0' = x0_hat - s (sig^2 / a) J^T (x0_hat - c) for the quadratic loss."""
    mu = torch.tensor([0.5, -1.0], dtype=F64)
    cov = torch.tensor([[1.0, 0.6], [0.6, 0.8]], dtype=F64)
    gmm = GMM.gaussian(mu, cov)
    c = torch.tensor([2.0, 1.0], dtype=F64)
    den = gmm.denoiser(schedule)
    t = schedule.t_for_sigma_ratio(0.7)
    x = noisy(gmm, schedule, t, 32, 0)
    a, sig = float(schedule.alpha(torch.tensor(t, dtype=F64))), float(schedule.sigma(torch.tensor(t, dtype=F64)))
    J = a * cov @ torch.linalg.inv(a * a * cov + sig * sig * torch.eye(2, dtype=F64))
    x0 = mu + (x - a * mu) @ J.T
    expect = x0 - s * (sig * sig / a) * (x0 - c) @ J
    got = UniversalGuidance(den, [Forward(quadratic(c), s)])(x, t)
    assert torch.allclose(got, expect, rtol=1e-10, atol=1e-10)


def test_forward_terms_combine_as_a_sum_and_per_sample_times_work(gmm):
    """Two forward terms at once equal the sum of the single-term corrections (the gradient is linear in the
    weighted loss); a per-sample t gives each row its own correction."""
    sch = VPLinear()
    den = gmm.denoiser(sch)
    t = sch.t_for_sigma_ratio(1.0)
    x = noisy(gmm, sch, t, 16, 1)
    l1, l2 = quadratic([1.0, 1.0]), lambda x0, cond: torch.sin(x0).sum(-1) + x0[:, 0] ** 3
    x0 = den(x, t)
    both = UniversalGuidance(den, [Forward(l1, 0.7), Forward(l2, -0.4)])(x, t)
    one = UniversalGuidance(den, [Forward(l1, 0.7)])(x, t) - x0
    two = UniversalGuidance(den, [Forward(l2, -0.4)])(x, t) - x0
    assert torch.allclose(both, x0 + one + two, rtol=1e-10, atol=1e-12)
    ts = torch.tensor([t, sch.t_for_sigma_ratio(0.3)], dtype=F64).repeat(8)
    rows = UniversalGuidance(den, [Forward(l1, 0.7)])(x, ts)
    for i in (0, 1):
        single = UniversalGuidance(den, [Forward(l1, 0.7)])(x[i : i + 1], float(ts[i]))
        assert torch.allclose(rows[i : i + 1], single, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("steps,lr", [(1, 0.1), (5, 0.3), (20, 0.05)])
def test_backward_guidance_on_a_quadratic_is_the_geometric_contraction(gmm, steps, lr):
    """Delta <- Delta - lr (x0 + Delta - c) from 0 gives x0 + Delta_m - c = (1 - lr)^m (x0 - c); two quadratics
    minimised jointly contract toward their mean at rate (1 - 2 lr)^m."""
    sch = VPLinear()
    den = gmm.denoiser(sch)
    t = sch.t_for_sigma_ratio(0.5)
    x = noisy(gmm, sch, t, 16, 2)
    c1, c2 = torch.tensor([2.0, -1.0], dtype=F64), torch.tensor([0.0, 3.0], dtype=F64)
    x0 = den(x, t)
    out = UniversalGuidance(den, [Backward(quadratic(c1), steps, lr)])(x, t)
    assert torch.allclose(out - c1, (1 - lr) ** steps * (x0 - c1), rtol=1e-10, atol=1e-12)
    joint = UniversalGuidance(den, [Backward(quadratic(c1), steps, lr), Backward(quadratic(c2), steps, lr)])(x, t)
    mid = 0.5 * (c1 + c2)
    assert torch.allclose(joint - mid, (1 - 2 * lr) ** steps * (x0 - mid), rtol=1e-10, atol=1e-12)
    d = backward_delta([quadratic(c1)], x0, None, steps, lr)
    assert torch.allclose(d, (1 - (1 - lr) ** steps) * (c1 - x0), rtol=1e-10, atol=1e-12)


def guided_samples(gmm, terms, solver="ddpm", n=256, steps=20, seed=0, k=1):
    sch = VPLinear()
    grid = make_grid(sch, steps, UniformT())
    g = torch.Generator().manual_seed(seed)
    x = initial_noise(sch, float(grid[0]), (n, gmm.dim), g, dtype=F64)
    den = gmm.denoiser(sch) if terms is None else UniversalGuidance(gmm.denoiser(sch), terms)
    slv = SOLVERS[solver]() if k is None else SelfRecurrence(SOLVERS[solver](), k)
    return sample(den, slv, grid, x, None, Gaussian(g))


@pytest.mark.parametrize("solver", ["ddpm", "dpmpp-2m"])
def test_scale_zero_and_k_one_are_the_unguided_sampler_bit_for_bit(gmm, solver):
    """Forward scale 0 and backward steps 0 return the denoiser's own output; SelfRecurrence with k = 1 runs
    the inner solver's step once and draws no extra noise: identical samples and NFE."""
    plain = guided_samples(gmm, None, solver, k=None)
    for terms, k in [
        ([Forward(quadratic([3.0, 3.0]), 0.0)], None),
        ([Backward(quadratic([3.0, 3.0]), 0)], None),
        (None, 1),
        ([Forward(quadratic([3.0, 3.0]), 0.0)], 1),
    ]:
        out = guided_samples(gmm, terms, solver, k=k)
        assert torch.equal(out.x, plain.x) and out.nfe == plain.nfe


def test_quadratic_guidance_moves_gmm_samples_toward_the_target_as_the_scale_grows(gmm):
    """Mean squared distance of final samples to a target c falls strictly as the forward scale grows."""
    c = [3.0, -2.0]
    dist = []
    for s in [0.0, 0.1, 0.3, 1.0]:
        x = guided_samples(gmm, [Forward(quadratic(c), s)]).x
        dist.append(float(((x - torch.tensor(c, dtype=F64)) ** 2).sum(-1).mean()))
    assert all(b < a for a, b in zip(dist, dist[1:])), dist
    assert dist[-1] < 0.5 * dist[0], dist


class ExactGaussianStep(Solver):
    """The exact PF-ODE flow of Gaussian data from t to t_next (closed form): maps p_t onto p_t_next."""

    name = "exact-gaussian"

    def __init__(self, fit):
        self.fit = fit

    def step(self, D, x, t, t_next, state, noise):
        return self.fit.flow(D.schedule, x, t, t_next), state


def test_self_recurrence_with_an_exact_step_leaves_the_marginals_invariant():
    """Spec 8(d): x_t ~ p_t, then k = 4 rounds of (exact step t -> s, re-noise s -> t by q(x_t | x_s)): the
    output has p_s's moments, mean a_s mu and covariance a_s^2 S + sig_s^2 I; the re-noising alone maps
    exact p_s draws to p_t's moments."""
    mu = torch.tensor([1.0, -0.5], dtype=F64)
    cov = torch.tensor([[1.0, 0.5], [0.5, 0.6]], dtype=F64)
    gmm = GMM.gaussian(mu, cov)
    sch = VPLinear()
    den = gmm.denoiser(sch)
    t, s = sch.t_for_sigma_ratio(2.0), sch.t_for_sigma_ratio(0.5)
    n = 40000
    x = noisy(gmm, sch, t, n, 3)
    g = torch.Generator().manual_seed(4)
    solver = SelfRecurrence(ExactGaussianStep(GaussianFit.from_moments(mu, cov)), 4)
    out, _ = solver.step(den, x, t, s, None, Gaussian(g))

    def check(v, time):
        p = point(sch, time)
        m, c = p.alpha * mu, p.alpha**2 * cov + p.sigma**2 * torch.eye(2, dtype=F64)
        tol = 5 * math.sqrt(float(c.diagonal().max()) / n)
        assert (v.mean(0) - m).abs().max() < tol
        assert (torch.cov(v.T) - c).abs().max() < 5 * float(c.diagonal().max()) * math.sqrt(2 / n)

    check(out, s)
    check(renoise(sch, noisy(gmm, sch, s, n, 5), s, t, torch.randn(n, 2, generator=g, dtype=F64)), t)
    # and the recurrence really re-ran the step: k = 4 uses 3 extra noise draws, a different output than k = 1
    once, _ = SelfRecurrence(solver.solver, 1).step(den, x, t, s, None, Gaussian(g))
    assert not torch.allclose(once, out)


def test_self_recurrence_repeats_from_the_step_state_and_counts_evaluations(gmm):
    """Multistep solvers: every repeat starts from the state given to the step, so a k = 3 trajectory has
    one history entry per grid step; NFE = k x steps."""
    out = guided_samples(gmm, None, "dpmpp-2m", steps=10, k=3)
    assert out.nfe == 30
    assert torch.isfinite(out.x).all()


def test_projection_after_universal_guidance_keeps_the_measurement_exact(gmm):
    """Nesting: Projection(UniversalGuidance(D, ...)) still satisfies A x0_hat = y at every step."""
    sch = VPLinear()
    op, y = SuperResolution(2, dims=1), torch.tensor([0.25], dtype=F64)
    den = Projection(UniversalGuidance(gmm.denoiser(sch), [Forward(quadratic([3.0, -2.0]), 0.5)]), op, y)
    errs = []
    grid = make_grid(sch, 10, UniformT())
    g = torch.Generator().manual_seed(0)
    x = initial_noise(sch, float(grid[0]), (64, 2), g, dtype=F64)
    out = sample(
        den,
        SOLVERS["unipc"](),
        grid,
        x,
        None,
        Gaussian(g),
        [lambda info: errs.append(float((op(info.x0_hat) - y).abs().max()))],
    )
    assert max(errs) < 1e-6 and (op(out.x) - y).abs().max() < 1e-6


def test_errors_name_the_bad_value(gmm):
    den = gmm.denoiser(VPLinear())
    with pytest.raises(ConfigError, match="callable loss"):
        Forward("l2", 1.0)
    with pytest.raises(ConfigError, match="guidance scale"):
        Forward(quadratic([0, 0]), float("nan"))
    with pytest.raises(ConfigError, match="non-negative integer, got -1"):
        Backward(quadratic([0, 0]), -1)
    with pytest.raises(ConfigError, match="lr must be a positive finite number, got 0"):
        Backward(quadratic([0, 0]), 1, 0)
    with pytest.raises(ConfigError, match="Forward"):
        UniversalGuidance(den, ["forward"])
    with pytest.raises(ConfigError, match="share steps and lr"):
        UniversalGuidance(den, [Backward(quadratic([0, 0]), 1), Backward(quadratic([0, 0]), 2)])
    with pytest.raises(ConfigError, match=r"one value per sample, shape \(4,\), got \(4, 2\)"):
        UniversalGuidance(den, [Forward(lambda x0, c: x0, 1.0)])(torch.zeros(4, 2, dtype=F64), 0.5)
    with pytest.raises(ConfigError, match="k must be a positive integer, got 0"):
        SelfRecurrence(SOLVERS["ddim"](), 0)
    with pytest.raises(ConfigError, match="wraps a solver object"):
        SelfRecurrence("ddim", 2)
