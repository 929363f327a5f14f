"""`condiff sample --parallel`: in one process the network runs whole (the same image as without the option, and
the sidecar records the option); on 2 forked gloo ranks (the process group torchrun would give) full_sync writes
the single-process image, from rank 0 only, and the sidecar records the bytes each kind of exchange sent."""

import json
import os

import numpy as np
from PIL import Image

from clikit import ok
from condiff.parallel.launch import spawn

FAST = ["--model", "shapes", "--prompt", "large red circle", "--n", "2", "--solver", "ddim", "--steps", "3"]


def _pixels(path):
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


def test_one_process_parallel_is_the_plain_sample(tmp_path, capsys):
    ok(["sample", *FAST, "--out", str(tmp_path / "a.png")], capsys)
    ok(["sample", *FAST, "--out", str(tmp_path / "b.png"), "--parallel", "pcpp"], capsys)
    assert np.array_equal(_pixels(tmp_path / "a.png"), _pixels(tmp_path / "b.png"))
    side = json.loads((tmp_path / "b.json").read_text())
    assert side["parallel"] == "pcpp" and side["world_size"] == 1 and "--parallel pcpp" in side["reproduce"]
    assert "parallel" not in json.loads((tmp_path / "a.json").read_text())  # without the option: unchanged


def _rank(rank, world, argv):
    from condiff.cli import main

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world))
    main(argv)


def test_two_ranks_full_sync_writes_the_single_process_image(tmp_path, capsys):
    ok(["sample", *FAST, "--out", str(tmp_path / "one.png")], capsys)
    par = tmp_path / "par"
    par.mkdir()
    opts = ["--parallel-opt", "mode=full_sync", "--parallel-opt", "split_batch=false"]
    spawn(_rank, 2, ["sample", *FAST, "--out", str(par / "two.png"), "--parallel", "distrifusion", *opts])
    assert sorted(p.name for p in par.iterdir()) == ["two.json", "two.png"]
    assert np.abs(_pixels(tmp_path / "one.png") - _pixels(par / "two.png")).max() <= 1  # float32, 8-bit PNG
    side = json.loads((par / "two.json").read_text())
    assert side["world_size"] == 2 and side["bands"] == 2 and side["parallel_mode"] == "full_sync"
    assert side["bytes_total"]["kv"] > 0 and side["bytes_total"]["halo"] > 0 and side["bytes_total"]["gn"] > 0
