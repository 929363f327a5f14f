"""The Diffusion Classifier (condiff.tasks.diffusion_classifier) against exact answers on a Gaussian mixture.

Data: K = 5 classes, x | c ~ N(mu_c, I_16) with mu_c = r e_c (orthogonal means of equal norm), uniform prior; the
model is the exact class-conditional denoiser of condiff.data.gmm. The Bayes rule is the nearest mean, and its
accuracy is P(correct) = int phi(z) Phi(z + r)^(K-1) dz, which r = 2.0528 sets to 0.800. The expected eps-error
difference between two classes is proportional to ||x0 - mu_c||^2 - ||x0 - mu_c'||^2 at every t, so the
classifier's limit is the Bayes rule. Each class is one Gaussian, so its exact denoiser is closed form,
E[x0 | x_t, c] = mu_c + alpha / v (x_t - alpha mu_c) with v = alpha^2 + sigma^2; the big runs use that form
(checked against the mixture's general denoiser, which computes every component for every row). For one pair
(t, eps), with A = alpha^2 / v, B = sigma alpha / v and u_c = x0 - mu_c, the l2 error is
e_c = ||A eps - B u_c||^2 / d, whose variances are closed form (see the tests).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from scipy import integrate, stats

from condiff.core.denoiser import coefficients
from condiff.core.schedules import EDM, VPDiscrete
from condiff.data.gmm import GMM
from condiff.errors import ConfigError
from condiff.tasks.diffusion_classifier import (
    ClassifierConfig,
    classify,
    draw_noise,
    pair_errors,
    per_sample_error,
    prune,
    stage_pairs,
    stratified_times,
)

F64 = torch.float64
K, D, R = 5, 16, 2.052796634773133  # r: the mean norm (data std 1) for a Bayes accuracy of 0.800
SCHEDULE = VPDiscrete.from_betas("squaredcos_cap_v2")
CONDS = [{"y": torch.tensor([c])} for c in range(K)]
BIG = 8192  # rows per forward: the closed-form denoiser is cheap, the per-forward overhead is not


def bayes_accuracy(r: float, k: int = K) -> float:
    """P(x is nearer its own mean than the k - 1 others) for orthogonal means of norm r and unit noise."""
    return integrate.quad(lambda z: stats.norm.pdf(z) * stats.norm.cdf(z + r) ** (k - 1), -12, 12, epsabs=1e-13)[0]


@pytest.fixture(scope="module")
def gmm() -> GMM:
    means = torch.zeros(K, D, dtype=F64)
    means[torch.arange(K), torch.arange(K)] = R
    return GMM(means, torch.ones(K, D, dtype=F64), torch.ones(K, dtype=F64), torch.arange(K))


@dataclass(frozen=True)
class ClassGaussians:
    """The exact class-conditional denoiser of N(means[c], I) data (the Denoiser protocol, reading cond['y'])."""

    means: torch.Tensor
    schedule: object = SCHEDULE

    def __call__(self, x, t, cond):
        a, s = coefficients(self.schedule, t, x)
        mu = self.means[cond["y"]]
        return mu + a / (a * a + s * s) * (x - a * mu)


@pytest.fixture(scope="module")
def exact(gmm) -> ClassGaussians:
    return ClassGaussians(gmm.means)


def test_closed_form_denoiser_is_the_mixture_oracle(gmm, exact):
    g = torch.Generator().manual_seed(5)
    x = 3 * torch.randn(256, D, generator=g, dtype=F64)
    t = torch.randint(0, 1000, (256,), generator=g).to(F64)
    cond = {"y": torch.randint(0, K, (256,), generator=g)}
    assert torch.allclose(exact(x, t, cond), gmm.denoiser(SCHEDULE)(x, t, cond), rtol=0, atol=1e-12)


@pytest.fixture(scope="module")
def points(gmm):
    x, y = gmm.sample(2000, torch.Generator().manual_seed(0))
    return x, y, gmm.class_posterior(x, 1.0, 0.0).argmax(1)  # the exact posterior's decisions


def test_bayes_accuracy_of_the_oracle(gmm, points):
    """The chosen mixture has Bayes accuracy 0.800, and the exact posterior's rule is the nearest mean."""
    x, y, bayes = points
    assert bayes_accuracy(R) == pytest.approx(0.800, abs=1e-9)
    assert torch.equal(bayes, torch.cdist(x, gmm.means).argmin(1))
    sd = math.sqrt(0.8 * 0.2 / len(y))
    assert abs(float((bayes == y).double().mean()) - 0.800) < 3 * sd


def test_accuracy_matches_bayes(exact, points):
    """With the exact eps* and 100 paired pairs the classifier's accuracy is within 2 points of the Bayes rule's
    on the same 2000 points."""
    x, y, bayes = points
    out = classify(exact, x, CONDS, ClassifierConfig.full(100, batch_size=BIG), torch.Generator().manual_seed(1))
    acc, acc_bayes = float((out.prediction == y).double().mean()), float((bayes == y).double().mean())
    assert abs(acc - acc_bayes) <= 0.02, (acc, acc_bayes)
    assert out.total_nfe == 2000 * K * 100 and bool((out.evaluated == 100).all())
    assert torch.equal(out.prediction, out.scores.argmin(1))


def test_adaptive_pruning_agrees_with_full_evaluation(exact, points):
    """Adaptive (20, 50 | keep 2, 1) picks the full 50-pair evaluation's class on >= 98% of the points, with the
    network evaluations the schedule implies; ``prune`` on the full errors decides exactly as the run did."""
    x = points[0]
    den, g = exact, torch.Generator()
    adaptive = ClassifierConfig(stages=(20, 50), keep=(2, 1), batch_size=BIG)
    full = classify(den, x, CONDS, ClassifierConfig.full(50, batch_size=BIG), g.manual_seed(2))
    run = classify(den, x, CONDS, adaptive, g.manual_seed(2))
    agree = float((run.prediction == full.prediction).double().mean())
    assert agree >= 0.98, agree
    assert run.total_nfe == 2000 * (K * 20 + 2 * 30)
    assert torch.equal(run.evaluated.sort(1).values[:, -2:], torch.full((2000, 2), 50))
    replay = prune(full, adaptive)
    assert torch.equal(replay.prediction, run.prediction) and torch.equal(replay.nfe, run.nfe)
    seen = ~run.errors.isnan()
    assert torch.allclose(run.errors[seen], full.errors[seen], rtol=1e-12, atol=0)


def _variances(x0, mu_c, mu_o, times):
    """The exact variance over eps of the l2 score difference e_c - e_o (mean over the pairs at ``times``), paired
    (one eps per pair) and unpaired (independent eps per class): per pair Var_paired = 4 A^2 B^2 ||mu_c - mu_o||^2
    / d^2 and Var_unpaired = (4 d A^4 + 4 A^2 B^2 (||u_c||^2 + ||u_o||^2)) / d^2."""
    a, s = SCHEDULE.alpha(times), SCHEDULE.sigma(times)
    v = a * a + s * s
    A, B = a * a / v, s * a / v
    u2 = ((x0 - mu_c) ** 2).sum() + ((x0 - mu_o) ** 2).sum()
    paired = 4 * A**2 * B**2 * ((mu_c - mu_o) ** 2).sum() / D**2
    unpaired = (4 * D * A**4 + 4 * A**2 * B**2 * u2) / D**2
    n = times.numel()
    return float(paired.sum() / n**2), float(unpaired.sum() / n**2)


def test_paired_noise_lowers_the_variance_of_score_differences(gmm, exact, points):
    """Over 1500 independent draws of 20 pairs, the score difference between two classes varies far less with
    paired noise than with one noise per class; both variances match their closed forms."""
    x0 = points[0][:3]
    draws, n = 1500, 20
    times = stratified_times(SCHEDULE, n)
    den, g = exact, torch.Generator().manual_seed(3)
    conds = CONDS[:2]
    xs = x0.repeat_interleave(draws, 0)
    diff = {}
    for name, noise in [("paired", draw_noise(xs, n, g)), ("unpaired", draw_noise(xs, n, g, candidates=2))]:
        scores = pair_errors(den, xs, conds, times, noise, ClassifierConfig(batch_size=BIG)).mean(-1)
        diff[name] = (scores[:, 0] - scores[:, 1]).reshape(len(x0), draws)
    for i in range(len(x0)):
        exact_p, exact_u = _variances(x0[i], gmm.means[0], gmm.means[1], times)
        got_p, got_u = float(diff["paired"][i].var()), float(diff["unpaired"][i].var())
        tol = 5 * math.sqrt(2 / (draws - 1))  # five standard errors of a sample variance
        assert got_p == pytest.approx(exact_p, rel=tol) and got_u == pytest.approx(exact_u, rel=tol)
        assert got_p < got_u / 5 and exact_p < exact_u / 5, (got_p, got_u)


def test_stratified_times_and_stage_pairs():
    """The paper's grid T/n/2 + k T/n on a 1000-step table; stages nest and hold exactly n pairs each."""
    assert stratified_times(SCHEDULE, 500).tolist() == list(range(1, 1000, 2))
    assert stratified_times(SCHEDULE, 100).tolist() == list(range(5, 1000, 10))
    edm = stratified_times(EDM(), 4, (0.5, 1.0))
    assert torch.allclose(edm, 0.002 + (80 - 0.002) * torch.tensor([0.5625, 0.6875, 0.8125, 0.9375], dtype=F64))
    new = stage_pairs(100, (20, 100))
    assert new[0].tolist() == list(range(2, 100, 5)) and len(new[1]) == 80  # the centred stride-5 subset
    for stages in [(20, 50), (10, 25, 100), (3, 7, 11)]:
        seen = set()
        for n, add in zip(stages, stage_pairs(max(stages), stages)):
            assert not seen & set(add.tolist())
            seen |= set(add.tolist())
            assert len(seen) == n


def test_errors_and_early_stop(gmm):
    """l1 / l2 / Huber per-sample errors match their definitions; an image left with one candidate is not
    evaluated again; the ranking puts survivors first."""
    e = torch.tensor([[0.5, -2.0, 0.0, 3.0]], dtype=F64)
    z = torch.zeros_like(e)
    assert per_sample_error(z, e, "l2").item() == pytest.approx((0.25 + 4 + 9) / 4)
    assert per_sample_error(z, e, "l1").item() == pytest.approx(5.5 / 4)
    assert per_sample_error(z, e, "huber").item() == pytest.approx((0.125 + 1.5 + 2.5) / 4)
    x = gmm.means[:3] * 1.0
    out = classify(gmm.denoiser(SCHEDULE), x, CONDS, ClassifierConfig(stages=(10, 40), keep=(1, 1)))
    assert out.total_nfe == 3 * K * 10 and torch.equal(out.prediction, torch.arange(3))
    assert bool((out.evaluated == 10).all()) and torch.equal(out.ranking[:, 0], out.scores.argmin(1))
    two = classify(gmm.denoiser(SCHEDULE), x, CONDS, ClassifierConfig(stages=(10, 40), keep=(2, 1)))
    assert torch.equal(two.nfe, torch.full((3,), K * 10 + 2 * 30))
    assert bool((two.evaluated.gather(1, two.ranking)[:, :2] == 40).all())


@pytest.mark.parametrize(
    "options, needle",
    [
        ({"stages": (50, 20), "keep": (2, 1)}, "strictly increasing"),
        ({"stages": (20, 50), "keep": (1,)}, "one count per stage"),
        ({"stages": (20, 50), "keep": (1, 2)}, "non-increasing"),
        ({"stages": (0,), "keep": (1,)}, "stages must be"),
        ({"stages": (10,), "keep": (0,)}, "keep must be"),
        ({"stages": "20,100"}, "stages must be"),
        ({"error": "l3"}, "unknown error 'l3'; accepted: l2, l1, huber"),
        ({"t_range": (0.5, 0.5)}, "t_range must be"),
        ({"t_range": (0, float("nan"))}, "t_range must be"),
        ({"huber_delta": 0.0}, "huber_delta must be"),
        ({"pairs": 10}, "pairs must be"),
        ({"batch_size": 0}, "batch_size must be"),
    ],
)
def test_bad_config(options, needle):
    with pytest.raises(ConfigError) as info:
        ClassifierConfig(**options)
    msg = str(info.value)
    assert needle in msg and msg.splitlines() == [msg], msg


def test_bad_inputs(gmm):
    den, x = gmm.denoiser(SCHEDULE), gmm.means[:2].clone()
    cases = [
        (lambda: classify(den, x, CONDS[:1]), "at least 2 candidate"),
        (lambda: classify(den, x, {"y": torch.arange(K)}), "list of cond mappings"),
        (lambda: classify(den, x, [CONDS[0], 3]), "candidate 1 must be a cond mapping"),
        (lambda: classify(den, x, [{"y": torch.tensor([0, 1])}, CONDS[1]]), "candidate 0 'y' has 2 rows"),
        (lambda: classify(den, x.long(), CONDS), "x0 must be a floating-point tensor"),
        (lambda: classify(den, x * math.inf, CONDS), "only finite values"),
        (lambda: classify(den, x, CONDS, noise=torch.zeros(2, 5, D, dtype=F64)), "noise must be"),
        (lambda: classify(den, x, CONDS, config={"stages": (20,)}), "config must be a ClassifierConfig"),
        (lambda: classify(den, x, CONDS, generator=0), "generator must be"),
        (lambda: stage_pairs(10, (5, 20)), "stages must be a non-empty sequence of integers in [1, 10], got [5, 20]"),
        (lambda: stage_pairs(10, (5, 5)), "strictly increasing"),
        (lambda: stratified_times(SCHEDULE, 0), "pairs must be an integer in [1, 10000], got 0"),
        (lambda: classify(x, x, CONDS), "denoiser must be a Denoiser"),
        (
            lambda: prune(
                classify(den, x, CONDS, ClassifierConfig(stages=(5, 10), keep=(2, 1))),
                ClassifierConfig(stages=(5, 10), keep=(2, 1)),
            ),
            "prune needs a full evaluation",
        ),
    ]
    for call, needle in cases:
        with pytest.raises(ConfigError) as info:
            call()
        msg = str(info.value)
        assert needle in msg and msg.splitlines() == [msg], (needle, msg)
