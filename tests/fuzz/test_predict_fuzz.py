"""Fuzzing of `condiff predict` and `condiff unicon` (Lotus, the eps-model baseline, UniCon) and of their recipes
(families dense and unicon). Every bad option, recipe key or input file is one ``error:`` line naming it (and what
is accepted), exit code 2, before any weights are read or any network is built, and nothing is written: no output,
no JSON, no stray temporary file."""

from __future__ import annotations

import dataclasses
import json
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
    unknown_key_case,
    wrong_type,
    wrong_type_case,
)
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from condiff.cli.recipes import RECIPES_DIR
from condiff.data import shapes
from condiff.data.images import write_image
from condiff.models import dense, unicon
from condiff.training.recipe import TrainConfig


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Saved tiny models (the bundled UNet widened, untrained), a good image and mask, and bad input files."""
    d = tmp_path_factory.mktemp("predict")
    dense.build_dense_model(dense.dense_recipe_from_dict({"name": "l", "family": "dense"})).save(d / "lotus" / "model")
    r = dense.dense_recipe_from_dict({"name": "e", "family": "dense", "model": {"kind": "eps"}})
    dense.build_dense_model(r).save(d / "eps")
    unicon.build_unicon_model(unicon.unicon_recipe_from_dict({"name": "u", "family": "unicon"})).save(d / "unicon")
    b = shapes.sample_batch(1, torch.Generator().manual_seed(0))
    write_image(b.images[0], d / "in.png")
    write_image((b.masks.float() * 2 - 1), d / "mask.png")
    torch.save({"x": torch.zeros(2)}, d / "weights.pt")
    (d / "pickle.png").write_bytes((d / "weights.pt").read_bytes())  # a torch.save zip named .png
    (d / "proto.png").write_bytes(b"\x80\x04\x95" + bytes(20))  # a pickle header named .png
    (d / "empty.png").write_bytes(b"")
    (d / "text.png").write_text("not an image")
    (d / "cut.png").write_bytes((d / "in.png").read_bytes()[:40])
    (d / "folder.png").mkdir()
    (d / "pickled-model").mkdir()
    (d / "pickled-model" / "model.bin").write_bytes(b"\x80\x04")
    (d / "empty-run").mkdir()
    return d


def run_refused(argv, *needles, outs=()):
    """The CLI contract, with the model loader guarded: refused before any weights are read; nothing written."""
    with mock.patch("condiff.cli.predict.load_task_model", guarded):
        line = expect_cli_error(argv, *needles)
    for out in outs:
        assert not Path(out).exists(), out
        assert no_stray_temp_files(Path(out).parent)
    return line


def predict(files, **over):
    opts = {"--task": "mask", "--image": files / "in.png", "--model": files / "lotus", "--out": files / "out.png"}
    opts.update(over)
    argv = ["predict"]
    for k, v in opts.items():
        if v is not None:
            argv += [k, str(v)]
    return argv


PREDICT_BAD = [
    ({"--task": "normals"}, ("--task", "'normals'", "accepted: depth, mask")),
    ({"--task": ""}, ("--task", "accepted: depth, mask")),
    ({"--steps": "0"}, ("--steps must be an integer in [1, 1000], got 0",)),
    ({"--steps": "1001"}, ("--steps", "1001")),
    ({"--steps": "x"}, ("--steps", "'x'")),
    ({"--seed": "-1"}, ("--seed", "-1")),
    ({"--threads": "0"}, ("--threads", "got 0")),
    ({"--out": "OUT/map.jpg"}, ("--out must end in .png",)),
    ({"--json": "OUT/map.txt"}, ("--json must end in .json",)),
    ({"--out": "IN/in.png"}, ("--out", "would overwrite --image")),
    ({"--model": "IN/missing"}, ("--model", "does not exist", "accepted: a model folder")),
    ({"--model": "IN/in.png"}, ("--model", "is not a folder")),
    ({"--model": "IN/empty-run"}, ("--model", "holds no dense or unicon model", "condiff train lotus")),
    ({"--model": "IN/pickled-model"}, ("--model", "model.bin", "pickle")),
    ({"--model": "IN/unicon", "--task": "depth"}, ("a unicon model predicts --task mask", "depth")),
    ({"--steps": "3"}, ("a Lotus model predicts in one network evaluation; --steps must be 1, got 3",)),
    ({"--threshold": "soft", "--model": "IN/eps"}, ("--threshold", "'soft'", "accepted: dynamic, clip, none")),
    ({"--threshold": "clip"}, ("--threshold is for the eps-model", "lotus")),
    ({"--threshold": "none", "--model": "IN/unicon"}, ("--threshold is for the eps-model", "unicon")),
    ({"--image": "IN/missing.png"}, ("--image", "not found", "accepted: PNG")),
    ({"--image": "IN/weights.pt"}, ("--image", "weights.pt", "pickle")),
    ({"--image": "IN/pickle.png"}, ("--image", "pickle.png", "zip archive (torch.save")),
    ({"--image": "IN/proto.png"}, ("--image", "proto.png", "pickle data")),
    ({"--image": "IN/empty.png"}, ("--image", "empty", "accepted: PNG")),
    ({"--image": "IN/text.png"}, ("--image", "text.png", "accepted: PNG")),
    ({"--image": "IN/cut.png"}, ("--image", "cut.png", "accepted: PNG")),
    ({"--image": "IN/folder.png"}, ("--image", "directory", "accepted: PNG")),
    ({"--bogus": "1"}, ("--bogus",)),
]


@pytest.mark.parametrize("over,needles", PREDICT_BAD, ids=[str(i) for i in range(len(PREDICT_BAD))])
def test_predict_refuses_every_bad_option_and_input(files, over, needles):
    out_dir = Path(tempfile.mkdtemp(dir=files))
    sub = {k: str(v).replace("IN", str(files)).replace("OUT", str(out_dir)) for k, v in over.items()}
    argv = predict(files, **{"--out": out_dir / "map.png", "--json": out_dir / "map.json", **sub})
    run_refused(argv, *needles, outs=(out_dir / "map.png", out_dir / "map.json"))


@settings(max_examples=25)
@given(task=st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=12))
def test_predict_refuses_any_other_task(files, task):
    assume(task not in ("depth", "mask") and "\x00" not in task and not task.startswith("-"))
    out = Path(tempfile.mkdtemp(dir=files)) / "m.png"
    run_refused(predict(files, **{"--task": task, "--out": out}), "--task", "accepted: depth, mask", outs=(out,))


@settings(max_examples=25)
@given(steps=st.one_of(st.integers(max_value=0), st.integers(min_value=1001)), seed=st.integers(max_value=-1))
def test_predict_refuses_steps_and_seeds_out_of_range(files, steps, seed):
    out = Path(tempfile.mkdtemp(dir=files)) / "m.png"
    run_refused(predict(files, **{"--steps": steps, "--model": files / "eps", "--out": out}), "--steps", outs=(out,))
    run_refused(predict(files, **{"--seed": seed, "--model": files / "eps", "--out": out}), "--seed", outs=(out,))


def unicon_argv(files, out, *extra):
    return ["unicon", "--model", str(files / "unicon"), "--out", str(out), *map(str, extra)]


UNICON_BAD = [
    ((), ("needs exactly one of --map FILE", "--joint", "condiff predict --task mask")),
    (("--joint", "--map", "IN/mask.png"), ("needs exactly one of --map FILE",)),
    (("--joint", "--n", "0"), ("--n", "got 0")),
    (("--joint", "--n", "1025"), ("--n", "1025")),
    (("--joint", "--steps", "0"), ("--steps", "got 0")),
    (("--joint", "--guidance", "2"), ("--guidance is for --map", "--joint")),
    (("--map", "IN/mask.png", "--guidance", "nan"), ("--guidance", "nan")),
    (("--map", "IN/mask.png", "--guidance", "1e5"), ("--guidance", "100000")),
    (("--map", "IN/weights.pt"), ("--map", "weights.pt", "pickle")),
    (("--map", "IN/text.png"), ("--map", "text.png", "accepted: PNG")),
    (("--map", "IN/missing.png"), ("--map", "not found")),
    (("--joint", "--model", "IN/eps"), ("is a dense model; condiff unicon needs a unicon model",)),
    (("--joint", "--model", "IN/pickled-model"), ("--model", "pickle")),
    (("--joint", "--json", "OUT/x.txt"), ("--json must end in .json",)),
]


@pytest.mark.parametrize("extra,needles", UNICON_BAD, ids=[str(i) for i in range(len(UNICON_BAD))])
def test_unicon_refuses_every_bad_option_and_input(files, extra, needles):
    out_dir = Path(tempfile.mkdtemp(dir=files))
    extra = [str(e).replace("IN", str(files)).replace("OUT", str(out_dir)) for e in extra]
    argv = unicon_argv(files, out_dir / "u.png", *extra)
    if "--model" in extra:  # the later --model wins
        i = extra.index("--model")
        argv = ["unicon", "--out", str(out_dir / "u.png"), *extra[:i], *extra[i + 2 :], "--model", extra[i + 1]]
    run_refused(argv, *needles, outs=(out_dir / "u.png",))


def test_a_good_command_runs_and_writes_its_outputs(files):
    """The contract's other side: the same files with good options run (exit 0) and write what they name."""
    from fuzzkit import run_cli

    out = Path(tempfile.mkdtemp(dir=files))
    code, stdout, err = run_cli(predict(files, **{"--out": out / "m.png", "--json": out / "m.json"}))
    assert code == 0, err
    record = json.loads((out / "m.json").read_text())
    assert record["nfe"] == 1 and record["kind"] == "lotus" and (out / "m.png").is_file()
    code, stdout, err = run_cli(unicon_argv(files, out / "u.png", "--map", files / "mask.png", "--steps", 2))
    assert code == 0 and (out / "u.png").is_file(), err


# recipes --------------------------------------------------------------------------------------------------------
KINDS = {
    "lotus": (RECIPES_DIR / "lotus.toml", {"model": dense.DenseNetConfig, "train": TrainConfig}),
    "dense-eps": (RECIPES_DIR / "dense-eps.toml", {"model": dense.DenseNetConfig, "train": TrainConfig}),
    "unicon": (RECIPES_DIR / "unicon.toml", {"model": unicon.UniConNetConfig, "train": TrainConfig}),
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
        data,
        workdir,
        *needles,
        trainers=("condiff.models.dense.make_dense_trainer", "condiff.models.unicon.make_unicon_trainer"),
        via_cli=via_cli,
    )


@settings(max_examples=60)
@given(field=st.sampled_from(FIELDS), data=st.data(), via_cli=st.booleans())
def test_recipe_wrong_types(workdir, field, data, via_cli):
    kind, table, key, default = field
    value = data.draw(wrong_type(default))
    r = _base(kind)
    _check(r, workdir, wrong_type_case(r, table, key, default, value), via_cli=via_cli)


@settings(max_examples=30)
@given(kind=st.sampled_from(list(KINDS)), key=st.from_regex(r"[a-z][a-z0-9_]{0,11}", fullmatch=True), data=st.data())
def test_recipe_unknown_keys(workdir, kind, key, data):
    tables = KINDS[kind][1]
    where = data.draw(st.sampled_from(["", *tables]))
    r = _base(kind)
    needle = unknown_key_case(r, tables, where, key)
    _check(r, workdir, needle, *(() if where else ("accepted",)), via_cli=True)


@settings(max_examples=30)
@given(
    which=st.sampled_from([("lotus", "kind"), ("dense-eps", "kind")]),
    value=st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=10),
)
def test_recipe_unknown_kinds(workdir, which, value):
    kind, key = which
    assume(value not in dense.KINDS and "\x00" not in value and value.strip())
    r = _base(kind)
    r["model"][key] = value
    r["model"]["reconstruction"] = False
    _check(r, workdir, repr(value), "accepted: lotus, eps", via_cli=True)


@settings(max_examples=30)
@given(kind=st.sampled_from(list(KINDS)), value=st.floats(allow_nan=True, allow_infinity=True))
def test_recipe_out_of_range_values(workdir, kind, value):
    r = _base(kind)
    if kind == "unicon":
        assume(not 0 <= value <= 0.5)
        r["model"]["p_clean"] = value
        _check(r, workdir, "model.p_clean", via_cli=True)
    else:
        assume(not 0 < value <= 10)
        r["train"]["lr"] = value
        _check(r, workdir, "train.lr", via_cli=True)
