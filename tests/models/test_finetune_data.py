"""The shapes fine-tuning data: the reward reads object areas exactly, partial prompts never name the size, the
few-shot set is fixed and striped, and the striped stream is the striped style of fresh renders."""

from __future__ import annotations

import torch

from condiff.data import labeller, shapes, text
from condiff.models.finetune_data import FewShot, StripedShapes, object_area, partial_prompts, prompted_area
from condiff.training.recipe import ObjectiveConfig


def test_object_area_is_the_rendered_mask():
    b = shapes.sample_batch(64, torch.Generator().manual_seed(0))
    assert torch.equal(object_area(b.images), b.masks.flatten(1).sum(1).float())
    small, large = object_area(b.images)[b.attrs[:, 2] == 0], object_area(b.images)[b.attrs[:, 2] == 1]
    assert small.max() + 20 <= large.min()  # the tie margin of 20 pixels separates the two sizes


def test_partial_prompts_never_name_the_size():
    tokens, attrs, named = partial_prompts(256, torch.Generator().manual_seed(0))
    read = text.tokens_to_attrs(tokens)
    assert bool((read[:, 2] == -1).all()) and not bool(named[:, 2].any())
    assert torch.equal(read[named], attrs[named]) and bool((read[~named] == -1).all())
    assert 0.4 < float(named[:, [0, 1, 3]].float().mean()) < 0.6


def test_few_shot_sets_are_fixed_and_striped():
    a, b = FewShot.striped(10), FewShot.striped(10)
    assert torch.equal(a.images, b.images) and bool(labeller.stripes(a.images).all())
    assert torch.equal(labeller.label(a.images), a.attrs)


def test_striped_stream_is_the_striped_style_of_the_same_renders():
    cfg = ObjectiveConfig(attr_dropout=0.0)
    x, raw = StripedShapes().batch(0, 16, torch.Generator().manual_seed(5), cfg)
    ref = shapes.striped(shapes.sample_batch(16, torch.Generator().manual_seed(5)))
    assert torch.equal(x, ref.images) and torch.equal(text.tokens_to_attrs(raw), ref.attrs)


def test_prompted_area_is_the_area_when_the_image_follows_the_prompt_and_zero_otherwise():
    g = torch.Generator().manual_seed(3)
    batch = shapes.sample_batch(64, g)
    named = torch.rand(64, 4, generator=g) < 0.5
    asked = text.attrs_to_tokens(batch.attrs, named)
    assert torch.equal(prompted_area(batch.images, asked), object_area(batch.images))
    wrong = batch.attrs.clone()
    wrong[:, 0] = (wrong[:, 0] + 1) % len(shapes.SHAPES)  # every prompt asks for another shape
    named[:, 0] = True
    r = prompted_area(batch.images, text.attrs_to_tokens(wrong, named))
    assert torch.equal(r, torch.zeros(64))
