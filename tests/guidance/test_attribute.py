"""Attribute-classifier guidance (guidance/attribute.py) against its formulas, with small random
AttributeClassifiers: the noise-aware classifier reads t in [0, 1] (t / 999 for the bundled schedule) and shifts
x0 by (sigma^2 / alpha) s grad log softmax; a clean classifier ignores t; EluCD uses a smoothed copy and leaves
the original net alone; the target is read from cond['cg_target'] and never reaches the denoiser."""

import pytest
import torch
from torch import nn

from condiff.core.denoiser import coefficients
from condiff.core.grids import make_grid
from condiff.core.schedules import schedule_from_config
from condiff.errors import ConfigError
from condiff.guidance.attribute import TARGET_KEY, AttributeLogits, classifier_guidance, elucd_guidance
from condiff.guidance.cfg import CFG
from condiff.guidance.elucd import EluCD, softplus_smoothed
from condiff.nets import AttributeClassifier

SCHEDULE = schedule_from_config({"type": "vp_discrete", "beta_schedule": "squaredcos_cap_v2", "num_steps": 1000})


class Toy:
    """x0_hat = 0.3 x + 0.1 pooled (records the cond keys it saw)."""

    schedule = SCHEDULE

    def __init__(self):
        self.seen = []

    def __call__(self, x, t, cond=None):
        self.seen.append(set(cond or {}))
        return 0.3 * x + 0.1 * (cond or {}).get("pooled", torch.zeros(())).reshape(-1, 1, 1, 1)


def _net(noise_aware, seed=0):
    torch.manual_seed(seed)
    return AttributeClassifier(width=16, hidden=32, noise_aware=noise_aware).eval()


def _expected_shift(net, x, t, y, s, u):
    xg = x.detach().requires_grad_(True)
    logp = torch.log_softmax(net.head(net(xg, u), "color"), 1).gather(1, y[:, None]).sum()
    (g,) = torch.autograd.grad(logp, xg)
    a, sig = coefficients(SCHEDULE, t, x)
    return (sig**2 / a) * s * g


@pytest.mark.parametrize("t", [100.0, 500.0, 900.0])
def test_noise_aware_guidance_is_the_adm_shift_at_unit_time(t):
    """x0 = x0_u + (sigma^2/alpha) s grad_x log p(y | x_t, u) with u = t / 999, to float32 rounding."""
    net, den = _net(True), Toy()
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 3, 5, 1])
    cond = {"pooled": torch.ones(4), TARGET_KEY: y}
    out = classifier_guidance(den, net, "color", 2.5)(x, t, cond)
    u = torch.full((4,), t / 999.0)
    expect = den(x, t, cond) + _expected_shift(net, x, t, y, 2.5, u)
    assert torch.allclose(out, expect, atol=1e-6, rtol=1e-5)
    assert all(TARGET_KEY not in keys for keys in den.seen[:1])


def test_clean_classifier_ignores_t_and_per_sample_times_work():
    """A clean net's guidance gradient is the same at every t (only the sigma^2/alpha factor changes); per-row t
    gives each row its own factor."""
    net, den = _net(False), Toy()
    x, y = torch.randn(3, 3, 32, 32), torch.tensor([2, 2, 4])
    cond = {TARGET_KEY: y}
    g = classifier_guidance(den, net, "color", 1.0)
    shifts = []
    for t in (200.0, 700.0):
        a, sig = coefficients(SCHEDULE, t, x)
        shifts.append((g(x, t, cond) - 0.3 * x) / (sig**2 / a))
    assert torch.allclose(shifts[0], shifts[1], atol=1e-5, rtol=1e-4)
    tt = torch.tensor([200.0, 700.0, 700.0])
    per_row = g(x, tt, cond)
    assert torch.allclose(per_row[:1], g(x[:1], 200.0, {TARGET_KEY: y[:1]}), atol=1e-6)
    assert torch.allclose(per_row[1:], g(x[1:], 700.0, {TARGET_KEY: y[1:]}), atol=1e-6)


def test_elucd_guidance_is_eluCD_on_a_smoothed_copy():
    """elucd_guidance equals EluCD(D, softplus_smoothed(net)) with tau2 = kappa tau1; the caller's net keeps
    its ReLUs; a noise-aware net is refused."""
    net, den = _net(False, seed=3), Toy()
    grid = make_grid(SCHEDULE, 10)
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 4])
    cond = {TARGET_KEY: y}
    out = elucd_guidance(den, net, "color", 3.0, grid)(x, float(grid[3]), cond)
    ref = EluCD(
        den,
        AttributeLogits(softplus_smoothed(net, 3.0), "color"),
        grid,
        3.0,
        tau1=1.0,
        tau2=0.5,
        gamma=0.3,
        key=TARGET_KEY,
    )(x, float(grid[3]), cond)
    assert torch.allclose(out, ref, atol=1e-6)
    assert not torch.allclose(out, 0.3 * x)
    assert any(isinstance(m, nn.ReLU) for m in net.modules())
    with pytest.raises(ConfigError, match="noise-aware"):
        elucd_guidance(den, _net(True), "color", 1.0, grid)


def test_errors_and_composition_with_cfg():
    """No target -> one ConfigError; an unknown attribute -> one ConfigError; stacked on CFG the target never
    reaches the model and CFG still sees its null branch."""
    net, den = _net(True), Toy()
    g = classifier_guidance(den, net, "color", 1.0)
    with pytest.raises(ConfigError, match="cg_target"):
        g(torch.randn(1, 3, 32, 32), 500.0, {"pooled": torch.ones(1)})
    with pytest.raises(ConfigError, match="accepted"):
        classifier_guidance(den, net, "texture", 1.0)
    stacked = classifier_guidance(CFG(den, 3.0), net, "color", 1.0)
    cond = {"pooled": torch.ones(2), "null": {"pooled": torch.zeros(2)}, TARGET_KEY: torch.tensor([0, 1])}
    out = stacked(torch.randn(2, 3, 32, 32), 300.0, cond)
    assert out.shape == (2, 3, 32, 32) and torch.isfinite(out).all()
    assert all(TARGET_KEY not in keys for keys in den.seen)
