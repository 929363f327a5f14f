"""The shapes_imbalanced family (cyan 5% of the data, mostly empty captions) and ``[train] init_from``, which
fine-tunes it from the bundled shapes model with exact resume."""

import tomllib
from pathlib import Path

import pytest
import torch

import condiff
from condiff.cli.train import make_trainer, train_recipe
from condiff.core.files import load_tensors
from condiff.data import labeller, shapes, text
from condiff.errors import ConfigError, InputFileError
from condiff.models.base import get_family, load_model
from condiff.models.shapes_imbalanced import (
    COLOR_WEIGHTS,
    EMPTY_CAPTION_SHARE,
    RARE_COLOR,
    RARE_SHARE,
    ShapesImbalancedFamily,
    imbalanced_attrs,
)
from condiff.training.recipe import ObjectiveConfig, recipe_from_dict

RECIPE = Path(condiff.__file__).parent / "recipes" / "shapes-minority.toml"


def test_color_weights_and_uniform_other_attributes():
    """Over 60000 draws each color's share is within 4 binomial standard errors of its weight (cyan 0.05, the
    others 0.19), and shape, size and position stay uniform."""
    n = 60000
    attrs = imbalanced_attrs(n, torch.Generator().manual_seed(0))
    assert COLOR_WEIGHTS[shapes.COLORS.index(RARE_COLOR)] == RARE_SHARE
    assert abs(float(COLOR_WEIGHTS.sum()) - 1) < 1e-12
    for col, weights in (
        (1, COLOR_WEIGHTS),
        (0, torch.full((3,), 1 / 3)),
        (2, torch.full((2,), 1 / 2)),
        (3, torch.full((9,), 1 / 9)),
    ):
        share = torch.bincount(attrs[:, col], minlength=len(weights)).double() / n
        se = (weights.double() * (1 - weights.double()) / n).sqrt()
        assert bool(((share - weights.double()).abs() < 4 * se).all()), (col, share)


def test_training_batch_renders_and_mostly_empty_captions():
    """The exact labeller reads every training image back as its caption's attributes; the share of empty
    captions is EMPTY_CAPTION_SHARE (+ attr_dropout^4 for the rest) within 4 standard errors."""
    fam = get_family("shapes_imbalanced")
    assert isinstance(fam, ShapesImbalancedFamily)
    obj = ObjectiveConfig(attr_dropout=0.15)
    n = 4000
    images, tokens = fam.training_batch(0, n, torch.Generator().manual_seed(1), 0, obj)
    empty = (tokens == text.PAD).all(1).double().mean()
    p = EMPTY_CAPTION_SHARE + (1 - EMPTY_CAPTION_SHARE) * 0.15**4
    assert abs(float(empty) - p) < 4 * (p * (1 - p) / n) ** 0.5
    labels = labeller.label(images[:300])
    full = (tokens[:300] != text.PAD).all(1)
    assert torch.equal(text.attrs_to_tokens(labels[full]), tokens[:300][full])


def _recipe(**train):
    data = tomllib.loads(RECIPE.read_text())
    data["train"].update(train)
    return recipe_from_dict(data)


def test_init_from_starts_at_the_bundled_weights_and_resumes_exactly(tmp_path):
    """The model and its EMA start equal to the bundled shapes weights; killing after 3 steps and resuming from
    the step-2 checkpoint reproduces the uninterrupted 4-step run bit for bit (weights and EMA)."""
    torch.set_num_threads(1)
    r = _recipe(steps=4, batch_size=2, ckpt_every=2, keep_checkpoints=3, warmup=1)
    tr = make_trainer(r, tmp_path / "probe", progress=False)
    ref = load_model("shapes").module.state_dict()
    sd = tr.module.state_dict()
    assert sd.keys() == ref.keys() and all(torch.equal(sd[k], ref[k]) for k in ref)
    names = [n for n, p in tr.module.named_parameters() if p.requires_grad]
    assert all(torch.equal(e, ref[n]) for n, e in zip(names, tr.ema.shadow_params))
    train_recipe(r, tmp_path / "full", progress=False)
    part = train_recipe(r, tmp_path / "part", progress=False, stop_after=3)
    assert part.step == 3
    train_recipe(r, tmp_path / "part", progress=False, resume=True)
    for f in ("model.safetensors", "ema.safetensors"):
        a = load_tensors(tmp_path / "full" / "checkpoints" / "step-00000004" / f)
        b = load_tensors(tmp_path / "part" / "checkpoints" / "step-00000004" / f)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a[names[0]], ref[names[0]])  # it did train
    assert load_model(tmp_path / "full" / "model").family.name == "shapes_imbalanced"


def test_bad_init_from_is_refused(tmp_path):
    with pytest.raises(InputFileError, match="neither a bundled model"):
        make_trainer(_recipe(init_from="no-such-model"), tmp_path / "a", progress=False)
    with pytest.raises(ConfigError, match="init_from 'digits'"):
        make_trainer(_recipe(init_from="digits"), tmp_path / "b", progress=False)
    with pytest.raises(ConfigError, match="init_from must be str"):
        _recipe(init_from=3)
