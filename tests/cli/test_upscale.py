"""`condiff sr search` and `condiff sr apply` on an untrained SR model (the bundled shapes UNet widened): the search
writes the best candidate and its report, is reproducible, and apply upscales from exactly that x_T."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from clikit import ok
from condiff.data import shapes
from condiff.data.images import read_image, to_uint8, write_image
from condiff.models import sr


@pytest.fixture(scope="module")
def d(tmp_path_factory):
    d = tmp_path_factory.mktemp("srcli")
    sr.build_sr_model(sr.sr_recipe_from_dict({"name": "s", "family": "sr"})).save(d / "run" / "model")
    b = shapes.sample_batch(1, torch.Generator().manual_seed(0))
    write_image(sr.degrade(b.images)[0], d / "low.png")
    return d


def test_search_then_apply(d, capsys):
    args = ["--model", str(d / "run"), "--candidates", "3", "--n-val", "2", "--steps", "2", "--solver", "ddim"]
    ok(["sr", "search", *args, "--out", str(d / "a.safetensors")], capsys)
    ok(["sr", "search", *args, "--out", str(d / "b.safetensors")], capsys)
    rep = json.loads((d / "a.json").read_text())
    assert rep["index"] == int(np.argmax(rep["scores"])) and rep["best_psnr"] == max(rep["scores"])
    assert rep["candidates"] == 3 and rep["n_val"] == 2 and rep["solver"] == "ddim"
    x_a, steps, solver = sr.load_start_file(d / "a.safetensors")
    assert torch.equal(x_a, sr.load_start_file(d / "b.safetensors")[0]) and (steps, solver) == (2, "ddim")

    out = ok(
        ["sr", "apply", "--model", str(d / "run"), "--image", str(d / "low.png"), "--xT", str(d / "a.safetensors"),
         "--out", str(d / "hi.png"), "--json", str(d / "hi.json")], capsys
    )  # fmt: skip
    assert "searched x_T" in out
    m = sr.load_sr_model(d / "run" / "model")
    low = read_image(d / "low.png", (3, 8, 8)).tensor
    want = to_uint8(m.upscale(low, x_a, 2, "ddim"))[0].numpy()
    assert np.array_equal(np.asarray(Image.open(d / "hi.png").convert("RGB")), want)
    rep = json.loads((d / "hi.json").read_text())
    assert rep["start"] == "searched" and rep["steps"] == 2 and rep["size"] == [32, 32]

    ok(["sr", "apply", "--model", str(d / "run"), "--image", str(d / "low.png"),
        "--out", str(d / "r.png"), "--seed", "4"], capsys)  # fmt: skip
    want = to_uint8(m.upscale(low, None, sr.DEFAULT_STEPS, sr.DEFAULT_SOLVER, seed=4))[0].numpy()
    assert np.array_equal(np.asarray(Image.open(d / "r.png").convert("RGB")), want)
