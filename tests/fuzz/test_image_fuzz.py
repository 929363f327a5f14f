"""Property-based fuzzing of ``condiff.data.images.read_image``: random bytes, PNG headers with random fields
and garbage, valid images of random sizes, modes and formats, and valid files with bytes flipped, cut or
inserted. Every call either returns a (1, C, H, W) finite float32 tensor in [-1, 1] or raises a one-line
InputFileError that names the file; no other exception ever escapes. Valid lossless files read exactly."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from hypothesis import assume, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from condiff.data.images import MAX_PIXELS, from_uint8, read_image
from condiff.errors import InputFileError

SHAPES = st.tuples(st.sampled_from([1, 3]), st.integers(1, 40), st.integers(1, 40))


def _read(path, shape, resize=True):
    """read_image's contract: a well-formed result or a one-line InputFileError naming ``path``."""
    try:
        got = read_image(path, shape=shape, resize=resize)
    except InputFileError as e:
        msg = str(e)
        assert msg.splitlines() == [msg] and str(path) in msg, msg
        event("refused")
        return None, msg
    event("read")
    x = got.tensor
    assert x.dtype == torch.float32 and x.shape == (1, *shape)
    assert torch.isfinite(x).all() and x.min() >= -1 and x.max() <= 1
    w, h = got.original_size
    assert w >= 1 and h >= 1 and (got.notice is None) == ((h, w) == shape[1:])
    return got, None


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


@settings(max_examples=100)
@given(data=st.binary(max_size=3000), shape=SHAPES)
def test_random_bytes(workdir, data, shape):
    """Arbitrary bytes (empty included) read as an image or fail with one InputFileError line."""
    path = workdir / "bytes.img"
    path.write_bytes(data)
    _read(path, shape)


PNG_MODES = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}
PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
SIDE = st.one_of(st.integers(0, 48), st.integers(8_000, 2**31 - 1), st.integers(0, 2**32 - 1))


@settings(max_examples=100)
@given(
    w=SIDE,
    h=SIDE,
    depth=st.one_of(st.sampled_from([1, 2, 4, 8, 16]), st.integers(0, 255)),
    colour=st.one_of(st.sampled_from(list(PNG_MODES)), st.integers(0, 255)),
    interlace=st.integers(0, 2),
    raw=st.binary(max_size=2000),
    compress=st.booleans(),
    tail=st.binary(max_size=200),
    iend=st.booleans(),
    shape=SHAPES,
)
def test_png_headers_with_garbage(workdir, w, h, depth, colour, interlace, raw, compress, tail, iend, shape):
    """A PNG signature and IHDR with random fields, then image data that is random (zlib-compressed or
    not) and random trailing bytes: a result or one InputFileError."""
    valid = depth in PNG_MODES.get(colour, ()) and interlace in (0, 1) and 0 < w < 2**31 and 0 < h < 2**31
    if valid:  # a valid header gets decoded: keep the allocation small (big ones: the next test)
        assume(w * h <= 48 * 48)
    ihdr = struct.pack(">IIBBBBB", w, h, depth, colour, 0, 0, interlace)
    data = (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", ihdr)
        + _chunk(b"IDAT", zlib.compress(raw) if compress else raw)
        + (_chunk(b"IEND", b"") if iend else b"")
        + tail
    )
    path = workdir / "header.png"
    path.write_bytes(data)
    _read(path, shape)


@settings(max_examples=40)
@given(
    mode=st.sampled_from([(c, d) for c, ds in PNG_MODES.items() for d in ds]),
    w=st.integers(1, 2**31 - 1),
    h=st.integers(1, 2**31 - 1),
    raw=st.binary(max_size=200),
)
def test_png_over_the_pixel_cap(workdir, mode, w, h, raw):
    """A valid PNG header claiming more than MAX_PIXELS pixels is refused with a message about pixels,
    whatever data follows (none is decoded)."""
    assume(w * h > MAX_PIXELS)
    ihdr = struct.pack(">IIBBBBB", w, h, mode[1], mode[0], 0, 0, 0)
    path = workdir / "big.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(raw)))
    _, msg = _read(path, (3, 32, 32))
    assert msg is not None and "pixels" in msg, msg


@settings(max_examples=100)
@given(
    mode=st.sampled_from([(c, d) for c, ds in PNG_MODES.items() for d in ds]),
    w=st.integers(1, 40),
    h=st.integers(1, 40),
    seed=st.integers(0, 2**32 - 1),
    trns=st.booleans(),
    bad_filter=st.booleans(),
    shape=SHAPES,
)
def test_png_decodable_payloads(workdir, mode, w, h, seed, trns, bad_filter, shape):
    """A hand-built PNG of every colour type and bit depth with random pixel bytes (a full palette for
    colour type 3, an optional tRNS chunk) reads; with an invalid row filter type it reads or is refused."""
    colour, depth = mode
    rng = np.random.default_rng(seed)
    row = (w * PNG_CHANNELS[colour] * depth + 7) // 8
    filters = rng.integers(0, 5, h) if not bad_filter else rng.integers(0, 256, h)
    raw = b"".join(bytes([f]) + rng.bytes(row) for f in filters)
    chunks = _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth, colour, 0, 0, 0))
    if colour == 3:
        chunks += _chunk(b"PLTE", rng.bytes(3 * 2**depth))
    if trns and colour in (0, 2, 3):
        chunks += _chunk(b"tRNS", rng.bytes({0: 2, 2: 6, 3: 2**depth}[colour]))
    path = workdir / "payload.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunks + _chunk(b"IDAT", zlib.compress(raw)) + _chunk(b"IEND", b""))
    got, msg = _read(path, shape)
    if not (filters > 4).any():
        assert got is not None, msg


MODES = ["1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "YCbCr", "I;16", "I"]
FORMATS = ["PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP", "PPM"]
LOSSLESS = {"PNG", "BMP", "TIFF", "PPM"}


def _make(mode: str, w: int, h: int, rng: np.random.Generator) -> Image.Image:
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16))
    if mode == "I":
        return Image.fromarray(rng.integers(-(2**20), 2**20, (h, w), dtype=np.int32), "I")
    return Image.fromarray(rng.integers(0, 256, (h, w, 4), dtype=np.uint8), "RGBA").convert(mode)


def _encode(im: Image.Image, fmt: str, **kwargs) -> bytes | None:
    buf = io.BytesIO()
    try:
        im.save(buf, format=fmt, **kwargs)
    except (OSError, ValueError, KeyError, TypeError):  # a mode this format cannot store
        return None
    return buf.getvalue()


def _pillow_reads(data: bytes | None) -> bool:
    """Whether Pillow itself decodes what it wrote (Pillow < 13 writes YCbCr TIFFs it cannot read back)."""
    if data is None:
        return False
    try:
        Image.open(io.BytesIO(data)).load()
    except OSError:
        return False
    return True


_RNG = np.random.default_rng(0)
ENCODED = {(m, f): _encode(_make(m, 3, 2, _RNG), f) for m in MODES for f in FORMATS}
SAVABLE = [pair for pair, data in ENCODED.items() if _pillow_reads(data)]
UNREADABLE = [pair for pair, data in ENCODED.items() if data is not None and not _pillow_reads(data)]


@st.composite
def image_files(draw, mode: str, fmt: str):
    """(encoded bytes, the image) for a random valid image of ``mode`` saved as ``fmt``: random size,
    pixels, transparency (where the format has it) and a second frame (where it has frames)."""
    w, h = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    im = _make(mode, w, h, rng)
    kwargs = {}
    if draw(st.booleans()) and fmt in ("PNG", "GIF") and mode in ("L", "P"):
        kwargs["transparency"] = 0
    if draw(st.booleans()) and fmt in ("PNG", "GIF", "TIFF", "WEBP"):
        kwargs.update(save_all=True, append_images=[_make(mode, w, h, rng)])
    data = _encode(im, fmt, **kwargs)
    if data is None:  # Pillow's APNG writer cannot always keep the transparency of differing frames
        kwargs.pop("transparency", None)
        data = _encode(im, fmt, **kwargs)
    assert data is not None, (mode, fmt, kwargs)
    return data, im


@pytest.mark.parametrize("mode, fmt", SAVABLE)
@settings(max_examples=6)
@given(data=st.data(), shape=SHAPES, same=st.booleans(), resize=st.booleans())
def test_valid_images_of_any_mode_and_format(workdir, mode, fmt, data, shape, same, resize):
    """A valid image always reads (resizing on, or the size already right) with original_size its size;
    with resizing off and another size it is refused naming both sizes; RGB and L files in a lossless
    format read exactly at their own size."""
    encoded, im = data.draw(image_files(mode, fmt))
    w, h = im.size
    if same:
        shape = (shape[0], h, w)
    path = workdir / f"valid.{fmt.lower()}"
    path.write_bytes(encoded)
    got, msg = _read(path, shape, resize)
    if not resize and (h, w) != shape[1:]:
        assert msg is not None and f"{w}x{h}" in msg and f"{shape[2]}x{shape[1]}" in msg, msg
        return
    assert got is not None, msg
    assert got.original_size == (w, h)
    if fmt in LOSSLESS and shape[1:] == (h, w) and (mode, shape[0]) in (("RGB", 3), ("L", 1)):
        want = from_uint8(torch.from_numpy(np.array(im)).reshape(h, w, shape[0]).permute(2, 0, 1))
        assert torch.equal(got.tensor[0], want)


NOTHING_UNREADABLE = pytest.mark.skip(reason="this Pillow reads back every image file it writes (Pillow 13 does)")


@pytest.mark.parametrize("mode, fmt", UNREADABLE or [pytest.param(None, None, marks=NOTHING_UNREADABLE)])
def test_files_pillow_writes_but_cannot_read_are_refused(workdir, mode, fmt):
    """A file Pillow writes but cannot decode (YCbCr TIFF before Pillow 13) is one InputFileError, not a crash."""
    path = workdir / f"unreadable.{fmt.lower()}"
    path.write_bytes(ENCODED[mode, fmt])
    with pytest.raises(InputFileError) as e:
        read_image(path, shape=(3, 2, 3))
    msg = str(e.value)
    assert msg.splitlines() == [msg] and str(path) in msg and "cannot read image" in msg, msg


@pytest.mark.parametrize("fmt", FORMATS)
@settings(max_examples=25)
@given(
    data=st.data(),
    shape=SHAPES,
    cut=st.floats(0, 1),
    flips=st.lists(st.tuples(st.floats(0, 1), st.integers(1, 255)), max_size=4),
    insert=st.binary(max_size=40),
    where=st.floats(0, 1),
)
def test_damaged_valid_files(workdir, fmt, data, shape, cut, flips, insert, where):
    """A valid file with bytes flipped, random bytes inserted and its end cut off: a result or one
    InputFileError."""
    mode = data.draw(st.sampled_from([m for m, f in SAVABLE if f == fmt]))
    damaged = bytearray(data.draw(image_files(mode, fmt))[0])
    for pos, mask in flips:
        damaged[min(int(pos * len(damaged)), len(damaged) - 1)] ^= mask
    at = int(where * len(damaged))
    damaged[at:at] = insert
    path = workdir / f"damaged.{fmt.lower()}"
    path.write_bytes(bytes(damaged[: max(1, int(cut * len(damaged)))] if cut < 1 else damaged))
    _read(path, shape)
