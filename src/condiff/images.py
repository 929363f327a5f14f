"""Image grids: tensors in [-1, 1] -> PNG (Pillow), written atomically."""

from __future__ import annotations

import io as _io

import torch
from PIL import Image

from .io import atomic_write_bytes


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) in [-1, 1] -> (B, H, W, 3) uint8."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return x.permute(0, 2, 3, 1)


def grid_image(images: torch.Tensor, ncols: int, scale: int = 4, pad: int = 2) -> Image.Image:
    x = to_uint8(images)
    b, h, w, _ = x.shape
    nrows = (b + ncols - 1) // ncols
    canvas = torch.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, 3), 40, dtype=torch.uint8)
    for i in range(b):
        r, c = divmod(i, ncols)
        canvas[pad + r * (h + pad):pad + r * (h + pad) + h, pad + c * (w + pad):pad + c * (w + pad) + w] = x[i]
    img = Image.fromarray(canvas.numpy())
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST) if scale > 1 else img


def save_png(img: Image.Image, path):
    buf = _io.BytesIO()
    img.save(buf, format="PNG")
    return atomic_write_bytes(path, buf.getvalue())
