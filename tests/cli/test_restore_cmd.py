"""`condiff restore` on the bundled shapes model (few steps): each task end to end (files, sizes, outputs at the
input's size, sidecar, the measurement satisfied by the sample, known pixels kept bit for bit in the written
PNG), diffusers' mask convention (white = fill, black = known), and one-line errors (exit 2) before any model
loads."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from clikit import ok, one_line_error, run
from condiff.cli.restore import read_mask, sr_factor
from condiff.data import shapes
from condiff.data.images import ImageInput, read_image, write_image
from condiff.guidance.steered import Colorize, SuperResolution

FAST = ["--steps", "4", "--recurrence", "2"]
SIDECAR_KEYS = {
    "command",
    "task",
    "model",
    "prompt",
    "steps",
    "seed",
    "recurrence",
    "solver",
    "image",
    "mask",
    "seconds",
    "measurement_error",
    "measurement_error_written",
    "labels",
    "reproduce",
    "outputs",
    "factor",
    "notice",
    "nfe",
}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A 32x32 render, its 8x8 average-pooled version, and a right-half (white) mask as PNGs."""
    d = tmp_path_factory.mktemp("restore")
    b = shapes.sample_batch(1, torch.Generator().manual_seed(3))
    write_image(b.images, d / "in.png")
    write_image(torch.nn.functional.avg_pool2d(b.images, 4), d / "lo.png")
    m = np.zeros((32, 32), np.uint8)
    m[:, 16:] = 255
    Image.fromarray(m).save(d / "right.png")
    Image.fromarray(255 - m).save(d / "left.png")
    return d


def _pixels(path):
    return np.asarray(Image.open(path).convert("RGB"))


def _sidecar(out):
    rec = json.loads(out.with_suffix(".json").read_text())
    assert SIDECAR_KEYS <= set(rec), SIDECAR_KEYS - set(rec)
    assert rec["reproduce"].startswith(f"condiff restore --task {rec['task']} ")
    assert out.with_name(out.stem + "_compare.png").is_file()
    return rec


@pytest.mark.parametrize("known, fill", [("left", "right.png"), ("right", "left.png")])
def test_inpaint_keeps_black_pixels_exactly(files, tmp_path, capsys, known, fill):
    """White mask pixels are filled and black ones are known: the written PNG equals the input bit for bit on
    the black half (for either half), the sample meets the measurement exactly, and the output is 32x32."""
    out = tmp_path / "out.png"
    ok(
        [
            "restore",
            "--task",
            "inpaint",
            "--image",
            str(files / "in.png"),
            "--mask",
            str(files / fill),
            *FAST,
            "--out",
            str(out),
        ],
        capsys,
    )
    src, res = _pixels(files / "in.png"), _pixels(out)
    assert res.shape == (32, 32, 3)
    cols = slice(0, 16) if known == "left" else slice(16, 32)
    assert np.array_equal(res[:, cols], src[:, cols])
    rec = _sidecar(out)
    assert rec["task"] == "inpaint" and rec["measurement_error"] == 0.0 and rec["measurement_error_written"] == 0.0
    assert set(rec["labels"]["output"]) == {"shape", "color", "size", "position"}


def test_sr_output_pools_to_the_input(files, tmp_path, capsys):
    """x4 super-resolution from 8x8: a 32x32 PNG whose sample average-pools to the input to 1e-5; the sidecar's
    error of the written file is the one recomputed from the PNG."""
    out = tmp_path / "sr.png"
    ok(["restore", "--task", "sr", "--image", str(files / "lo.png"), *FAST, "--out", str(out)], capsys)
    assert _pixels(out).shape == (32, 32, 3)
    rec = _sidecar(out)
    assert rec["factor"] == 4 and rec["measurement_error"] <= 1e-5
    y = read_image(files / "lo.png", (3, 8, 8), resize=False).tensor.double()
    x = read_image(out, (3, 32, 32), resize=False).tensor.double()
    assert abs(float((SuperResolution(4)(x) - y).abs().max()) - rec["measurement_error_written"]) < 1e-9


def test_colorize_keeps_the_luminance(files, tmp_path, capsys):
    """Colorization: a color 32x32 PNG whose sample has the input's BT.601 luminance to 1e-5."""
    out = tmp_path / "col.png"
    ok(
        [
            "restore",
            "--task",
            "colorize",
            "--image",
            str(files / "in.png"),
            "--prompt",
            "red",
            *FAST,
            "--out",
            str(out),
        ],
        capsys,
    )
    assert _pixels(out).shape == (32, 32, 3)
    rec = _sidecar(out)
    assert rec["measurement_error"] <= 1e-5 and rec["prompt"] == "red"
    y = Colorize()(read_image(files / "in.png").tensor.double())
    x = read_image(out, (3, 32, 32), resize=False).tensor.double()
    assert abs(float((Colorize()(x) - y).abs().max()) - rec["measurement_error_written"]) < 1e-9


@pytest.mark.parametrize("size, fit", [((128, 128), "resized"), ((48, 32), "pasted")])
def test_output_is_written_at_the_input_size(files, tmp_path, capsys, size, fit):
    """An input of another size gives an output of its size, as `edit` writes it: resized back (square), or
    resized to the centre-crop box and pasted into the original, whose borders survive unchanged; the sidecar's
    error of the written file is the one recomputed from the file read back for the model."""
    big = tmp_path / "big.png"
    Image.open(files / "in.png").convert("RGB").resize(size, Image.BICUBIC).save(big)
    out = tmp_path / "col.png"
    printed = ok(["restore", "--task", "colorize", "--image", str(big), *FAST, "--out", str(out)], capsys)
    assert Image.open(out).size == size and f"wrote {out} ({size[0]}x{size[1]})" in printed
    rec = _sidecar(out)
    assert rec["output"]["size"] == list(size) and rec["output"]["fit"] == fit and rec["outputs"]["size"] == list(size)
    if fit == "pasted":
        left, _, right, _ = rec["output"]["crop"]
        src, res = _pixels(big), _pixels(out)
        assert (left, right) == (8, 40) and np.array_equal(res[:, :left], src[:, :left])
        assert np.array_equal(res[:, right:], src[:, right:])
    y = Colorize()(read_image(big, (3, 32, 32)).tensor.double())
    x = read_image(out, (3, 32, 32)).tensor.double()
    assert abs(float((Colorize()(x) - y).abs().max()) - rec["measurement_error_written"]) < 1e-9


def test_read_mask_threshold_and_resize(tmp_path):
    """Mask reading: gray >= 128 (white side) is fill, <= 127 is known; a 64x64 mask is resized by nearest
    neighbour to 32x32 (each 2x2 block -> its pixel); an input-sized mask follows the input's centre crop."""
    m = np.zeros((64, 64), np.uint8)
    m[:, 32:] = 128
    m[:32, :32] = 127
    Image.fromarray(m).save(tmp_path / "m64.png")
    src = ImageInput(torch.zeros(1, 3, 32, 32), (64, 64), None, (0, 0, 64, 64))
    fill = read_mask(tmp_path / "m64.png", src, 32, 32)
    assert fill.shape == (1, 1, 32, 32) and fill.dtype == torch.bool
    expect = torch.zeros(32, 32, dtype=torch.bool)
    expect[:, 16:] = True
    assert torch.equal(fill[0, 0], expect)
    wide = np.zeros((32, 64), np.uint8)
    wide[:, 16:48] = 255  # exactly the centre-crop box of a 64x32 image
    Image.fromarray(wide).save(tmp_path / "wide.png")
    src = ImageInput(torch.zeros(1, 3, 32, 32), (64, 32), None, (16, 0, 48, 32))
    assert bool(read_mask(tmp_path / "wide.png", src, 32, 32).all())


def test_sr_factor_sizes():
    """The factor is model side / input side; only square inputs whose side divides 32 (ratio >= 2) pass."""
    assert sr_factor((8, 8), (3, 32, 32)) == 4 and sr_factor((16, 16), (3, 32, 32)) == 2
    assert sr_factor((1, 1), (3, 32, 32)) == 32
    for bad in [(10, 10), (32, 32), (8, 16), (64, 64)]:
        with pytest.raises(Exception, match="accepted: 16x16, 8x8, 4x4, 2x2, 1x1"):
            sr_factor(bad, (3, 32, 32))


@pytest.fixture
def no_model(monkeypatch):
    """Fail loudly if a command tries to read weights."""

    def boom(*a, **k):
        raise AssertionError("the model was loaded before the inputs were checked")

    monkeypatch.setattr("condiff.cli.common.load_model", boom)


def test_bad_inputs_are_one_line_errors(files, tmp_path, capsys, no_model):
    """Bad task, missing/extra mask, bad sizes, bad files and bad out paths: one `error:` line, exit 2, no
    model loaded."""
    Image.fromarray(np.zeros((10, 10, 3), np.uint8)).save(tmp_path / "ten.png")
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(tmp_path / "m20.png")
    (tmp_path / "junk.png").write_bytes(b"not an image")
    img, out = str(files / "in.png"), str(tmp_path / "o.png")
    cases = [
        (["--task", "deblur", "--image", img], "unknown task 'deblur'; accepted: inpaint, sr, colorize"),
        (["--task", "inpaint", "--image", img], "--task inpaint needs --mask"),
        (["--task", "sr", "--image", img, "--mask", str(files / "right.png")], "--mask is for --task inpaint"),
        (["--task", "sr", "--image", str(tmp_path / "ten.png")], "got 10x10; accepted: 16x16, 8x8"),
        (["--task", "sr", "--image", img], "got 32x32; accepted"),
        (["--task", "inpaint", "--image", img, "--mask", str(tmp_path / "m20.png")], "is 20x20"),
        (["--task", "inpaint", "--image", img, "--mask", str(tmp_path / "junk.png")], "--mask:"),
        (["--task", "colorize", "--image", str(tmp_path / "missing.png")], "image file not found"),
        (["--task", "colorize", "--image", img, "--recurrence", "0"], "--recurrence must be an integer in [1, 100]"),
        (["--task", "colorize", "--image", img, "--steps", "0"], "--steps must be"),
        (["--task", "colorize", "--image", img, "--solver", "nope"], "unknown solver 'nope'"),
    ]
    cases += [
        (["--task", "colorize", "--image", img, "--out", str(tmp_path / "o.jpg")], "--out must end in .png"),
        (["--task", "colorize", "--image", img, "--out", img], "would overwrite --image"),
    ]
    for args, needle in cases:
        argv = ["restore", *args] + ([] if "--out" in args else ["--out", out])
        code, _, err = run(argv, capsys)
        one_line_error(code, err, needle)
