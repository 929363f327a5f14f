"""Oracles of randomized smoothing (Cohen et al. 2019), denoised smoothing (Carlini et al. 2023) and DensePure
(Xiao et al. 2023): the t* lookup, Clopper-Pearson, the exact radius of a linear classifier, DensePure with K = 1."""

from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import beta as beta_dist
from scipy.stats import norm
from statsmodels.stats.proportion import proportion_confint

from condiff.core.schedules import EDM, Flow, VPCosine, VPDiscrete, VPLinear
from condiff.errors import ConfigError
from condiff.solvers import DDIM
from condiff.tasks.smoothing import (
    ABSTAIN,
    DenoisedClassifier,
    DensePureClassifier,
    certify,
    clopper_pearson_lower,
    densepure_votes,
    majority_vote,
    one_shot_denoise,
    predict,
    purify,
    smoothing_time,
)

SCHEDULES = [VPLinear(), VPCosine(), VPDiscrete.from_betas("linear", 1000), EDM(), Flow()]


def _bisect_time(schedule, ratio: float) -> float:
    """The reference t*: plain bisection of sigma/alpha (increasing in t) on [t_min, t_max]."""
    lo, hi = float(schedule.t_min), float(schedule.t_max)
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if float(schedule.sigma_over_alpha(torch.tensor(mid, dtype=torch.float64))) < ratio:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: type(s).__name__)
@pytest.mark.parametrize("sigma", [0.12, 0.25, 0.5])
def test_t_star_is_exact(schedule, sigma):
    t = smoothing_time(schedule, sigma, scale=2.0)
    ratio = float(schedule.sigma_over_alpha(torch.tensor(t, dtype=torch.float64)))
    assert ratio == pytest.approx(2.0 * sigma, rel=1e-6)
    assert t == pytest.approx(_bisect_time(schedule, 2.0 * sigma), abs=1e-6 * max(1.0, schedule.t_max))


@pytest.mark.parametrize("sigma", [0.12, 0.25, 0.5, 1.0])
def test_t_star_on_a_grid_within_half_a_step(sigma):
    schedule = VPDiscrete.from_betas("linear", 1000)
    steps = torch.arange(1000)
    t = smoothing_time(schedule, sigma, scale=2.0, times=steps)
    assert t == int(t)
    assert abs(t - _bisect_time(schedule, 2.0 * sigma)) <= 0.5 + 1e-9
    coarse = torch.linspace(schedule.t_min, schedule.t_max, 21, dtype=torch.float64)
    t = smoothing_time(schedule, sigma, scale=2.0, times=coarse)
    assert abs(t - _bisect_time(schedule, 2.0 * sigma)) <= 0.5 * float(coarse[1] - coarse[0]) + 1e-9


@pytest.mark.parametrize(
    "k,n,alpha", [(0, 10, 0.001), (1, 10, 0.05), (50, 100, 0.001), (990, 1000, 0.001), (7, 7, 0.01)]
)
def test_clopper_pearson_matches_references(k, n, alpha):
    got = clopper_pearson_lower(k, n, alpha)
    ref = 0.0 if k == 0 else beta_dist.ppf(alpha, k, n - k + 1)
    assert got == pytest.approx(ref, abs=1e-12)
    assert got == pytest.approx(proportion_confint(k, n, alpha=2 * alpha, method="beta")[0], abs=1e-9)


def _linear(w: torch.Tensor, b: float):
    return lambda x: (x @ w + b > 0).long()


def test_linear_classifier_radius_is_sound_and_tight():
    gen = torch.Generator().manual_seed(0)
    w = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0], dtype=torch.float64)
    b, sigma = 0.3, 0.5
    f = _linear(w, b)
    for i in range(4):
        x = torch.randn(5, generator=gen, dtype=torch.float64) * 0.4
        exact = abs(float(x @ w) + b) / float(w.norm())
        gaps = []
        for n in (1_000, 100_000):
            cert = certify(f, x, sigma, 100, n, 0.001, num_classes=2, batch_size=100_000, generator=gen)
            assert cert.radius <= exact + 1e-12
            if not cert.abstained:
                assert cert.label == int(float(x @ w) + b > 0)
                assert cert.radius == pytest.approx(
                    sigma * norm.ppf(beta_dist.ppf(0.001, cert.count, n - cert.count + 1))
                )
            gaps.append(exact - cert.radius)
        if exact < 2 * sigma:  # p_A < Phi(2) is well estimated by 100k draws
            assert gaps[1] <= gaps[0]
            assert gaps[1] <= 0.05 * sigma


def test_boundary_point_abstains_and_predict_is_consistent():
    gen = torch.Generator().manual_seed(1)
    w = torch.tensor([1.0, 1.0], dtype=torch.float64)
    f = _linear(w, 0.0)
    x = torch.zeros(2, dtype=torch.float64)
    assert certify(f, x, 0.5, 100, 2000, 0.001, 2, generator=gen).label == ABSTAIN
    assert predict(f, x, 0.5, 2000, 0.001, 2, generator=gen) == ABSTAIN
    far = torch.tensor([3.0, 3.0], dtype=torch.float64)
    assert predict(f, far, 0.5, 200, 0.001, 2, generator=gen) == 1


class GaussianDenoiser:
    """The exact posterior mean of x_0 ~ N(mu, s^2 I) under x_t = alpha x_0 + sigma eps."""

    def __init__(self, schedule, mu: torch.Tensor, s: float):
        self.schedule, self.mu, self.s = schedule, mu, s

    def __call__(self, x, t, cond=None):
        a, g = (float(v) for v in self.schedule.alpha_sigma(torch.tensor(float(t), dtype=torch.float64)))
        gain = a * self.s**2 / (a * a * self.s**2 + g * g)
        return self.mu + gain * (x - a * self.mu)


def test_one_shot_denoise_is_the_posterior_mean_in_classifier_units():
    schedule = VPCosine()
    mu = torch.tensor([0.5, -0.25], dtype=torch.float64)
    D = GaussianDenoiser(schedule, mu, 0.3)
    x_noisy = torch.tensor([[0.6, 0.7], [0.1, 0.2]], dtype=torch.float64)  # in [0, 1]; the model in [-1, 1]
    sigma = 0.25
    got = one_shot_denoise(D, x_noisy, sigma, scale=2.0, shift=-1.0)
    y = 2.0 * x_noisy - 1.0  # = x0 + (2 sigma) eps in the model's units
    var = 0.3**2
    ref = (mu + var / (var + (2 * sigma) ** 2) * (y - mu) + 1.0) / 2.0
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-9)
    f = DenoisedClassifier(lambda z: (z.sum(1) > 0.5).long(), D, sigma, scale=2.0, shift=-1.0)
    assert f(x_noisy).tolist() == (ref.sum(1) > 0.5).long().tolist()


def test_densepure_k1_deterministic_equals_multistep_denoising():
    schedule = VPCosine()
    mu = torch.zeros(3, dtype=torch.float64)
    D = GaussianDenoiser(schedule, mu, 1.0)
    gen = torch.Generator().manual_seed(2)
    x_noisy = torch.randn(16, 3, generator=gen, dtype=torch.float64)
    w = torch.tensor([1.0, -1.0, 0.5], dtype=torch.float64)
    classify = lambda z: torch.stack([-(z @ w), z @ w], 1)  # noqa: E731  logits of a linear classifier
    x0 = purify(D, DDIM(), x_noisy, 0.5, steps=8)
    votes = densepure_votes(classify, D, DDIM(), x_noisy, 0.5, 2, runs=1, steps=8)
    assert votes.shape == (1, 16)
    assert votes[0].tolist() == classify(x0).argmax(1).tolist()
    g = DensePureClassifier(classify, D, DDIM(), 0.5, num_classes=2, runs=1, steps=8)
    assert g(x_noisy).tolist() == classify(x0).argmax(1).tolist()
    g3 = DensePureClassifier(classify, D, DDIM(), 0.5, num_classes=2, runs=3, steps=8)
    assert torch.equal(g3(x_noisy), g(x_noisy))  # deterministic runs all agree


def test_majority_vote_ties_go_to_the_lowest_label():
    votes = torch.tensor([[2, 0, 1], [1, 0, 1], [2, 1, 0], [1, 1, 0]])
    assert majority_vote(votes, 3).tolist() == [1, 0, 0]


@pytest.mark.parametrize(
    "call, words",
    [
        (lambda: clopper_pearson_lower(5, 4, 0.01), ["successes", "5"]),
        (lambda: clopper_pearson_lower(1, 4, 0.7), ["alpha", "0.7"]),
        (lambda: smoothing_time(VPCosine(), -0.5), ["sigma", "-0.5", "> 0"]),
        (lambda: smoothing_time(VPCosine(), 1e4), ["sigma", "10000", "range"]),
        (lambda: smoothing_time("cosine", 0.5), ["schedule", "cosine"]),
        (lambda: certify(_linear(torch.ones(2), 0.0), torch.zeros(2), 0.5, 0, 10, 0.001, 2), ["n0", "0"]),
        (lambda: certify(_linear(torch.ones(2), 0.0), torch.zeros(2), 0.5, 10, 10, 0.001, 1), ["num_classes", "1"]),
        (lambda: certify(lambda x: x.sum(1), torch.zeros(2), 0.5, 10, 10, 0.001, 2), ["base classifier", "shape"]),
        (lambda: certify(_linear(torch.ones(2), 0.0), [0.0, 0.0], 0.5, 10, 10, 0.001, 2), ["x must be"]),
        (lambda: densepure_votes(None, None, DDIM(), torch.zeros(1, 2), 0.5, 2, runs=0, steps=4), ["runs", "0"]),
    ],
)
def test_bad_inputs_are_one_line_config_errors(call, words):
    with pytest.raises(ConfigError) as info:
        call()
    msg = str(info.value)
    assert "\n" not in msg
    for word in words:
        assert word in msg


def test_t_star_lookup_stays_finite_for_every_schedule():
    for schedule in SCHEDULES:
        assert math.isfinite(smoothing_time(schedule, 0.25))
