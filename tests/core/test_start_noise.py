"""centre_subpixel_means: an orthogonal projection that makes the sub-pixel phase means equal and keeps each
channel's mean."""

import pytest
import torch

from condiff.core.start_noise import centre_subpixel_means
from condiff.errors import ConfigError


def phase_means(x, f):
    return torch.nn.functional.pixel_unshuffle(x, f).reshape(x.shape[0], x.shape[1], f * f, -1).mean(-1)


@pytest.mark.parametrize("f", [2, 4])
def test_phase_means_equal_and_channel_mean_kept(f):
    x = torch.randn(3, 2, 16, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = centre_subpixel_means(x, f)
    pm = phase_means(y, f)
    assert torch.allclose(pm, pm[:, :, :1].expand_as(pm), atol=1e-12)
    assert torch.allclose(y.mean(dim=(2, 3)), x.mean(dim=(2, 3)), atol=1e-12)


def test_orthogonal_projection():
    """Idempotent, and what it removes is orthogonal to what it keeps: the kept noise is Gaussian on the rest."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64)
    y = centre_subpixel_means(x, 2)
    assert torch.allclose(centre_subpixel_means(y, 2), y, atol=1e-12)
    assert abs(float(((x - y) * y).sum())) < 1e-9
    # it removes exactly C (f^2 - 1) dimensions: the rank of I - P
    basis = torch.eye(3 * 64, dtype=torch.float64).reshape(-1, 3, 8, 8)
    removed = (basis - centre_subpixel_means(basis, 2)).reshape(3 * 64, -1)
    assert int(torch.linalg.matrix_rank(removed)) == 3 * 3


def test_removes_a_two_pixel_pattern_and_nothing_flat():
    flat = torch.full((1, 1, 4, 4), -0.5)
    assert torch.equal(centre_subpixel_means(flat, 2), flat)
    checker = ((torch.arange(4)[:, None] + torch.arange(4)) % 2).float()[None, None] * 0.1
    assert torch.allclose(centre_subpixel_means(checker - 1, 2), torch.full_like(checker, -0.95))


def test_factor_one_is_identity_and_bad_input_is_refused():
    x = torch.randn(1, 1, 6, 6)
    assert centre_subpixel_means(x, 1) is x
    for bad in (0, 2.0, True):
        with pytest.raises(ConfigError, match="factor must be a positive integer"):
            centre_subpixel_means(x, bad)
    with pytest.raises(ConfigError, match="divisible by 4"):
        centre_subpixel_means(x, 4)
