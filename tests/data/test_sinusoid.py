"""The sinusoid oracle (spec D2(d)): its exact denoiser against the Monte-Carlo posterior mean, and its exact
conditional law of the future against samples."""

import pytest
import torch

from condiff.core.schedules import VPDiscrete, VPLinear
from condiff.data.sinusoid import SinusoidGP
from condiff.errors import ConfigError

F64 = torch.float64


def test_covariance_is_the_law_of_the_samples():
    gp = SinusoidGP(length=12, period=6.0, noise=0.1)
    x = gp.sample(200_000, torch.Generator().manual_seed(0))
    emp = x.T @ x / x.shape[0]
    assert torch.allclose(emp, gp.cov, atol=0.03)


@pytest.mark.parametrize("t", [0.1, 0.4, 0.8])
def test_exact_denoiser_is_the_monte_carlo_posterior_mean(t):
    """E[x0 | x_t] is linear in x_t for a Gaussian: the least-squares regression of x0 on x_t over Monte-Carlo
    pairs estimates it, and the residual x0 - D(x_t) is uncorrelated with x_t with E||r||^2 = tr Cov[x0 | x_t]."""
    gp = SinusoidGP(length=12, period=6.0, noise=0.1)
    schedule = VPLinear()
    D = gp.denoiser(schedule)
    g = torch.Generator().manual_seed(1)
    x0 = gp.sample(200_000, g)
    a, s = (float(v) for v in schedule.alpha_sigma(torch.tensor(t, dtype=F64)))
    xt = a * x0 + s * torch.randn(x0.shape, generator=g, dtype=F64)
    K = torch.linalg.lstsq(xt, x0).solution  # x0 ~ xt @ K
    exact = D(torch.eye(12, dtype=F64), t)  # D(x) = x @ K with K symmetric
    assert torch.allclose(K, exact, atol=0.02)
    r = x0 - D(xt, t)
    n = x0.shape[0]
    assert (r.T @ xt / n).abs().max() < 0.05
    mse = (r**2).sum(1)
    tr = torch.trace(D.posterior_cov(t))
    assert abs(mse.mean() - tr) < 3 * mse.std() / n**0.5 + 1e-9


def test_denoiser_times_dtypes_and_the_clean_end():
    gp = SinusoidGP(length=96)
    schedule = VPDiscrete.from_betas("linear", 100, 1e-4, 0.1)
    D = gp.denoiser(schedule)
    x = gp.sample(4, torch.Generator().manual_seed(2))
    assert torch.allclose(D(x, schedule.t_clean), x)  # sigma = 0: x0 = x
    per = D(x, torch.tensor([5.0, 5.0, 50.0, 50.0]))
    assert torch.allclose(per[:2], D(x[:2], 5.0)) and torch.allclose(per[2:], D(x[2:], 50.0))
    assert D(x.float(), 10.0).dtype == torch.float32
    with pytest.raises(ConfigError, match="96"):
        D(x[:, :10], 10.0)


def test_exact_conditional_law_against_samples():
    """x_f - mean(x_c) is uncorrelated with x_c and its covariance is the conditional covariance."""
    gp = SinusoidGP(length=12, period=6.0, noise=0.1)
    x = gp.sample(200_000, torch.Generator().manual_seed(3))
    mean, cov = gp.conditional(x[:, :8])
    r = x[:, 8:] - mean
    n = x.shape[0]
    assert (r.mean(0)).abs().max() < 0.01
    assert (r.T @ x[:, :8] / n).abs().max() < 0.01
    assert torch.allclose(r.T @ r / n, cov, atol=5e-4)
    assert torch.allclose(gp.conditional_std(8), cov.diagonal().sqrt())


def test_conditional_of_a_noiseless_period_is_nearly_exact():
    """With three periods observed, the signal's 3 coefficients are known up to the noise: the conditional sd is about
    the noise's, 0.1 sqrt(1 + 3 / 72) = 0.102 (least squares with 3 parameters from 72 points)."""
    gp = SinusoidGP(length=96, period=24.0, noise=0.1)
    sd = gp.conditional_std(72)
    assert torch.all(sd > 0.1) and torch.all(sd < 0.103)


@pytest.mark.parametrize(
    "kwargs", [{"length": 1}, {"period": 0.0}, {"noise": -0.1}, {"noise": float("nan")}, {"length": 3.5}]
)
def test_bad_laws_are_config_errors(kwargs):
    with pytest.raises(ConfigError):
        SinusoidGP(**kwargs)


def test_bad_contexts_are_config_errors():
    gp = SinusoidGP(length=12, period=6.0)
    with pytest.raises(ConfigError, match="context"):
        gp.conditional(torch.zeros(2, 12))
    with pytest.raises(ConfigError, match="context"):
        gp.conditional(torch.zeros(12))
    with pytest.raises(ConfigError, match="context"):
        gp.conditional(torch.zeros(2, 5), context_length=4)
