"""SDA (condiff.tasks.sda) on the spec's Gaussian toy: source classes N(+-mu, I) (priors 0.9 / 0.1), an exact
Gaussian-mixture denoiser (unconditional, and class-conditional through ``cond["class_labels"]``), a target shift
(contrast: x -> 0.3 x). The classifier fine-tuned on MoD-projected synthetic data beats the source classifier on
projected targets (0.846 -> 0.893 at seed 1, 4000 points: the few-step projection from t* makes its own
"synthetic domain", and the fine-tuned classifier is aligned to it). In this toy the source classifier on the raw
targets (0.91) is still the best single number; the oracle is the spec's comparison on projected targets."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from condiff.core.sampling import Gaussian, Recorded
from condiff.core.schedules import VPCosine
from condiff.errors import ConfigError
from condiff.tasks import sda

SCHEDULE = VPCosine()
MUS = torch.tensor([[1.5, 0.0], [-1.5, 0.0]])
PRIORS = torch.tensor([0.9, 0.1])


class ExactGMM:
    """E[x0 | x_t] of the mixture sum_k pi_k N(mu_k, I) (per class with ``cond["class_labels"]``)."""

    schedule = SCHEDULE

    def __call__(self, x, t, cond=None):
        a, s = (float(v) for v in SCHEDULE.alpha_sigma(torch.tensor(float(t), dtype=torch.float64)))
        var = a * a + s * s
        d = x[:, None, :] - a * MUS[None]
        means = MUS[None] + a / var * d
        if cond and "class_labels" in cond:
            w = nn.functional.one_hot(cond["class_labels"], len(MUS)).to(x.dtype)
        else:
            w = (PRIORS.log()[None] - (d**2).sum(-1) / (2 * var)).softmax(-1)
        return (w[..., None] * means).sum(1)


def draw(n, g):
    y = torch.multinomial(PRIORS, n, replacement=True, generator=g)
    return MUS[y] + torch.randn(n, 2, generator=g), y


def test_one_step_projection_is_tweedie():
    D = ExactGMM()
    t_star = SCHEDULE.t_for_sigma_ratio(1.0)
    x, eps = torch.randn(6, 2), torch.randn(6, 2)
    out = sda.project(D, x, sda.Projection(t_star, steps=1), Recorded([eps]))
    a, s = (float(v) for v in SCHEDULE.alpha_sigma(torch.tensor(t_star, dtype=torch.float64)))
    assert torch.allclose(out, D(a * x + s * eps, t_star), atol=1e-6)


def test_mix_of_diffusion_is_synthesis_then_the_same_projection():
    D = ExactGMM()
    proj = sda.Projection(SCHEDULE.t_for_sigma_ratio(2.0), steps=3)
    labels = torch.tensor([0, 1, 1, 0])
    zs = [torch.randn(4, 2) for _ in range(3)]  # start noise and the projection's eps (DDIM draws no more)
    images, ys = sda.mix_of_diffusion(D, D, labels, (2,), proj, steps=4, noise=Recorded(list(zs)))
    noise = Recorded(list(zs))
    ref = sda.project(D, sda.synthesize(D, labels, (2,), steps=4, noise=noise), proj, noise)
    assert torch.equal(images, ref) and torch.equal(ys, labels)


def test_class_conditional_synthesis_has_the_class_means():
    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([0, 1]).repeat(2000)
    x = sda.synthesize(ExactGMM(), labels, (2,), steps=50, noise=Gaussian(g))
    for k in (0, 1):
        assert torch.allclose(x[labels == k].mean(0), MUS[k], atol=0.08)


def test_finetuning_on_mod_data_beats_the_source_classifier_on_projected_targets():
    g = torch.Generator().manual_seed(1)
    D = ExactGMM()
    proj = sda.Projection(SCHEDULE.t_for_sigma_ratio(3.0), steps=5)
    torch.manual_seed(0)
    xs, ys = draw(4000, g)
    source, _ = sda.finetune(nn.Linear(2, 2), xs, ys, epochs=30, lr=0.05, generator=g)
    before = [p.detach().clone() for p in source.parameters()]
    xt, yt = draw(4000, g)
    xt = 0.3 * xt  # the target shift
    projected = sda.project(D, xt, proj, Gaussian(g))
    labels = torch.multinomial(PRIORS, 4000, replacement=True, generator=g)
    images, ym = sda.mix_of_diffusion(D, D, labels, (2,), proj, steps=20, noise=Gaussian(g))
    adapted, history = sda.finetune(source, images, ym, epochs=30, lr=0.05, generator=g)
    assert all(torch.equal(p, q) for p, q in zip(before, source.parameters()))  # the source is untouched
    assert history[-1] < history[0]
    with torch.no_grad():
        acc_source = sda.accuracy(source(projected), yt)
        acc_adapted = sda.accuracy(adapted(projected), yt)
        acc_sda = sda.accuracy(sda.predict(source, adapted, xt, projected), yt)
    assert acc_adapted > acc_source + 0.02, (acc_source, acc_adapted)
    assert acc_sda > acc_source
    probs = sda.predict(source, adapted, xt, projected)
    ref = (adapted(projected).softmax(-1) + source(xt).softmax(-1)) / 2
    assert torch.allclose(probs, ref) and torch.allclose(probs.sum(-1), torch.ones(4000))


class GaussianPixels:
    """E[x0 | x_t] = alpha / (alpha^2 + sigma^2) x_t: the exact denoiser of images with N(0, I) pixels."""

    schedule = SCHEDULE

    def __call__(self, x, t, cond=None):
        a, s = (float(v) for v in SCHEDULE.alpha_sigma(torch.tensor(float(t), dtype=torch.float64)))
        return a / (a * a + s * s) * x


def test_low_pass_is_block_means_repeated():
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    ref = torch.tensor([[2.5, 2.5, 4.5, 4.5], [2.5, 2.5, 4.5, 4.5], [10.5, 10.5, 12.5, 12.5], [10.5, 10.5, 12.5, 12.5]])
    assert torch.equal(sda.low_pass(x, 2)[0, 0], ref)
    assert torch.equal(sda.low_pass(x, 1), x)
    with pytest.raises(ConfigError, match="divide"):
        sda.low_pass(x, 3)


def test_structure_weight_zero_is_the_plain_projection_bit_for_bit():
    x, zs = torch.randn(3, 1, 4, 4), [torch.randn(3, 1, 4, 4)]
    t_star = SCHEDULE.t_for_sigma_ratio(2.0)
    plain = sda.project(GaussianPixels(), x, sda.Projection(t_star, steps=4), Recorded(list(zs)))
    zero = sda.Projection(t_star, steps=4, structure_factor=2, structure_weight=0.0)
    assert torch.equal(sda.project(GaussianPixels(), x, zero, Recorded(list(zs))), plain)


def test_one_guided_step_is_the_analytic_dda_update():
    # one DDIM step to clean: x_out = x0_hat - w grad_{x_t} ||phi(x_in) - phi(c x_t)|| = c x_t + w c r / ||r||,
    # r = phi(x_in) - phi(c x_t), c = alpha / (alpha^2 + sigma^2) (phi is an orthogonal projection)
    t_star, w = SCHEDULE.t_for_sigma_ratio(1.5), 0.7
    x, eps = torch.randn(2, 1, 4, 4, dtype=torch.float64), torch.randn(2, 1, 4, 4, dtype=torch.float64)
    a, s = (float(v) for v in SCHEDULE.alpha_sigma(torch.tensor(t_star, dtype=torch.float64)))
    c, x_t = a / (a * a + s * s), a * x + s * eps
    r = sda.low_pass(x, 2) - sda.low_pass(c * x_t, 2)
    ref = c * x_t + w * c * r / r.flatten(1).norm(dim=1)[:, None, None, None]
    proj = sda.Projection(t_star, steps=1, structure_factor=2, structure_weight=w)
    assert torch.allclose(sda.project(GaussianPixels(), x, proj, Recorded([eps])), ref, atol=1e-12)


def test_structure_guidance_lowers_the_low_pass_error_per_image():
    g = torch.Generator().manual_seed(0)
    x = 2.0 + torch.randn(4, 1, 8, 8, generator=g)  # far from the N(0, I) prior: the plain projection loses it
    zs = [torch.randn(4, 1, 8, 8, generator=g)]
    t_star = SCHEDULE.t_for_sigma_ratio(2.0)

    def error(weight):
        proj = sda.Projection(t_star, steps=5, structure_factor=4, structure_weight=weight)
        out = sda.project(GaussianPixels(), x, proj, Recorded(list(zs)))
        return (sda.low_pass(out, 4) - sda.low_pass(x, 4)).flatten(1).norm(dim=1), out

    plain, _ = error(0.0)
    guided, out = error(1.0)
    assert bool((guided < plain).all()), (plain, guided)
    alone = sda.project(
        GaussianPixels(),
        x[:1],
        sda.Projection(t_star, 5, structure_factor=4, structure_weight=1.0),
        Recorded([zs[0][:1]]),
    )
    assert torch.allclose(alone, out[:1], atol=1e-6)  # each image's guidance is its own


def test_bad_inputs_are_config_errors():
    D = ExactGMM()
    with pytest.raises(ConfigError, match="steps"):
        sda.Projection(0.5, steps=0)
    with pytest.raises(ConfigError, match="solver"):
        sda.Projection(0.5, solver="ddim")
    with pytest.raises(ConfigError, match="structure_factor"):
        sda.Projection(0.5, structure_factor=0, structure_weight=1.0)
    with pytest.raises(ConfigError, match="structure_weight"):
        sda.Projection(0.5, structure_factor=2, structure_weight=-1.0)
    with pytest.raises(ConfigError, match="schedule"):
        sda.project(lambda x, t, c: x, torch.zeros(2, 2), sda.Projection(0.5))
    with pytest.raises(ConfigError, match="labels must be an integer"):
        sda.synthesize(D, torch.tensor([0.0, 1.0]), (2,))
    with pytest.raises(ConfigError, match="rows"):
        sda.finetune(nn.Linear(2, 2), torch.zeros(3, 2), torch.tensor([0, 1]))
    with pytest.raises(ConfigError, match="nn.Module"):
        sda.finetune(lambda x: x, torch.zeros(2, 2), torch.tensor([0, 1]))
    with pytest.raises(ConfigError, match="projected"):
        sda.predict(nn.Linear(2, 2), nn.Linear(2, 2), torch.zeros(2, 2), torch.zeros(3, 2))
    with pytest.raises(ConfigError, match="shape"):
        sda.synthesize(D, torch.tensor([0, 1]), (0,))
