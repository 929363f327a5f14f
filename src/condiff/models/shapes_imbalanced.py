"""The shapes_imbalanced family: the shapes networks, trained on a split in which one color is rare.

Used by the minority-guidance experiment (Um, Lee, Ye, ICLR 2024, "Don't Play Favorites: Minority Guidance for
Diffusion Models"; condiff.guidance.minority): training colors are drawn with ``COLOR_WEIGHTS`` (cyan 5%, the
five other colors 19% each) and most captions are empty, so the empty prompt gives an unconditional model of
the imbalanced data. Shape, size and position stay uniform. The packaged recipe ``shapes-minority`` fine-tunes the
bundled shapes model into it (``[train] init_from``)."""

from __future__ import annotations

import torch

from condiff.data import shapes, text
from condiff.models.shapes import ShapesFamily

RARE_COLOR = "cyan"
RARE_SHARE = 0.05
EMPTY_CAPTION_SHARE = 0.8  # of training captions, before the objective's cond_dropout
COLOR_WEIGHTS = torch.tensor(
    [RARE_SHARE if c == RARE_COLOR else (1 - RARE_SHARE) / (len(shapes.COLORS) - 1) for c in shapes.COLORS],
    dtype=torch.float64,
)


def imbalanced_attrs(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """(n, 4) attributes: shape, size and position uniform, color drawn from ``COLOR_WEIGHTS``."""
    attrs = shapes.random_attrs(n, generator)
    attrs[:, 1] = torch.multinomial(COLOR_WEIGHTS, n, replacement=True, generator=generator)
    return attrs


class ShapesImbalancedFamily(ShapesFamily):
    name = "shapes_imbalanced"

    def training_batch(self, step, n, generator, seed, objective):
        b = shapes.render_batch(imbalanced_attrs(n, generator), generator)
        keep = torch.rand(n, 4, generator=generator) >= objective.attr_dropout
        keep &= torch.rand(n, 1, generator=generator) >= EMPTY_CAPTION_SHARE
        return b.images, text.attrs_to_tokens(b.attrs, keep)
