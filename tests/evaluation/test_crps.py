"""CRPS (condiff.evaluation.crps): the Gaussian closed form against the energy-form sample estimator, point masses,
and the sorted pair sum against the brute-force double sum."""

import math

import pytest
import torch

from condiff.errors import ConfigError
from condiff.evaluation.crps import crps_gaussian, crps_samples

F64 = torch.float64


@pytest.mark.parametrize("fair", [True, False])
def test_closed_form_equals_the_sample_estimator_within_three_standard_errors(fair):
    """Over 400 observations y and 20 independent sample sets of S draws each, the mean sample CRPS matches the mean
    closed form within 3 standard errors (the plug-in estimator's bias E|X - X'| / 2S is removed when not fair)."""
    g = torch.Generator().manual_seed(0)
    mean, std, S = 0.3, 1.7, 64
    y = mean + 2.0 * torch.randn(400, generator=g, dtype=F64)
    samples = mean + std * torch.randn(S, 20, 400, generator=g, dtype=F64)
    est = crps_samples(samples, y, fair=fair)
    if not fair:
        est = est - 0.5 * (2 * std / math.sqrt(math.pi)) / S  # E|X - X'| = 2 sd / sqrt(pi), weight 1/S in the pairs
    exact = crps_gaussian(mean, std, y)
    diff = (est - exact).flatten()
    se = diff.std() / diff.numel() ** 0.5
    assert abs(diff.mean()) < 3 * se


def test_closed_form_at_the_mean_and_its_scale():
    """CRPS(N(0, sd^2), 0) = sd (2 phi(0) - 1/sqrt(pi)) = sd (sqrt(2) - 1) / sqrt(pi); it scales with sd."""
    want = (math.sqrt(2) - 1) / math.sqrt(math.pi)
    assert crps_gaussian(0.0, 1.0, 0.0).item() == pytest.approx(want, rel=1e-12)
    assert crps_gaussian(1.0, 3.0, 1.0).item() == pytest.approx(3 * want, rel=1e-12)


def test_a_point_mass_scores_the_absolute_error():
    x, y = torch.tensor([0.5, -2.0, 3.0], dtype=F64), torch.tensor([1.0, 1.0, 3.0], dtype=F64)
    assert torch.allclose(crps_samples(x[None], y), (x - y).abs())
    assert torch.allclose(crps_samples(x.expand(7, 3), y), (x - y).abs())  # S equal samples
    assert torch.allclose(crps_gaussian(x, 0.0, y), (x - y).abs())


def test_sorted_pair_sum_equals_the_double_sum():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(9, 4, generator=g, dtype=F64), torch.randn(4, generator=g, dtype=F64)
    pair = (x[:, None] - x[None]).abs().sum((0, 1))
    brute = (x - y).abs().mean(0) - 0.5 * pair / 81
    fair = (x - y).abs().mean(0) - 0.5 * pair / 72
    assert torch.allclose(crps_samples(x, y), brute)
    assert torch.allclose(crps_samples(x, y, fair=True), fair)
    assert torch.allclose(crps_samples(x.T, y, dim=1), brute)


def test_bad_inputs_are_config_errors():
    with pytest.raises(ConfigError, match="at least 2"):
        crps_samples(torch.zeros(1, 3), torch.zeros(3), fair=True)
    with pytest.raises(ConfigError, match="finite"):
        crps_samples(torch.tensor([[float("nan")]]), torch.zeros(1))
    with pytest.raises(ConfigError, match="sample dimension"):
        crps_samples(torch.tensor(1.0), 0.0)
    with pytest.raises(ConfigError, match="standard deviations"):
        crps_gaussian(0.0, -1.0, 0.0)
