"""`condiff sample` output files: --n 1 writes the image itself at its own size (no grid frame); --out-dir writes
each sample as its own PNG with DIR/samples.json listing each file's index, seed and caption, beside the grid
when --out is given too."""

import json

import numpy as np
from PIL import Image

from clikit import ok, one_line_error, run

FAST = ["--solver", "ddim", "--steps", "3", "--seed", "4"]


def _pixels(path):
    return np.asarray(Image.open(path).convert("RGB"))


def test_one_sample_is_the_image_itself(tmp_path, capsys):
    ok(
        [
            "sample",
            "--model",
            "shapes",
            "--prompt",
            "small blue square",
            "--n",
            "1",
            *FAST,
            "--out",
            str(tmp_path / "s.png"),
        ],
        capsys,
    )
    assert Image.open(tmp_path / "s.png").size == (32, 32)
    side = json.loads((tmp_path / "s.json").read_text())
    assert side["out_layout"].startswith("image") and "files" not in side and side["captions"] == ["small blue square"]
    ok(["sample", "--model", "digits", "--prompt", "3", "--n", "1", *FAST, "--out", str(tmp_path / "d.png")], capsys)
    assert Image.open(tmp_path / "d.png").size == (16, 16)  # was a 20x20 grid (2-pixel frame), 4x enlarged


def test_out_dir_writes_each_sample_beside_the_grid(tmp_path, capsys):
    grid, each = tmp_path / "grid.png", tmp_path / "each"
    args = ["sample", "--model", "shapes", "--n", "3", *FAST, "--out", str(grid), "--out-dir", str(each)]
    printed = ok(args, capsys)
    names = ["sample_000.png", "sample_001.png", "sample_002.png"]
    assert sorted(p.name for p in each.iterdir()) == [*names, "samples.json"]
    assert f"{each / 'sample_000.png'} ... sample_002.png" in printed
    side = json.loads((each / "samples.json").read_text())
    assert side == json.loads(grid.with_suffix(".json").read_text())  # the same record beside the grid
    assert [f["file"] for f in side["files"]] == names and side["out_dir"] == str(each)
    assert [f["caption"] for f in side["files"]] == side["captions"] and {f["seed"] for f in side["files"]} == {4}
    assert "--out-dir" in side["reproduce"] and side["out_layout"].startswith("grid of 2 columns")
    tiles = _pixels(grid)
    for i, name in enumerate(names):  # tile i of the 4x-enlarged grid, 2-pixel frames, 2 columns
        r, c = divmod(i, 2)
        top, left = 4 * (2 + r * 34), 4 * (2 + c * 34)
        tile = tiles[top : top + 128 : 4, left : left + 128 : 4]
        assert Image.open(each / name).size == (32, 32) and np.array_equal(_pixels(each / name), tile)


def test_out_dir_alone_writes_no_grid_and_matches_n1(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = ["sample", "--model", "digits", "--prompt", "7", "--n", "1", *FAST]
    ok([*args, "--out-dir", "each"], capsys)
    assert not (tmp_path / "grid.png").exists() and not (tmp_path / "grid.json").exists()
    ok([*args, "--out", "one.png"], capsys)
    assert (tmp_path / "each" / "sample_000.png").read_bytes() == (tmp_path / "one.png").read_bytes()
    files = json.loads((tmp_path / "each" / "samples.json").read_text())["files"]
    assert files == [{"file": "sample_000.png", "index": 0, "seed": 4, "caption": "7"}]


def test_out_dir_that_is_a_file_is_refused_before_sampling(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    code, _, err = run(["sample", "--model", "digits", "--n", "2", "--out-dir", str(tmp_path / "f")], capsys)
    one_line_error(code, err, "--out-dir")
    assert "not a directory" in err
