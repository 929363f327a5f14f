"""Diversity measures (condiff.evaluation.diversity) on cases with known answers."""

import pytest
import torch

from condiff.errors import ConfigError
from condiff.evaluation.diversity import distance_spearman, distinct_fraction, nearest_training_distance

G = torch.Generator().manual_seed(0)


def test_same_samples_or_a_scaled_copy_correlate_perfectly():
    a = torch.randn(10, 3, 4, 4, generator=G)
    assert distance_spearman(a, a) == pytest.approx(1.0)
    assert distance_spearman(a, 2.5 * a + 1.0) == pytest.approx(1.0)  # distances scale, ranks stay


def test_collapsed_samples_lose_the_ranking():
    a = torch.randn(12, 8, generator=G)
    collapsed = a[:1] + 1e-3 * torch.randn(12, 8, generator=G)  # everything near one sample, fresh jitter
    assert distance_spearman(a, collapsed) < 0.5


def test_points_on_a_line_give_the_hand_computed_rank_correlation():
    x = torch.tensor([[0.0], [1.0], [3.0], [7.0]])  # pairwise distances 1, 3, 7, 2, 6, 4
    y = torch.tensor([[0.0], [4.0], [6.0], [7.0]])  # pairwise distances 4, 6, 7, 2, 3, 1
    # ranks 1 3 6 2 5 4 against 4 5 6 2 3 1: sum d^2 = 26, rho = 1 - 6 * 26 / (6 * 35)
    assert distance_spearman(x, y) == pytest.approx(1 - 6 * 26 / (6 * 35), abs=1e-12)


def test_distinct_fraction_counts_rows():
    labels = torch.tensor([[0, 1], [0, 1], [2, 3], [4, 5]])
    assert distinct_fraction(labels) == 0.75


def test_nearest_training_distance_is_zero_for_copies():
    train = torch.randn(5, 1, 4, 4, generator=G)
    d, mean = nearest_training_distance(train[[0, 3, 3]], train)
    assert mean == 0.0 and torch.equal(d, torch.zeros(3, dtype=torch.float64))
    d2, _ = nearest_training_distance(train[:1] + 1.0, train)
    assert d2.item() <= 4.0 + 1e-6  # the shifted copy is at most 4 (= sqrt(16)) from its original


def test_bad_inputs_are_one_line():
    with pytest.raises(ConfigError, match="at least 3"):
        distance_spearman(torch.zeros(2, 3), torch.zeros(2, 3))
    with pytest.raises(ConfigError, match="shape"):
        distinct_fraction(torch.zeros(3))
    with pytest.raises(ConfigError, match="share their image shape"):
        nearest_training_distance(torch.zeros(2, 3), torch.zeros(2, 4))
