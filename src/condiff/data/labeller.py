"""A deterministic, non-learned labeller that reads shapes' attributes back from pixels.

1. mask: pixels whose brightest channel is above 0 on the [-1, 1] scale (half coverage of a pure color);
   the largest 4-connected component is kept, so isolated noise pixels do not count.
2. color: the mask's mean RGB, nearest palette entry.
3. size: the bounding box's longer side (6 px small, 10-12 px large).
4. shape: a triangle (apex up) holds ~1/4 of its area in the top half of its box, circles and squares
   ~1/2; then the fill ratio of the box separates squares (~1) from circles (~pi/4).
5. position: the 3x3 cell that contains the bounding box's centre.
An empty mask gets label -1 in every column (counted wrong). ``stripes`` reads the striped style
(condiff.data.shapes.striped): even rows of the object brighter than its odd rows.

Rule 4 is exact on renders whose centres lie on pixel corners, as the shapes world's do. An object between pixels
(``shapes.render_batch(..., subpixel=True)``, or a frame on a latent path) can lose a row to the pixel grid, and a
6-px circle then holds under 47% of its area in the top half: read as a triangle. ``fitted_shapes`` reads shape
by template fitting instead, and ``label_fitted`` is ``label`` with that shape column.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

from condiff.data.shapes import CELL, HALF_EXTENT, PALETTE, SHAPES, SIZE, shape_inside

_SIDE_SPLIT = HALF_EXTENT[0] + HALF_EXTENT[1]  # box side: small 6, large 10-12 (clean renders)
_TOP_SHARE_SPLIT = 0.47  # triangle <= 0.445, circle and square = 0.5 (clean renders)
_FILL_SPLIT = 0.94  # circle <= 0.89 | square 1 (clean renders)


def _mask_one(img: np.ndarray) -> np.ndarray:
    """The object mask: the largest 4-connected component of the bright pixels (all False if none)."""
    bright = img.max(0) > 0.0
    lab, n = ndimage.label(bright)
    if n == 0:
        return np.zeros(bright.shape, dtype=bool)
    sizes = ndimage.sum(bright, lab, index=range(1, n + 1))
    return lab == (int(np.argmax(sizes)) + 1)


def _label_one(img: np.ndarray) -> list[int]:
    mask = _mask_one(img)
    if not mask.any():
        return [-1, -1, -1, -1]
    ys, xs = np.nonzero(mask)
    area = mask.sum()
    h, w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    top_share = (ys < ys.min() + h / 2).sum() / area
    if top_share < _TOP_SHARE_SPLIT:
        shape = 2
    else:
        shape = 0 if area / (h * w) < _FILL_SPLIT else 1
    rgb = (img[:, mask].mean(1) + 1) / 2
    color = int(np.argmin(((PALETTE.numpy() - rgb[:, None].T) ** 2).sum(1)))
    size = int(max(h, w) > _SIDE_SPLIT)
    cy, cx = (ys.min() + ys.max() + 1) / 2, (xs.min() + xs.max() + 1) / 2
    row = min(int(cy // CELL), 2)
    col = min(int(cx // CELL), 2)
    return [shape, color, size, row * 3 + col]


_FIT_OFFSETS = torch.linspace(-0.5, 0.5, 5)  # the centre's search around the mask's box centre, in pixels
_FIT_EXTENTS = torch.linspace(-0.75, 0.75, 7)  # the half extent's search around half the box's longer side


def _fit_one(mask: np.ndarray) -> int:
    """The shape whose best-fitting template has the highest IoU with the mask (-1 for an empty mask)."""
    if not mask.any():
        return -1
    ys, xs = np.nonzero(mask)
    cy, cx = (ys.min() + ys.max() + 1) / 2, (xs.min() + xs.max() + 1) / 2
    half = max(ys.max() - ys.min() + 1, xs.max() - xs.min() + 1) / 2
    oy, ox, r = torch.meshgrid(_FIT_OFFSETS, _FIT_OFFSETS, half + _FIT_EXTENTS, indexing="ij")
    grid = torch.arange(SIZE, dtype=torch.float32) + 0.5  # pixel centres
    dy = grid.view(1, SIZE, 1) - (cy + oy.reshape(-1, 1, 1))
    dx = grid.view(1, 1, SIZE) - (cx + ox.reshape(-1, 1, 1))
    m = torch.from_numpy(mask)
    best = []
    for k in range(len(SHAPES)):
        t = shape_inside(k, dy, dx, r.reshape(-1, 1, 1))
        best.append(float(((t & m).flatten(1).sum(1) / (t | m).flatten(1).sum(1)).max()))
    return int(np.argmax(best))


def fitted_shapes(images: torch.Tensor) -> torch.Tensor:
    """(B,) shape ids of (B, 3, 32, 32) images in [-1, 1], read by fitting: each shape's template (pixel-centre
    inside test) is placed at centres within +-0.5 px of the mask's box centre and at half extents within +-0.75 px
    of half its longer side (steps of 0.25 px), and the shape whose best template has the highest IoU with the mask
    wins. Exact on clean renders wherever the centre lies; -1 for an empty mask."""
    imgs = images.detach().cpu().float().numpy()
    return torch.tensor([_fit_one(_mask_one(im)) for im in imgs], dtype=torch.long)


def label_fitted(images: torch.Tensor) -> torch.Tensor:
    """``label`` with the shape column read by ``fitted_shapes`` (an empty mask: -1 in every column)."""
    out = label(images)
    out[:, 0] = fitted_shapes(images)
    return out


def label(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, 32, 32) images in [-1, 1] -> (B, 4) long labels (shape, color, size, position)."""
    arr = images.detach().float().cpu().numpy()
    return torch.tensor([_label_one(a) for a in arr], dtype=torch.long)


STRIPE_SPLIT = 0.2  # striped renders: 0.8 between even and odd rows (1 vs 0.2 on [-1, 1]); clean ones: ~0


def stripes(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, 32, 32) -> (B,) bool: the object's even canvas rows are brighter than its odd rows by more than
    ``STRIPE_SPLIT`` (the brightest channel, mean over the mask's pixels of each parity): the striped style of
    condiff.data.shapes.striped. False for an empty mask or a mask on one row parity only."""
    arr = images.detach().float().cpu().numpy()
    out = []
    for a in arr:
        m = _mask_one(a)
        bright = a.max(0)
        even, odd = m.copy(), m.copy()
        even[1::2], odd[0::2] = False, False
        out.append(bool(even.any() and odd.any() and bright[even].mean() - bright[odd].mean() > STRIPE_SPLIT))
    return torch.tensor(out, dtype=torch.bool)


def masks(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, 32, 32) images in [-1, 1] -> (B, 32, 32) bool object masks, as the labeller reads them."""
    arr = images.detach().float().cpu().numpy()
    return torch.from_numpy(np.stack([_mask_one(a) for a in arr]))


def iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample intersection over union of two (B, H, W) bool masks (1 where both are empty)."""
    inter = (a & b).flatten(1).sum(1).float()
    union = (a | b).flatten(1).sum(1).float()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))


def accuracy(pred: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """Per-attribute accuracy plus 'all' (every attribute right)."""
    ok = pred == target
    out = {name: float(ok[:, i].float().mean()) for i, name in enumerate(("shape", "color", "size", "position"))}
    out["all"] = float(ok.all(1).float().mean())
    return out
