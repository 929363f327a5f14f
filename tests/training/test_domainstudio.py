"""DomainStudio's losses (condiff.training.domainstudio): the Haar transform is orthonormal and its round trip
exact, the relative-distance KL is 0 for the source itself (and for rescaled copies) with a gradient wherever
the relative distances differ, and the high-frequency bands of a flat image are 0."""

import pytest
import torch

from condiff.errors import ConfigError
from condiff.training.domainstudio import haar2, hf_mse, high_frequency, ihaar2, relative_distance_kl

G = torch.Generator().manual_seed(0)


def test_haar_round_trip_is_bit_exact_on_dyadic_values():
    x = torch.randint(-512, 512, (3, 2, 8, 6), generator=G).double() / 64
    assert torch.equal(ihaar2(haar2(x)), x)


def test_haar_round_trip_and_orthonormality_on_random_images():
    x = torch.randn(4, 3, 16, 16, generator=G, dtype=torch.float64)
    b = haar2(x)
    assert b.shape == (4, 4, 3, 8, 8)
    assert torch.allclose(ihaar2(b), x, rtol=0, atol=1e-14)
    assert torch.allclose(b.pow(2).sum(), x.pow(2).sum(), rtol=1e-14)  # energy kept: orthonormal


def test_flat_images_have_no_high_frequency_and_ll_is_twice_the_mean():
    x = torch.full((2, 1, 4, 4), 0.75, dtype=torch.float64)
    assert torch.equal(high_frequency(x), torch.zeros(2, 1, 2, 2, dtype=torch.float64))
    assert torch.equal(haar2(x)[:, 0], torch.full((2, 1, 2, 2), 1.5, dtype=torch.float64))


def test_a_checkerboard_lives_in_hh_only():
    x = torch.tensor([[1.0, -1.0], [-1.0, 1.0]], dtype=torch.float64).repeat(4, 4)[None, None]
    b = haar2(x)
    assert torch.equal(b[:, :3], torch.zeros_like(b[:, :3])) and torch.equal(b[:, 3], torch.full_like(b[:, 3], 2.0))


def test_relative_distance_kl_is_zero_for_the_source_and_its_rescaling():
    s = torch.randn(6, 3, 8, 8, generator=G, dtype=torch.float64)
    assert relative_distance_kl(s, s).item() == pytest.approx(0.0, abs=1e-14)
    assert relative_distance_kl(3.0 * s, s).item() == pytest.approx(0.0, abs=1e-14)  # cosine: scale-free


def test_relative_distance_kl_is_positive_with_a_gradient_when_distances_differ():
    s = torch.randn(6, 3, 8, 8, generator=G, dtype=torch.float64)
    a = (s + 0.5 * torch.randn(6, 3, 8, 8, generator=G, dtype=torch.float64)).requires_grad_()
    kl = relative_distance_kl(a, s)
    (g,) = torch.autograd.grad(kl, a)
    assert kl.item() > 0 and float(g.abs().max()) > 0


def test_collapsed_samples_cost_more_than_diverse_ones():
    """The loss that keeps diversity: samples collapsed toward one image are farther (in KL) from the source's
    relative distances than the source with a little noise."""
    s = torch.randn(8, 1, 8, 8, generator=G, dtype=torch.float64)
    collapsed = 0.1 * s + s[:1]
    noisy = s + 0.1 * torch.randn(8, 1, 8, 8, generator=G, dtype=torch.float64)
    assert relative_distance_kl(collapsed, s) > relative_distance_kl(noisy, s)


def test_hf_mse_is_zero_against_itself_and_ignores_flat_offsets():
    x = torch.randn(2, 1, 8, 8, generator=G, dtype=torch.float64)
    assert hf_mse(x, x).item() == 0.0
    assert hf_mse(x + 0.5, x).item() == pytest.approx(0.0, abs=1e-28)


@pytest.mark.parametrize("shape", [(2, 1, 7, 8), (2, 1, 8, 5), (8, 8)])
def test_odd_or_wrong_shapes_are_one_line(shape):
    with pytest.raises(ConfigError, match="H and W even"):
        haar2(torch.zeros(shape))


def test_relative_distance_needs_two_matching_batches():
    with pytest.raises(ConfigError, match="at least 2 samples"):
        relative_distance_kl(torch.zeros(1, 3), torch.zeros(1, 3))
    with pytest.raises(ConfigError, match="one shape"):
        relative_distance_kl(torch.zeros(2, 3), torch.zeros(2, 4))
