"""Fuzzing of `condiff vae sample|interpolate` and of the diffusevae recipes. Every bad option, recipe key or model
folder is one ``error:`` line naming it (and what is accepted), exit code 2, before any weights are read or any
network is built, and nothing is written: no output, no JSON, no stray temporary file. Good calls on tiny models
write their PNG and JSON."""

from __future__ import annotations

import dataclasses
import json
import tempfile
import tomllib
from pathlib import Path
from unittest import mock

import pytest
from fuzzkit import (
    expect_bad_recipe,
    expect_cli_error,
    guarded,
    no_stray_temp_files,
    run_cli,
    to_toml,
    unknown_key_case,
    wrong_type,
    wrong_type_case,
)
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from condiff.cli.recipes import RECIPES_DIR
from condiff.models import diffusevae as dv
from condiff.training.recipe import TrainConfig


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny VAE (a run folder with model/), a DiffuseVAE on it (the bundled UNet widened, untrained), bad folders."""
    d = tmp_path_factory.mktemp("vae")
    r = dv.diffusevae_recipe_from_dict(
        {"name": "v", "family": "diffusevae", "model": {"kind": "vae", "latent_dim": 3, "width": 4}}
    )
    dv.build_diffusevae_model(r).save(d / "vae" / "model")
    r = dv.diffusevae_recipe_from_dict(
        {"name": "d", "family": "diffusevae", "model": {"kind": "ddpm", "vae": str(d / "vae")}}
    )
    dv.build_diffusevae_model(r).save(d / "ddpm")
    r = dv.diffusevae_recipe_from_dict(
        {"name": "g", "family": "diffusevae", "model": {"kind": "ddpm", "vae": str(d / "vae"), "cond_drop": 0.1}}
    )
    dv.build_diffusevae_model(r).save(d / "ddpm-guided")
    (d / "empty-run").mkdir()
    (d / "pickled-model").mkdir()
    (d / "pickled-model" / "model.bin").write_bytes(b"\x80\x04")
    (d / "a-file").write_text("x")
    (d / "odd-kind").mkdir()
    (d / "odd-kind" / "condiff.json").write_text(json.dumps({"diffusevae": {"kind": "gan"}}))
    return d


def run_refused(argv, *needles, outs=()):
    with mock.patch("condiff.models.diffusevae.load_diffusevae_model", guarded):
        line = expect_cli_error(argv, *needles)
    for out in outs:
        assert not Path(out).exists(), out
        assert no_stray_temp_files(Path(out).parent)
    return line


def argv_of(command: str, files: Path, out_dir: Path, over: dict) -> list[str]:
    opts = {"--model": files / "ddpm", "--out": out_dir / "g.png", "--json": out_dir / "g.json", **over}
    argv = ["vae", command]
    for k, v in opts.items():
        if v is not None:
            argv += [k, str(v).replace("IN", str(files)).replace("OUT", str(out_dir))]
    return argv


COMMON_BAD = [
    ({"--stage": "best"}, ("--stage", "'best'", "accepted: refined, vae, both")),
    ({"--steps": "0"}, ("--steps must be an integer in [1, 1000], got 0",)),
    ({"--steps": "x"}, ("--steps", "'x'")),
    ({"--seed": "-1"}, ("--seed", "-1")),
    ({"--threads": "0"}, ("--threads", "got 0")),
    ({"--out": "OUT/g.jpg"}, ("--out must end in .png",)),
    ({"--json": "OUT/g.txt"}, ("--json must end in .json",)),
    ({"--json": "OUT/g.png"}, ("--json must end in .json", "g.png")),
    ({"--model": "IN/missing"}, ("--model", "does not exist", "accepted: a DiffuseVAE model folder")),
    ({"--model": "IN/a-file"}, ("--model", "is not a folder")),
    ({"--model": "IN/empty-run"}, ("--model", "holds no DiffuseVAE model", "condiff train diffusevae")),
    ({"--model": "IN/pickled-model"}, ("--model", "model.bin", "pickle")),
    ({"--model": "IN/odd-kind"}, ("--model", "kind 'gan'", "accepted: vae, ddpm")),
    ({"--model": "IN/vae", "--stage": "refined"}, ("is a VAE alone", "--stage vae", "got --stage refined")),
    ({"--model": "IN/vae", "--stage": "both"}, ("is a VAE alone", "got --stage both")),
    ({"--bogus": "1"}, ("--bogus",)),
    ({"--guidance": "nan"}, ("--guidance must be a finite number", "nan")),
    ({"--guidance": "x"}, ("--guidance", "'x'")),
    ({"--guidance": "2"}, ("guidance 2.0 needs a refiner trained with model.cond_drop > 0",)),
    ({"--model": "IN/vae", "--guidance": "2"}, ("is a VAE alone", "no refiner to guide")),
]
SAMPLE_BAD = [*COMMON_BAD, ({"--n": "0"}, ("--n", "got 0")), ({"--n": "1025"}, ("--n", "1025"))]
INTERP_BAD = [
    *COMMON_BAD,
    ({"--pairs": "0"}, ("--pairs", "got 0")),
    ({"--pairs": "33"}, ("--pairs", "33")),
    ({"--frames": "1"}, ("--frames", "got 1")),
    ({"--frames": "33"}, ("--frames", "33")),
]


@pytest.mark.parametrize("over,needles", SAMPLE_BAD, ids=[str(i) for i in range(len(SAMPLE_BAD))])
def test_sample_refuses_every_bad_option(files, over, needles):
    out_dir = Path(tempfile.mkdtemp(dir=files))
    run_refused(argv_of("sample", files, out_dir, over), *needles, outs=(out_dir / "g.png", out_dir / "g.json"))


@pytest.mark.parametrize("over,needles", INTERP_BAD, ids=[str(i) for i in range(len(INTERP_BAD))])
def test_interpolate_refuses_every_bad_option(files, over, needles):
    out_dir = Path(tempfile.mkdtemp(dir=files))
    run_refused(argv_of("interpolate", files, out_dir, over), *needles, outs=(out_dir / "g.png", out_dir / "g.json"))


@settings(max_examples=10)
@given(
    stage=st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=10),
    command=st.sampled_from(["sample", "interpolate"]),
)
def test_any_other_stage_is_refused(files, stage, command):
    assume(stage not in ("refined", "vae", "both") and "\x00" not in stage and not stage.startswith("-"))
    out_dir = Path(tempfile.mkdtemp(dir=files))
    run_refused(argv_of(command, files, out_dir, {"--stage": stage}), "--stage", "accepted: refined, vae, both")


@settings(max_examples=10)
@given(
    n=st.one_of(st.integers(max_value=0), st.integers(min_value=1025)),
    frames=st.one_of(st.integers(max_value=1), st.integers(min_value=33)),
)
def test_counts_out_of_range_are_refused(files, n, frames):
    out_dir = Path(tempfile.mkdtemp(dir=files))
    run_refused(argv_of("sample", files, out_dir, {"--n": n}), "--n", outs=(out_dir / "g.png",))
    run_refused(argv_of("interpolate", files, out_dir, {"--frames": frames}), "--frames", outs=(out_dir / "g.png",))


def test_good_calls_write_their_grid_and_json(files):
    out = Path(tempfile.mkdtemp(dir=files))
    code, stdout, err = run_cli(argv_of("sample", files, out, {"--n": 2, "--steps": 1, "--stage": "both"}))
    assert code == 0, err
    rec = json.loads((out / "g.json").read_text())
    assert rec["stage"] == "both" and rec["nfe"] == 1 and len(rec["samples"]) == 2 and (out / "g.png").is_file()
    code, stdout, err = run_cli(
        argv_of("interpolate", files, out, {"--model": "IN/vae", "--pairs": 2, "--frames": 3, "--out": "OUT/i.png"})
    )
    assert code == 0, err
    rec = json.loads((out / "g.json").read_text())
    assert rec["stage"] == "vae" and len(rec["paths"]) == 2 and len(rec["paths"][0]["frames"]) == 3
    assert "attribute changes per path" in stdout and no_stray_temp_files(out)
    # a refiner trained with cond_drop takes --guidance; the JSON and the reproduce line record it
    code, stdout, err = run_cli(
        argv_of("sample", files, out, {"--model": "IN/ddpm-guided", "--n": 2, "--steps": 1, "--guidance": "2.5"})
    )
    assert code == 0, err
    rec = json.loads((out / "g.json").read_text())
    assert rec["guidance"] == 2.5 and "--guidance 2.5" in rec["reproduce"] and rec["nfe"] == 1
    # same seed, same grid
    code, _, _ = run_cli(argv_of("sample", files, out, {"--n": 2, "--steps": 1, "--out": "OUT/a.png", "--json": None}))
    code2, _, _ = run_cli(argv_of("sample", files, out, {"--n": 2, "--steps": 1, "--out": "OUT/b.png", "--json": None}))
    assert code == code2 == 0 and (out / "a.png").read_bytes() == (out / "b.png").read_bytes()


# recipes --------------------------------------------------------------------------------------------------------
KINDS = {
    "diffusevae-vae": (RECIPES_DIR / "diffusevae-vae.toml", {"model": dv.DiffuseVAENetConfig, "train": TrainConfig}),
    "diffusevae-vae-spatial": (
        RECIPES_DIR / "diffusevae-vae-spatial.toml",
        {"model": dv.DiffuseVAENetConfig, "train": TrainConfig},
    ),
    "diffusevae": (RECIPES_DIR / "diffusevae.toml", {"model": dv.DiffuseVAENetConfig, "train": TrainConfig}),
    "diffusevae-spatial-code": (
        RECIPES_DIR / "diffusevae-spatial-code.toml",
        {"model": dv.DiffuseVAENetConfig, "train": TrainConfig},
    ),
}
FIELDS = [
    (kind, t, f.name, f.default)
    for kind, (_, tables) in KINDS.items()
    for t, cls in tables.items()
    for f in dataclasses.fields(cls)
    if f.default is not dataclasses.MISSING and not (kind == "diffusevae" and f.name in dv.VAE_KEYS)
]


def _base(kind: str) -> dict:
    return tomllib.loads(KINDS[kind][0].read_text())


def _check(data: dict, workdir: Path, *needles: str, via_cli: bool = False):
    expect_bad_recipe(
        data, workdir, *needles, trainers=("condiff.models.diffusevae.make_diffusevae_trainer",), via_cli=via_cli
    )


@settings(max_examples=25)
@given(field=st.sampled_from(FIELDS), data=st.data(), via_cli=st.booleans())
def test_recipe_wrong_types(workdir, field, data, via_cli):
    kind, table, key, default = field
    value = data.draw(wrong_type(default))
    r = _base(kind)
    _check(r, workdir, wrong_type_case(r, table, key, default, value), via_cli=via_cli)


@settings(max_examples=10)
@given(kind=st.sampled_from(list(KINDS)), key=st.from_regex(r"[a-z][a-z0-9_]{0,11}", fullmatch=True), data=st.data())
def test_recipe_unknown_keys(workdir, kind, key, data):
    tables = KINDS[kind][1]
    where = data.draw(st.sampled_from(["", *tables]))
    r = _base(kind)
    needle = unknown_key_case(r, tables, where, key)
    _check(r, workdir, needle, *(() if where else ("accepted",)), via_cli=True)


@settings(max_examples=10)
@given(value=st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=10))
def test_recipe_unknown_kinds(workdir, value):
    assume(value not in dv.KINDS and "\x00" not in value and value.strip())
    r = _base("diffusevae-vae")
    r["model"]["kind"] = value
    _check(r, workdir, repr(value), "accepted: vae, ddpm", via_cli=True)


@settings(max_examples=10)
@given(value=st.floats(allow_nan=True, allow_infinity=True), key=st.sampled_from(["sigma", "beta"]))
def test_recipe_out_of_range_vae_values(workdir, value, key):
    assume(not (0 < value < float("inf")) if key == "sigma" else not (0 <= value < float("inf")))
    r = _base("diffusevae-vae")
    r["model"][key] = value
    _check(r, workdir, f"model.{key}", via_cli=True)


def test_recipe_vae_keys_on_the_ddpm_and_missing_vae(workdir):
    r = _base("diffusevae")
    r["model"]["latent_dim"] = 8
    _check(r, workdir, "model.latent_dim belongs to the VAE's recipe", via_cli=True)
    r = _base("diffusevae")
    r["model"]["vae"] = ""
    _check(r, workdir, "model.vae must name the trained VAE", via_cli=True)


@pytest.mark.parametrize(
    ("kind", "key", "guard"),
    [("diffusevae", "vae", "load_start"), ("diffusevae-spatial-code", "refiner", "load_networks")],
)
def test_train_refuses_a_missing_vae_or_refiner_before_building(workdir, kind, key, guard):
    """model.vae (or model.refiner) naming nothing: one line from `condiff train`, no run folder, nothing loaded."""
    d = Path(tempfile.mkdtemp(dir=workdir))
    r = _base(kind)
    r["model"][key] = str(d / "nowhere")
    (d / "recipe.toml").write_text(to_toml(r))
    with mock.patch(f"condiff.models.diffusevae.{guard}", guarded):
        expect_cli_error(["train", str(d / "recipe.toml"), "--out", str(d / "run")], f"model.{key}", "does not exist")
    assert not (d / "run").exists()


@settings(max_examples=10)
@given(
    value=st.one_of(
        st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=8),
        st.integers(-5, 0),
        st.integers(dv.MAX_COMPONENTS + 1, 10**6),
    )
)
def test_recipe_bad_priors(workdir, value):
    r = _base("diffusevae")
    if isinstance(value, str):
        assume(value not in dv.PRIORS and "\x00" not in value)
        r["model"]["prior"] = value
        _check(r, workdir, "model.prior", repr(value), via_cli=True)
    else:
        r["model"]["prior_components"] = value
        _check(r, workdir, "model.prior_components", str(value), via_cli=True)
    r = _base("diffusevae-vae")
    r["model"]["prior"] = "gmm"
    _check(r, workdir, "model.prior belongs to a kind 'ddpm' recipe", via_cli=True)


@settings(max_examples=10)
@given(
    case=st.one_of(
        st.tuples(st.just("decoder"), st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=8)),
        st.tuples(st.just("patch"), st.integers(-64, 200)),
        st.tuples(st.just("where_weight"), st.floats(allow_nan=True, allow_infinity=True)),
        st.tuples(st.just("jitter"), st.integers(-50, 50)),
    )
)
def test_recipe_bad_spatial_decoder_values(workdir, case):
    key, value = case
    if key == "decoder":
        assume(value not in dv.VAES and "\x00" not in value)
    elif key == "patch":
        assume(not (8 <= value <= 32 and value % 8 == 0))
    elif key == "jitter":
        assume(not 0 <= value <= dv.MAX_JITTER)
    else:
        assume(not (0 <= value < float("inf")))
    r = _base("diffusevae-vae-spatial")
    r["model"][key] = value
    _check(r, workdir, f"model.{key}", via_cli=True)
    r = _base("diffusevae-vae")
    r["model"].update(decoder="conv", latent_dim=16, patch=24)
    _check(r, workdir, "model.patch belongs to decoder 'spatial'", via_cli=True)


@settings(max_examples=10)
@given(
    value=st.one_of(
        st.text(st.characters(blacklist_categories=("Cs",)), min_size=0, max_size=8),
        st.integers(-5, 5),
        st.floats(allow_nan=False, allow_infinity=False),
    )
)
def test_recipe_bad_z_condition(workdir, value):
    """model.z_condition takes true or false on a kind 'ddpm' recipe; anything else, or the key on a VAE's recipe, is
    one line from `condiff train`, with no run folder."""
    assume("\x00" not in str(value))
    r = _base("diffusevae")
    r["model"]["z_condition"] = value
    _check(r, workdir, "model.z_condition", via_cli=True)
    r = _base("diffusevae-vae")
    r["model"]["z_condition"] = True
    _check(r, workdir, "model.z_condition belongs to a kind 'ddpm' recipe", via_cli=True)


@settings(max_examples=10)
@given(
    case=st.one_of(
        st.tuples(st.just("cond_drop"), st.floats(allow_nan=True, allow_infinity=True)),
        st.tuples(st.just("code_drop"), st.floats(allow_nan=True, allow_infinity=True)),
        st.tuples(st.just("guidance"), st.floats(allow_nan=True, allow_infinity=True)),
    )
)
def test_recipe_bad_guidance_values(workdir, case):
    """model.cond_drop or model.code_drop outside [0, 1), and model.guidance not finite or != 1 without either: one
    line each."""
    key, value = case
    r = _base("diffusevae")
    if key in ("cond_drop", "code_drop"):
        assume(not 0 <= value < 1)
    else:
        assume(value != 1.0)
    r["model"][key] = value
    _check(r, workdir, f"model.{key}", via_cli=True)


@pytest.mark.parametrize(
    ("over", "needle"),
    [
        ({"vae": "runs/diffusevae-vae"}, "model.vae comes from model.refiner"),
        ({"z_condition": True}, "model.z_condition comes from model.refiner"),
        ({"cond_drop": 0.1}, "pick the guidance's null condition; give one of them"),
    ],
)
def test_recipe_bad_refiner_start(workdir, over, needle):
    """The code-dropping recipe with a key the refiner it goes on from already fixes, or both null shares: one line
    from `condiff train`, with no run folder."""
    r = _base("diffusevae-spatial-code")
    r["model"].update(over)
    _check(r, workdir, needle, via_cli=True)
