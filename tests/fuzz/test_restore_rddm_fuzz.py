"""Fuzzing of `condiff restore --method rddm|ddpm` and of the rddm family's recipes (rddm-shapes,
ddpm-restore-shapes). Every bad option, recipe key or input file is one ``error:`` line naming it (and what is
accepted), exit code 2, before any weights are read or any network is built, and nothing is written: no output, no
comparison image, no JSON, no stray temporary file."""

from __future__ import annotations

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
from condiff.data import shapes
from condiff.data.images import write_image
from condiff.models import rddm_restore as rr
from condiff.training.recipe import TrainConfig


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Saved untrained models of both kinds (the bundled UNet widened), a good image, and bad input files."""
    d = tmp_path_factory.mktemp("restore-rddm")
    for kind in rr.KINDS:
        r = rr.rddm_recipe_from_dict({"name": kind, "family": "rddm", "model": {"kind": kind}})
        rr.build_restore_model(r).save(d / kind / "model")
    b = shapes.sample_batch(1, torch.Generator().manual_seed(0))
    write_image(b.images[0], d / "in.png")
    write_image(b.masks.float() * 2 - 1, d / "mask.png")
    torch.save({"x": torch.zeros(2)}, d / "weights.pt")
    (d / "pickle.png").write_bytes((d / "weights.pt").read_bytes())
    (d / "text.png").write_text("not an image")
    (d / "empty.png").write_bytes(b"")
    (d / "empty-run").mkdir()
    # an rddm table over pickled weights
    shutil.copytree(d / "rddm" / "model", d / "pickled")
    for f in (d / "pickled" / "unet").glob("*.safetensors"):
        f.unlink()
    (d / "pickled" / "unet" / "diffusion_pytorch_model.bin").write_bytes((d / "weights.pt").read_bytes())
    return d


def argv_of(files, out, **over):
    opts = {
        "--method": "rddm",
        "--task": "denoise",
        "--image": files / "in.png",
        "--model": files / "rddm",
        "--out": out,
    }
    opts.update(over)
    argv = ["restore"]
    for k, v in opts.items():
        if v is not None:
            argv += [k, str(v)]
    return argv


def refused(files, *needles, **over):
    out_dir = Path(tempfile.mkdtemp(dir=files))
    out = over.pop("--out", out_dir / "r.png")
    over = {k: (str(v).replace("IN", str(files)) if isinstance(v, str) else v) for k, v in over.items()}
    with mock.patch("condiff.models.rddm_restore.load_restore_model", guarded):
        line = expect_cli_error(argv_of(files, out, **over), *needles)
    assert not any(out_dir.iterdir()), list(out_dir.iterdir())
    assert no_stray_temp_files(out_dir)
    return line


BAD = [
    ({"--method": "rdm"}, ("unknown method 'rdm'", "accepted: steered, rddm, ddpm")),
    ({"--task": "sr"}, ("unknown task 'sr'", "accepted: denoise, deblur, inpaint")),
    ({"--task": "colorize", "--method": "ddpm", "--model": "IN/ddpm"}, ("'colorize'", "denoise, deblur, inpaint")),
    ({"--method": "steered", "--task": "deblur"}, ("unknown task 'deblur'", "accepted: inpaint, sr, colorize")),
    ({"--method": "ddpm"}, ("is a model of kind 'rddm'", "--method ddpm needs kind 'ddpm'")),
    ({"--model": "IN/ddpm"}, ("is a model of kind 'ddpm'", "--method rddm needs kind 'rddm'")),
    ({"--model": "shapes"}, ("--method rddm needs --model", "'shapes' is not one")),
    ({"--model": "IN/empty-run"}, ("--method rddm needs --model", "empty-run")),
    ({"--model": "IN/missing"}, ("--method rddm needs --model", "missing")),
    ({"--steps": "0"}, ("--steps", "got 0")),
    ({"--steps": "1001"}, ("--steps", "1001")),
    ({"--steps": "x"}, ("--steps", "'x'")),
    ({"--seed": "-1"}, ("--seed", "-1")),
    ({"--recurrence": "2"}, ("--recurrence is for --method steered", "got 2")),
    ({"--solver": "ddim"}, ("--solver is for --method steered", "ddim")),
    ({"--prompt": "red"}, ("--prompt is for --method steered", "'red'")),
    ({"--mask": "IN/mask.png"}, ("--mask is for --task inpaint", "--task denoise")),
    ({"--mask": "IN/text.png", "--task": "inpaint"}, ("--mask", "text.png")),
    ({"--image": "IN/text.png"}, ("text.png",)),
    ({"--image": "IN/empty.png"}, ("empty.png",)),
    ({"--image": "IN/pickle.png"}, ("pickle.png",)),
    ({"--image": "IN/missing.png"}, ("missing.png",)),
    ({"--image": "IN/weights.pt"}, ("weights.pt",)),
    ({"--out": "OUT.jpg"}, ("--out", ".png")),
    ({"--threads": "0"}, ("--threads", "got 0")),
]


@pytest.mark.parametrize("over,needles", BAD, ids=[str(i) for i in range(len(BAD))])
def test_restore_rddm_refuses_every_bad_option_and_input(files, over, needles):
    if over.get("--out") == "OUT.jpg":
        over = {**over, "--out": Path(tempfile.mkdtemp(dir=files)) / "r.jpg"}
    refused(files, *needles, **over)


def test_out_overwriting_the_image_is_refused(files):
    d = Path(tempfile.mkdtemp(dir=files))
    shutil.copy(files / "in.png", d / "in.png")
    before = (d / "in.png").read_bytes()
    with mock.patch("condiff.models.rddm_restore.load_restore_model", guarded):
        expect_cli_error(argv_of(files, d / "in.png", **{"--image": d / "in.png"}), "would overwrite --image")
    assert (d / "in.png").read_bytes() == before and sorted(p.name for p in d.iterdir()) == ["in.png"]


def test_pickled_weights_are_refused_and_nothing_is_written(files):
    out_dir = Path(tempfile.mkdtemp(dir=files))
    code, out, err = run_cli(argv_of(files, out_dir / "r.png", **{"--model": files / "pickled"}))
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: ") and "pickle" in err, err
    assert not any(out_dir.iterdir())


@settings(max_examples=25)
@given(method=st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=12))
def test_restore_refuses_any_other_method(files, method):
    assume(method not in ("steered", "rddm", "ddpm") and "\x00" not in method and not method.startswith("-"))
    refused(files, "method", "accepted: steered, rddm, ddpm", **{"--method": method})


@settings(max_examples=25)
@given(
    task=st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=12), kind=st.sampled_from(rr.KINDS)
)
def test_restore_refuses_any_other_task(files, task, kind):
    assume(task not in rr.DEGRADATIONS and "\x00" not in task and not task.startswith("-"))
    refused(
        files,
        "task",
        "accepted: denoise, deblur, inpaint",
        **{"--task": task, "--method": kind, "--model": f"IN/{kind}"},
    )


@settings(max_examples=20)
@given(steps=st.one_of(st.integers(max_value=0), st.integers(min_value=1001)), seed=st.integers(max_value=-1))
def test_restore_refuses_steps_and_seeds_out_of_range(files, steps, seed):
    refused(files, "--steps", **{"--steps": steps})
    refused(files, "--seed", **{"--seed": seed})


def test_a_good_command_runs_and_writes_its_outputs(files):
    out = Path(tempfile.mkdtemp(dir=files)) / "r.png"
    code, stdout, err = run_cli(
        argv_of(files, out, **{"--task": "inpaint", "--mask": files / "mask.png", "--steps": 2})
    )
    assert code == 0, err
    rec = json.loads(out.with_suffix(".json").read_text())
    assert rec["nfe"] == 2 and rec["method"] == "rddm" and out.is_file() and out.with_name("r_compare.png").is_file()


# recipes --------------------------------------------------------------------------------------------------------
KINDS = {
    "rddm-shapes": (RECIPES_DIR / "rddm-shapes.toml", {"model": rr.RDDMNetConfig, "train": TrainConfig}),
    "ddpm-restore-shapes": (
        RECIPES_DIR / "ddpm-restore-shapes.toml",
        {"model": rr.RDDMNetConfig, "train": TrainConfig},
    ),
}
FIELDS = [
    (kind, t, f.name, f.default)
    for kind, (_, tables) in KINDS.items()
    for t, cls in tables.items()
    for f in dataclasses.fields(cls)
    if f.default is not dataclasses.MISSING
]


def _base(kind: str) -> dict:
    return tomllib.loads(KINDS[kind][0].read_text())


def _check(data: dict, workdir: Path, *needles: str, via_cli: bool = False):
    expect_bad_recipe(
        data, workdir, *needles, trainers=("condiff.models.rddm_restore.make_rddm_trainer",), via_cli=via_cli
    )


@settings(max_examples=40)
@given(field=st.sampled_from(FIELDS), data=st.data(), via_cli=st.booleans())
def test_recipe_wrong_types(workdir, field, data, via_cli):
    kind, table, key, default = field
    value = data.draw(wrong_type(default))
    r = _base(kind)
    _check(r, workdir, wrong_type_case(r, table, key, default, value), via_cli=via_cli)


@settings(max_examples=25)
@given(kind=st.sampled_from(list(KINDS)), key=st.from_regex(r"[a-z][a-z0-9_]{0,11}", fullmatch=True), data=st.data())
def test_recipe_unknown_keys(workdir, kind, key, data):
    tables = KINDS[kind][1]
    where = data.draw(st.sampled_from(["", *tables]))
    r = _base(kind)
    needle = unknown_key_case(r, tables, where, key)
    _check(r, workdir, needle, *(() if where else ("accepted",)), via_cli=True)


@settings(max_examples=25)
@given(value=st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=10))
def test_recipe_unknown_kinds(workdir, value):
    assume(value not in rr.KINDS and "\x00" not in value and value.strip())
    r = _base("rddm-shapes")
    r["model"]["kind"] = value
    _check(r, workdir, repr(value), "accepted: rddm, ddpm", via_cli=True)


@settings(max_examples=20)
@given(value=st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=10))
def test_recipe_unknown_predictions(workdir, value):
    assume(value not in rr.DDPM_PREDICTIONS and "\x00" not in value and value.strip())
    r = _base("ddpm-restore-shapes")
    r["model"]["prediction"] = value
    _check(r, workdir, "model.prediction", repr(value), "accepted: v, eps", via_cli=True)


@settings(max_examples=20)
@given(value=st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=14))
def test_recipe_unknown_objectives(workdir, value):
    assume(value not in rr.RDDM_OBJECTIVES and "\x00" not in value and value.strip())
    r = _base("rddm-shapes")
    r["model"]["objective"] = value
    _check(r, workdir, "model.objective", repr(value), "accepted: pred_res_noise, pred_res", via_cli=True)


def test_ddpm_recipe_refuses_an_rddm_objective(workdir):
    r = _base("ddpm-restore-shapes")
    r["model"]["objective"] = "pred_res"
    _check(r, workdir, "model.objective is RDDM's", "'pred_res'", via_cli=True)


@settings(max_examples=25)
@given(value=st.floats(allow_nan=True, allow_infinity=True))
def test_recipe_out_of_range_sum_scale(workdir, value):
    assume(not 0 < value <= 1)
    r = _base("rddm-shapes")
    r["model"]["sum_scale"] = value
    _check(r, workdir, "model.sum_scale", via_cli=True)


@settings(max_examples=15)
@given(key=st.sampled_from(["sum_scale", "loss"]), data=st.data())
def test_ddpm_recipe_refuses_rddm_only_values(workdir, key, data):
    value = data.draw(st.floats(0.02, 1.0) if key == "sum_scale" else st.just("l2"))
    r = _base("ddpm-restore-shapes")
    r["model"][key] = value
    _check(r, workdir, "kind 'ddpm'", f"model.{key}", via_cli=True)
