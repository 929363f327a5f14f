"""rRCM's pieces against exact answers: adjacent grid times, InfoNCE on orthonormal codes, the EMA target, the
smoothing map onto the trajectory, the noisy cross-entropy, and the certified radius of a linear one-step network
through that map (sound, and near the exact radius)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from scipy.stats import norm
from torch import nn

from condiff.core.schedules import VPCosine
from condiff.errors import ConfigError
from condiff.tasks.rrcm import (
    OneStepClassifier,
    adjacent_times,
    contrastive_denoising_loss,
    ema_update,
    info_nce,
    noisy_label_loss,
    smoothing_point,
)
from condiff.tasks.smoothing import certify

SCHED = VPCosine()


def test_adjacent_times_are_neighbours_on_the_grid():
    t_lo, t_hi = adjacent_times(SCHED, 500, 10, torch.Generator().manual_seed(0))
    step = (SCHED.t_max - SCHED.t_min) / 10
    assert torch.allclose(t_hi - t_lo, torch.full((500,), step, dtype=torch.float64), atol=1e-12)
    assert float(t_lo.min()) == pytest.approx(SCHED.t_min) and float(t_hi.max()) == pytest.approx(SCHED.t_max)
    k = torch.round((t_lo - SCHED.t_min) / step)
    assert set(k.long().tolist()) == set(range(10))  # every interval drawn
    again = adjacent_times(SCHED, 500, 10, torch.Generator().manual_seed(0))
    assert torch.equal(again[0], t_lo)


@pytest.mark.parametrize("b,tau", [(4, 0.2), (8, 1.0)])
def test_info_nce_on_orthonormal_codes_is_exact(b, tau):
    q = torch.eye(b, 16, dtype=torch.float64) * 3.0  # norms do not matter: cosine similarities
    loss = info_nce(q, q.clone(), tau)
    exact = -math.log(math.exp(1 / tau) / (math.exp(1 / tau) + (b - 1)))
    assert torch.allclose(loss, torch.full((b,), exact, dtype=torch.float64), atol=1e-12)
    with pytest.raises(ConfigError, match="temperature"):
        info_nce(q, q, 0.0)
    with pytest.raises(ConfigError, match="one shape"):
        info_nce(q, q[:2], 0.2)


class Lin(nn.Module):
    def __init__(self, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.w = nn.Linear(17, 5)

    def represent(self, x, t):
        return self.w(torch.cat([x.flatten(1), t.float().reshape(-1, 1)], 1))


def test_contrastive_loss_terms_and_gradients_reach_the_online_net_only():
    online, target = Lin(0), Lin(1).requires_grad_(False)
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(6, 1, 4, 4, generator=g)
    eps = torch.randn(6, 1, 4, 4, generator=g)
    t_lo, t_hi = adjacent_times(SCHED, 6, 20, g)
    loss, terms = contrastive_denoising_loss(online, target, SCHED, x0, t_lo, t_hi, eps, 0.5, consistency=2.0)
    a_lo, s_lo = SCHED.alpha(t_lo).reshape(-1, 1, 1, 1), SCHED.sigma(t_lo).reshape(-1, 1, 1, 1)
    a_hi, s_hi = SCHED.alpha(t_hi).reshape(-1, 1, 1, 1), SCHED.sigma(t_hi).reshape(-1, 1, 1, 1)
    q = online.represent((a_hi * x0 + s_hi * eps).float(), t_hi)
    k = target.represent((a_lo * x0 + s_lo * eps).float(), t_lo)
    k0 = target.represent(x0, torch.full_like(t_lo, SCHED.t_min))
    logits = F.normalize(q, dim=1) @ F.normalize(k, dim=1).T / 0.5
    nce = F.cross_entropy(logits, torch.arange(6), reduction="none")
    align = 1 - F.cosine_similarity(q, k0, dim=1)
    assert torch.allclose(loss, nce + 2.0 * align, atol=1e-5)
    assert terms["contrastive"] == pytest.approx(float(nce.detach().mean()), abs=1e-5)
    loss.mean().backward()
    assert online.w.weight.grad is not None and target.w.weight.grad is None


def test_ema_update_is_the_convex_combination():
    a, b = Lin(0), Lin(1)
    a0 = a.w.weight.detach().clone()
    ema_update(a, b, 0.75)
    assert torch.allclose(a.w.weight, 0.75 * a0 + 0.25 * b.w.weight, atol=1e-7)
    ema_update(a, b, 0.0)
    assert torch.equal(a.w.weight, b.w.weight)
    with pytest.raises(ConfigError, match="decay"):
        ema_update(a, b, 1.5)


def test_smoothing_point_is_on_the_trajectory_at_the_smoothing_noise():
    x = torch.rand(3, 1, 4, 4)
    x_t, t = smoothing_point(SCHED, x, 0.25, 2.0, -1.0)
    a, s = float(SCHED.alpha(t[0])), float(SCHED.sigma(t[0]))
    assert s / a == pytest.approx(0.5, rel=1e-9)  # sigma(t*) / alpha(t*) = scale * sigma
    assert torch.allclose(x_t, (a * (2 * x - 1)).float(), atol=1e-6)


def test_noisy_label_loss_is_the_cross_entropy_on_the_same_draws():
    net = lambda x_t, t: x_t.flatten(1)[:, :3] * 4.0  # noqa: E731
    x = torch.rand(5, 1, 2, 2)
    y = torch.tensor([0, 1, 2, 0, 1])
    loss = noisy_label_loss(net, SCHED, x, y, 0.3, torch.Generator().manual_seed(1), 2.0, -1.0)
    delta = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)) * 0.3
    x_t, t = smoothing_point(SCHED, x + delta, 0.3, 2.0, -1.0)
    assert torch.allclose(loss, F.cross_entropy(net(x_t, t), y, reduction="none"))


class LinearTwoClass(nn.Module):
    def __init__(self, w, b):
        super().__init__()
        self.w, self.b = w, b

    def forward(self, x_t, t):
        s = x_t.flatten(1).double() @ self.w + self.b * SCHED.alpha(t)
        return torch.stack([-s, s], 1)


def test_one_step_certificates_of_a_linear_network_are_sound_and_tight():
    """Through the map x + delta -> alpha (2 (x + delta) - 1), a linear net w.x_t + b alpha is the linear
    classifier 2 w.x + (b - w.1) of the draw: its smoothed version is exact, radius |w'.x + b'| / ||w'||."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, generator=g, dtype=torch.float64)
    b = 0.4
    net = LinearTwoClass(w, b)
    clf = OneStepClassifier(net, SCHED, 0.5, 2.0, -1.0)
    w2, b2 = 2 * w, b - float(w.sum())
    for i in range(3):
        x = torch.rand(1, 4, 4, generator=g)
        margin = float(x.flatten().double() @ w2 + b2)
        exact = abs(margin) / float(w2.norm())
        c = certify(clf, x, 0.5, 50, 20000, 0.001, 2, 5000, torch.Generator().manual_seed(i))
        assert c.label == int(margin > 0) or c.label == -1
        if c.label != -1:
            assert c.radius <= exact + 1e-9
            # the bound is within the Clopper-Pearson slack at n = 20000 of the exact probability's radius
            p = norm.cdf(exact / 0.5)
            slack = 0.5 * (norm.ppf(min(p, 1 - 1e-9)) - norm.ppf(max(0.5, p - 0.02)))
            assert c.radius >= exact - slack - 1e-9
