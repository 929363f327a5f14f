"""Classifier-free guidance on the exact GMM: limits, eps-space = x0-space, the exact guided score, batching."""

import pytest
import torch

from condiff.core.schedules import EDM, VPLinear
from condiff.data.gmm import GMM, NULL_CLASS
from condiff.errors import ConfigError
from condiff.guidance import CFG

F64 = torch.float64


class Counting:
    """Wraps a denoiser and records every call (batch size and condition)."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    @property
    def schedule(self):
        return self.inner.schedule

    def __call__(self, x, t, cond=None):
        self.calls.append((x.shape[0], t, cond))
        return self.inner(x, t, cond)


def setup(gmm, schedule=None, n=32, seed=0):
    schedule = schedule or VPLinear()
    t = schedule.t_for_sigma_ratio(0.8)
    g = torch.Generator().manual_seed(seed)
    x = float(schedule.sigma(torch.tensor(t, dtype=F64))) * torch.randn(n, gmm.dim, generator=g, dtype=F64)
    y = torch.arange(n) % gmm.num_classes
    cond = {"y": y, "null": GMM.null_cond(n)}
    return gmm.denoiser(schedule), x, t, y, cond


def test_w1_is_conditional_and_w0_unconditional(gmm):
    den, x, t, y, cond = setup(gmm)
    assert torch.equal(CFG(den, 1.0)(x, t, cond), den(x, t, {"y": y}))
    assert torch.equal(CFG(den, 0.0)(x, t, cond), den(x, t))


@pytest.mark.parametrize("w", [0.0, 1.0, 2.5])
def test_batched_path_agrees_with_the_limits(gmm, w):
    """The two-branch batched path (forced with skip_trivial=False, also at w = 0 and 1) is the affine mix,
    so w = 1 gives the conditional and w = 0 the unconditional denoiser through the contrast itself."""
    den, x, t, y, cond = setup(gmm)
    mixed = CFG(den, lambda _t: w, skip_trivial=False)(x, t, cond)
    assert torch.allclose(mixed, den(x, t) + w * (den(x, t, {"y": y}) - den(x, t)), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("schedule", [VPLinear(), EDM()], ids=lambda s: type(s).__name__)
@pytest.mark.parametrize("w", [0.5, 3.0, 7.5])
def test_eps_space_cfg_equals_x0_space_cfg(gmm, schedule, w):
    den, x, t, y, cond = setup(gmm, schedule)
    a, s = schedule.alpha(torch.tensor(t, dtype=F64)), schedule.sigma(torch.tensor(t, dtype=F64))
    eps_u, eps_c = den.eps(x, t), den.eps(x, t, {"y": y})
    x0_from_eps = (x - s * (eps_u + w * (eps_c - eps_u))) / a
    assert torch.allclose(CFG(den, w)(x, t, cond), x0_from_eps, rtol=1e-10, atol=1e-10)


def test_guided_score_is_unconditional_score_plus_w_classifier_gradient(gmm):
    """Ho & Salimans 2022 eq. 6 with exact parts: score_w = score_u + w grad log p_t(y | x)."""
    den, x, t, y, cond = setup(gmm)
    sch, w = den.schedule, 4.0
    a, s = sch.alpha(torch.tensor(t, dtype=F64)), sch.sigma(torch.tensor(t, dtype=F64))
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(torch.log(den.class_posterior(xg, t).gather(1, y[:, None])).sum(), xg)
    score_cfg = -(x - a * CFG(den, w)(x, t, cond)) / s**2
    assert torch.allclose(score_cfg, den.score(x, t) + w * grad, rtol=1e-9, atol=1e-9)


def test_one_inner_call_with_layout_uncond_then_cond(gmm):
    den, x, t, y, cond = setup(gmm)
    counted = Counting(den)
    CFG(counted, 3.0)(x, t, cond)
    assert len(counted.calls) == 1
    batch, t_seen, inner_cond = counted.calls[0]
    assert batch == 2 * x.shape[0] and t_seen == t
    assert set(inner_cond) == {"y"}
    n = x.shape[0]
    assert bool((inner_cond["y"][:n] == NULL_CLASS).all()) and torch.equal(inner_cond["y"][n:], y)


def test_per_sample_times_are_duplicated_for_both_branches(gmm):
    den, x, _, y, cond = setup(gmm)
    t = torch.linspace(0.2, 0.8, x.shape[0], dtype=F64)
    counted = Counting(den)
    out = CFG(counted, 2.0)(x, t, cond)
    assert torch.equal(counted.calls[0][1], torch.cat([t, t]))
    ref = den(x, t) + 2.0 * (den(x, t, {"y": y}) - den(x, t))
    assert torch.allclose(out, ref, rtol=1e-12, atol=1e-12)


def test_null_given_at_construction_and_errors(gmm):
    den, x, t, y, _ = setup(gmm)
    out = CFG(den, 2.0, null=GMM.null_cond(x.shape[0]))(x, t, {"y": y})
    assert torch.allclose(out, CFG(den, 2.0)(x, t, {"y": y, "null": GMM.null_cond(x.shape[0])}), rtol=0, atol=0)
    with pytest.raises(ConfigError):
        CFG(den, 2.0)(x, t, {"y": y})
    for bad in (float("nan"), float("inf"), "3", True):
        with pytest.raises(ConfigError):
            CFG(den, bad)
