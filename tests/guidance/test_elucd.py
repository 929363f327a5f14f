"""EluCD pieces against their formulas (Softplus smoothing, temperature/margin surrogate, the x0-fed
classifier gradient, the DDPM and EDM schedules) and the DDPM mean shift of the Denoiser wrapper, on the GMM
with its exact clean classifier."""

import math

import pytest
import torch
from torch import nn

from condiff.core.grids import UniformT, make_grid
from condiff.core.sampling import CountingDenoiser, Gaussian, NoiseSource, sample
from condiff.core.schedules import VPLinear
from condiff.errors import ConfigError
from condiff.guidance.elucd import (
    EluCD,
    calibrated_log_likelihood,
    ddpm_guidance_variance,
    ddpm_step_factors,
    edm_classifier_input,
    edm_guidance_shift,
    edm_guidance_weight,
    sine_bump,
    softplus_smoothed,
    x0_gradient,
)
from condiff.solvers import SOLVERS

F64 = torch.float64


class Zero(NoiseSource):
    def sample(self, like):
        return torch.zeros_like(like)


def clean_logits(gmm):
    """Exact clean-classifier logits z_c(x0) = log sum_{k in c} pi_k N(x0; mu_k, Sigma_k)."""

    def logits(x0):
        joint = torch.log(gmm.weights)[None] + gmm.component_log_prob(x0, 1.0, 0.0)
        return torch.stack([torch.logsumexp(joint[:, gmm.classes == c], 1) for c in range(gmm.num_classes)], 1)

    return logits


def test_softplus_smoothing_replaces_every_relu_and_tends_to_relu():
    """Nested ReLUs all become Softplus(beta) in a copy (the original is untouched); Softplus_beta - ReLU lies
    in [0, log(2)/beta] with the maximum log(2)/beta at 0."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Sequential(nn.Linear(5, 3), nn.ReLU(inplace=True)))
    smooth = softplus_smoothed(net, 3.0)
    assert sum(isinstance(m, nn.ReLU) for m in net.modules()) == 2
    assert sum(isinstance(m, nn.ReLU) for m in smooth.modules()) == 0
    assert [m.beta for m in smooth.modules() if isinstance(m, nn.Softplus)] == [3.0, 3.0]
    x = torch.randn(7, 4)
    h = torch.nn.functional.softplus(net[0](x), beta=3.0)
    assert torch.allclose(smooth(x), torch.log1p(torch.exp(3.0 * net[2][0](h))) / 3.0, atol=1e-6)
    z = torch.linspace(-3, 3, 601, dtype=F64)
    for beta in (1.0, 10.0, 100.0):
        gap = softplus_smoothed(nn.ReLU(), beta)(z) - torch.relu(z)
        assert bool((gap >= 0).all()) and math.isclose(float(gap.max()), math.log(2) / beta, rel_tol=1e-12)
    with pytest.raises(ConfigError):
        softplus_smoothed(net, float("inf"))


def test_calibrated_log_likelihood_and_its_gradient():
    """J = tau1 z_y - logsumexp(tau2 z): tau1 = tau2 = 1 is log-softmax; tau2 = 0 is tau1 z_y - log C; the
    gradient in z is tau1 e_y - tau2 softmax(tau2 z)."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(6, 5, generator=g, dtype=F64)
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    assert torch.allclose(calibrated_log_likelihood(z, y), torch.log_softmax(z, 1).gather(1, y[:, None])[:, 0])
    assert torch.allclose(calibrated_log_likelihood(z, y, 2.0, 0.0), 2.0 * z.gather(1, y[:, None])[:, 0] - math.log(5))
    for tau1, tau2 in ((1.0, 0.5), (2.0, 1.0), (0.7, 0.0)):
        zg = z.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(calibrated_log_likelihood(zg, y, tau1, tau2).sum(), zg)
        ref = tau1 * nn.functional.one_hot(y, 5).to(F64) - tau2 * torch.softmax(tau2 * z, 1)
        assert torch.allclose(grad, ref, rtol=1e-12, atol=1e-12)


def test_x0_gradient_is_the_exact_clean_posterior_gradient_at_the_clipped_point(gmm):
    """With the exact clean classifier and tau1 = tau2 = 1 the gradient is grad log p(y | x0) (spec 6d-i),
    taken at clamp(x0) as a leaf (not zeroed by the clip)."""
    g = torch.Generator().manual_seed(0)
    x0 = 2.0 * torch.randn(32, 2, generator=g, dtype=F64)
    y = torch.arange(32) % 2
    leaf = x0.clamp(-1, 1).requires_grad_(True)
    (ref,) = torch.autograd.grad(torch.log(gmm.class_posterior(leaf, 1.0, 0.0).gather(1, y[:, None])).sum(), leaf)
    assert torch.allclose(x0_gradient(clean_logits(gmm), x0, y, 1.0, 1.0), ref, rtol=1e-10, atol=1e-10)
    xg = x0.clone().requires_grad_(True)  # differentiating through the clamp would zero clipped coordinates
    (through,) = torch.autograd.grad(
        torch.log(gmm.class_posterior(xg.clamp(-1, 1), 1.0, 0.0).gather(1, y[:, None])).sum(), xg
    )
    clipped = x0.abs() > 1
    assert bool((through[clipped] == 0).all()) and bool((ref[clipped] != 0).all())
    leaf = x0.clone().requires_grad_(True)
    (ref,) = torch.autograd.grad(torch.log(gmm.class_posterior(leaf, 1.0, 0.0).gather(1, y[:, None])).sum(), leaf)
    assert torch.allclose(x0_gradient(clean_logits(gmm), x0, y, 1.0, 1.0, clip=None), ref, rtol=1e-10, atol=1e-10)


def test_schedule_shapes():
    """Sine bump: 0 at both ends, 1 in the middle, symmetric. DDPM factor: Sigma + gamma sin(pi t/T) Sigma_max.
    EDM weight: w_max at i = 0, linear decay plus a bump, floored at 1e-5."""
    u = torch.linspace(0, 1, 101, dtype=F64)
    b = sine_bump(u)
    assert b[0] == 0 and abs(float(b[-1])) < 1e-15 and b[50] == 1 and torch.allclose(b, b.flip(0), atol=1e-15)
    ref = torch.tensor(0.2 + 0.3 * 0.5 * math.sin(math.pi / 4), dtype=F64)
    assert torch.allclose(ddpm_guidance_variance(0.2, 0.5, 25, 100, 0.3), ref)
    assert float(ddpm_guidance_variance(0.2, 0.5, 0, 100, 0.3)) == 0.2
    n, w_max, gam = 18, 0.004, 0.3
    i = torch.arange(n, dtype=F64)
    w = edm_guidance_weight(i, n, w_max, gam)
    ref = w_max * (n + 1 - i) / (n + 1) + gam * w_max * torch.sin(math.pi * i / n)
    assert torch.allclose(w, ref, rtol=1e-12) and math.isclose(float(w[0]), w_max)
    assert torch.allclose(edm_guidance_weight(i, n, w_max, 0.0), w_max * (n + 1 - i) / (n + 1))
    assert float(edm_guidance_weight(n + 1, n, 1e-4, 0.0)) == 1e-5  # the floor
    bump = w - edm_guidance_weight(i, n, w_max, 0.0)
    assert int(bump.argmax()) == n // 2


def test_edm_input_normalisation_and_shift():
    g = torch.Generator().manual_seed(0)
    spread = torch.tensor([0.3, 0.9, 2.0, 10.0], dtype=F64)[:, None, None, None]
    x = torch.randn(4, 3, 5, 5, generator=g, dtype=F64) * spread
    rms = lambda v: v.pow(2).flatten(1).mean(1).sqrt()  # noqa: E731
    inp = edm_classifier_input(x)
    assert torch.equal(inp[:2], x[:2]) and torch.allclose(rms(inp[2:]), torch.ones(2, dtype=F64))
    grad = torch.randn(4, 3, 5, 5, generator=g, dtype=F64)
    shift = edm_guidance_shift(x, grad, 0.004)
    assert torch.allclose(rms(shift), 0.004 * rms(x))
    cos = (shift * grad).flatten(1).sum(1) / (shift.flatten(1).norm(dim=1) * grad.flatten(1).norm(dim=1))
    assert torch.allclose(cos, torch.ones(4, dtype=F64))


def test_ddpm_step_mean_moves_by_the_guidance_variance_times_the_gradient(gmm):
    """Under the ddpm solver, each step's mean moves by exactly V_k s dJ/dx0 (the official DDPM script's
    mean shift with the sine bump); the shift vanishes on the final step (Sigma = 0, bump = 0)."""
    sch = VPLinear()
    grid = make_grid(sch, 10, UniformT())
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 2, generator=g, dtype=F64)
    y = torch.arange(16) % 2
    den = gmm.denoiser(sch)
    s = 2.0
    guided = EluCD(den, clean_logits(gmm), grid, scale=s, tau1=1.0, tau2=0.5, gamma=0.3, clip=None)
    v, c = ddpm_step_factors(sch, grid, 0.3)
    m, running = grid.numel() - 1, 0.0  # V_k by hand: posterior variance, its running max, the bump at u = t/T
    for k in range(m):
        a_t, s_t = float(sch.alpha(grid[k])), float(sch.sigma(grid[k]))
        a_s, s_s = float(sch.alpha(grid[k + 1])), float(sch.sigma(grid[k + 1]))
        var_ts = s_t**2 - (a_t / a_s) ** 2 * s_s**2
        variance = var_ts * s_s**2 / s_t**2
        running = max(running, variance)
        ref = variance + 0.3 * running * max(math.sin(math.pi * (m - 1 - k) / m), 0.0)
        assert math.isclose(float(v[k]), ref, rel_tol=1e-12, abs_tol=1e-15)
        assert math.isclose(float(c[k]), a_s * var_ts / s_t**2, rel_tol=1e-12)
    ddpm = SOLVERS["ddpm"]()
    for k in (0, 4, 9):
        t, t_next = float(grid[k]), float(grid[k + 1])
        base, _ = ddpm.step(CountingDenoiser(den, {}), x, t, t_next, ddpm.init_state(grid), Zero())
        out, _ = ddpm.step(CountingDenoiser(guided, {"y": y}), x, t, t_next, ddpm.init_state(grid), Zero())
        grad = x0_gradient(clean_logits(gmm), den(x, t), y, 1.0, 0.5, clip=None)
        assert torch.allclose(out - base, float(v[k]) * s * grad, rtol=1e-9, atol=1e-12)
        assert (grad.abs() > 0).any()
    v0, _ = ddpm_step_factors(sch, grid, 0.0)
    assert float(v[-1]) == 0.0 and float(v[m // 2]) > float(v0[m // 2])  # no shift at the end, bump mid-way
    with pytest.raises(ConfigError, match="grid times"):
        guided(x, 0.123, {"y": y})
    with pytest.raises(ConfigError, match="target class"):
        guided(x, float(grid[0]), {})


def test_guided_sampling_raises_the_target_class_rate_monotonically(gmm):
    """Spec 6d-iii: DDPM sampling of the unconditional GMM guided by its exact clean classifier hits the
    target class (exact clean posterior argmax) more often as s grows."""
    sch = VPLinear()
    grid = make_grid(sch, 40, UniformT())
    n = 400
    y = torch.zeros(n, dtype=torch.long)
    ddpm = SOLVERS["ddpm"]()
    rates = []
    for s in (0.0, 0.05, 0.2):  # measured: 0.50, 0.73, 0.96
        g = torch.Generator().manual_seed(0)
        x = float(sch.sigma(grid[0])) * torch.randn(n, 2, generator=g, dtype=F64)
        guided = EluCD(gmm.denoiser(sch), clean_logits(gmm), grid, scale=s, tau1=1.0, tau2=1.0, clip=None)
        out = sample(guided, ddpm, grid, x, {"y": y}, Gaussian(g)).x
        rates.append(float((gmm.class_posterior(out, 1.0, 0.0).argmax(1) == 0).double().mean()))
    assert rates[0] < rates[1] < rates[2], rates
    assert rates[2] - rates[0] > 0.3, rates


def test_check_solver_dry_run_finds_off_grid_solvers():
    """check_solver runs the solver on a zero denoiser: solvers that call the model at grid times only pass;
    DPM-Solver++(2S) (a midpoint in log-SNR) and EDM's churn sampler are refused with the grid-times error."""
    grid = make_grid(VPLinear(), 6, UniformT())

    class D:
        schedule = VPLinear()

        def __call__(self, x, t, cond=None):
            return x

    e = EluCD(D(), lambda x0: torch.zeros(x0.shape[0], 2, dtype=x0.dtype), grid)
    for name in ("ddpm", "ddim", "dpmpp-2m", "heun", "unipc"):
        e.check_solver(SOLVERS[name](), grid)
    for name in ("dpmpp-2s", "edm-sde"):
        with pytest.raises(ConfigError, match="grid times"):
            e.check_solver(SOLVERS[name](), grid)
