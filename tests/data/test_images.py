"""condiff.data.images: reading image files into [-1, 1] tensors (exact values per colour mode, crop and
resize, refusals), writing PNGs (exact round trip, resizing, atomic) and the comparison figures."""

from __future__ import annotations

import io
import os
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from condiff.data.images import MAX_PIXELS, compare_image, from_uint8, labelled_grid, read_image, to_uint8, write_image
from condiff.errors import ConfigError, InputFileError, NonFiniteError, OutputFileError


def _chw(a: np.ndarray) -> torch.Tensor:
    """(H, W, C) uint8 -> the (C, H, W) float tensor its 8-bit values read as."""
    return from_uint8(torch.from_numpy(np.array(a)).permute(2, 0, 1))


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png(width: int, height: int, depth: int, colour: int, raw: bytes) -> bytes:
    """A PNG file built by hand: IHDR with the given header fields, one IDAT holding zlib(raw)."""
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(raw))
        + _png_chunk(b"IEND", b"")
    )


def _save(tmp_path, img: Image.Image, name: str, **kw):
    path = tmp_path / name
    img.save(path, **kw)
    return path


def _one_line_error(exc_info, *needles):
    msg = str(exc_info.value)
    assert msg and msg.splitlines() == [msg], msg
    for needle in needles:
        assert needle in msg, (needle, msg)
    return msg


# ---- round trip ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(3, 32, 32), (1, 16, 24), (3, 5, 40)])
def test_round_trip_is_exactly_the_uint8_quantisation(tmp_path, shape):
    """write_image then read_image at the native size gives exactly from_uint8(to_uint8(x)), values
    outside [-1, 1] included (they clamp), for RGB and grayscale, and with a (1, C, H, W) input."""
    x = 1.2 * (2 * torch.rand(shape, generator=torch.Generator().manual_seed(0)) - 1)
    path = write_image(x[None], tmp_path / "x.png")
    got = read_image(path, shape=shape)
    q = to_uint8(x[None])[0][..., : shape[0]].numpy()
    assert got.tensor.dtype == torch.float32 and got.tensor.shape == (1, *shape)
    assert torch.equal(got.tensor[0], _chw(q))
    assert got.notice is None and got.original_size == (shape[2], shape[1]) and got.crop == (0, 0, shape[2], shape[1])
    assert Image.open(path).mode == ("L" if shape[0] == 1 else "RGB")


def test_every_8bit_level_is_a_fixed_point(tmp_path):
    """All 256 levels from_uint8(0..255) survive write/read bit for bit, and to_uint8 inverts them."""
    q = torch.arange(256, dtype=torch.uint8).reshape(1, 16, 16).expand(3, 16, 16)
    x = from_uint8(q)
    assert torch.equal(to_uint8(x[None])[0].permute(2, 0, 1), q)
    assert torch.equal(read_image(write_image(x, tmp_path / "l.png"), shape=(3, 16, 16)).tensor[0], x)


# ---- crop and resize -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "size, shape, notice, crop",
    [
        ((64, 48), (3, 32, 32), "from 64x48 to 32x32 (centre crop 48x48)", (8, 0, 56, 48)),
        ((48, 64), (3, 32, 32), "from 48x64 to 32x32 (centre crop 48x48)", (0, 8, 48, 56)),
        ((16, 16), (3, 32, 32), "from 16x16 to 32x32", (0, 0, 16, 16)),
        ((100, 20), (1, 8, 8), "from 100x20 to 8x8 (centre crop 20x20)", (40, 0, 60, 20)),
        ((64, 64), (3, 16, 32), "from 64x64 to 32x16 (centre crop 64x32)", (0, 16, 64, 48)),
        ((7, 3), (3, 32, 32), "from 7x3 to 32x32 (centre crop 3x3)", (2, 0, 5, 3)),
    ],
)
def test_resize_notice_shape_and_crop(tmp_path, size, shape, notice, crop):
    """A file of another size is centre-cropped to the target aspect and resized: the notice names the
    file, both sizes and the crop; a constant colour stays that colour (the filter is normalised)."""
    colour = (10, 200, 77)
    path = _save(tmp_path, Image.new("RGB", size, colour), "in.png")
    got = read_image(path, shape=shape)
    assert got.tensor.shape == (1, *shape)
    assert got.notice == f"resized {path} from {notice.removeprefix('from ')}"
    assert got.original_size == size and got.crop == crop
    value = (
        torch.tensor(colour, dtype=torch.float32)
        if shape[0] == 3
        else torch.tensor([(299 * colour[0] + 587 * colour[1] + 114 * colour[2]) / 1000])
    )
    assert torch.allclose(got.tensor[0], from_uint8(value)[:, None, None].expand(shape), atol=1e-5, rtol=0)


@pytest.mark.parametrize("size, keep", [((96, 32), np.s_[:, 32:64]), ((32, 96), np.s_[32:64, :])])
def test_crop_keeps_exactly_the_centre(tmp_path, size, keep):
    """With a crop at scale 1 (96x32 -> 32x32), the result is exactly the centre 32x32 of the file:
    the borders are cut, nothing of them leaks in."""
    a = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    got = read_image(_save(tmp_path, Image.fromarray(a), "wide.png"))
    assert torch.equal(got.tensor[0], _chw(a[keep]))


@pytest.mark.parametrize("target", [32, 21, 16])
def test_downscaling_filters_instead_of_sampling(tmp_path, target):
    """Downscaling a 64x64 one-pixel black/white checkerboard gives its mean, mid-gray (0.0), away from
    the border: the filter averages (no aliasing), where point sampling would give +-1."""
    board = (np.indices((64, 64)).sum(0) % 2 * 255).astype(np.uint8)
    got = read_image(_save(tmp_path, Image.fromarray(board), "board.png"), shape=(1, target, target)).tensor
    assert got[..., 3:-3, 3:-3].abs().max() < 1e-4


def test_resize_off_names_both_sizes(tmp_path):
    """resize=False refuses a file of another size, naming the file, its size and the expected size."""
    path = _save(tmp_path, Image.new("RGB", (64, 48)), "big.png")
    with pytest.raises(InputFileError) as info:
        read_image(path, shape=(3, 32, 32), resize=False)
    _one_line_error(info, "big.png", "64x48", "32x32")
    assert read_image(_save(tmp_path, Image.new("RGB", (32, 32)), "ok.png"), resize=False).notice is None


# ---- colour modes ----------------------------------------------------------------------------------------


def test_rgba_is_composited_on_black(tmp_path):
    """Opaque red reads (1, -1, -1); alpha 0 reads black (-1) whatever its colour; alpha 128 scales red
    to 128 exactly."""
    a = np.array([[[255, 0, 0, 255], [255, 255, 255, 0], [255, 0, 0, 128]]], dtype=np.uint8)
    got = read_image(_save(tmp_path, Image.fromarray(a, "RGBA"), "rgba.png"), shape=(3, 1, 3)).tensor[0, :, 0]
    assert torch.equal(got[:, 0], torch.tensor([1.0, -1.0, -1.0]))
    assert torch.equal(got[:, 1], torch.tensor([-1.0, -1.0, -1.0]))
    assert torch.equal(got[:, 2], from_uint8(torch.tensor([128, 0, 0])))


def test_grayscale_and_la(tmp_path):
    """L reads as its values, repeated for RGB and as is for one channel; LA composites on black
    (200 at alpha 51 reads as 40)."""
    a = np.array([[0, 17, 255]], dtype=np.uint8)
    path = _save(tmp_path, Image.fromarray(a, "L"), "g.png")
    want = from_uint8(torch.from_numpy(a))
    assert torch.equal(read_image(path, shape=(1, 1, 3)).tensor[0, 0], want)
    assert torch.equal(read_image(path, shape=(3, 1, 3)).tensor[0], want.expand(3, 1, 3))
    la = _save(tmp_path, Image.new("LA", (1, 1), (200, 51)), "la.png")
    assert torch.equal(read_image(la, shape=(1, 1, 1)).tensor.flatten(), from_uint8(torch.tensor([40])))


def test_rgb_to_one_channel_uses_luma(tmp_path):
    """shape[0] == 1 turns RGB into ITU-R 601-2 luma (0.299 R + 0.587 G + 0.114 B), matching Pillow's
    'L' conversion to within its integer rounding."""
    img = Image.fromarray(np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [30, 60, 90]]], dtype=np.uint8))
    got = read_image(_save(tmp_path, img, "rgb.png"), shape=(1, 1, 4)).tensor.flatten()
    want = from_uint8(torch.tensor([76.245, 149.685, 29.07, 0.299 * 30 + 0.587 * 60 + 0.114 * 90]))
    assert torch.allclose(got, want, atol=1e-6, rtol=0)
    pil = from_uint8(torch.from_numpy(np.array(img.convert("L"))).flatten())
    assert (got - pil).abs().max() <= 0.5 / 127.5 + 1e-6


def test_palette_with_transparency_and_bilevel(tmp_path):
    """A palette image reads its palette colours; its transparent index reads black. Mode '1' reads +-1."""
    p = Image.new("P", (3, 1))
    p.putpalette([0, 0, 255, 255, 255, 0, 9, 9, 9] + [0] * 759)
    p.putdata([0, 1, 2])
    got = read_image(_save(tmp_path, p, "p.png", transparency=2), shape=(3, 1, 3)).tensor[0, :, 0]
    want = from_uint8(torch.tensor([[0, 0, 255], [255, 255, 0], [0, 0, 0]]).T)
    assert torch.equal(got, want)
    b = Image.new("1", (2, 1))
    b.putpixel((1, 0), 1)
    assert torch.equal(
        read_image(_save(tmp_path, b, "b.png"), shape=(1, 1, 2)).tensor.flatten(), torch.tensor([-1.0, 1.0])
    )


def test_16bit_gray_keeps_its_precision(tmp_path):
    """A 16-bit grayscale PNG reads v / 65535 * 2 - 1 (to float32 rounding), not just its top 8 bits."""
    v = np.array([[0, 65535, 25700, 12345, 1]], dtype=np.uint16)
    path = _save(tmp_path, Image.fromarray(v), "g16.png")
    assert Image.open(path).mode.startswith("I")
    got = read_image(path, shape=(1, 1, 5)).tensor.flatten().double()
    want = torch.from_numpy(v.astype(np.float64)).flatten() / 65535 * 2 - 1
    assert (got - want).abs().max() < 1e-6


def test_16bit_rgb_reads_to_within_one_8bit_step(tmp_path):
    """A 48-bit RGB PNG (built by hand; Pillow decodes it at 8 bits) reads within one 8-bit step of v/65535."""
    v = [65535, 0, 32768, 1000, 50000, 65280]
    raw = b"\x00" + struct.pack(">6H", *v)  # one row, filter byte 0, two RGB pixels
    path = tmp_path / "rgb48.png"
    path.write_bytes(_png(2, 1, 16, 2, raw))
    got = read_image(path, shape=(3, 1, 2)).tensor[0, :, 0].T.flatten().double()
    want = torch.tensor(v, dtype=torch.float64) / 65535 * 2 - 1
    assert (got - want).abs().max() <= 1 / 127.5


def test_cmyk_first_frame_and_exif_orientation(tmp_path):
    """CMYK (0, 255, 255, 0) reads as red; an animated GIF reads its first frame; an EXIF orientation of 6
    (rotate 90 degrees clockwise) is applied, and original_size is the upright size."""
    cmyk = _save(tmp_path, Image.new("CMYK", (2, 2), (0, 255, 255, 0)), "c.tif")
    assert torch.equal(read_image(cmyk, shape=(3, 2, 2)).tensor[0, :, 0, 0], torch.tensor([1.0, -1.0, -1.0]))
    pal = [255, 0, 0, 0, 0, 255] + [0] * 762
    frames = [Image.new("P", (4, 4), i) for i in (0, 1)]
    for f in frames:
        f.putpalette(pal)
    gif = tmp_path / "a.gif"
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert Image.open(gif).n_frames == 2
    red = torch.tensor([1.0, -1, -1])[:, None, None].expand(3, 4, 4)
    assert torch.equal(read_image(gif, shape=(3, 4, 4)).tensor[0], red)
    exif = Image.Exif()
    exif[0x0112] = 6
    red_blue = Image.fromarray(np.array([[[255, 0, 0], [0, 0, 255]]], dtype=np.uint8))
    got = read_image(_save(tmp_path, red_blue, "e.png", exif=exif), shape=(3, 2, 1))
    assert got.original_size == (1, 2) and got.notice is None
    assert torch.equal(got.tensor[0, :, :, 0].T, torch.tensor([[1.0, -1, -1], [-1, -1, 1]]))


# ---- refusals --------------------------------------------------------------------------------------------


def _bad_files(tmp_path):
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, "PNG")
    png = buf.getvalue()
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, "JPEG")
    jpg = buf.getvalue()
    corrupt = bytearray(png)
    corrupt[200] ^= 0xFF
    files = {
        "text.png": b"hello, not an image\n",
        "empty.png": b"",
        "truncated.png": png[: len(png) // 2],
        "truncated.jpg": jpg[: len(jpg) // 2],
        "corrupt.png": bytes(corrupt),
        "garbage.png": png[:33] + b"\x00" * 100,
        # headers claiming more pixels than the cap, than Pillow's warning limit and its error limit
        "bomb70M.png": _png(10_000, 7_000, 8, 2, b""),
        "bomb100M.png": _png(10_000, 10_000, 8, 2, b""),
        "bomb200M.png": _png(20_000, 10_000, 8, 2, b""),
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    Image.new("F", (3, 3)).save(tmp_path / "float.tif")
    Image.new("RGB", (3, 3)).save(tmp_path / "image.pcx")
    Image.new("RGB", (3, 3)).save(tmp_path / "image.eps")
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "dir.png").mkdir()
    return [*files, "float.tif", "image.pcx", "image.eps", "fifo", "dir.png", "missing.png"]


def test_every_bad_file_is_one_input_file_error(tmp_path):
    """Missing, a directory, a FIFO, empty, not an image, truncated PNG/JPEG, a corrupt PNG stream, a
    decompression bomb (at each of three limits), a float TIFF and formats outside the list (PCX, EPS):
    each is an InputFileError whose one line names the path and what is accepted."""
    for name in _bad_files(tmp_path):
        with pytest.raises(InputFileError) as info:
            read_image(tmp_path / name)
        msg = _one_line_error(info, name, "accepted: PNG")
        if name.startswith("bomb"):
            assert "pixels" in msg and "bomb" in msg, msg


def test_bomb_is_refused_before_decoding(tmp_path):
    """A header over MAX_PIXELS is refused from its size alone (the file holds no pixel data at all)."""
    side = int(MAX_PIXELS**0.5) + 1
    (tmp_path / "b.png").write_bytes(_png(side, side, 8, 0, b""))
    with pytest.raises(InputFileError) as info:
        read_image(tmp_path / "b.png")
    _one_line_error(info, f"{side}x{side}", str(MAX_PIXELS))


@pytest.mark.parametrize("shape", [(2, 32, 32), (3, 0, 32), (3, 32), "3x32x32", (3, 32.0, 32), (1, 10**5, 10**5)])
def test_bad_shape_is_a_config_error(tmp_path, shape):
    """A target shape that is not (1 or 3, H >= 1, W >= 1) within the pixel cap is a ConfigError."""
    with pytest.raises(ConfigError) as info:
        read_image(tmp_path / "x.png", shape=shape)
    _one_line_error(info, "shape")


# ---- writing ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("channels, size", [(3, (64, 48)), (3, (20, 7)), (1, (13, 40)), (3, (16, 16))])
def test_write_at_a_given_size(tmp_path, channels, size):
    """write_image(size=(w, h)) writes a w x h PNG (RGB or L), leaves no temporary file, and a constant
    image stays that constant after resizing."""
    x = torch.full((channels, 16, 16), from_uint8(torch.tensor(99)).item())
    path = write_image(x, tmp_path / "o.png", size=size)
    img = Image.open(path)
    assert img.size == size and img.mode == ("L" if channels == 1 else "RGB")
    assert (np.asarray(img) == 99).all()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.png"]


def test_write_refuses_bad_input(tmp_path):
    """Non-finite values, a wrong shape, a bad size and a directory as the path are typed one-line errors."""
    good = torch.zeros(3, 4, 4)
    for call, err, needle in [
        (lambda: write_image(torch.full((3, 4, 4), float("nan")), tmp_path / "a.png"), NonFiniteError, "NaN"),
        (lambda: write_image(torch.zeros(2, 3, 4, 4), tmp_path / "a.png"), ConfigError, "(2, 3, 4, 4)"),
        (lambda: write_image(torch.zeros(4, 4, 4), tmp_path / "a.png"), ConfigError, "(4, 4, 4)"),
        (lambda: write_image(good, tmp_path / "a.png", size=(0, 4)), ConfigError, "(0, 4)"),
        (lambda: write_image(good, tmp_path / "a.png", size=(4,)), ConfigError, "(4,)"),
        (lambda: write_image(good, tmp_path), OutputFileError, str(tmp_path)),
    ]:
        with pytest.raises(err) as info:
            call()
        _one_line_error(info, needle)
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())


# ---- figures ---------------------------------------------------------------------------------------------

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255), (0, 255, 255)]


def _solid(colour, h=8, w=8):
    return from_uint8(torch.tensor(colour))[:, None, None].expand(3, h, w)


def _blocks(img: Image.Image, colours):
    """For each colour: (pixel count, top row, mean column) of the pixels exactly that colour."""
    a = np.asarray(img.convert("RGB"))
    out = []
    for c in colours:
        ys, xs = np.nonzero((a == np.array(c, dtype=np.uint8)).all(-1))
        out.append((len(ys), ys.min(), xs.mean(), ys.mean()))
    return out


def test_compare_image_strip(tmp_path):
    """compare_image puts each image, magnified scale times, left to right in order, all at the same
    height, under a label: exactly (scale*8)^2 pixels of each colour, and dark text pixels above."""
    rows = [("source", _solid(COLOURS[0])), ("reconstruction", _solid(COLOURS[1])), ("edited", _solid(COLOURS[2]))]
    img = compare_image(rows, scale=4)
    blocks = _blocks(img, COLOURS[:3])
    assert [b[0] for b in blocks] == [32 * 32] * 3
    assert blocks[0][2] < blocks[1][2] < blocks[2][2]
    top = blocks[0][1]
    assert top > 0 and all(b[1] == top for b in blocks)
    assert (np.asarray(img.convert("L"))[:top] < 128).sum() > 20  # the labels
    with pytest.raises(ConfigError):
        compare_image([])


def test_labelled_grid_layout():
    """labelled_grid lays images out row-major (rows = methods, columns = examples) with labels to the
    left and above; a count that is not rows x columns is a ConfigError."""
    images = torch.stack([_solid(c) for c in COLOURS])
    img = labelled_grid(images, ["ddim", "null-text"], ["a", "b", "c"], scale=3)
    blocks = _blocks(img, COLOURS)
    assert [b[0] for b in blocks] == [24 * 24] * 6
    for r in range(2):
        assert blocks[3 * r][2] < blocks[3 * r + 1][2] < blocks[3 * r + 2][2]
        assert blocks[3 * r][3] == blocks[3 * r + 1][3] == blocks[3 * r + 2][3]
    assert blocks[0][3] < blocks[3][3] and blocks[0][2] == blocks[3][2]
    assert min(b[2] for b in blocks) > 12 and min(b[1] for b in blocks) > 0  # room for the labels
    with pytest.raises(ConfigError) as info:
        labelled_grid(images[:5], ["ddim", "null-text"], ["a", "b", "c"])
    _one_line_error(info, "(5, 3, 8, 8)")
