"""Fuzzing of the dit_moe recipe family (shapes-dit-moe, shapes-dit-dense): every wrong type, unknown key and
out-of-range value is one ``error:`` line naming it (and what is accepted), exit code 2, before any network is built,
and nothing is written."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

from fuzzkit import expect_bad_recipe, wrong_type, wrong_type_case
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from condiff.cli.recipes import RECIPES_DIR
from condiff.models.dit_moe import MAX_SIZE, DiTConfig
from condiff.training.recipe import ObjectiveConfig, TrainConfig

BASE = RECIPES_DIR / "shapes-dit-moe.toml"
TABLES = {"model": DiTConfig, "objective": ObjectiveConfig, "train": TrainConfig}
FIELDS = [
    (t, f.name, f.default)
    for t, cls in TABLES.items()
    for f in dataclasses.fields(cls)
    if f.default is not dataclasses.MISSING
]


def _check(data: dict, workdir: Path, *needles: str, via_cli: bool = False):
    expect_bad_recipe(data, workdir, *needles, trainers=("condiff.models.dit_moe.make_dit_trainer",), via_cli=via_cli)


@settings(max_examples=30)
@given(field=st.sampled_from(FIELDS), data=st.data(), via_cli=st.booleans())
def test_recipe_wrong_types(workdir, field, data, via_cli):
    table, key, default = field
    value = data.draw(wrong_type(default))
    r = tomllib.loads(BASE.read_text())
    _check(r, workdir, wrong_type_case(r, table, key, default, value), via_cli=via_cli)


@settings(max_examples=20)
@given(
    key=st.from_regex(r"[a-z][a-z0-9_]{0,11}", fullmatch=True),
    where=st.sampled_from(["", "model", "objective", "train"]),
)
def test_recipe_unknown_keys(workdir, key, where):
    r = tomllib.loads(BASE.read_text())
    if where:
        assume(key not in TABLES[where].__dataclass_fields__)
        r.setdefault(where, {})[key] = 1
        _check(r, workdir, f"{where}.{key}", via_cli=True)
    else:
        assume(key not in r and key not in TABLES and key not in ("name", "family", "schedule"))
        r[key] = 1
        _check(r, workdir, repr(key), "accepted", via_cli=True)


SIZES = ("patch_size", "dim", "depth", "heads")
COUNTS = ("experts", "shared", "expert_ratio", "shared_ratio", "dense_ratio")


@settings(max_examples=25)
@given(
    key=st.sampled_from(SIZES + COUNTS),
    value=st.one_of(st.integers(max_value=-1), st.integers(min_value=MAX_SIZE + 1, max_value=2**62)),
)
def test_recipe_sizes_out_of_range(workdir, key, value):
    r = tomllib.loads(BASE.read_text())
    r["model"][key] = value
    _check(r, workdir, f"model.{key}", str(value), via_cli=True)


@settings(max_examples=15)
@given(top_k=st.one_of(st.integers(max_value=0), st.integers(min_value=9, max_value=MAX_SIZE)))
def test_recipe_top_k_outside_the_experts(workdir, top_k):
    r = tomllib.loads(BASE.read_text())  # 8 experts
    r["model"]["top_k"] = top_k
    _check(r, workdir, "model.top_k", str(top_k), "[1, model.experts = 8]", via_cli=True)


@settings(max_examples=15)
@given(patch=st.integers(min_value=1, max_value=32))
def test_recipe_patch_sizes_that_do_not_divide_the_image(workdir, patch):
    assume(32 % patch)
    r = tomllib.loads(BASE.read_text())
    r["model"]["patch_size"] = patch
    _check(r, workdir, "model.patch_size", str(patch), via_cli=True)


@settings(max_examples=15)
@given(alpha=st.one_of(st.floats(max_value=-1e-9), st.floats(min_value=1e3 + 1), st.just(float("nan"))))
def test_recipe_balance_weights_out_of_range(workdir, alpha):
    r = tomllib.loads(BASE.read_text())
    r["model"]["alpha"] = alpha
    _check(r, workdir, "model.alpha", via_cli=True)


def test_recipe_other_family_names_and_init_from(workdir):
    r = tomllib.loads(BASE.read_text())
    r["train"]["init_from"] = "shapes"
    _check(r, workdir, "train.init_from", via_cli=True)
    r = tomllib.loads(BASE.read_text())
    r["model"]["heads"] = 3
    _check(r, workdir, "model.dim", "model.heads", via_cli=True)
