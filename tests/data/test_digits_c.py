"""digits-C corruptions (condiff.data.digits_c): exact properties of each pure function. Severity 0 is the identity;
noise adds exactly NOISE_STD * z for the generator's z; blur keeps every image's mean and a constant image; contrast
scales each image's deviation from its mean by CONTRAST; occlusion sets exactly one side x side box (at
``occlusion_corners``) to the fill value and leaves every other pixel alone; ``corrupt`` is seeded per (seed,
corruption, severity)."""

from __future__ import annotations

import pytest
import torch

from condiff.data import digits_c
from condiff.errors import ConfigError

NAMES = list(digits_c.CORRUPTIONS)


def images(n=6, dtype=torch.float64):
    return torch.rand((n, 1, 16, 16), generator=torch.Generator().manual_seed(3), dtype=dtype) * 2 - 1


@pytest.mark.parametrize("name", NAMES)
def test_severity_zero_is_the_identity(name):
    x = images()
    out = digits_c.CORRUPTIONS[name](x, 0, torch.Generator().manual_seed(0))
    assert torch.equal(out, x) and out is not x


@pytest.mark.parametrize("severity", digits_c.SEVERITIES)
def test_noise_adds_the_generators_draw_at_the_severitys_std(severity):
    x = images()
    out = digits_c.noise(x, severity, torch.Generator().manual_seed(5))
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(5), dtype=x.dtype)
    assert torch.allclose(out - x, digits_c.NOISE_STD[severity - 1] * z, atol=1e-12)


def test_noise_std_on_a_large_batch():
    x = torch.zeros(400, 1, 16, 16, dtype=torch.float64)
    out = digits_c.noise(x, 5, torch.Generator().manual_seed(0))
    # 102400 draws: the sample std is within 4 standard errors (std / sqrt(2 n)) of 1.2
    assert abs(float(out.std()) - 1.2) < 4 * 1.2 / (2 * out.numel()) ** 0.5


@pytest.mark.parametrize("severity", digits_c.SEVERITIES)
def test_blur_preserves_each_images_mean_and_constants(severity):
    x = images()
    out = digits_c.blur(x, severity)
    assert torch.allclose(out.mean(dim=(1, 2, 3)), x.mean(dim=(1, 2, 3)), atol=1e-12)
    c = torch.full((2, 1, 16, 16), 0.3, dtype=torch.float64)
    assert torch.allclose(digits_c.blur(c, severity), c, atol=1e-12)


def test_blur_of_a_delta_is_the_outer_product_of_the_kernel():
    x = torch.zeros(1, 1, 16, 16, dtype=torch.float64)
    x[0, 0, 8, 8] = 1.0
    k = digits_c.gaussian_kernel(digits_c.BLUR_SD[1])
    r = (k.numel() - 1) // 2
    out = digits_c.blur(x, 2)[0, 0]
    assert torch.allclose(out[8 - r : 9 + r, 8 - r : 9 + r], torch.outer(k, k), atol=1e-12)
    assert float(out.sum()) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("severity", digits_c.SEVERITIES)
def test_contrast_scales_the_deviation_from_the_mean(severity):
    x = images()
    out = digits_c.contrast(x, severity)
    m = x.mean(dim=(1, 2, 3), keepdim=True)
    assert torch.allclose(out.mean(dim=(1, 2, 3), keepdim=True), m, atol=1e-12)
    assert torch.allclose(out - m, digits_c.CONTRAST[severity - 1] * (x - m), atol=1e-12)


@pytest.mark.parametrize("severity", digits_c.SEVERITIES)
def test_occlusion_sets_exactly_one_box(severity):
    x = images(20) * 0.5 + 0.6  # values in [0.1, 1.1]: never the fill value 0
    side = digits_c.OCCLUSION_SIDE[severity - 1]
    out = digits_c.occlusion(x, severity, torch.Generator().manual_seed(9))
    corners = digits_c.occlusion_corners(20, side, 16, 16, torch.Generator().manual_seed(9))
    for i, (r, c) in enumerate(corners.tolist()):
        mask = torch.zeros(16, 16, dtype=torch.bool)
        mask[r : r + side, c : c + side] = True
        assert 0 <= r <= 16 - side and 0 <= c <= 16 - side
        assert int((out[i, 0] == digits_c.OCCLUSION_FILL).sum()) == side * side
        assert torch.all(out[i, 0][mask] == digits_c.OCCLUSION_FILL)
        assert torch.equal(out[i, 0][~mask], x[i, 0][~mask])


def test_corrupt_is_seeded_per_corruption_and_severity():
    x = images()
    a = digits_c.corrupt("noise", x, 3, seed=1)
    assert torch.equal(a, digits_c.corrupt("noise", x, 3, seed=1))
    assert not torch.equal(a, digits_c.corrupt("noise", x, 3, seed=2))
    assert not torch.equal(a - x, (digits_c.corrupt("noise", x, 4, seed=1) - x) * 0.8 / 1.0)
    assert torch.equal(digits_c.corrupt("contrast", x, 2, seed=1), digits_c.contrast(x, 2))


def test_severities_grow():
    assert list(digits_c.NOISE_STD) == sorted(digits_c.NOISE_STD)
    assert list(digits_c.BLUR_SD) == sorted(digits_c.BLUR_SD)
    assert list(digits_c.CONTRAST) == sorted(digits_c.CONTRAST, reverse=True)
    assert list(digits_c.OCCLUSION_SIDE) == sorted(digits_c.OCCLUSION_SIDE)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: digits_c.corrupt("fog", images(), 1), "unknown corruption 'fog'; accepted: noise, blur"),
        (lambda: digits_c.noise(images(), 6), "severity"),
        (lambda: digits_c.blur(images(), -1), "severity"),
        (lambda: digits_c.contrast(images(), True), "severity"),
        (lambda: digits_c.occlusion(torch.zeros(2, 16, 16), 1), "images must be a floating-point"),
        (lambda: digits_c.noise(torch.zeros(1, 1, 4, 4, dtype=torch.long), 1), "images must be a floating-point"),
        (lambda: digits_c.occlusion(torch.zeros(1, 1, 9, 9), 5), "at least 10 pixels"),
    ],
)
def test_bad_input_is_refused(call, match):
    with pytest.raises(ConfigError, match=match):
        call()
