"""Fréchet distance against its closed forms: 0 between a set and itself, ||mu_a - mu_b||^2 for a shift, and
sum (sqrt(a_i) - sqrt(b_i))^2 between centred diagonal Gaussians (from their exact sample moments)."""

import numpy as np
import pytest
import torch

from condiff.errors import ConfigError
from condiff.evaluation.metrics import frechet_distance


def _with_moments(n, mean, cov, seed):
    """n points whose sample mean and covariance are exactly ``mean`` and ``cov``."""
    z = np.random.default_rng(seed).standard_normal((n, len(mean)))
    z -= z.mean(0)
    z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T  # whitened: sample cov = I
    return z @ np.linalg.cholesky(cov).T + mean


def test_identity_shift_and_diagonal_closed_form():
    d = 5
    a = _with_moments(200, np.zeros(d), np.eye(d), 0)
    assert abs(frechet_distance(a, a)) < 1e-9
    shift = np.arange(d, dtype=float)
    assert frechet_distance(a, a + shift) == pytest.approx(float((shift**2).sum()), rel=1e-9)
    va, vb = np.array([1.0, 2.0, 0.5, 3.0, 1.5]), np.array([2.0, 0.5, 0.5, 1.0, 4.0])
    a = _with_moments(300, np.zeros(d), np.diag(va), 1)
    b = _with_moments(400, np.ones(d), np.diag(vb), 2)
    expect = d * 1.0 + float(((np.sqrt(va) - np.sqrt(vb)) ** 2).sum())
    assert frechet_distance(a, b) == pytest.approx(expect, rel=1e-7)
    assert frechet_distance(torch.tensor(b), torch.tensor(a)) == pytest.approx(expect, rel=1e-7)


def test_bad_shapes_are_one_error():
    with pytest.raises(ConfigError, match="same d"):
        frechet_distance(np.zeros((5, 3)), np.zeros((5, 4)))
    with pytest.raises(ConfigError, match="n >= 2"):
        frechet_distance(np.zeros((1, 3)), np.zeros((5, 3)))
