"""Fréchet distance against its closed forms: 0 between a set and itself, ||mu_a - mu_b||^2 for a shift, and
sum (sqrt(a_i) - sqrt(b_i))^2 between centred diagonal Gaussians (from their exact sample moments); k-NN
precision and recall against sets whose neighbourhoods are known by hand."""

import numpy as np
import pytest
import torch

from condiff.errors import ConfigError
from condiff.evaluation.metrics import frechet_distance, precision_recall


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


def test_frechet_of_fewer_points_than_dimensions_is_quiet_and_zero_with_itself(recwarn):
    a = np.random.default_rng(0).standard_normal((4, 16))  # singular covariances
    assert abs(frechet_distance(a, a)) < 1e-6
    assert not recwarn.list


def test_precision_recall_identical_and_disjoint_sets():
    a = np.random.default_rng(0).standard_normal((50, 8))
    assert precision_recall(a, a) == (1.0, 1.0)
    assert precision_recall(a, a + 100.0) == (0.0, 0.0)


def test_precision_recall_by_hand_on_a_line():
    """real = 0, 1, ..., 9 (k = 1: every ball has radius 1); fake = 0.5, 4, 9.5, 20, 30 (k = 1: radii 3.5, 3.5,
    5.5, 10.5, 10). Precision: 0.5, 4 and 9.5 lie in a real ball, 20 and 30 do not: 3/5. Recall: a real point
    is covered when it lies within a fake ball: 0..4 by 0.5 (radius 3.5) and 1..7 by 4 (radius 3.5), 4..9 by
    9.5 (radius 5.5), so all 10: 1."""
    real = np.arange(10.0)[:, None]
    fake = np.array([0.5, 4.0, 9.5, 20.0, 30.0])[:, None]
    assert precision_recall(real, fake, k=1) == (pytest.approx(3 / 5), 1.0)
    # k = 1 on fake = 0.5, 1.5 (radius 1 each) covers the real points 0, 1, 2 only
    assert precision_recall(real, np.array([[0.5], [1.5]]), k=1) == (1.0, pytest.approx(3 / 10))


def test_precision_recall_refuses_too_few_points():
    with pytest.raises(ConfigError, match="n > k = 3"):
        precision_recall(np.zeros((3, 2)), np.zeros((10, 2)))
    with pytest.raises(ConfigError, match="same d"):
        precision_recall(np.zeros((5, 2)), np.zeros((5, 3)))
    with pytest.raises(ConfigError, match="positive integer k"):
        precision_recall(np.zeros((5, 2)), np.zeros((5, 2)), k=0)
