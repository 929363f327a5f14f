"""Negative conditions on the exact GMM: NegativeGuidance is CFG with null := negative (bit for bit, whole
trajectories); Negation (composable diffusion) is the exact score_u + w grad log p(c|x) - w_neg grad log p(neg|x)."""

import pytest
import torch

from condiff.core.grids import make_grid
from condiff.core.sampling import sample
from condiff.core.schedules import VPLinear
from condiff.data.gmm import GMM, NULL_CLASS
from condiff.errors import ConfigError
from condiff.guidance import CFG
from condiff.guidance.negative import Negation, NegativeGuidance
from condiff.solvers import get_solver

F64 = torch.float64


@pytest.fixture(scope="module")
def gmm3():
    return GMM.random(dim=2, components=6, num_classes=3, seed=2, spread=2.0, var_range=(0.1, 1.0))


def setup(gmm, n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, gmm.dim, generator=g, dtype=F64)
    y = torch.arange(n) % gmm.num_classes
    neg = (y + 1) % gmm.num_classes
    return x, y, neg


class Recording:
    def __init__(self, inner):
        self.inner, self.calls = inner, []

    @property
    def schedule(self):
        return self.inner.schedule

    def __call__(self, x, t, cond):
        self.calls.append((x.shape[0], cond))
        return self.inner(x, t, cond)


@pytest.mark.parametrize("solver", ["ddim", "dpmpp-2m", "heun"])
def test_negative_replaces_the_null_branch(gmm3, solver):
    """A whole trajectory of NegativeGuidance equals CFG whose null condition is the negative one, bit for bit;
    a 'null' entry in cond is ignored."""
    sch = VPLinear()
    grid = make_grid(sch, 8)
    x, y, neg = setup(gmm3)
    x = x * float(sch.sigma(grid[0]))
    den = gmm3.denoiser(sch)
    out = sample(
        NegativeGuidance(den, 4.0),
        get_solver(solver),
        grid,
        x,
        {"y": y, "negative": {"y": neg}, "null": GMM.null_cond(x.shape[0])},
    ).x
    ref = sample(CFG(den, 4.0), get_solver(solver), grid, x, {"y": y, "null": {"y": neg}}).x
    assert torch.equal(out, ref)
    given = sample(NegativeGuidance(den, 4.0, negative={"y": neg}), get_solver(solver), grid, x, {"y": y}).x
    assert torch.equal(given, ref)


def test_negative_guided_score_points_from_negative_to_condition(gmm3):
    """score = score(x | neg) + w (score(x | c) - score(x | neg)) with exact class-conditional scores."""
    x, y, neg = setup(gmm3)
    sch = VPLinear()
    den = gmm3.denoiser(sch)
    t, w = 0.4, 3.0
    a, s = sch.alpha(torch.tensor(t, dtype=F64)), sch.sigma(torch.tensor(t, dtype=F64))
    out = NegativeGuidance(den, w)(x, t, {"y": y, "negative": {"y": neg}})
    score = -(x - a * out) / s**2
    want = den.score(x, t, {"y": neg}) + w * (den.score(x, t, {"y": y}) - den.score(x, t, {"y": neg}))
    assert torch.allclose(score, want, rtol=1e-9, atol=1e-9)


def test_negation_is_the_exact_composed_score(gmm3):
    """Negation: score = score_u + w grad log p_t(y|x) - w_neg grad log p_t(neg|x), with the exact noisy
    classifier of the GMM; one forward of 3n rows laid out [uncond, cond, negative]."""
    x, y, neg = setup(gmm3)
    sch = VPLinear()
    den = gmm3.denoiser(sch)
    t, w, w_neg = 0.5, 3.0, 1.5
    a, s = sch.alpha(torch.tensor(t, dtype=F64)), sch.sigma(torch.tensor(t, dtype=F64))
    rec = Recording(den)
    out = Negation(rec, w, w_neg)(x, t, {"y": y, "null": GMM.null_cond(x.shape[0]), "negative": {"y": neg}})
    n = x.shape[0]
    assert len(rec.calls) == 1 and rec.calls[0][0] == 3 * n
    labels = rec.calls[0][1]["y"]
    assert bool((labels[:n] == NULL_CLASS).all())
    assert torch.equal(labels[n : 2 * n], y) and torch.equal(labels[2 * n :], neg)
    xg = x.clone().requires_grad_(True)
    logp = torch.log(den.class_posterior(xg, t))
    (g_c,) = torch.autograd.grad(logp.gather(1, y[:, None]).sum(), xg, retain_graph=True)
    (g_n,) = torch.autograd.grad(logp.gather(1, neg[:, None]).sum(), xg)
    score = -(x - a * out) / s**2
    assert torch.allclose(score, den.score(x, t) + w * g_c - w_neg * g_n, rtol=1e-9, atol=1e-9)


def test_negation_with_zero_negative_weight_is_cfg(gmm3):
    x, y, neg = setup(gmm3)
    den = gmm3.denoiser(VPLinear())
    cond = {"y": y, "null": GMM.null_cond(x.shape[0]), "negative": {"y": neg}}
    out = Negation(den, 2.5, 0.0)(x, 0.3, cond)
    assert torch.allclose(out, CFG(den, 2.5)(x, 0.3, cond), rtol=1e-12, atol=1e-12)


def test_errors(gmm3):
    den = gmm3.denoiser(VPLinear())
    x = torch.zeros(2, 2, dtype=F64)
    with pytest.raises(ConfigError, match="negative"):
        NegativeGuidance(den, 3.0)(x, 0.3, {"y": torch.tensor([0, 1])})
    with pytest.raises(ConfigError, match="null"):
        Negation(den, 3.0, 1.0)(x, 0.3, {"y": torch.tensor([0, 1]), "negative": {"y": torch.tensor([1, 0])}})
    with pytest.raises(ConfigError, match="negative guidance scale"):
        Negation(den, 3.0, float("nan"))
