"""Classifier guidance on the exact GMM: with the exact p(y | x_t), scale 1 is the exact conditional denoiser
and scale s the tempered posterior p_t(x) p(y | x_t)^s, in x0, eps and score form."""

import pytest
import torch

from condiff.core.schedules import EDM, VPLinear
from condiff.errors import ConfigError
from condiff.guidance import CFG
from condiff.guidance.classifier import ClassifierGuidance, exact_gmm_classifier, from_logits

F64 = torch.float64


def setup(gmm, schedule, ratio=0.8, n=64, seed=0):
    t = schedule.t_for_sigma_ratio(ratio)
    g = torch.Generator().manual_seed(seed)
    x = float(schedule.alpha(torch.tensor(t, dtype=F64))) * gmm.sample(n, g)[0] + float(
        schedule.sigma(torch.tensor(t, dtype=F64))
    ) * torch.randn(n, gmm.dim, generator=g, dtype=F64)
    y = torch.arange(n) % gmm.num_classes
    return gmm.denoiser(schedule), x, t, y


@pytest.mark.parametrize("schedule", [VPLinear(), EDM()], ids=lambda s: type(s).__name__)
@pytest.mark.parametrize("ratio", [0.3, 1.0, 3.0])
def test_scale_one_with_the_exact_classifier_is_the_conditional_denoiser(gmm, schedule, ratio):
    den, x, t, y = setup(gmm, schedule, ratio)
    guided = ClassifierGuidance(den, exact_gmm_classifier(den), 1.0)(x, t, {"y": y})
    assert (guided - den(x, t, {"y": y})).abs().max() < 1e-6
    assert torch.allclose(guided, den(x, t, {"y": y}), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("s", [0.0, 0.5, 2.0, 5.0])
def test_scale_s_is_the_tempered_posterior(gmm, s):
    """score_s = grad log [p_t(x) p(y | x_t)^s], taken by autograd of the exact log densities; in eps form
    eps_u - sigma s grad log p(y|x); and for exact parts it coincides with CFG at w = s."""
    sch = VPLinear()
    den, x, t, y = setup(gmm, sch)
    a, sig = sch.alpha(torch.tensor(t, dtype=F64)), sch.sigma(torch.tensor(t, dtype=F64))
    out = ClassifierGuidance(den, exact_gmm_classifier(den), s)(x, t, {"y": y})
    xg = x.clone().requires_grad_(True)
    logp = den.log_prob(xg, t) + s * (den.log_prob(xg, t, {"y": y}) - den.log_prob(xg, t))  # log p(y|x) + const
    (score,) = torch.autograd.grad(logp.sum(), xg)
    assert torch.allclose(-(x - a * out) / sig**2, score, rtol=1e-8, atol=1e-8)
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(torch.log(den.class_posterior(xg, t).gather(1, y[:, None])).sum(), xg)
    eps = den.eps(x, t) - sig * s * g
    assert torch.allclose(out, (x - sig * eps) / a, rtol=1e-9, atol=1e-9)
    null = {"y": torch.full_like(y, -1)}
    assert torch.allclose(out, CFG(den, s)(x, t, {"y": y, "null": null}), rtol=1e-8, atol=1e-8)


def test_per_sample_times_and_a_scale_schedule(gmm):
    sch = VPLinear()
    den, x, _, y = setup(gmm, sch)
    t = torch.linspace(0.1, 0.9, x.shape[0], dtype=F64)
    out = ClassifierGuidance(den, exact_gmm_classifier(den), lambda tt: 1.0)(x, t, {"y": y})
    assert torch.allclose(out, den(x, t, {"y": y}), rtol=1e-9, atol=1e-9)


def test_from_logits_equals_the_exact_classifier_given_exact_logits(gmm):
    """log_softmax of the exact class log-posteriors (any per-row shift) is the exact log p(y | x_t)."""
    sch = VPLinear()
    den, x, t, y = setup(gmm, sch)
    logits = lambda xx, tt: torch.log(den.class_posterior(xx, tt)) + 3.0  # noqa: E731
    a = ClassifierGuidance(den, from_logits(logits), 2.0)(x, t, {"y": y})
    b = ClassifierGuidance(den, exact_gmm_classifier(den), 2.0)(x, t, {"y": y})
    assert torch.allclose(a, b, rtol=1e-10, atol=1e-10)


def test_drop_keeps_the_label_for_a_conditional_model_and_errors(gmm):
    """drop=() guides the conditional denoiser: s = 1 then gives the posterior p(x|y) p(y|x), i.e. CFG w = 2."""
    sch = VPLinear()
    den, x, t, y = setup(gmm, sch)
    out = ClassifierGuidance(den, exact_gmm_classifier(den), 1.0, drop=())(x, t, {"y": y})
    null = {"y": torch.full_like(y, -1)}
    assert torch.allclose(out, CFG(den, 2.0)(x, t, {"y": y, "null": null}), rtol=1e-8, atol=1e-8)
    with pytest.raises(ConfigError):
        ClassifierGuidance(den, exact_gmm_classifier(den), float("inf"))
    with pytest.raises(ConfigError):
        ClassifierGuidance(den, "not callable", 1.0)
    with pytest.raises(ConfigError, match="one value per sample"):
        ClassifierGuidance(den, lambda xx, tt, c: xx, 1.0)(x, t, {"y": y})
