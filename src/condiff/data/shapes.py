"""``shapes``: procedural 32x32 RGB images of one object on black, with exact attributes and masks.

Attributes: shape (circle, square, triangle), color (6 palette colors), size (small, large) and position
(a 3x3 grid of cells, with whole-pixel jitter of up to +-1 px). Pixels are tested at their centres, so a
clean render is exactly binary (palette color or black) and the mask is exact. Values are in [-1, 1].
The stream is seeded and unlimited: ``render_batch(attrs, generator)`` renders any attribute tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SIZE = 32
SHAPES = ("circle", "square", "triangle")
COLORS = ("red", "green", "blue", "yellow", "magenta", "cyan")
PALETTE = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [1, 0, 1], [0, 1, 1]], dtype=torch.float32)
SIZES = ("small", "large")
HALF_EXTENT = (3.0, 5.5)  # half the side of the bounding box, in pixels
POSITIONS = ("top-left", "top", "top-right", "left", "center", "right", "bottom-left", "bottom", "bottom-right")
ATTRIBUTES = {"shape": SHAPES, "color": COLORS, "size": SIZES, "position": POSITIONS}
CELL = SIZE / 3  # the labeller's cell boundaries
CENTRES = torch.tensor([7.0, 16.0, 25.0])  # object centres (on pixel corners), inset so large shapes fit
JITTER = 1
SUPERSAMPLE = 1


@dataclass(frozen=True)
class ShapesBatch:
    images: torch.Tensor  # (B, 3, 32, 32) in [-1, 1]
    attrs: torch.Tensor  # (B, 4) long: shape, color, size, position
    masks: torch.Tensor  # (B, 32, 32) bool
    depth: torch.Tensor  # (B, 32, 32) float in [0, 1]: 1 at the object's centre, 0 outside
    centres: torch.Tensor | None = None  # (B, 2) float: the object's centre (row, column), pixel corners, with jitter
    extents: torch.Tensor | None = None  # (B,) float: the object's half extent in pixels (HALF_EXTENT[size] or given)


def random_attrs(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    cols = [torch.randint(len(v), (n,), generator=generator) for v in ATTRIBUTES.values()]
    return torch.stack(cols, 1)


def cell_centre(position: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, col) pixel coordinates of the centre of each position's cell."""
    row = CENTRES[position // 3]
    col = CENTRES[position % 3]
    return row, col


def _coverage(attrs: torch.Tensor, cy: torch.Tensor, cx: torch.Tensor, half: torch.Tensor) -> torch.Tensor:
    """Supersampled inside-test for objects of half extent ``half`` (B,); returns per-pixel coverage in [0, 1],
    shape (B, 32, 32)."""
    b = attrs.shape[0]
    ss = SIZE * SUPERSAMPLE
    g = (torch.arange(ss, dtype=torch.float32) + 0.5) / SUPERSAMPLE
    yy, xx = g.view(1, ss, 1), g.view(1, 1, ss)
    dy, dx = yy - cy.view(b, 1, 1), xx - cx.view(b, 1, 1)
    r = half.view(b, 1, 1)
    every = torch.stack([shape_inside(k, dy, dx, r) for k in range(len(SHAPES))])  # (shapes, B, ss, ss)
    inside = every[attrs[:, 0], torch.arange(b)]
    return inside.float().view(b, SIZE, SUPERSAMPLE, SIZE, SUPERSAMPLE).mean((2, 4))


def shape_inside(shape: int, dy: torch.Tensor, dx: torch.Tensor, r) -> torch.Tensor:
    """Whether the points at offsets (dy, dx) from an object's centre lie inside shape ``shape`` (an index into
    SHAPES) of half extent r; the arguments broadcast. The triangle is isosceles, apex up: apex at dy = -r, base at
    dy = r, half-width r at the base."""
    if shape == 0:
        return dy**2 + dx**2 <= r**2
    if shape == 1:
        return (dy.abs() <= r) & (dx.abs() <= r)
    return (dy <= r) & (dy >= -r) & (dx.abs() <= (dy + r) / 2)


def render_batch(
    attrs: torch.Tensor,
    generator: torch.Generator | None = None,
    jitter: int = JITTER,
    extents: torch.Tensor | None = None,
    subpixel: bool = False,
) -> ShapesBatch:
    """Render images for an (B, 4) attribute tensor; position jitter is drawn from ``generator``. ``extents`` (B,)
    gives each object's half extent in pixels in place of its size's ``HALF_EXTENT`` (sizes between the two).
    ``subpixel``: the jitter is uniform on [-jitter, jitter] in each axis, not whole pixels, so the object's edges
    fall anywhere between pixel centres (the render stays binary: pixels are tested at their centres)."""
    attrs = attrs.long()
    b = attrs.shape[0]
    half = torch.tensor(HALF_EXTENT)[attrs[:, 2]] if extents is None else extents.float().reshape(b)
    cy, cx = cell_centre(attrs[:, 3])
    if jitter > 0 and subpixel:  # continuous jitter in [-jitter, jitter]
        cy = cy + (2 * torch.rand(b, generator=generator) - 1) * jitter
        cx = cx + (2 * torch.rand(b, generator=generator) - 1) * jitter
    elif jitter > 0:  # whole-pixel jitter in {-jitter..jitter}
        cy = cy + torch.randint(-jitter, jitter + 1, (b,), generator=generator).float()
        cx = cx + torch.randint(-jitter, jitter + 1, (b,), generator=generator).float()
    cov = _coverage(attrs, cy, cx, half)
    color = PALETTE[attrs[:, 1]].view(b, 3, 1, 1)
    images = cov.unsqueeze(1) * color * 2 - 1
    masks = cov > 0.5
    g = torch.arange(SIZE, dtype=torch.float32) + 0.5
    dist = ((g.view(1, SIZE, 1) - cy.view(b, 1, 1)) ** 2 + (g.view(1, 1, SIZE) - cx.view(b, 1, 1)) ** 2).sqrt()
    depth = (1 - dist / (half.view(b, 1, 1) * 1.5)).clamp(0, 1) * masks
    return ShapesBatch(images, attrs, masks, depth, torch.stack([cy, cx], 1), half)


STRIPE_DIM = 0.6  # the object's odd canvas rows at 60% of its colour: still "bright" for the labeller's mask


def striped(batch: ShapesBatch) -> ShapesBatch:
    """The striped style, a target domain for few-shot adaptation: every odd canvas row of the object at
    ``STRIPE_DIM`` of its colour (horizontal stripes, 1 px). Masks, attributes and depth are unchanged, so the
    labeller reads the same attributes (mask: brightest channel 0.6 * 2 - 1 > 0) and ``labeller.stripes`` tells
    the style."""
    odd = (torch.arange(SIZE) % 2 == 1).view(1, 1, SIZE, 1)
    dimmed = (batch.images + 1) * STRIPE_DIM - 1  # colour * coverage scaled, on the [-1, 1] scale
    images = torch.where(odd & batch.masks.unsqueeze(1), dimmed, batch.images)
    return ShapesBatch(images, batch.attrs, batch.masks, batch.depth, batch.centres, batch.extents)


def sample_batch(n: int, generator: torch.Generator | None = None) -> ShapesBatch:
    """n random images (uniform attributes) from a seeded stream."""
    return render_batch(random_attrs(n, generator), generator)


def caption(attrs_row, keep=(True, True, True, True)) -> str:
    """'large red circle top-left': size, color, shape, position; omitted attributes are left out."""
    s, c, z, p = (int(v) for v in attrs_row)
    words = [
        SIZES[z] if keep[2] else None,
        COLORS[c] if keep[1] else None,
        SHAPES[s] if keep[0] else None,
        POSITIONS[p] if keep[3] else None,
    ]
    return " ".join(w for w in words if w)
