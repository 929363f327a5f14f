"""The shapes_classifier family: its time input and noising formulas, its loss (the per-head cross-entropies),
exact resume of a classifier training run, the bundled clean classifier's accuracy on fresh renders against
their exact attributes, and load_classifier's errors."""

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import condiff
from condiff.cli.train import train_recipe
from condiff.core.denoiser import diffuse as noisy
from condiff.core.schedules import schedule_from_config, unit_time
from condiff.data import shapes
from condiff.errors import InputFileError
from condiff.models.classifiers import load_classifier
from condiff.models.shapes_classifier import ShapesClassifierFamily, attribute_loss
from condiff.training.recipe import load_recipe

SCHEDULE = schedule_from_config({"type": "vp_discrete", "beta_schedule": "squaredcos_cap_v2", "num_steps": 1000})


def test_unit_time_and_noising():
    """unit_time maps the schedule's [t_min, t_max] = [0, 999] onto [0, 1]; noisy is alpha x0 + sigma eps."""
    assert unit_time(torch.tensor([0.0, 499.5, 999.0]), SCHEDULE.t_min, SCHEDULE.t_max).tolist() == [0.0, 0.5, 1.0]
    x0, eps, t = torch.randn(3, 3, 32, 32), torch.randn(3, 3, 32, 32), torch.tensor([10.0, 500.0, 990.0])
    a, s = SCHEDULE.alpha(t.double()).float(), SCHEDULE.sigma(t.double()).float()
    assert torch.allclose(
        noisy(SCHEDULE, x0, t, eps), a[:, None, None, None] * x0 + s[:, None, None, None] * eps, atol=1e-6
    )


def test_attribute_loss_is_the_sum_of_head_cross_entropies():
    fam = ShapesClassifierFamily()
    net = fam.build({"width": 16, "hidden": 32})["classifier"]
    b = shapes.sample_batch(5, torch.Generator().manual_seed(0))
    z = net(b.images)
    expect = sum(
        F.cross_entropy(net.head(z, k), b.attrs[:, i], reduction="none")
        for i, k in enumerate(("shape", "color", "size", "position"))
    )
    assert torch.allclose(attribute_loss(net, z, b.attrs), expect)


@pytest.mark.parametrize("kind", ["clean", "noisy"])
def test_training_resumes_exactly(tmp_path, kind):
    """6 steps in one go and 3 + resume + 3 give bit-identical weights (noise-aware: t and eps replay too)."""
    r = load_recipe(Path(condiff.__file__).parent / "recipes" / f"shapes-{kind}-classifier.toml")
    r = dataclasses.replace(
        r,
        model={**r.model, "width": 8, "hidden": 16},
        train=dataclasses.replace(r.train, steps=6, batch_size=8, ckpt_every=3, eval_every=0),
    )
    one = train_recipe(r, tmp_path / "a", progress=False)
    train_recipe(r, tmp_path / "b", progress=False, stop_after=3)
    two = train_recipe(r, tmp_path / "b", progress=False, resume=True)
    for (k, p), q in zip(one.module.state_dict().items(), two.module.state_dict().values()):
        assert torch.equal(p, q), k


def test_bundled_clean_classifier_reads_fresh_renders():
    """The bundled clean classifier is right on >= 99% of 512 fresh renders for every attribute (its training
    stream never repeats a render: these are new images with exact attributes)."""
    net = load_classifier("clean")
    assert not net.config.noise_aware
    b = shapes.sample_batch(512, torch.Generator().manual_seed(2024))
    with torch.no_grad():
        z = net(b.images)
    for i, k in enumerate(("shape", "color", "size", "position")):
        assert (net.head(z, k).argmax(1) == b.attrs[:, i]).float().mean() >= 0.99, k


def test_load_classifier_errors(tmp_path):
    with pytest.raises(InputFileError, match="neither a bundled classifier"):
        load_classifier(str(tmp_path / "missing"))
    with pytest.raises(InputFileError, match="not a classifier"):
        from condiff.models.base import bundled_dir

        load_classifier(str(bundled_dir("digits")))


def test_bundled_noisy_classifier_reads_noisy_renders():
    """The bundled noise-aware classifier reads the color of 512 fresh renders noised to the middle of the
    schedule (t = 500 of 999, where alpha is about 0.7) right >= 98% of the time, and every attribute at
    t = 250 >= 98%; the clean classifier on the same t = 500 images is far worse (it never saw noise)."""
    from condiff.models.base import bundled_dir, load_model

    net, clean = load_classifier("noisy"), load_classifier("clean")
    assert net.config.noise_aware
    sch = load_model(bundled_dir("shapes-noisy-classifier")).schedule
    g = torch.Generator().manual_seed(2025)
    b = shapes.sample_batch(512, g)
    eps = torch.randn(b.images.shape, generator=g)
    with torch.no_grad():
        for t, names in ((250.0, ("shape", "color", "size", "position")), (500.0, ("color",))):
            tt = torch.full((512,), t, dtype=torch.float64)
            xt = noisy(sch, b.images, tt, eps)
            z = net(xt, unit_time(tt, sch.t_min, sch.t_max))
            for k in names:
                i = ("shape", "color", "size", "position").index(k)
                assert (net.head(z, k).argmax(1) == b.attrs[:, i]).float().mean() >= 0.98, (t, k)
        naive = (clean.head(clean(xt), "color").argmax(1) == b.attrs[:, 1]).float().mean()
        assert naive < 0.9, float(naive)
