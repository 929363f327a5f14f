"""`condiff match` and the diffmatch recipe under bad input: every bad option, input file (a pickle included, which
is refused), model folder and recipe key gets one ``error:`` line naming it and what is accepted, exit code 2, and
nothing is written (no output, no stray temporary file). Option and image errors come before any model is read."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import tempfile
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
    run_cli,
    unknown_key_case,
    wrong_type,
    wrong_type_case,
)
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from condiff.cli.recipes import RECIPES_DIR
from condiff.data.images import write_image
from condiff.data.matching import WarpConfig, matching_batch
from condiff.models import diffmatch
from condiff.training.recipe import TrainConfig

RECIPE = RECIPES_DIR / "diffmatch.toml"
TABLES = {**diffmatch.TABLES, "train": TrainConfig}
FIELDS = [(t, f.name, f.default) for t, cls in TABLES.items() for f in dataclasses.fields(cls)]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny model folder, two valid 32x32 images, and bad inputs: a pickle, a text file, a 16x16 image."""
    d = tmp_path_factory.mktemp("match")
    r = diffmatch.diffmatch_recipe_from_dict(
        {
            "name": "tiny",
            "family": "diffmatch",
            "model": {"channels": 8, "time_dim": 8, "feature_radius": 1, "local_radius": 1},
            "sampling": {"steps": 1, "hypotheses": 1},
        }
    )
    torch.manual_seed(0)
    diffmatch.build_diffmatch_model(r).save(d / "model")
    b = matching_batch(1, torch.Generator().manual_seed(0), WarpConfig())
    write_image(b.source[0], d / "a.png")
    write_image(b.target[0], d / "b.png")
    write_image(b.source[0, :, :16, :16], d / "small.png")
    torch.save({"x": torch.zeros(2)}, d / "pickled.png")  # a pickle under an image's name
    torch.save({"x": torch.zeros(2)}, d / "weights.pt")
    (d / "notes.png").write_text("not an image")
    (d / "empty").mkdir()
    (d / "file").write_text("x")
    return d


def _argv(d: Path, **over) -> list[str]:
    opts = {"--model": d / "model", "--source": d / "a.png", "--target": d / "b.png", "--out": d / "out" / "flow.png"}
    opts.update(over)
    argv = ["match"]
    for k, v in opts.items():
        if v is not None:
            argv += [k, str(v)]
    return argv


def _nothing_written(d: Path):
    out = d / "out"
    assert not (out / "flow.png").exists() and not (out / "flow.json").exists()
    assert no_stray_temp_files(d, out, d / "model")


OPTION_CASES = [
    ({"--steps": "0"}, ("--steps must be an integer in [1, 1000], got 0",)),
    ({"--steps": "1001"}, ("--steps", "1001")),
    ({"--steps": "x"}, ("--steps", "'x'")),
    ({"--hypotheses": "0"}, ("--hypotheses must be an integer in [1, 256], got 0",)),
    ({"--hypotheses": "257"}, ("--hypotheses", "257")),
    ({"--seed": "-1"}, ("--seed", "-1")),
    ({"--threads": "0"}, ("--threads", "0")),
    ({"--out": "OUT/flow.jpg"}, ("--out must end in .png", "flow.jpg")),
    ({"--out": "FILE/flow.png"}, ("--out", "is not a directory")),
    ({"--out": "EMPTY"}, ("--out must end in .png",)),
    ({"--json": "OUT/flow.txt"}, ("--json must end in .json", "flow.txt")),
    ({"--json": "FILE/x.json"}, ("--json", "is not a directory")),
    ({"--out": "A"}, ("would overwrite --source",)),
    ({"--source": "MISSING.png"}, ("--source", "not found", "accepted")),
    ({"--source": "EMPTY"}, ("--source", "directory", "accepted")),
    ({"--source": "PICKLED"}, ("--source", "pickled.png", "never pickles")),
    ({"--target": "WEIGHTS"}, ("--target", "weights.pt", "never pickles")),
    ({"--source": "NOTES"}, ("--source", "notes.png", "accepted")),
    ({"--target": "SMALL"}, ("--target", "16x16", "accepted: 32x32")),
    ({"--model": "PICKLEDIR"}, ("--model", "weights.pt", "never pickles")),
    ({"--bogus": "1"}, ("--bogus",)),
    ({"--out": None}, ("--out",)),
]


def _resolve(d: Path, over: dict) -> dict:
    names = {
        "OUT": str(d / "out"),
        "FILE": str(d / "file"),
        "EMPTY": str(d / "empty"),
        "A": str(d / "a.png"),
        "MISSING.png": str(d / "missing.png"),
        "PICKLED": str(d / "pickled.png"),
        "WEIGHTS": str(d / "weights.pt"),
        "NOTES": str(d / "notes.png"),
        "SMALL": str(d / "small.png"),
        "PICKLEDIR": str(d),  # the fixture folder holds weights.pt
    }
    out = {}
    for k, v in over.items():
        if isinstance(v, str):
            for name, path in names.items():
                if v == name or v.startswith(name + "/"):
                    v = path + v[len(name) :]
                    break
        out[k] = v
    return out


@pytest.mark.parametrize(
    "over,needles", OPTION_CASES, ids=[next(iter(o)) + "=" + str(o[next(iter(o))]) for o, _ in OPTION_CASES]
)
def test_bad_options_and_inputs_fail_before_any_model_is_read(files, over, needles):
    with mock.patch.object(diffmatch, "load_diffmatch_model", guarded):
        expect_cli_error(_argv(files, **_resolve(files, over)), *needles)
    _nothing_written(files)
    assert (files / "a.png").stat().st_size > 100  # --out naming --source did not overwrite it


@contextlib.contextmanager
def _model_copy(files: Path, edit):
    d = Path(tempfile.mkdtemp(dir=files))
    shutil.copytree(files / "model", d / "model")
    edit(d / "model")
    try:
        yield d / "model"
    finally:
        shutil.rmtree(d)


def _json_edit(fn):
    def edit(folder: Path):
        info = json.loads((folder / "condiff.json").read_text())
        fn(info)
        (folder / "condiff.json").write_text(json.dumps(info))

    return edit


MODEL_CASES = {
    "missing": (lambda m: shutil.rmtree(m), ("--model", "does not exist", "accepted")),
    "not a model": (lambda m: (m / "condiff.json").unlink(), ("--model", "not a diffmatch model folder")),
    "bad json": (lambda m: (m / "condiff.json").write_text("{"), ("--model", "not a diffmatch model folder")),
    "pickle inside": (lambda m: torch.save({}, m / "x.bin"), ("--model", "x.bin", "never pickles")),
    "pickle as weights": (lambda m: torch.save({}, m / "net.safetensors"), ("--model", "net.safetensors", "pickle")),
    "garbage weights": (
        lambda m: (m / "net.safetensors").write_bytes(b"\x00" * 64),
        ("net.safetensors", "not a valid safetensors file"),
    ),
    "missing weights": (lambda m: (m / "net.safetensors").unlink(), ("net.safetensors", "not found")),
    "bad table": (
        _json_edit(lambda i: i["diffmatch"]["model"].update(channels="8")),
        ("--model", "condiff.json", "model.channels must be int"),
    ),
    "missing table": (
        _json_edit(lambda i: i["diffmatch"].pop("sampling")),
        ("--model", "condiff.json", "needs the tables"),
    ),
    "other solver": (
        _json_edit(lambda i: i["diffmatch"]["sampling"].update(solver="dpm-v3")),
        ("--model", "'dpm-v3'", "accepted"),
    ),
    "weights of another net": (
        _json_edit(lambda i: i["diffmatch"]["model"].update(local_radius=2)),
        ("--model", "net.safetensors does not fit"),
    ),
}


@pytest.mark.parametrize("case", list(MODEL_CASES))
def test_bad_model_folders_are_one_line_errors(files, case):
    edit, needles = MODEL_CASES[case]
    with _model_copy(files, edit) as model:
        expect_cli_error(_argv(files, **{"--model": model}), *needles)
    _nothing_written(files)


def test_a_good_run_writes_the_flow_and_its_json(files):
    out = files / "good" / "flow.png"
    code, stdout, err = run_cli(_argv(files, **{"--out": out, "--json": out.with_suffix(".json"), "--steps": "2"}))
    assert code == 0, err
    rec = json.loads(out.with_suffix(".json").read_text())
    assert out.is_file() and rec["steps"] == 2 and len(rec["flow"]) == 2 and len(rec["flow"][0]) == 32
    assert rec["reproduce"].startswith("condiff match --model ")
    shutil.rmtree(out.parent)


# ---- the recipe -----------------------------------------------------------------------------------------------
def _check(data: dict, workdir: Path, *needles: str, via_cli: bool = False):
    expect_bad_recipe(
        data, workdir, *needles, trainers=("condiff.models.diffmatch.make_diffmatch_trainer",), via_cli=via_cli
    )


def _base() -> dict:
    return tomllib.loads(RECIPE.read_text())


@settings(max_examples=40)
@given(field=st.sampled_from(FIELDS), data=st.data(), via_cli=st.booleans())
def test_wrong_types(workdir, field, data, via_cli):
    table, key, default = field
    value = data.draw(wrong_type(default))
    r = _base()
    _check(r, workdir, wrong_type_case(r, table, key, default, value), via_cli=via_cli)


@settings(max_examples=20)
@given(key=st.from_regex(r"[a-z][a-z0-9_]{0,11}", fullmatch=True), data=st.data())
def test_unknown_keys(workdir, key, data):
    where = data.draw(st.sampled_from(["", *TABLES]))
    r = _base()
    _check(r, workdir, unknown_key_case(r, TABLES, where, key), via_cli=True)


NAMES = [
    (("diffusion", "schedule"), tuple(diffmatch.SCHEDULES)),
    (("sampling", "solver"), diffmatch.SAMPLING_SOLVERS),
]


@settings(max_examples=20)
@given(
    which=st.sampled_from(NAMES), value=st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=10)
)
def test_unknown_names(workdir, which, value):
    keys, accepted = which
    assume(value not in accepted and "\x00" not in value and value.strip())
    r = _base()
    r[keys[0]][keys[1]] = value
    _check(r, workdir, repr(value), via_cli=True)


@pytest.mark.parametrize(
    "table,key,value,needle",
    [
        ("model", "channels", 0, "model.channels"),
        ("model", "feature_radius", 9, "model.feature_radius"),
        ("model", "local_radius", -1, "model.local_radius"),
        ("model", "temperature", float("nan"), "model.temperature"),
        ("sampling", "steps", 0, "sampling.steps"),
        ("sampling", "t_start", -0.5, "sampling.t_start"),
        ("data", "max_shift", 100.0, "data.max_shift"),
        ("data", "max_scale", 3.0, "data.max_scale"),
        ("train", "batch_size", 0, "train.batch_size"),
    ],
)
def test_out_of_range_values(workdir, table, key, value, needle):
    r = _base()
    r[table][key] = value
    _check(r, workdir, needle, via_cli=True)
