"""Fuzzing of `condiff forecast` and of the tsdiff recipes. Every bad option, recipe key or input folder is one
``error:`` line naming it (and what is accepted), exit code 2, and nothing is written: no fan chart, no JSON, no
stray temporary file. Option and input errors come before any weights are read, except --horizon past the model's
horizon, which needs the model's window."""

from __future__ import annotations

import dataclasses
import tempfile
import tomllib
from pathlib import Path
from unittest import mock

import pytest
import torch
from fuzzkit import (
    bad_json_target,
    expect_bad_recipe,
    expect_cli_error,
    guarded,
    no_stray_temp_files,
    wrong_type,
    wrong_type_case,
)
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from condiff.cli.recipes import RECIPES_DIR
from condiff.models import tsdiff_series as ts
from condiff.training.recipe import TrainConfig

TINY = {
    "name": "t",
    "family": "tsdiff",
    "model": {"channels": 4, "blocks": 1, "time_dim": 4},
    "data": {"series": "nile"},
    "forecast": {"samples": 2, "steps": 2, "refine_steps": 1},
}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("forecast")
    ts.build_tsdiff_model(ts.tsdiff_recipe_from_dict(TINY)).save(d / "run" / "model")
    (d / "pickled-model").mkdir()
    torch.save({"x": torch.zeros(2)}, d / "pickled-model" / "weights.pt")
    (d / "empty-run").mkdir()
    (d / "file.txt").write_text("x")
    return d


def argv_of(files, out_dir, **over):
    opts = {"--model": files / "run", "--out": out_dir / "fan.png", "--json": out_dir / "f.json"}
    opts.update(over)
    argv = ["forecast"]
    for k, v in opts.items():
        if v is True:
            argv.append(k)
        elif v is not None:
            argv += [k, str(v).replace("IN", str(files)).replace("OUT", str(out_dir))]
    return argv


def refused(argv, out_dir, *needles, guard: bool = True, outs=("fan.png", "f.json")):
    with mock.patch("condiff.models.tsdiff_series.load_tsdiff_model", guarded) if guard else mock.MagicMock():
        line = expect_cli_error(argv, *needles)
    for name in outs:
        assert not (out_dir / name).exists()
    assert no_stray_temp_files(out_dir)
    return line


BAD = [
    ({"--horizon": "0"}, ("--horizon", "got 0")),
    ({"--horizon": "x"}, ("--horizon", "'x'")),
    ({"--samples": "0"}, ("--samples", "got 0")),
    ({"--samples": "10001"}, ("--samples", "10001")),
    ({"--guidance": "l1"}, ("--guidance", "'l1'", "accepted: mse, quantile")),
    ({"--refine": "hmc"}, ("--refine", "'hmc'", "accepted: ml, langevin")),
    ({"--refine": "ml", "--base": "naive"}, ("--base", "'naive'", "accepted: seasonal-naive, ets, arima")),
    ({"--base": "ets"}, ("--base is the forecaster --refine refines", "ets")),
    ({"--refine": "ml", "--guidance": "mse"}, ("--guidance is for self-guided forecasts", "--refine ml")),
    ({"--end": True, "--refine": "langevin"}, ("--end", "--refine needs the test split")),
    ({"--seed": "-1"}, ("--seed", "-1")),
    ({"--threads": "0"}, ("--threads", "got 0")),
    ({"--out": "OUT/fan.jpg"}, ("--out must end in .png",)),
    ({"--json": "OUT/f.txt"}, ("--json must end in .json",)),
    ({"--model": "IN/missing"}, ("--model", "does not exist", "accepted: a tsdiff model folder")),
    ({"--model": "IN/file.txt"}, ("--model", "is not a folder")),
    ({"--model": "IN/empty-run"}, ("--model", "holds no tsdiff model", "condiff train tsdiff-co2")),
    ({"--model": "IN/pickled-model"}, ("--model", "weights.pt", "pickle")),
    ({"--bogus": "1"}, ("--bogus",)),
]


@pytest.mark.parametrize("over,needles", BAD, ids=[str(i) for i in range(len(BAD))])
def test_forecast_refuses_every_bad_option_and_input(files, over, needles):
    out_dir = Path(tempfile.mkdtemp(dir=files))
    model_read = any(k == "--model" for k in over)  # the loader itself refuses these folders
    refused(argv_of(files, out_dir, **over), out_dir, *needles, guard=not model_read)


def test_a_horizon_past_the_models_is_refused_once_its_window_is_known(files):
    out_dir = Path(tempfile.mkdtemp(dir=files))
    refused(argv_of(files, out_dir, **{"--horizon": "6"}), out_dir, "--horizon", "[1, 5]", "got 6", guard=False)


@pytest.mark.parametrize("kind", ["suffix", "pickle", "directory", "under-file"])
def test_forecast_refuses_unusable_json_targets(files, kind):
    out_dir = Path(tempfile.mkdtemp(dir=files))
    target = bad_json_target(out_dir, kind, "f")
    refused(argv_of(files, out_dir, **{"--json": target}), out_dir, "--json", outs=("fan.png",))


@settings(max_examples=20)
@given(value=st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=10))
def test_forecast_refuses_any_other_guidance_or_base(files, value):
    assume(value not in ("mse", "quantile", "seasonal-naive", "ets", "arima") and "\x00" not in value)
    assume(not value.startswith("-"))
    out_dir = Path(tempfile.mkdtemp(dir=files))
    refused(argv_of(files, out_dir, **{"--guidance": value}), out_dir, "--guidance", "accepted: mse, quantile")
    refused(argv_of(files, out_dir, **{"--refine": "ml", "--base": value}), out_dir, "--base", "accepted")


# recipes --------------------------------------------------------------------------------------------------------
RECIPES = {n: RECIPES_DIR / f"tsdiff-{n}.toml" for n in ("co2", "sunspots", "nile", "nile-pool-se")}
TABLES = {**ts.TABLES, "train": TrainConfig}
FIELDS = [
    (t, f.name, f.default)
    for t, cls in TABLES.items()
    for f in dataclasses.fields(cls)
    if f.default is not dataclasses.MISSING
]


def _check(data: dict, workdir: Path, *needles: str, via_cli: bool = False):
    expect_bad_recipe(
        data, workdir, *needles, trainers=("condiff.models.tsdiff_series.make_tsdiff_trainer",), via_cli=via_cli
    )


@settings(max_examples=60)
@given(recipe=st.sampled_from(list(RECIPES)), field=st.sampled_from(FIELDS), data=st.data(), via_cli=st.booleans())
def test_recipe_wrong_types(workdir, recipe, field, data, via_cli):
    table, key, default = field
    value = data.draw(wrong_type(default))
    r = tomllib.loads(RECIPES[recipe].read_text())
    _check(r, workdir, wrong_type_case(r, table, key, default, value), via_cli=via_cli)


@settings(max_examples=30)
@given(key=st.from_regex(r"[a-z][a-z0-9_]{0,11}", fullmatch=True), data=st.data())
def test_recipe_unknown_keys(workdir, key, data):
    where = data.draw(st.sampled_from(["", *TABLES]))
    r = tomllib.loads(RECIPES["co2"].read_text())
    if where:
        assume(key not in TABLES[where].__dataclass_fields__)
        r.setdefault(where, {})[key] = 1
        _check(r, workdir, f"{where}.{key}", via_cli=True)
    else:
        assume(key not in r and key not in TABLES and key not in ("name", "family"))
        r[key] = 1
        _check(r, workdir, repr(key), "accepted", via_cli=True)


@settings(max_examples=30)
@given(
    which=st.sampled_from([("data", "series"), ("forecast", "guidance")]),
    value=st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=10),
)
def test_recipe_unknown_names(workdir, which, value):
    table, key = which
    assume(value not in ("co2", "sunspots", "nile", "mse", "quantile") and "\x00" not in value)
    r = tomllib.loads(RECIPES["nile"].read_text())
    r.setdefault(table, {})[key] = value
    _check(r, workdir, repr(value), "accepted", via_cli=True)


@settings(max_examples=40)
@given(
    key=st.sampled_from(
        ["std", "quantile_scale", "mse_weight", "refine_lr", "refine_tau", "refine_weight", "refine_noise"]
    ),
    value=st.floats(allow_nan=True, allow_infinity=True),
)
def test_recipe_out_of_range_forecast_values(workdir, key, value):
    lo, hi = {"std": (1e-4, 100), "refine_lr": (1e-300, 10), "refine_tau": (1e-300, 99)}.get(key, (0, 1e3))
    hi = {"refine_weight": 1e6, "refine_noise": 10}.get(key, hi)
    assume(not lo <= value <= hi)
    r = tomllib.loads(RECIPES["sunspots"].read_text())
    r.setdefault("forecast", {})[key] = value
    _check(r, workdir, f"forecast.{key}", via_cli=True)


@settings(max_examples=30)
@given(value=st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=12))
def test_recipe_unknown_pool_names(workdir, value):
    from condiff.data.series import POOLS

    names = [n.strip() for n in value.split(",")]
    bad = [n for n in names if n not in POOLS]
    assume(value.strip() and bad and "\x00" not in value)
    r = tomllib.loads(RECIPES["nile"].read_text())
    r.setdefault("data", {})["pool"] = value
    _check(r, workdir, "data.pool", repr(bad[0]), "accepted", via_cli=True)


@settings(max_examples=20)
@given(value=st.floats(allow_nan=True, allow_infinity=True))
def test_recipe_out_of_range_pool_fraction(workdir, value):
    assume(not 0 <= value < 1)
    r = tomllib.loads(RECIPES["nile"].read_text())
    r.setdefault("data", {})["pool_fraction"] = value
    _check(r, workdir, "data.pool_fraction", via_cli=True)
