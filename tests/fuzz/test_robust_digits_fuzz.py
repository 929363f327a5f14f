"""The robust_digits recipes (rRCM, the Gaussian-augmentation classifier) and `condiff certify --classifier` under
bad input: every wrong-typed or unknown recipe key, unknown kind and out-of-range value is one ``error:`` line
naming it (exit code 2 from `condiff train`, nothing created), and a --classifier that is missing, not a model, or
holds a pickle is refused the same way before anything is loaded."""

from __future__ import annotations

import dataclasses
import pickle
import tempfile
import tomllib
from pathlib import Path

import pytest
from fuzzkit import expect_bad_recipe, expect_cli_error, unknown_key_case, wrong_type, wrong_type_case
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from condiff.cli.recipes import RECIPES_DIR
from condiff.models import robust_digits
from condiff.training.recipe import TrainConfig

RECIPE = RECIPES_DIR / "rrcm-digits-0.25.toml"
TABLES = {"model": robust_digits.RobustNetConfig, "pretrain": robust_digits.PretrainConfig, "train": TrainConfig}
FIELDS = [(t, f.name, f.default) for t, cls in TABLES.items() for f in dataclasses.fields(cls)]


def _check(data: dict, workdir: Path, *needles: str, via_cli: bool = False):
    expect_bad_recipe(
        data, workdir, *needles, trainers=("condiff.models.robust_digits.make_robust_trainer",), via_cli=via_cli
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


@settings(max_examples=20)
@given(value=st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=10))
def test_unknown_kind(workdir, value):
    assume(value not in robust_digits.KINDS and "\x00" not in value and value.strip())
    r = _base()
    r["model"]["kind"] = value
    _check(r, workdir, "model.kind", repr(value), via_cli=True)


@pytest.mark.parametrize(
    "table,key,value,needle",
    [
        ("model", "sigma", 0.0, "model.sigma"),
        ("model", "sigma", float("inf"), "model.sigma"),
        ("model", "hidden", 0, "model.hidden"),
        ("model", "dim", 1, "model.dim"),
        ("pretrain", "steps", 10**9, "pretrain.steps"),
        ("pretrain", "grid", 0, "pretrain.grid"),
        ("pretrain", "temperature", float("nan"), "pretrain.temperature"),
        ("pretrain", "consistency", -1.0, "pretrain.consistency"),
        ("pretrain", "target_decay", 1.01, "pretrain.target_decay"),
    ],
)
def test_out_of_range_values(workdir, table, key, value, needle):
    r = _base()
    r[table][key] = value
    _check(r, workdir, needle, via_cli=True)


def test_noise_kind_with_a_pretrain_table(workdir):
    r = _base()
    r["model"]["kind"] = "noise"
    _check(r, workdir, "[pretrain] applies to model.kind 'rrcm' only", via_cli=True)


@pytest.mark.parametrize("kind", ["missing", "file", "empty-folder", "pickle"])
def test_bad_classifier_folders(workdir, kind):
    d = Path(tempfile.mkdtemp(dir=workdir))
    target = d / "cls"
    if kind == "file":
        target.write_text("not a model")
    elif kind == "empty-folder":
        target.mkdir()
    elif kind == "pickle":
        target.mkdir()
        (target / "net.pt").write_bytes(pickle.dumps({"w": 1}))
    needle = {
        "missing": "does not exist",
        "file": "not a robust_digits model",
        "empty-folder": "not a robust_digits model",
    }
    argv = ["certify", "--method", "rrcm", "--classifier", str(target), "--images", "2", "--n", "10", "--n0", "5"]
    expect_cli_error([*argv, "--json", str(d / "c.json")], "--classifier", needle.get(kind, "pickle"))
    assert not (d / "c.json").exists()
