"""RDDM (condiff.tasks.rddm): with the residual off it is exactly DDIM / DDPM on the variance-exploding baseline, a
DDPM table converts exactly to DDIM, the forward marginal is the formula (and the composition of its one-step
increments), oracle predictions return I_0 for any number of steps, and an exact Gaussian posterior recovers the
clean mean."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from condiff.core.denoiser import wrap
from condiff.core.sampling import Gaussian, Recorded
from condiff.core.sampling import sample as condiff_sample
from condiff.core.schedules import EDM, VPDiscrete
from condiff.errors import ConfigError
from condiff.solvers.ddim import DDIM
from condiff.solvers.ddpm import DDPM
from condiff.tasks import rddm


class EpsNet(nn.Module):
    """A small nonlinear eps-network of (x, time)."""

    def __init__(self, dim=3):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(dim + 1, 16), nn.Tanh(), nn.Linear(16, dim)).double()

    def forward(self, x, t):
        t = torch.as_tensor(t, dtype=x.dtype).reshape(-1, 1).expand(x.shape[0], 1)
        return self.net(torch.cat([x, t / 10.0], dim=1))


def noises(n, shape, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(n)]


@pytest.mark.parametrize("eta, solver", [(0.0, DDIM(eta=0.0)), (0.25, DDIM(eta=0.5)), (1.0, DDPM())])
def test_residual_off_is_ddim_on_the_ve_baseline(eta, solver):
    net = EpsNet()
    T = 12
    sched = rddm.RDDMSchedule.residual_off(torch.linspace(0.05, 3.0, T, dtype=torch.float64))
    times = [11, 8, 5, 2, 0, -1]
    x_start = torch.randn(4, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x_in = torch.randn(4, 3, dtype=torch.float64)  # anything: the residual term is off

    def model(x, t, x_in, cond):
        return {"res": torch.randn_like(x), "noise": net(x, sched.beta_bar[t])}  # res is multiplied by 0

    zs = noises(len(times), x_start.shape)
    ours = rddm.sample(model, sched, x_in, eta=eta, noise=Recorded(list(zs)), x_start=x_start, times=times)

    denoiser = wrap(net, EDM(), "eps", call=lambda n, x, t, cond: n(x, t))
    grid = torch.tensor([float(sched.beta_bar[t]) for t in times[:-1]] + [0.0], dtype=torch.float64)
    ref = condiff_sample(denoiser, solver, grid, x_start, noise=Recorded(list(zs))).x
    assert torch.allclose(ours, ref, atol=1e-12, rtol=0), float((ours - ref).abs().max())


def test_ddpm_table_converts_exactly_to_ddim():
    net = EpsNet()
    vp = VPDiscrete.from_betas("linear", 100)
    sched = rddm.RDDMSchedule.from_alphas_cumprod(vp.alphas_cumprod)
    x_t = torch.randn(5, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    x_in = torch.zeros_like(x_t)
    model = rddm.eps_model(lambda x, t: net(x, t.double()), vp.alphas_cumprod)
    times = rddm.timesteps(sched, 7)
    assert times[0] == 99 and times[-1] == -1
    ours = rddm.sample(model, sched, x_in, x_start=x_t, times=times)
    denoiser = wrap(net, vp, "eps", call=lambda n, x, t, cond: n(x, t))
    ref = condiff_sample(denoiser, DDIM(), torch.tensor(times, dtype=torch.float64), x_t).x
    assert torch.allclose(ours, ref, atol=1e-9, rtol=0), float((ours - ref).abs().max())
    # the forward processes agree: I_t = sqrt(abar) x0 + sqrt(1 - abar) eps with I_in = 0
    x0, eps = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    a = vp.alphas_cumprod[40].sqrt()
    assert torch.allclose(rddm.q_sample(sched, x0, x_in, 40, eps), a * x0 + (1 - a**2).sqrt() * eps, atol=1e-12)


def test_paper_schedule_and_forward_marginal():
    sched = rddm.RDDMSchedule.paper(10, sum_scale=0.01)
    assert float(sched.alpha_bar[-1]) == pytest.approx(1.0, abs=1e-12)
    assert float(sched.beta_bar[-1]) ** 2 == pytest.approx(0.01, abs=1e-12)
    alphas = torch.diff(sched.alpha_bar, prepend=torch.zeros(1, dtype=torch.float64))
    assert bool((alphas[1:] < alphas[:-1]).all())  # decreased
    g = torch.Generator().manual_seed(3)
    x0, x_in = torch.randn(1, 4, generator=g, dtype=torch.float64), torch.randn(1, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(1, 4, generator=g, dtype=torch.float64)
    for t in (0, 4, 9):
        ab, bb = sched.alpha_bar[t], sched.beta_bar[t]
        assert torch.equal(rddm.q_sample(sched, x0, x_in, t, eps), x0 + ab * (x_in - x0) + bb * eps)
    assert torch.allclose(rddm.q_sample(sched, x0, x_in, 9, eps), x_in + 0.1 * eps, atol=1e-12)
    assert torch.equal(rddm.q_sample(sched, x0, x_in, -1, eps), x0)  # the clean point
    # the marginal is the composition of the one-step increments I_t = I_{t-1} + alpha_t I_res + beta_t eps_t
    n, t = 200_000, 6
    betas = torch.diff(sched.beta_bar**2, prepend=torch.zeros(1, dtype=torch.float64)).sqrt()
    x = x0.expand(n, 4).clone()
    for i in range(t + 1):
        x = x + alphas[i] * (x_in - x0) + betas[i] * torch.randn(n, 4, generator=g, dtype=torch.float64)
    mean, std = rddm.marginal(sched, x0, x_in, t)
    se = float(std) / n**0.5
    assert (x.mean(0) - mean[0]).abs().max() < 5 * se
    assert (x.var(0) / std**2 - 1).abs().max() < 0.02


@pytest.mark.parametrize("steps", [1, 3, 10])
def test_oracle_predictions_return_the_clean_image(steps):
    sched = rddm.RDDMSchedule.paper(10)
    g = torch.Generator().manual_seed(4)
    x0, x_in = torch.randn(3, 2, generator=g, dtype=torch.float64), torch.randn(3, 2, generator=g, dtype=torch.float64)

    def oracle(x, t, x_in, cond):
        ab, bb = sched.at(t)
        ab, bb = ab.reshape(-1, 1), bb.reshape(-1, 1)
        res = x_in - x0
        return {"res": res, "noise": (x - x0 - ab * res) / bb}

    out = rddm.sample(oracle, sched, x_in, steps=steps, noise=Recorded(noises(1, x0.shape)))
    assert torch.allclose(out, x0, atol=1e-12)


@pytest.mark.parametrize("objective", ["pred_res", "pred_noise", "pred_x0_noise", "pred_res_noise"])
def test_objectives_recover_residual_and_noise(objective):
    sched = rddm.RDDMSchedule.paper(10)
    g = torch.Generator().manual_seed(5)
    x0, x_in, eps = (torch.randn(3, 2, generator=g, dtype=torch.float64) for _ in range(3))
    x_t = rddm.q_sample(sched, x0, x_in, 5, eps)
    out = rddm.targets(x0, x_in, eps, objective)
    res, noise = rddm.to_res_noise(sched, objective, out, x_t, x_in, 5)
    assert torch.allclose(res, x_in - x0, atol=1e-10) and torch.allclose(noise, eps, atol=1e-10)
    assert float(rddm.loss(out, out)) == 0.0


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_exact_gaussian_posterior_recovers_the_clean_mean(eta):
    """I_0 | I_in ~ N(m, v) with m = I_in / 2: the exact posterior mean E[I_0 | I_t] drives the sampler; the mean is
    preserved exactly by the linear step, so the samples' mean is m within Monte Carlo error; the variance converges
    to v with the number of steps (0.73 v at 20 of 50 steps, 0.98 v at 200 of 200)."""
    sched = rddm.RDDMSchedule.paper(200, sum_scale=1.0)
    n, v = 40_000, 0.25
    g = torch.Generator().manual_seed(6)
    x_in = torch.tensor([[2.0, -1.0]], dtype=torch.float64).expand(n, 2)
    m = x_in / 2

    def posterior(x, t, x_in, cond):
        ab, bb = sched.at(t)
        c, ab, bb = (1 - ab).reshape(-1, 1), ab.reshape(-1, 1), bb.reshape(-1, 1)
        x0 = m + c * v / (c**2 * v + bb**2) * (x - c * m - ab * x_in)
        return {"x0": x0, "noise": (x - c * x0 - ab * x_in) / bb}

    out = rddm.sample(posterior, sched, x_in, steps=200, eta=eta, objective="pred_x0_noise", noise=Gaussian(g))
    se = (v / n) ** 0.5
    assert (out.mean(0) - m[0]).abs().max() < 5 * se
    assert (out.var(0) / v - 1).abs().max() < 0.06


def test_bad_inputs_are_config_errors():
    sched = rddm.RDDMSchedule.paper(10)
    x = torch.zeros(2, 3)
    with pytest.raises(ConfigError, match="objective"):
        rddm.targets(x, x, x, "pred_v")
    with pytest.raises(ConfigError, match="RDDM times"):
        rddm.q_sample(sched, x, x, 10, x)
    with pytest.raises(ConfigError, match="eta"):
        rddm.step(sched, x, 5, 3, x, x, eta=2.0)
    with pytest.raises(ConfigError, match="s < t"):
        rddm.step(sched, x, 3, 5, x, x)
    with pytest.raises(ConfigError, match="one shape"):
        rddm.residual(x, torch.zeros(2, 4))
    with pytest.raises(ConfigError, match="weight schedule"):
        rddm.RDDMSchedule.paper(10, alpha_kind="cosine")
    with pytest.raises(ConfigError, match="alpha_bar_t = 1"):
        rddm.to_res_noise(sched, "pred_noise", {"noise": x}, x, x, 9)
    with pytest.raises(ConfigError, match="strictly increasing"):
        rddm.RDDMSchedule(alpha_bar=torch.zeros(3), beta_bar=torch.tensor([1.0, 1.0, 2.0]))
    with pytest.raises(ConfigError, match="steps"):
        rddm.timesteps(sched, 0)
    with pytest.raises(ConfigError, match="times must"):
        rddm.sample(lambda *a: {}, sched, x, times=[9, 5])
    with pytest.raises(ConfigError, match="RDDM times"):
        sched.at(torch.tensor([True]))
    with pytest.raises(ConfigError, match="mapping"):
        rddm.sample(lambda *a: x, sched, x, steps=2)
