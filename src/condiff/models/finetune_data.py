"""The data of the shapes fine-tuning recipes, each with an exact judge.

- ``StripedShapes``: the striped style (condiff.data.shapes.striped) over every attribute combination, a target
  domain that ``labeller.stripes`` detects and whose attributes the labeller still reads.
- ``FewShot``: a fixed set of k striped renders (the few-shot target of DomainStudio, Zhu et al. 2023).
- Preference pairs for Diffusion-DPO (Wallace et al. 2024) from an oracle reward the model never sees:
  ``object_area`` (the labeller's object mask, in pixels: larger objects are preferred). Prompts name the shape,
  colour and position at random but never the size, so the reward asks for something the prompt left open.
  Two samples of the base model per prompt; the one with the larger object wins when the areas differ by at least
  ``margin`` pixels (a small object covers about 30, a large one about 100); closer pairs are ties and dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from condiff.data import labeller, shapes, text
from condiff.training.finetune import PreferencePairs

FEW_SHOT_SEED = 1234  # a k-image few-shot set is shapes.sample_batch(k) drawn with this seed, striped
SIZE_COLUMN = 2  # shape, color, size, position


def _tokens(attrs: torch.Tensor, n: int, generator, loss_cfg) -> torch.Tensor:
    keep = torch.rand(n, 4, generator=generator) >= loss_cfg.attr_dropout
    return text.attrs_to_tokens(attrs, keep)


@dataclass(frozen=True)
class StripedShapes:
    """Fresh striped renders every step."""

    def batch(self, step, n, generator, loss_cfg):
        b = shapes.striped(shapes.sample_batch(n, generator))
        return b.images, _tokens(b.attrs, n, generator, loss_cfg)


@dataclass
class FewShot:
    """k fixed images with their attributes, drawn with replacement every step."""

    images: torch.Tensor
    attrs: torch.Tensor

    @classmethod
    def striped(cls, k: int) -> FewShot:
        b = shapes.striped(shapes.sample_batch(k, torch.Generator().manual_seed(FEW_SHOT_SEED)))
        return cls(b.images, b.attrs)

    def batch(self, step, n, generator, loss_cfg):
        idx = torch.randint(self.images.shape[0], (n,), generator=generator)
        return self.images[idx], _tokens(self.attrs[idx], n, generator, loss_cfg)


def object_area(images: torch.Tensor) -> torch.Tensor:
    """The reward: the labeller's object mask in pixels, per image (float)."""
    return labeller.masks(images).flatten(1).sum(1).float()


def prompted_area(images: torch.Tensor, raw: torch.Tensor) -> torch.Tensor:
    """The prompt-aware reward: the object's area where the labeller reads every attribute the prompt names (the
    tokens ``raw``), else 0, so a larger object never wins by changing what was asked for."""
    asked = text.tokens_to_attrs(raw)
    follows = ((labeller.label(images) == asked) | (asked < 0)).all(1)
    return torch.where(follows, object_area(images), torch.zeros(()))


REWARDS = {"larger": lambda images, raw: object_area(images), "larger-prompted": prompted_area}


def partial_prompts(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tokens, attributes, named) for n prompts naming each of shape, colour and position with probability 1/2
    and never the size."""
    attrs = shapes.random_attrs(n, generator)
    named = torch.rand(n, 4, generator=generator) < 0.5
    named[:, SIZE_COLUMN] = False
    return text.attrs_to_tokens(attrs, named), attrs, named


def preference_pairs(
    model,
    prompts: int,
    seed: int,
    margin: float = 20.0,
    steps: int = 20,
    cfg: float = 3.0,
    progress: bool = False,
    reward: str = "larger",
) -> tuple[PreferencePairs, dict]:
    """Pairs from ``model`` (two DPM-Solver++(2M) samples per partial prompt) judged by ``REWARDS[reward]``
    (``object_area``, or ``prompted_area``); returns the pairs and what was kept (prompts, pairs, ties dropped)."""
    from condiff.evaluation.evaluate import generate
    from condiff.solvers import DPMSolverPP2M

    g = torch.Generator().manual_seed(seed)
    raw, _, _ = partial_prompts(prompts, g)
    a, _ = generate(model, raw, DPMSolverPP2M(), steps, cfg, g, progress=progress, desc="pairs (first)")
    b, _ = generate(model, raw, DPMSolverPP2M(), steps, cfg, g, progress=progress, desc="pairs (second)")
    ra, rb = REWARDS[reward](a, raw), REWARDS[reward](b, raw)
    keep = (ra - rb).abs() >= margin
    a_wins = (ra > rb).view(-1, 1, 1, 1)
    winners, losers = torch.where(a_wins, a, b)[keep], torch.where(a_wins, b, a)[keep]
    stats = {"prompts": prompts, "pairs": int(keep.sum()), "ties_dropped": int((~keep).sum()), "margin": margin}
    stats["reward"] = reward
    return PreferencePairs(raw[keep], winners, losers), stats
