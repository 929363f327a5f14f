"""Fuzzing of `condiff sr search` and `condiff sr apply` and of the sr recipe family. Every bad option, recipe key or
input file is one ``error:`` line naming it (and what is accepted), exit code 2, before any weights are read or any
network is built, and nothing is written: no x_T, no report, no image, no stray temporary file."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path
from unittest import mock

import pytest
import torch
from fuzzkit import (
    expect_bad_recipe,
    expect_cli_error,
    guarded,
    no_stray_temp_files,
    wrong_type,
    wrong_type_case,
)
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from condiff.cli.recipes import RECIPES_DIR
from condiff.data import shapes
from condiff.data.images import write_image
from condiff.models import sr
from condiff.training.recipe import TrainConfig


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A saved SR model (untrained: the bundled UNet widened), a good 8x8 image and x_T file, and bad input files."""
    d = tmp_path_factory.mktemp("sr")
    sr.build_sr_model(sr.sr_recipe_from_dict({"name": "s", "family": "sr"})).save(d / "run" / "model")
    b = shapes.sample_batch(1, torch.Generator().manual_seed(0))
    write_image(sr.degrade(b.images)[0], d / "low.png")
    sr.save_start(d / "xT.safetensors", torch.zeros(3, 32, 32), 2, "ddim", "bicubic")
    save_file({"x_T": torch.zeros(3, 8, 8)}, str(d / "small.safetensors"), metadata={"format": sr.XT_FORMAT})
    torch.save({"x_T": torch.zeros(3, 32, 32)}, d / "pickle.safetensors")
    (d / "text.safetensors").write_text("not safetensors")
    torch.save({"x": torch.zeros(2)}, d / "weights.pt")
    (d / "pickle.png").write_bytes((d / "weights.pt").read_bytes())
    (d / "text.png").write_text("not an image")
    (d / "folder.png").mkdir()
    (d / "pickled-model").mkdir()
    (d / "pickled-model" / "model.bin").write_bytes(b"\x80\x04")
    (d / "empty-run").mkdir()
    (d / "out").mkdir()
    return d


def refused(argv, *needles, outs=()):
    with mock.patch("condiff.cli.upscale.load", guarded):
        line = expect_cli_error(argv, *needles)
    for out in outs:
        assert not Path(out).exists(), out
        assert no_stray_temp_files(Path(out).parent)
    return line


def argv_of(command, opts):
    argv = ["sr", command]
    for k, v in opts.items():
        if v is not None:
            argv += [k, str(v)]
    return argv


def search(files, **over):
    opts = {"--model": files / "run", "--out": files / "out" / "xT.safetensors", "--candidates": 2, "--n-val": 2}
    opts.update(over)
    return argv_of("search", opts)


def apply(files, **over):
    opts = {
        "--model": files / "run",
        "--image": files / "low.png",
        "--xT": files / "xT.safetensors",
        "--out": files / "out" / "hi.png",
    }
    opts.update(over)
    return argv_of("apply", opts)


SEARCH_BAD = [
    ({"--candidates": "0"}, ("--candidates", "0")),
    ({"--candidates": "4097"}, ("--candidates", "4097")),
    ({"--candidates": "x"}, ("--candidates", "'x'")),
    ({"--n-val": "0"}, ("--n-val", "0")),
    ({"--n-val": "5000"}, ("--n-val", "5000")),
    ({"--steps": "0"}, ("--steps must be an integer in [1, 1000], got 0",)),
    ({"--solver": "euler"}, ("--solver", "'euler'", "accepted: ddim, dpmpp2m")),
    ({"--seed": "-1"}, ("--seed", "-1")),
    ({"--threads": "0"}, ("--threads", "got 0")),
    ({"--out": "xT.pt"}, ("--out must end in .safetensors", "xT.pt")),
    ({"--model": "nowhere"}, ("--model", "'nowhere'", "does not exist")),
    ({"--model": "{d}/low.png"}, ("--model", "is not a folder")),
    ({"--model": "{d}/empty-run"}, ("--model", "holds no SR model", "condiff train sr-shapes")),
    ({"--model": "{d}/pickled-model"}, ("--model", "model.bin")),
]


@pytest.mark.parametrize("over,needles", SEARCH_BAD)
def test_search_refuses_every_bad_option_and_input(files, over, needles):
    over = {k: v.format(d=files) for k, v in over.items()}
    out = files / "out" / "xT.safetensors"
    refused(search(files, **over), *needles, outs=(out, out.with_suffix(".json")))


APPLY_BAD = [
    ({"--image": "{d}/missing.png"}, ("--image", "missing.png")),
    ({"--image": "{d}/text.png"}, ("--image", "text.png")),
    ({"--image": "{d}/folder.png"}, ("--image", "folder.png")),
    ({"--image": "{d}/pickle.png"}, ("--image", "pickle")),
    ({"--xT": "{d}/missing.safetensors"}, ("--xT", "missing.safetensors")),
    ({"--xT": "{d}/small.safetensors"}, ("--xT", "small.safetensors", "condiff-sr-xT")),
    ({"--xT": "{d}/text.safetensors"}, ("--xT", "text.safetensors")),
    ({"--xT": "{d}/pickle.safetensors"}, ("--xT", "pickle")),
    ({"--out": "{d}/out/hi.jpg"}, ("--out must end in .png",)),
    ({"--out": "{d}/low.png"}, ("--out", "would overwrite --image")),
    ({"--json": "{d}/out/hi.png"}, ("--json must end in .json",)),
    ({"--seed": "-3"}, ("--seed", "-3")),
    ({"--model": "{d}/empty-run"}, ("--model", "holds no SR model")),
    ({"--model": ""}, ("--model", "holds no SR model")),
]


@pytest.mark.parametrize("over,needles", APPLY_BAD)
def test_apply_refuses_every_bad_option_and_input(files, over, needles):
    over = {k: v.format(d=files) for k, v in over.items()}
    refused(apply(files, **over), *needles, outs=(files / "out" / "hi.png",))


@settings(max_examples=10)
@given(solver=st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=12))
def test_search_refuses_any_other_solver(files, solver):
    assume(solver not in sr.SOLVERS and "\x00" not in solver and not solver.startswith("-"))
    refused(search(files, **{"--solver": solver}), "--solver", "accepted: ddim, dpmpp2m")


@settings(max_examples=10)
@given(k=st.one_of(st.integers(max_value=0), st.integers(min_value=4097)), seed=st.integers(max_value=-1))
def test_search_refuses_counts_and_seeds_out_of_range(files, k, seed):
    refused(search(files, **{"--candidates": str(k)}), "--candidates", str(k))
    refused(search(files, **{"--seed": str(seed)}), "--seed", str(seed))


# recipes --------------------------------------------------------------------------------------------------------
BASE = RECIPES_DIR / "sr-shapes.toml"
TABLES = {"model": sr.SRNetConfig, "train": TrainConfig}
FIELDS = [
    (t, f.name, f.default)
    for t, cls in TABLES.items()
    for f in dataclasses.fields(cls)
    if f.default is not dataclasses.MISSING
]


def _check(data: dict, workdir: Path, *needles: str, via_cli: bool = False):
    expect_bad_recipe(data, workdir, *needles, trainers=("condiff.models.sr.make_sr_trainer",), via_cli=via_cli)


@settings(max_examples=30)
@given(field=st.sampled_from(FIELDS), data=st.data(), via_cli=st.booleans())
def test_recipe_wrong_types(workdir, field, data, via_cli):
    table, key, default = field
    value = data.draw(wrong_type(default))
    r = tomllib.loads(BASE.read_text())
    _check(r, workdir, wrong_type_case(r, table, key, default, value), via_cli=via_cli)


@settings(max_examples=20)
@given(key=st.from_regex(r"[a-z][a-z0-9_]{0,11}", fullmatch=True), where=st.sampled_from(["", "model", "train"]))
def test_recipe_unknown_keys(workdir, key, where):
    r = tomllib.loads(BASE.read_text())
    if where:
        assume(key not in TABLES[where].__dataclass_fields__)
        r.setdefault(where, {})[key] = 1
        _check(r, workdir, f"{where}.{key}", via_cli=True)
    else:
        assume(key not in r and key not in TABLES and key not in ("name", "family"))
        r[key] = 1
        _check(r, workdir, repr(key), "accepted", via_cli=True)


@settings(max_examples=20)
@given(value=st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=10))
def test_recipe_unknown_upsamplers(workdir, value):
    assume(value not in sr.UPSAMPLERS and "\x00" not in value and value.strip())
    r = tomllib.loads(BASE.read_text())
    r["model"]["upsample"] = value
    _check(r, workdir, repr(value), "accepted: bicubic, nearest", via_cli=True)
