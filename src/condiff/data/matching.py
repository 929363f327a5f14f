"""``matching``: procedural image pairs related by a known affine warp, with the exact dense flow between them
(the data of DiffMatch, ``condiff.tasks.diffmatch``).

A scene is a ``CANVAS`` x ``CANVAS`` RGB canvas in [-1, 1]: a smooth random texture (random colour noise on a
coarse lattice, bicubically upsampled, two octaves) with 3 to 6 opaque shapes on it (circles, squares, triangles of
random colour, size and place, inside-tested at pixel centres as in ``condiff.data.shapes``). The source image is
the canvas's centre ``SIZE`` x ``SIZE`` window (an exact copy of pixels); the target image is the canvas resampled
under the warp, bilinearly, at every target pixel.

Pixel (row i, column j) has its centre at x = j, y = i. The warp maps a target pixel q to the source point

    p(q) = s R(theta) (q - c) + c + tau,        c = ((SIZE - 1) / 2, (SIZE - 1) / 2)

(s the scale, theta the rotation, tau the translation, in source pixels), and the target shows the canvas there:
``target[q] = bilinear(canvas, p(q) + MARGIN)``. The flow is the target-to-source flow of dense matching
(GLU-Net's and DiffMatch's convention): ``flow[q] = p(q) - q``, channel 0 along x, channel 1 along y, so warping
the source by the flow reproduces the target. ``valid[q]``: p(q) lies within the source image, [0, SIZE - 1] on
both axes (bilinear sampling of the source there reads source pixels only, so it reproduces the target up to
float rounding). The bilinear sampler here is a gather in pixel coordinates (not ``grid_sample``'s normalised
ones), so an integer translation copies pixels bit for bit.

Everything is drawn from the generator passed in: ``matching_batch(n, generator, config)`` is seeded and exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from condiff.errors import ConfigError, check_int, check_real

SIZE = 32
MARGIN = 16  # canvas border around the source window: the target's view of the scene beyond the source
CANVAS = SIZE + 2 * MARGIN
SHAPES = ("circle", "square", "triangle")


@dataclass(frozen=True)
class WarpConfig:
    """The warps drawn: translation magnitude uniform in [0, max_shift] (pixels, uniform direction), scale
    log-uniform in [1 / max_scale, max_scale], rotation uniform in [-max_rotation, max_rotation] (degrees)."""

    max_shift: float = 4.0
    max_scale: float = 1.2
    max_rotation: float = 15.0
    min_shapes: int = 3
    max_shapes: int = 6
    texture: float = 0.5  # amplitude of the background texture (0: black)


def check_warp_config(c: WarpConfig, where: str = "data") -> WarpConfig:
    """One-line ConfigErrors naming the key for values out of range."""
    check_real(f"{where}.max_shift", c.max_shift, 0, SIZE / 2)
    check_real(f"{where}.max_scale", c.max_scale, 1, 2)
    check_real(f"{where}.max_rotation", c.max_rotation, 0, 45)
    check_int(f"{where}.min_shapes", c.min_shapes, 0, 20)
    check_int(f"{where}.max_shapes", c.max_shapes, 0, 20)
    if c.max_shapes < c.min_shapes:
        raise ConfigError(f"{where}.max_shapes {c.max_shapes} must be at least {where}.min_shapes {c.min_shapes}")
    check_real(f"{where}.texture", c.texture, 0, 1)
    return c


@dataclass(frozen=True)
class MatchingBatch:
    source: torch.Tensor  # (B, 3, SIZE, SIZE) in [-1, 1]
    target: torch.Tensor  # (B, 3, SIZE, SIZE) in [-1, 1]
    flow: torch.Tensor  # (B, 2, SIZE, SIZE) float32: target pixel q shows source point q + flow[q] (x, y)
    valid: torch.Tensor  # (B, SIZE, SIZE) bool: q + flow[q] inside the source image
    params: torch.Tensor  # (B, 5): tau_x, tau_y, scale, rotation (degrees), |tau|


def pixel_grid(h: int, w: int, dtype=torch.float32) -> torch.Tensor:
    """(2, h, w): the x (column) and y (row) coordinate of every pixel centre."""
    ys, xs = torch.meshgrid(torch.arange(h, dtype=dtype), torch.arange(w, dtype=dtype), indexing="ij")
    return torch.stack([xs, ys])


def bilinear(image: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``image`` (B, C, H, W) sampled at pixel coordinates ``x``, ``y`` (B, h, w) by bilinear interpolation of the
    four surrounding pixels (zero outside the image): (B, C, h, w). At integer coordinates it returns the pixel
    itself exactly (the other weights are exactly 0)."""
    b, c, hh, ww = image.shape
    x0, y0 = torch.floor(x), torch.floor(y)
    fx, fy = (x - x0).unsqueeze(1), (y - y0).unsqueeze(1)
    x0, y0 = x0.long(), y0.long()
    flat = image.reshape(b, c, hh * ww)

    def tap(xi, yi):
        inside = ((xi >= 0) & (xi < ww) & (yi >= 0) & (yi < hh)).unsqueeze(1)
        idx = (yi.clamp(0, hh - 1) * ww + xi.clamp(0, ww - 1)).reshape(b, 1, -1).expand(-1, c, -1)
        v = flat.gather(2, idx).reshape(b, c, *x.shape[1:])
        return torch.where(inside, v, torch.zeros((), dtype=image.dtype))

    top = tap(x0, y0) * (1 - fx) + tap(x0 + 1, y0) * fx
    bottom = tap(x0, y0 + 1) * (1 - fx) + tap(x0 + 1, y0 + 1) * fx
    return top * (1 - fy) + bottom * fy


def _texture(n: int, generator, amplitude: float) -> torch.Tensor:
    """Smooth colour noise on the canvas: lattices of 9 and 17 points upsampled bicubically, (n, 3, CANVAS, CANVAS)."""
    out = torch.zeros(n, 3, CANVAS, CANVAS)
    for cells, weight in ((9, 0.7), (17, 0.3)):
        coarse = torch.randn(n, 3, cells, cells, generator=generator)
        out += weight * F.interpolate(coarse, size=(CANVAS, CANVAS), mode="bicubic", align_corners=True)
    return amplitude * out


def _shapes(canvas: torch.Tensor, generator, lo: int, hi: int) -> torch.Tensor:
    """Paint between lo and hi opaque shapes (random kind, colour in [-1, 1]^3, half-extent 2.5-7 px, centre
    anywhere on the canvas) over ``canvas``, in order."""
    n = canvas.shape[0]
    counts = torch.randint(lo, hi + 1, (n,), generator=generator)
    most = int(counts.max()) if n else 0
    kind = torch.randint(len(SHAPES), (n, most), generator=generator)
    colour = torch.rand(n, most, 3, generator=generator) * 2 - 1
    r = 2.5 + 4.5 * torch.rand(n, most, generator=generator)
    cx = torch.rand(n, most, generator=generator) * CANVAS
    cy = torch.rand(n, most, generator=generator) * CANVAS
    g = pixel_grid(CANVAS, CANVAS)
    xx, yy = g[0], g[1]
    for k in range(most):
        dx = xx - cx[:, k, None, None]
        dy = yy - cy[:, k, None, None]
        rk = r[:, k, None, None]
        circle = dx**2 + dy**2 <= rk**2
        square = (dx.abs() <= rk) & (dy.abs() <= rk)
        triangle = (dy <= rk) & (dy >= -rk) & (dx.abs() <= (dy + rk) / 2)
        kk = kind[:, k, None, None]
        inside = torch.where(kk == 0, circle, torch.where(kk == 1, square, triangle))
        inside = inside & (k < counts)[:, None, None]
        canvas = torch.where(inside[:, None], colour[:, k, :, None, None], canvas)
    return canvas


def render_scenes(n: int, generator, config: WarpConfig = WarpConfig()) -> torch.Tensor:
    """n canvases (n, 3, CANVAS, CANVAS) in [-1, 1]."""
    canvas = _texture(n, generator, config.texture)
    return _shapes(canvas, generator, config.min_shapes, config.max_shapes).clamp(-1, 1)


def random_warps(n: int, generator, config: WarpConfig = WarpConfig()) -> torch.Tensor:
    """(n, 4): tau_x, tau_y (pixels), scale, rotation (degrees), drawn as ``WarpConfig`` says."""
    mag = torch.rand(n, generator=generator) * config.max_shift
    ang = torch.rand(n, generator=generator) * (2 * math.pi)
    log_s = (torch.rand(n, generator=generator) * 2 - 1) * math.log(config.max_scale)
    rot = (torch.rand(n, generator=generator) * 2 - 1) * config.max_rotation
    return torch.stack([mag * torch.cos(ang), mag * torch.sin(ang), torch.exp(log_s), rot], 1)


def warp_flow(params: torch.Tensor, size: int = SIZE) -> torch.Tensor:
    """The target-to-source flow (B, 2, size, size) of warps ``params`` (B, 4): p(q) - q with
    p(q) = s R(theta) (q - c) + c + tau, computed in float64 and returned as float32."""
    p = params.double()
    tx, ty, s, th = p[:, 0], p[:, 1], p[:, 2], torch.deg2rad(p[:, 3])
    c = (size - 1) / 2
    q = pixel_grid(size, size, torch.float64)
    qx, qy = q[0] - c, q[1] - c
    cos, sin = (s * torch.cos(th))[:, None, None], (s * torch.sin(th))[:, None, None]
    px = cos * qx - sin * qy + c + tx[:, None, None]
    py = sin * qx + cos * qy + c + ty[:, None, None]
    return torch.stack([px - q[0], py - q[1]], 1).float()


def valid_mask(flow: torch.Tensor) -> torch.Tensor:
    """(B, H, W) bool: q + flow[q] lies in the image, [0, W - 1] x [0, H - 1]."""
    _, _, h, w = flow.shape
    q = pixel_grid(h, w, flow.dtype)
    x, y = q[0] + flow[:, 0], q[1] + flow[:, 1]
    return (x >= 0) & (x <= w - 1) & (y >= 0) & (y <= h - 1)


def warp_pair(canvas: torch.Tensor, params: torch.Tensor) -> MatchingBatch:
    """Source, target, flow and valid mask of canvases (B, C, CANVAS, CANVAS) under warps ``params`` (B, 4)."""
    source = canvas[:, :, MARGIN : MARGIN + SIZE, MARGIN : MARGIN + SIZE]
    flow = warp_flow(params)
    q = pixel_grid(SIZE, SIZE)
    target = bilinear(canvas, q[0] + flow[:, 0] + MARGIN, q[1] + flow[:, 1] + MARGIN)
    shift = params[:, :2].norm(dim=1, keepdim=True)
    return MatchingBatch(source.contiguous(), target, flow, valid_mask(flow), torch.cat([params, shift], 1))


def matching_batch(n: int, generator, config: WarpConfig = WarpConfig()) -> MatchingBatch:
    """n scenes and warps drawn from ``generator``: (source, target, flow, valid, params)."""
    check_int("n", n, 1)
    canvas = render_scenes(n, generator, config)
    return warp_pair(canvas, random_warps(n, generator, config))


def flow_to_rgb(flow: torch.Tensor, max_magnitude: float | None = None) -> torch.Tensor:
    """The usual colour coding of a flow (B, 2, H, W) as images (B, 3, H, W) in [-1, 1]: hue = direction,
    saturation = magnitude / ``max_magnitude`` (clipped at 1; default: the batch's largest magnitude), value 1
    (zero flow is white; +x is red, -x cyan, +y (down) yellow-green, -y violet)."""
    fx, fy = flow[:, 0].float(), flow[:, 1].float()
    mag = torch.sqrt(fx**2 + fy**2)
    top = float(mag.max()) if max_magnitude is None else float(max_magnitude)
    sat = (mag / top).clamp(0, 1) if top > 0 else torch.zeros_like(mag)
    hue = (torch.atan2(-fy, -fx) / math.pi + 1) * 3  # [0, 6)
    k = torch.stack([(5 + hue) % 6, (3 + hue) % 6, (1 + hue) % 6], 1)  # HSV -> RGB with V = 1
    rgb = 1 - sat[:, None] * (torch.minimum(k, 4 - k).clamp(0, 1))
    return rgb * 2 - 1
