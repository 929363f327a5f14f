"""Image input and output: files <-> tensors in [-1, 1] (Pillow), grids and labelled figures, written
atomically.

Reading (``read_image``) is defensive: only a fixed list of raster formats is decoded (never EPS, which
Pillow hands to Ghostscript), images over ``MAX_PIXELS`` are refused from their header before any pixel is
decoded, and every failure is one ``InputFileError`` line that names the path and what is accepted.
Colour modes are mapped to RGB (or grayscale) values on the 0..255 scale: 16-bit samples keep their extra
precision, alpha is composited on black (the background of the shapes dataset), the first frame of an
animation is taken and the EXIF orientation is applied. The 8-bit value ``q`` reads as ``q / 127.5 - 1``
(``from_uint8``), so a PNG written by ``write_image`` reads back as exactly the ``to_uint8`` quantisation
of what was written.
"""

from __future__ import annotations

import io as _io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps

from condiff.core.files import atomic_write_bytes
from condiff.errors import ConfigError, InputFileError, NonFiniteError, one_line

MAX_PIXELS = 64_000_000  # decompression-bomb cap (width * height), checked before decoding
FORMATS = ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP", "PPM")  # Pillow plugins read_image opens
ACCEPTED = "PNG, JPEG, GIF, BMP, TIFF, WebP or PPM images of at most 64 megapixels"
_RESAMPLE = Image.Resampling.LANCZOS


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) in [-1, 1] -> (B, H, W, 3) uint8."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return x.permute(0, 2, 3, 1)


def from_uint8(q: torch.Tensor) -> torch.Tensor:
    """uint8 (or 0..255 float) values -> float32 in [-1, 1], the exact inverse map ``read_image`` uses."""
    return q.to(torch.float32) / 127.5 - 1


def grid_image(images: torch.Tensor, ncols: int, scale: int = 4, pad: int = 2) -> Image.Image:
    x = to_uint8(images)
    b, h, w, _ = x.shape
    nrows = (b + ncols - 1) // ncols
    canvas = torch.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, 3), 40, dtype=torch.uint8)
    for i in range(b):
        r, c = divmod(i, ncols)
        canvas[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + c * (w + pad) : pad + c * (w + pad) + w] = x[i]
    img = Image.fromarray(canvas.numpy())
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST) if scale > 1 else img


def save_png(img: Image.Image, path):
    buf = _io.BytesIO()
    img.save(buf, format="PNG")
    return atomic_write_bytes(path, buf.getvalue())


# ---- reading ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageInput:
    """An image file read for a model: ``tensor`` (1, C, H, W) float32 in [-1, 1]; ``original_size`` the
    file's (width, height) as a viewer shows it (EXIF orientation applied); ``notice`` a one-line message
    when the image was cropped or resized, else None; ``crop`` the (left, top, right, bottom) region of
    the file that ``tensor`` shows (the whole image unless it was centre-cropped)."""

    tensor: torch.Tensor
    original_size: tuple[int, int]
    notice: str | None = None
    crop: tuple[int, int, int, int] | None = None


def _check_shape(shape) -> tuple[int, int, int]:
    ok = (
        isinstance(shape, (tuple, list))
        and len(shape) == 3
        and all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in shape)
        and shape[0] in (1, 3)
        and shape[1] * shape[2] <= MAX_PIXELS
    )
    if not ok:
        raise ConfigError(
            f"image shape {shape!r} is not accepted; expected (channels, height, width) with "
            f"channels 1 or 3 and positive sizes of at most {MAX_PIXELS} pixels"
        )
    return int(shape[0]), int(shape[1]), int(shape[2])


def _check_pixels(size: tuple[int, int], where: str):
    if size[0] * size[1] > MAX_PIXELS:
        raise InputFileError(
            f"{where} is {size[0]}x{size[1]} = {size[0] * size[1]} pixels, over the limit of "
            f"{MAX_PIXELS} (a decompression bomb?); accepted: {ACCEPTED}"
        )


def _pixels(im: Image.Image) -> np.ndarray:
    """A decoded Pillow image -> (H, W, 1 | 3) float32 on the 0..255 scale, alpha composited on black."""
    mode = im.mode
    if mode == "F":
        raise ValueError("floating-point samples (mode F) have no fixed range")
    if mode.startswith("I"):  # 16- or 32-bit integer gray: the 16-bit range is full scale
        return np.clip(np.asarray(im), 0, 65535).astype(np.float32)[..., None] / np.float32(257)
    if mode in ("1", "L", "LA", "La"):
        if mode in ("LA", "La") or "transparency" in im.info:
            la = np.asarray(im.convert("LA")).astype(np.float32)
            return la[..., :1] * la[..., 1:] / np.float32(255)
        return np.asarray(im if mode == "L" else im.convert("L")).astype(np.float32)[..., None]
    if mode in ("RGBA", "RGBa", "PA") or "transparency" in im.info:
        rgba = np.asarray(im.convert("RGBA")).astype(np.float32)
        return rgba[..., :3] * rgba[..., 3:] / np.float32(255)
    return np.asarray(im if mode == "RGB" else im.convert("RGB")).astype(np.float32)


def _decode(path: Path) -> np.ndarray:
    """Frame 0 of the image file at ``path``, checked against ``MAX_PIXELS`` before it is decoded."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow's notes on odd metadata; bad pixel data raises anyway
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path, formats=FORMATS) as im:
            _check_pixels(im.size, repr(str(path)))
            im.seek(0)
            _check_pixels(im.size, repr(str(path)))
            im.load()
            ImageOps.exif_transpose(im, in_place=True)
            return _pixels(im)


def centre_crop_box(size: tuple[int, int], target: tuple[int, int]) -> tuple[int, int, int, int]:
    """The largest centred (left, top, right, bottom) box of an image of ``size`` (width, height) with the
    aspect ratio of ``target`` (width, height), in whole pixels."""
    (w, h), (tw, th) = size, target
    if w * th > h * tw:  # too wide: crop the width
        cw, ch = max(1, min(w, round(h * tw / th))), h
    else:
        cw, ch = w, max(1, min(h, round(w * th / tw)))
    left, top = (w - cw) // 2, (h - ch) // 2
    return left, top, left + cw, top + ch


def resize_pixels(pixels: np.ndarray, size: tuple[int, int], box=None) -> np.ndarray:
    """(H, W, K) float values -> (height, width, K) for ``size`` = (width, height): the ``box`` region
    (default all) resampled with a Lanczos filter per channel in float32, clipped to 0..255."""
    chans = [
        np.asarray(
            Image.fromarray(np.ascontiguousarray(pixels[..., k], dtype=np.float32)).resize(size, _RESAMPLE, box=box)
        )
        for k in range(pixels.shape[-1])
    ]
    return np.clip(np.stack(chans, -1), 0, 255)


def fit_pixels(pixels: np.ndarray, height: int, width: int):
    """Centre-crop (H, W, K) pixels to the aspect ratio of (height, width) and resize them to it. Returns
    (pixels, crop box); unchanged pixels when the size already matches."""
    h, w = pixels.shape[:2]
    if (h, w) == (height, width):
        return pixels, (0, 0, w, h)
    box = centre_crop_box((w, h), (width, height))
    return resize_pixels(pixels, (width, height), box), box


def pixels_to_tensor(pixels: np.ndarray, channels: int) -> torch.Tensor:
    """(H, W, 1 | 3) values on the 0..255 scale -> (1, channels, H, W) float32 in [-1, 1]; RGB goes to
    gray with the ITU-R 601-2 luma weights Pillow uses, gray is repeated for RGB."""
    if channels == 1 and pixels.shape[-1] == 3:
        pixels = (pixels[..., :1] * 299 + pixels[..., 1:2] * 587 + pixels[..., 2:3] * 114) / 1000
    elif channels == 3 and pixels.shape[-1] == 1:
        pixels = np.repeat(pixels, 3, axis=-1)
    x = from_uint8(torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1))))
    return x.clamp(-1, 1)[None]


def read_image(path, shape=(3, 32, 32), resize: bool = True) -> ImageInput:
    """Read an image file as a (1, C, H, W) tensor in [-1, 1] for ``shape`` = (C, H, W).

    A file of another size is centre-cropped to the target aspect ratio and resized (Lanczos) when
    ``resize`` is true, with a one-line ``notice`` saying so; otherwise it is refused. C == 1 reads as
    grayscale. Raises InputFileError (one line naming the path) for anything that is not a readable image
    of an accepted format within ``MAX_PIXELS``."""
    c, h, w = _check_shape(shape)
    if not isinstance(path, (str, Path)):
        raise ConfigError(f"image path must be a str or Path, got {type(path).__name__}")
    path = Path(path)
    name = repr(str(path))
    try:
        if not path.exists():
            raise InputFileError(f"image file not found: {name}; accepted: {ACCEPTED}")
        if path.is_dir():
            raise InputFileError(f"expected an image file, got a directory: {name}; accepted: {ACCEPTED}")
        if not path.is_file():
            raise InputFileError(f"{name} is not a regular file; accepted: {ACCEPTED}")
        if path.stat().st_size == 0:
            raise InputFileError(f"image file {name} is empty; accepted: {ACCEPTED}")
    except (OSError, ValueError) as e:  # a name too long, a NUL byte, no permission to look
        if isinstance(e, InputFileError):
            raise
        raise InputFileError(f"cannot read image {name} ({one_line(str(e))}); accepted: {ACCEPTED}") from None
    try:
        pixels = _decode(path)
    except InputFileError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InputFileError(f"{name} has too many pixels (a decompression bomb?); accepted: {ACCEPTED}") from None
    except Image.UnidentifiedImageError:
        raise InputFileError(f"{name} is not an image of an accepted format; accepted: {ACCEPTED}") from None
    except Exception as e:  # noqa: BLE001  Pillow's decoders raise many types for truncated or corrupt data
        detail = one_line(str(e))[:120] or type(e).__name__
        raise InputFileError(f"cannot read image {name} ({type(e).__name__}: {detail}); accepted: {ACCEPTED}") from None
    src_h, src_w = pixels.shape[:2]
    notice = None
    if (src_h, src_w) != (h, w):
        if not resize:
            raise InputFileError(
                f"image {name} is {src_w}x{src_h} (width x height) but {w}x{h} is expected "
                f"and resizing is off; give a {w}x{h} image or allow resizing"
            )
        pixels, box = fit_pixels(pixels, h, w)
        cw, ch = box[2] - box[0], box[3] - box[1]
        crop = "" if (cw, ch) == (src_w, src_h) else f" (centre crop {cw}x{ch})"
        notice = f"resized {one_line(str(path))} from {src_w}x{src_h} to {w}x{h}{crop}"
    else:
        box = (0, 0, w, h)
    return ImageInput(pixels_to_tensor(pixels, c), (src_w, src_h), notice, box)


# ---- writing ---------------------------------------------------------------------------------------------


def _one_image(image, what: str = "image") -> torch.Tensor:
    """(C, H, W) or (1, C, H, W) with C in {1, 3} -> (C, H, W) float, finite."""
    if not isinstance(image, torch.Tensor):
        raise ConfigError(f"{what} must be a tensor, got {type(image).__name__}")
    x = image.detach()
    if x.dim() == 4 and x.shape[0] == 1:
        x = x[0]
    if x.dim() != 3 or x.shape[0] not in (1, 3) or x.shape[1] < 1 or x.shape[2] < 1:
        raise ConfigError(f"{what} has shape {tuple(image.shape)}; expected (C, H, W) or (1, C, H, W) with C 1 or 3")
    x = x.float().cpu()
    if not torch.isfinite(x).all():
        raise NonFiniteError(f"{what} has NaN or inf values; expected finite values in [-1, 1]")
    return x


def _check_size(size) -> tuple[int, int]:
    ok = (
        isinstance(size, (tuple, list))
        and len(size) == 2
        and all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in size)
        and size[0] * size[1] <= MAX_PIXELS
    )
    if not ok:
        raise ConfigError(
            f"image size {size!r} is not accepted; expected (width, height), positive, at most {MAX_PIXELS} pixels"
        )
    return int(size[0]), int(size[1])


def write_image(image: torch.Tensor, path, size=None) -> Path:
    """Write one image ((C, H, W) or (1, C, H, W) in [-1, 1], C 1 or 3) as an RGB or grayscale PNG,
    atomically. ``size`` = (width, height) resizes it first (Lanczos, in float, then quantised). At the
    native size the file holds exactly ``to_uint8(image)``."""
    x = _one_image(image)
    c, h, w = x.shape
    size = (w, h) if size is None else _check_size(size)
    if size != (w, h):
        pixels = ((x.clamp(-1, 1) + 1) * 127.5).permute(1, 2, 0).numpy()
        q = np.round(resize_pixels(pixels, size)).astype(np.uint8)
    else:
        q = to_uint8(x[None])[0].numpy()
    img = Image.fromarray(np.ascontiguousarray(q[..., 0] if c == 1 else q[..., :3]))
    return save_png(img, path)


# ---- figures ---------------------------------------------------------------------------------------------

_PAD = 4


def _tile(x: torch.Tensor, scale: int) -> Image.Image:
    img = Image.fromarray(to_uint8(x[None])[0].numpy())
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST) if scale > 1 else img


def _text_size(font, text: str) -> tuple[int, int]:
    left, top, right, bottom = font.getbbox(text or " ")
    return int(right - min(left, 0)), int(bottom - min(top, 0))


def _check_scale(scale) -> int:
    if not isinstance(scale, int) or isinstance(scale, bool) or not 1 <= scale <= 64:
        raise ConfigError(f"scale {scale!r} is not accepted; expected an integer from 1 to 64")
    return scale


def compare_image(rows: list[tuple[str, torch.Tensor]], scale: int = 4) -> Image.Image:
    """A side-by-side strip of images ((C, H, W) in [-1, 1]), each magnified ``scale`` times with its
    label above it, e.g. [("source", x), ("reconstruction", r), ("edited", e)]. White background."""
    scale = _check_scale(scale)
    if not rows:
        raise ConfigError("compare_image needs at least one (label, image) pair")
    font = ImageFont.load_default()
    labels = [one_line(str(label)) for label, _ in rows]
    tiles = [_tile(_one_image(img, f"image {label!r}"), scale) for label, img in rows]
    text_h = max(_text_size(font, s)[1] for s in labels)
    widths = [max(t.width, _text_size(font, s)[0]) for t, s in zip(tiles, labels)]
    canvas = Image.new(
        "RGB", (sum(widths) + _PAD * (len(rows) + 1), text_h + max(t.height for t in tiles) + 3 * _PAD), "white"
    )
    draw, x0 = ImageDraw.Draw(canvas), _PAD
    for tile, label, width in zip(tiles, labels, widths):
        draw.text((x0 + (width - _text_size(font, label)[0]) // 2, _PAD), label, fill="black", font=font)
        canvas.paste(tile, (x0 + (width - tile.width) // 2, text_h + 2 * _PAD))
        x0 += width + _PAD
    return canvas


def labelled_grid(images: torch.Tensor, row_labels, col_labels, scale: int = 4) -> Image.Image:
    """A figure of (B, C, H, W) images in [-1, 1], row-major, B = rows x columns (rows = methods, columns
    = examples), with each row's label on its left and each column's label above it."""
    scale = _check_scale(scale)
    rl, cl = [one_line(str(s)) for s in row_labels], [one_line(str(s)) for s in col_labels]
    if (
        not isinstance(images, torch.Tensor)
        or images.dim() != 4
        or images.shape[1] not in (1, 3)
        or images.shape[0] != len(rl) * len(cl)
        or images.shape[0] == 0
    ):
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ConfigError(
            f"labelled_grid images have shape {shape}; expected (rows x columns = "
            f"{len(rl)} x {len(cl)}, C, H, W) with C 1 or 3"
        )
    font = ImageFont.load_default()
    tiles = [_tile(_one_image(img), scale) for img in images]
    tw, th = tiles[0].width, tiles[0].height
    left = max(_text_size(font, s)[0] for s in rl) + 2 * _PAD
    top = max(_text_size(font, s)[1] for s in cl) + 2 * _PAD
    cell_w = max(tw, max(_text_size(font, s)[0] for s in cl))
    canvas = Image.new("RGB", (left + len(cl) * (cell_w + _PAD), top + len(rl) * (th + _PAD)), "white")
    draw = ImageDraw.Draw(canvas)
    for j, s in enumerate(cl):
        draw.text(
            (left + j * (cell_w + _PAD) + (cell_w - _text_size(font, s)[0]) // 2, _PAD), s, fill="black", font=font
        )
    for i, s in enumerate(rl):
        y = top + i * (th + _PAD)
        draw.text((_PAD, y + (th - _text_size(font, s)[1]) // 2), s, fill="black", font=font)
        for j in range(len(cl)):
            canvas.paste(tiles[i * len(cl) + j], (left + j * (cell_w + _PAD) + (cell_w - tw) // 2, y))
    return canvas
