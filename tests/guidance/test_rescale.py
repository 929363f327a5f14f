"""Guidance rescale (Lin et al. 2024, sec. 3.4) on the exact GMM: phi = 0 is CFG bit for bit; phi = 1 gives the
guided prediction the per-sample std of the conditional one in the chosen space (x0 by default, eps, v); the
result is affine in phi in that space."""

import math

import pytest
import torch

from condiff.core.denoiser import X0, Eps, V, coefficients
from condiff.core.grids import make_grid
from condiff.core.sampling import sample
from condiff.core.schedules import VPLinear
from condiff.data.gmm import GMM
from condiff.errors import ConfigError
from condiff.guidance import CFG
from condiff.guidance.rescale import GuidanceRescale, rescale_guidance, to_space
from condiff.solvers import get_solver

F64 = torch.float64
SPACES = [X0(), Eps(), V()]


@pytest.fixture(scope="module")
def gmm8():
    """A 3-class mixture in R^8: per-sample std over 8 entries is a meaningful statistic."""
    return GMM.random(dim=8, components=6, num_classes=3, seed=1, spread=2.0, var_range=(0.1, 1.0))


def setup(gmm, n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, gmm.dim, generator=g, dtype=F64)
    y = torch.randint(0, gmm.num_classes, (n,), generator=g)
    return x, y, {"y": y, "null": GMM.null_cond(n)}


@pytest.mark.parametrize("space", SPACES, ids=lambda s: s.name)
def test_phi_zero_is_cfg_bit_for_bit_over_a_trajectory(gmm8, space):
    sch = VPLinear()
    grid = make_grid(sch, 8)
    x, _, cond = setup(gmm8)
    x = x * float(sch.sigma(grid[0]))
    den = gmm8.denoiser(sch)
    ref = sample(CFG(den, 5.0), get_solver("dpmpp-2m"), grid, x, cond).x
    out = sample(GuidanceRescale(den, 5.0, phi=0.0, space=space), get_solver("dpmpp-2m"), grid, x, cond).x
    assert torch.equal(out, ref)


@pytest.mark.parametrize("space", SPACES, ids=lambda s: s.name)
@pytest.mark.parametrize("per_sample_t", [False, True])
def test_phi_one_matches_the_conditional_std_per_sample(gmm8, space, per_sample_t):
    """phi = 1: std(y_guided) = std(y_cond) per sample in ``space`` (y = x0, eps or v), while CFG's own std is
    far from it; the guided prediction stays parallel to CFG's in that space."""
    x, y, cond = setup(gmm8)
    sch = VPLinear()
    den = gmm8.denoiser(sch)
    t = torch.linspace(0.2, 0.9, x.shape[0], dtype=F64) if per_sample_t else 0.5
    out = GuidanceRescale(den, 5.0, phi=1.0, space=space)(x, t, cond)
    y_out = to_space(space, x, out, t, sch)
    y_c = to_space(space, x, den(x, t, {"y": y}), t, sch)
    y_cfg = to_space(space, x, CFG(den, 5.0)(x, t, cond), t, sch)
    assert torch.allclose(y_out.std(1), y_c.std(1), rtol=1e-10, atol=0)
    assert (y_cfg.std(1) / y_c.std(1) - 1).abs().max() > 0.05
    assert torch.allclose(
        torch.nn.functional.cosine_similarity(y_out, y_cfg, dim=1), torch.ones(16, dtype=F64), rtol=0, atol=1e-12
    )


@pytest.mark.parametrize("space", SPACES, ids=lambda s: s.name)
def test_result_is_affine_in_phi_in_its_space(gmm8, space):
    """Lin et al. eq. 18: y(phi) = phi y(1) + (1 - phi) y(0)."""
    x, _, cond = setup(gmm8)
    sch = VPLinear()
    den = gmm8.denoiser(sch)
    ys = {
        phi: to_space(space, x, GuidanceRescale(den, 4.0, phi=phi, space=space)(x, 0.4, cond), 0.4, sch)
        for phi in (0.0, 0.3, 1.0)
    }
    assert torch.allclose(ys[0.3], 0.3 * ys[1.0] + 0.7 * ys[0.0], rtol=1e-10, atol=1e-10)


def test_rescale_rule_on_tensors():
    """rescale_guidance: the per-sample std (over all non-batch dims) of the result at phi = 1 is that of
    y_cond, its direction is y_cfg's, and it is invariant to scaling y_cfg."""
    g = torch.Generator().manual_seed(0)
    spread = torch.tensor([1.0, 2, 3, 4, 5], dtype=F64)[:, None, None, None]
    y_cfg = torch.randn(5, 3, 4, 4, generator=g, dtype=F64) * spread
    y_c = torch.randn(5, 3, 4, 4, generator=g, dtype=F64)
    out = rescale_guidance(y_cfg, y_c, 1.0)
    assert torch.allclose(out.flatten(1).std(1), y_c.flatten(1).std(1), rtol=1e-12, atol=0)
    assert torch.allclose(rescale_guidance(7.0 * y_cfg, y_c, 1.0), out, rtol=1e-12, atol=1e-12)
    assert torch.equal(rescale_guidance(y_cfg, y_c, 0.0), y_cfg)


def test_scale_one_is_the_conditional_model(gmm8):
    x, y, cond = setup(gmm8)
    den = gmm8.denoiser(VPLinear())
    assert torch.equal(GuidanceRescale(den, 1.0, phi=0.7)(x, 0.5, cond), den(x, 0.5, {"y": y}))


def test_eps_space_rescale_matches_the_formula_on_eps(gmm8):
    """In eps space the rule acts on the exact GMM eps: eps_guided = phi eps_cfg std(eps_c)/std(eps_cfg) +
    (1 - phi) eps_cfg, converted to x0 with x0 = (x - sigma eps) / alpha."""
    x, y, cond = setup(gmm8)
    sch = VPLinear()
    den = gmm8.denoiser(sch)
    e_u, e_c = den.eps(x, 0.6), den.eps(x, 0.6, {"y": y})
    e_cfg = e_u + 3.0 * (e_c - e_u)
    phi = 0.7
    e = phi * e_cfg * (e_c.std(1, keepdim=True) / e_cfg.std(1, keepdim=True)) + (1 - phi) * e_cfg
    a, s = coefficients(sch, 0.6, x)
    out = GuidanceRescale(den, 3.0, phi=phi, space=Eps())(x, 0.6, cond)
    assert torch.allclose(out, (x - s * e) / a, rtol=1e-10, atol=1e-10)


def test_errors(gmm8):
    den = gmm8.denoiser(VPLinear())
    for bad in (-0.1, 1.5, math.nan, "0.5", True):
        with pytest.raises(ConfigError, match="phi"):
            GuidanceRescale(den, 3.0, phi=bad)
    with pytest.raises(ConfigError, match="space"):
        GuidanceRescale(den, 3.0, space="eps")
    with pytest.raises(ConfigError, match="null"):
        GuidanceRescale(den, 3.0)(torch.zeros(2, 8, dtype=F64), 0.3, {"y": torch.tensor([0, 1])})
