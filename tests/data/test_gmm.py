"""The GMM oracle checked against independent computations (torch.distributions, autograd, Monte Carlo)."""

import math

import pytest
import torch
from torch.distributions import Categorical, MixtureSameFamily, MultivariateNormal

from condiff.core.schedules import EDM, VPCosine, VPLinear
from condiff.data.gmm import GMM, NULL_CLASS, gaussian_pf_ode, reference_pf_ode
from condiff.errors import ConfigError

F64 = torch.float64
SCHEDULES = [VPLinear(), EDM()]


def _ids(s):
    return type(s).__name__


def independent_log_prob(gmm, x, a, s, y=None):
    """log p_t(x | y) built from torch.distributions, sharing nothing with the oracle but its parameters."""
    keep = torch.ones(len(gmm.weights), dtype=torch.bool) if y is None else gmm.classes == y
    cov = a**2 * gmm.covs[keep] + s**2 * torch.eye(gmm.dim, dtype=F64)
    mix = MixtureSameFamily(Categorical(probs=gmm.weights[keep]), MultivariateNormal(a * gmm.means[keep], cov))
    return mix.log_prob(x)


def points(gmm, schedule, t, n=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    x0, _ = gmm.sample(n, g)
    t = torch.tensor(t, dtype=F64)
    return schedule.alpha(t) * x0 + schedule.sigma(t) * torch.randn(x0.shape, generator=g, dtype=F64)


def mid_time(schedule, ratio=0.7):
    return schedule.t_for_sigma_ratio(ratio)


@pytest.mark.parametrize("y", [None, 0, 1])
@pytest.mark.parametrize("schedule", SCHEDULES, ids=_ids)
def test_log_prob_and_score_match_independent_autograd(gmm, schedule, y):
    t = mid_time(schedule)
    den = gmm.denoiser(schedule)
    a, s = float(schedule.alpha(t)), float(schedule.sigma(t))
    x = points(gmm, schedule, t).requires_grad_(True)
    ref = independent_log_prob(gmm, x, a, s, y)
    (grad,) = torch.autograd.grad(ref.sum(), x)
    cond = None if y is None else {"y": torch.full((x.shape[0],), y)}
    x = x.detach()
    assert torch.allclose(den.log_prob(x, t, cond), ref.detach(), rtol=1e-12, atol=1e-12)
    assert torch.allclose(den.score(x, t, cond), grad, rtol=1e-10, atol=1e-12)
    eps = den.eps(x, t, cond)
    assert torch.allclose(eps, -s * grad, rtol=1e-10, atol=1e-12)
    assert torch.allclose(den(x, t, cond), (x - s * eps) / a, rtol=1e-10, atol=1e-10)


def test_denoiser_per_sample_t_and_labels(gmm):
    sch = VPLinear()
    t = torch.linspace(0.05, 0.9, 8, dtype=F64)
    x = points(gmm, sch, 0.5, n=8)
    y = torch.tensor([0, 1, NULL_CLASS, 1, 0, NULL_CLASS, 0, 1])
    den = gmm.denoiser(sch)
    batched = den(x, t, {"y": y})
    for i in range(8):
        cond = None if y[i] == NULL_CLASS else {"y": y[i : i + 1]}
        assert torch.allclose(batched[i : i + 1], den(x[i : i + 1], float(t[i]), cond), rtol=1e-13, atol=1e-13)


def test_null_class_is_unconditional(gmm):
    sch = VPLinear()
    x = points(gmm, sch, 0.4)
    den = gmm.denoiser(sch)
    ref = den(x, 0.4)
    assert torch.equal(den(x, 0.4, {}), ref)
    assert torch.equal(den(x, 0.4, GMM.null_cond(x.shape[0])), ref)
    with pytest.raises(ConfigError):
        den(x, 0.4, {"y": torch.full((x.shape[0],), 2)})


def test_x0_mean_matches_monte_carlo(gmm):
    """Self-normalised importance sampling of E[x0 | x_t]: x0_i ~ p_0, weights N(x_t; a x0_i, s^2 I).

    The tolerance is 4.5 delta-method standard errors per coordinate, from the draws themselves."""
    sch = VPLinear()
    t = sch.t_for_sigma_ratio(1.0)
    a, s = float(sch.alpha(t)), float(sch.sigma(t))
    x0, _ = gmm.sample(200_000, torch.Generator().manual_seed(7))
    xt = points(gmm, sch, t, n=6, seed=3)
    exact = gmm.denoiser(sch)(xt, t)
    for j in range(xt.shape[0]):
        logw = -((xt[j] - a * x0) ** 2).sum(1) / (2 * s * s)
        w = torch.softmax(logw, 0)
        est = (w[:, None] * x0).sum(0)
        se = torch.sqrt((w[:, None] ** 2 * (x0 - est) ** 2).sum(0))
        assert 1.0 / float((w**2).sum()) > 2000  # enough effective samples for the normal approximation
        assert bool(((est - exact[j]).abs() <= 4.5 * se).all()), (est, exact[j], se)


def test_class_posterior_sums_to_one_and_obeys_bayes(gmm):
    sch = VPLinear()
    t = mid_time(sch)
    x = points(gmm, sch, t)
    den = gmm.denoiser(sch)
    post = den.class_posterior(x, t)
    assert post.shape == (x.shape[0], gmm.num_classes)
    assert torch.allclose(post.sum(1), torch.ones(x.shape[0], dtype=F64), rtol=0, atol=1e-14)
    for y in range(gmm.num_classes):
        prior = float(gmm.weights[gmm.classes == y].sum())
        bayes = den.log_prob(x, t, {"y": torch.tensor(y)}) + math.log(prior) - den.log_prob(x, t)
        assert torch.allclose(torch.log(post[:, y]), bayes, rtol=1e-10, atol=1e-10)


def test_class_posterior_at_t_to_zero_is_the_clean_posterior(gmm):
    sch = VPLinear()
    x0, _ = gmm.sample(64, torch.Generator().manual_seed(11))
    logs = torch.stack([independent_log_prob(gmm, x0, 1.0, 0.0, y) for y in range(gmm.num_classes)], 1)
    prior = torch.stack([gmm.weights[gmm.classes == y].sum() for y in range(gmm.num_classes)])
    clean = torch.softmax(logs + torch.log(prior), 1)
    den = gmm.denoiser(sch)
    assert torch.allclose(den.class_posterior(x0, sch.t_clean), clean, rtol=0, atol=1e-12)
    # the limit t -> 0 (below t_min, so not through t_for_sigma_ratio, which clamps): at sigma/alpha = 1e-6
    # the posterior of unit-scale components moves by O(1e-6)
    t = float(sch.t_from_log_snr(torch.tensor(-2 * math.log(1e-6), dtype=F64)))
    assert 0 < t < 1e-9
    xt = sch.alpha(t) * x0 + sch.sigma(t) * torch.randn(
        x0.shape, generator=torch.Generator().manual_seed(12), dtype=F64
    )
    assert torch.allclose(den.class_posterior(xt, t), clean, rtol=0, atol=1e-5)


def test_noisy_classifier_gradient_is_the_conditional_score_difference(gmm):
    """grad log p(y | x_t) = score(x | y) - score(x): the identity behind classifier guidance and CFG."""
    sch = VPLinear()
    t = mid_time(sch)
    den = gmm.denoiser(sch)
    x = points(gmm, sch, t).requires_grad_(True)
    y = torch.arange(x.shape[0]) % gmm.num_classes
    logp = torch.log(den.class_posterior(x, t).gather(1, y[:, None])).sum()
    (grad,) = torch.autograd.grad(logp, x)
    x = x.detach()
    assert torch.allclose(grad, den.score(x, t, {"y": y}) - den.score(x, t), rtol=1e-9, atol=1e-11)


def test_sampling_is_seeded_and_matches_the_moments(gmm):
    x1, y1 = gmm.sample(40_000, torch.Generator().manual_seed(3))
    x2, y2 = gmm.sample(40_000, torch.Generator().manual_seed(3))
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    n = x1.shape[0]
    mean = (gmm.weights[:, None] * gmm.means).sum(0)
    second = (gmm.weights[:, None, None] * (gmm.covs + gmm.means[:, :, None] * gmm.means[:, None, :])).sum(0)
    cov = second - mean[:, None] * mean[None, :]
    # 5 standard errors of a mean of n draws
    assert bool(((x1.mean(0) - mean).abs() <= 5 * torch.sqrt(torch.diagonal(cov) / n)).all())
    emp = torch.cov(x1.T)
    assert torch.allclose(emp, cov, rtol=0, atol=5 * float(torch.diagonal(cov).max()) * math.sqrt(2 / n))
    for y in range(gmm.num_classes):
        p = float(gmm.weights[gmm.classes == y].sum())
        assert abs(float((y1 == y).double().mean()) - p) <= 5 * math.sqrt(p * (1 - p) / n)


def test_conditional_sampling_stays_in_class(gmm):
    x, y = gmm.sample(500, torch.Generator().manual_seed(4), y=1)
    assert bool((y == 1).all())
    post = gmm.class_posterior(x, 1.0, 0.0)
    assert float(post[:, 1].mean()) > 0.5


def test_rejects_bad_parameters():
    with pytest.raises(ConfigError):
        GMM(torch.zeros(2, 2), torch.ones(2, 2) * torch.tensor([1.0, -1.0]), torch.ones(2))
    with pytest.raises(ConfigError):
        GMM(torch.zeros(2, 2), torch.ones(2, 2), torch.ones(3))
    with pytest.raises(ConfigError):
        GMM(torch.zeros(2, 2), torch.ones(2, 2), torch.tensor([1.0, 0.0]))
    with pytest.raises(ConfigError):
        GMM(torch.zeros(2, 2), torch.ones(2, 2), torch.ones(2), classes=torch.tensor([0, 2]))


def random_gaussian(d, seed):
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(d, generator=g, dtype=F64)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=F64))
    lam = torch.exp(math.log(0.01) + math.log(100) * torch.rand(d, generator=g, dtype=F64))  # [0.01, 1]
    return mean, q @ torch.diag(lam) @ q.T


@pytest.mark.parametrize("schedule", [VPLinear(), VPCosine(), EDM()], ids=_ids)
def test_gaussian_closed_form_matches_reference_ode(schedule):
    mean, cov = random_gaussian(16, seed=5)
    den = GMM.gaussian(mean, cov).denoiser(schedule)
    t_from, t_to = schedule.default_t_start(), schedule.t_min
    x = schedule.sigma(torch.tensor(t_from, dtype=F64)) * torch.randn(
        8, 16, generator=torch.Generator().manual_seed(6), dtype=F64
    )
    exact = gaussian_pf_ode(mean, cov, schedule, x, t_from, t_to)
    ref = reference_pf_ode(den, x, t_from, t_to, steps=512)
    assert float((ref - exact).abs().max()) < 1e-6
    # the closed form is a flow: composing two legs is the one-leg map, and a zero-length leg is the identity
    t_mid = schedule.t_for_sigma_ratio(1.0)
    two = gaussian_pf_ode(mean, cov, schedule, gaussian_pf_ode(mean, cov, schedule, x, t_from, t_mid), t_mid, t_to)
    assert torch.allclose(two, exact, rtol=1e-12, atol=1e-12)
    assert torch.allclose(gaussian_pf_ode(mean, cov, schedule, x, t_from, t_from), x, rtol=1e-13, atol=1e-13)


def test_reference_ode_is_stable_under_step_halving(gmm):
    sch = VPLinear()
    t_from, t_to = sch.t_for_sigma_ratio(80.0), sch.t_for_sigma_ratio(1e-2)
    den = gmm.denoiser(sch)
    x = points(gmm, sch, t_from, n=64)
    coarse = reference_pf_ode(den, x, t_from, t_to, steps=256)
    fine = reference_pf_ode(den, x, t_from, t_to, steps=512)
    finer = reference_pf_ode(den, x, t_from, t_to, steps=1024)
    e1, e2 = float((coarse - finer).abs().max()), float((fine - finer).abs().max())
    assert e2 < 1e-6
    assert e1 / e2 > 10  # fourth order: halving the step cuts the error ~16x
