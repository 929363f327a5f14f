"""Property-based fuzzing of `condiff adapt` (SDA on digits-C): bad --corruptions / --severities / --t-star /
--steps / --structure-factor / --structure-weight / --synthetic / --synthesis-steps / --epochs / --lr / --images /
--seed values, non-numbers, unwritable or wrong-suffix --json / --out targets, --save beside --classifier, and
--classifier folders that are missing, files, pickles or not written by --save.

The contract is the fuzz suite's (fuzzkit): exit code 2, one ``error: `` line naming the bad value, no traceback,
the refusal before any model weights are read, and nothing written (no --json, --out or --save, no stray temporary
file).
"""

from __future__ import annotations

import math
import os
import pickle
import tempfile
from pathlib import Path

from fuzzkit import IS_ROOT, bad_json_target, expect_cli_error, no_stray_temp_files
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from condiff.data.digits_c import CORRUPTIONS, SEVERITIES
from condiff.models.sda_digits import MAX_EPOCHS, MAX_STEPS, MAX_SYNTHETIC, MAX_WEIGHT

ARG_TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=24)
TEST_IMAGES = 300


def _fresh(workdir: Path) -> Path:
    return Path(tempfile.mkdtemp(dir=workdir))


def _argv(out: Path, *extra: str) -> list[str]:
    return [
        "adapt",
        "--images",
        "2",
        "--json",
        str(out / "a.json"),
        "--out",
        str(out / "a.png"),
        "--save",
        str(out / "clf"),
        *extra,
    ]


def _nothing_written(out: Path) -> bool:
    return not any(os.path.lexists(out / n) for n in ("a.json", "a.png", "clf")) and no_stray_temp_files(out)


@settings(max_examples=12)
@given(name=ARG_TEXT)
def test_unknown_corruption(workdir, name):
    assume(name.strip() not in CORRUPTIONS and "," not in name)
    out = _fresh(workdir)
    expect_cli_error(_argv(out, f"--corruptions=noise,{name}"), "--corruptions", repr(name.strip()), "noise, blur")
    assert _nothing_written(out)


@settings(max_examples=10)
@given(name=st.sampled_from(list(CORRUPTIONS)))
def test_repeated_corruption(workdir, name):
    out = _fresh(workdir)
    expect_cli_error(_argv(out, f"--corruptions={name},{name}"), "--corruptions", "twice")
    assert _nothing_written(out)


@settings(max_examples=15)
@given(text=st.one_of(ARG_TEXT, st.integers().map(str), st.just("1,1"), st.just("")))
def test_bad_severities(workdir, text):
    parts = [p.strip() for p in text.split(",")]
    good = all(p.isascii() and p.isdigit() and int(p) in SEVERITIES for p in parts) and len(set(parts)) == len(parts)
    assume(not good)
    out = _fresh(workdir)
    expect_cli_error(_argv(out, f"--severities={text}"), "--severities", "1, 2, 3, 4, 5", repr(text))
    assert _nothing_written(out)


@settings(max_examples=12)
@given(t=st.one_of(st.floats(max_value=0.0), st.floats(min_value=999.0, exclude_min=True), st.just(math.nan)))
def test_bad_t_star(workdir, t):
    out = _fresh(workdir)
    expect_cli_error(_argv(out, f"--t-star={t!r}"), "--t-star", "(0, 999]")
    assert _nothing_written(out)


@settings(max_examples=20)
@given(
    option=st.sampled_from(["--steps", "--synthetic", "--synthesis-steps", "--epochs", "--images"]),
    data=st.data(),
)
def test_bad_counts(workdir, option, data):
    lo, hi = {
        "--steps": (1, MAX_STEPS),
        "--synthetic": (10, MAX_SYNTHETIC),
        "--synthesis-steps": (1, MAX_STEPS),
        "--epochs": (1, MAX_EPOCHS),
        "--images": (1, TEST_IMAGES),
    }[option]
    value = data.draw(st.one_of(st.integers(max_value=lo - 1), st.integers(min_value=hi + 1)))
    out = _fresh(workdir)
    argv = _argv(out, f"{option}={value}")
    if option == "--images":
        argv = [a for a in argv if a != "2"]
        argv.remove("--images")
    expect_cli_error(argv, option, f"[{lo}, {hi}]", repr(value))
    assert _nothing_written(out)


@settings(max_examples=12)
@given(factor=st.integers().filter(lambda d: d != 0 and (d < 1 or d > 16 or 16 % d != 0)))
def test_bad_structure_factor(workdir, factor):
    out = _fresh(workdir)
    expect_cli_error(
        _argv(out, f"--structure-factor={factor}"), "--structure-factor", "0, 1, 2, 4, 8, 16", repr(factor)
    )
    assert _nothing_written(out)


@settings(max_examples=10)
@given(
    w=st.one_of(
        st.floats(max_value=0.0, exclude_max=True), st.floats(min_value=MAX_WEIGHT, exclude_min=True), st.just(math.nan)
    )
)
def test_bad_structure_weight(workdir, w):
    out = _fresh(workdir)
    expect_cli_error(_argv(out, f"--structure-weight={w!r}"), "--structure-weight", f"[0, {MAX_WEIGHT:g}]")
    assert _nothing_written(out)


@settings(max_examples=10)
@given(lr=st.one_of(st.floats(max_value=0.0), st.floats(min_value=1.0, exclude_min=True), st.just(math.inf)))
def test_bad_lr(workdir, lr):
    out = _fresh(workdir)
    expect_cli_error(_argv(out, f"--lr={lr!r}"), "--lr", "(0, 1]")
    assert _nothing_written(out)


@settings(max_examples=10)
@given(seed=st.one_of(st.integers(max_value=-1), st.integers(min_value=2**63)))
def test_bad_seed(workdir, seed):
    out = _fresh(workdir)
    expect_cli_error(_argv(out, f"--seed={seed}"), "--seed")
    assert _nothing_written(out)


@settings(max_examples=20)
@given(
    option=st.sampled_from(
        [
            "--t-star",
            "--steps",
            "--structure-factor",
            "--structure-weight",
            "--synthetic",
            "--epochs",
            "--lr",
            "--images",
            "--seed",
        ]
    ),
    value=ARG_TEXT,
)
def test_non_numbers(workdir, option, value):
    try:
        float(value)
        assume(False)
    except ValueError:
        pass
    out = _fresh(workdir)
    expect_cli_error(_argv(out, f"{option}={value}"), option)
    assert _nothing_written(out)


@settings(max_examples=15)
@given(
    kind=st.sampled_from(["suffix", "pickle", "directory", "under-file"] + ([] if IS_ROOT else ["read-only"])),
    stem=st.text("abcdefghij_-0123456789", min_size=1, max_size=10),
)
def test_unwritable_json(workdir, kind, stem):
    d = _fresh(workdir)
    target = bad_json_target(d, kind, stem)
    before = target.read_bytes() if kind == "pickle" else None
    expect_cli_error(["adapt", "--images", "2", "--json", str(target)], "--json", repr(str(target)))
    if kind == "pickle":
        assert target.read_bytes() == before
    else:
        assert target.is_dir() or not os.path.lexists(target)
    assert no_stray_temp_files(d, target.parent)


@settings(max_examples=10)
@given(suffix=st.sampled_from([".jpg", ".json", "", ".PNG.txt"]))
def test_out_must_be_a_png(workdir, suffix):
    d = _fresh(workdir)
    target = d / f"plot{suffix}"
    expect_cli_error(["adapt", "--out", str(target)], "--out", ".png")
    assert not os.path.lexists(target) and no_stray_temp_files(d)


def test_same_file_for_json_and_out(workdir):
    d = _fresh(workdir)
    expect_cli_error(["adapt", "--json", str(d / "x.json"), "--out", str(d / "x.json")], "--out")
    assert not os.path.lexists(d / "x.json")


def test_save_beside_classifier(workdir):
    d = _fresh(workdir)
    expect_cli_error(["adapt", "--save", str(d / "s"), "--classifier", str(d)], "--save and --classifier")
    assert not os.path.lexists(d / "s")


@settings(max_examples=12)
@given(kind=st.sampled_from(["missing", "file", "pickle", "empty-dir", "no-table", "bad-json"]))
def test_bad_classifier(workdir, kind):
    d = _fresh(workdir)
    target = d / "clf"
    needle = {
        "missing": "does not exist",
        "file": "is not a folder",
        "pickle": "pickle",
        "empty-dir": "has no condiff.json",
        "no-table": "needs a 'sda_digits' table",
        "bad-json": "is not valid JSON",
    }[kind]
    if kind == "file":
        target.write_text("x")
    elif kind != "missing":
        target.mkdir()
        if kind == "pickle":
            (target / "classifier.bin").write_bytes(pickle.dumps({"a": 1}))
        elif kind == "no-table":
            (target / "condiff.json").write_text('{"dense": {}}')
        elif kind == "bad-json":
            (target / "condiff.json").write_text("{")
    expect_cli_error(["adapt", "--classifier", str(target), "--json", str(d / "a.json")], "--classifier", needle)
    assert not os.path.lexists(d / "a.json") and no_stray_temp_files(d)
