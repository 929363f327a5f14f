"""Property-based fuzzing of fine-tuning recipes (`condiff finetune`): mutations of a packaged recipe (wrong
types, unknown keys, unknown method / objective / data names, out-of-range numbers) and of the command's options.
Each is refused by ``load_finetune_recipe`` with a one-line ConfigError naming the key or value, and by the CLI
with exit code 2 before any model is loaded or any output written."""

from __future__ import annotations

import math
import tempfile
import tomllib
from pathlib import Path
from unittest import mock

from fuzzkit import expect_api_error, expect_cli_error, guarded, to_toml, wrong_type_case
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from condiff.cli.recipes import packaged_finetune as packaged
from condiff.training.finetune_recipe import TABLES, load_finetune_recipe

BASE = tomllib.loads(packaged()["shapes-striped-lora"].read_text())
TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=12)
IDENT = st.from_regex(r"[a-z][a-z0-9_]{0,11}", fullmatch=True)


def _check(data: dict, workdir: Path, *needles: str, via_cli: bool = False):
    d = Path(tempfile.mkdtemp(dir=workdir))
    path = d / "recipe.toml"
    path.write_text(to_toml(data))
    expect_api_error(load_finetune_recipe, path, needles=needles)
    if via_cli:
        with mock.patch("condiff.cli.finetune.make_finetune_trainer", guarded):
            expect_cli_error(["finetune", str(path), "--out", str(d / "run")], *needles)
        assert not (d / "run").exists()


def _copy(d):
    return {k: _copy(v) if isinstance(v, dict) else v for k, v in d.items()}


FIELDS = [(t, f, cls.__dataclass_fields__[f].default) for t, cls in TABLES.items() for f in cls.__dataclass_fields__]


@settings(max_examples=40)
@given(field=st.sampled_from(FIELDS), data=st.data(), via_cli=st.booleans())
def test_wrong_types(workdir, field, data, via_cli):
    table, key, default = field
    choices = [st.booleans(), st.lists(st.integers(), max_size=2)]
    if isinstance(default, str):
        choices.append(st.integers())
    elif isinstance(default, bool):
        choices.append(st.text(max_size=4))
    elif isinstance(default, (int, float)):
        choices.append(st.text(max_size=4))
    value = data.draw(st.one_of(choices))
    r = _copy(BASE)
    _check(r, workdir, wrong_type_case(r, table, key, default, value), via_cli=via_cli)


@settings(max_examples=25)
@given(where=st.sampled_from(["", *TABLES]), key=IDENT, via_cli=st.booleans())
def test_unknown_keys(workdir, where, key, via_cli):
    r = _copy(BASE)
    if where:
        assume(key not in TABLES[where].__dataclass_fields__)
        r.setdefault(where, {})[key] = 1
        _check(r, workdir, f"{where}.{key}", via_cli=via_cli)
    else:
        assume(key not in r and key not in TABLES and key not in ("name", "base", "method", "objective", "data"))
        r[key] = 1
        _check(r, workdir, repr(key), via_cli=via_cli)


@settings(max_examples=30)
@given(where=st.sampled_from(["method", "objective", "data"]), value=TEXT)
def test_unknown_names(workdir, where, value):
    accepted = {"method": ("full", "lora", "sara"), "objective": ("denoise", "dpo", "domainstudio")}
    assume(value not in accepted.get(where, ()) and value.strip())
    r = _copy(BASE)
    r[where] = value
    if where == "data":
        assume(
            value not in ("striped", "preferences:larger", "preferences:larger-prompted")
            and not value.startswith("striped:")
        )
        d = Path(tempfile.mkdtemp(dir=workdir))
        (d / "r.toml").write_text(to_toml(r))
        with mock.patch("condiff.cli.finetune.make_finetune_trainer", guarded):
            expect_cli_error(["finetune", str(d / "r.toml"), "--out", str(d / "run")], repr(value))
        assert not (d / "run").exists()
    else:
        _check(r, workdir, repr(value), via_cli=True)


BAD_NUMBERS = {
    ("lora", "rank"): st.integers(-(2**40), 0),
    ("lora", "alpha"): st.one_of(st.floats(max_value=0.0), st.just(math.inf), st.just(math.nan)),
    ("sara", "theta"): st.one_of(st.floats(max_value=0.0), st.just(math.inf), st.just(math.nan)),
    ("sara", "lambda_rank"): st.one_of(st.floats(max_value=-1e-12), st.just(math.nan)),
    ("sara", "reselect_at"): st.integers(-(2**40), -1),
    ("dpo", "beta"): st.one_of(st.floats(max_value=0.0), st.just(math.inf), st.just(math.nan)),
    ("dpo", "prompts"): st.integers(-(2**40), 0),
    ("dpo", "margin"): st.one_of(st.floats(max_value=-1e-12), st.just(math.nan)),
    ("domainstudio", "lambda_img"): st.one_of(st.floats(max_value=-1e-12), st.just(math.nan)),
    ("loss", "cond_dropout"): st.one_of(st.floats(min_value=1.0), st.just(math.nan)),
    ("train", "steps"): st.integers(-(2**40), 0),
}


@settings(max_examples=40)
@given(where=st.sampled_from(sorted(BAD_NUMBERS)), data=st.data(), via_cli=st.booleans())
def test_out_of_range_numbers(workdir, where, data, via_cli):
    table, key = where
    r = _copy(BASE)
    r.setdefault(table, {})[key] = data.draw(BAD_NUMBERS[where])
    _check(r, workdir, f"{table}.{key}", via_cli=via_cli)


@settings(max_examples=15)
@given(k=st.one_of(st.integers(-5, 1), st.integers(100_001, 2**40)).map(str) | st.sampled_from(["", "x", "²", "1.5"]))
def test_bad_few_shot_sizes(workdir, k):
    r = _copy(BASE)
    r["data"] = f"striped:{k}"
    d = Path(tempfile.mkdtemp(dir=workdir))
    (d / "r.toml").write_text(to_toml(r))
    with mock.patch("condiff.cli.finetune.make_finetune_trainer", guarded):
        expect_cli_error(["finetune", str(d / "r.toml"), "--out", str(d / "run")], f"striped:{k}")


@settings(max_examples=15)
@given(
    opt=st.sampled_from(["--steps", "--seed", "--threads"]),
    value=st.one_of(st.integers(-(2**70), 0), TEXT.filter(lambda s: s.strip() and not s.strip().isdigit())),
)
def test_bad_options(workdir, opt, value):
    d = Path(tempfile.mkdtemp(dir=workdir))
    assume(not (opt == "--seed" and isinstance(value, int) and value == 0))
    with mock.patch("condiff.cli.finetune.make_finetune_trainer", guarded):
        expect_cli_error(["finetune", "shapes-striped-lora", opt, str(value), "--out", str(d / "run")])
    assert not (d / "run").exists()
