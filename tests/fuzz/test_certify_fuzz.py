"""Property-based fuzzing of `condiff certify` (randomized smoothing of the digits scorer): bad --method /
--sigma / --n / --n0 / --alpha / --images / --runs / --steps values and unwritable or non-JSON --json targets (a
pickle's name included).

The contract is the fuzz suite's (fuzzkit): exit code 2, one ``error: `` line naming the bad value, no traceback,
the refusal before any model weights are read, and nothing written (no --json file, no stray temporary file).
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

from fuzzkit import IS_ROOT, bad_json_target, expect_cli_error, no_stray_temp_files
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from condiff.cli.certify import MAX_DRAWS, METHODS

ARG_TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=24)
HELDOUT = 450


def _fresh(workdir: Path) -> Path:
    return Path(tempfile.mkdtemp(dir=workdir))


def _argv(out: Path, *extra: str) -> list[str]:
    return ["certify", "--images", "2", "--n", "10", "--n0", "5", "--json", str(out / "c.json"), *extra]


def _nothing_written(out: Path) -> bool:
    return not (out / "c.json").exists() and no_stray_temp_files(out)


@settings(max_examples=20)
@given(method=ARG_TEXT)
def test_unknown_method(workdir, method):
    assume(method not in METHODS)
    out = _fresh(workdir)
    expect_cli_error(_argv(out, f"--method={method}"), "--method", repr(method), "plain, denoised, densepure")
    assert _nothing_written(out)


@settings(max_examples=30)
@given(
    method=st.sampled_from(METHODS),
    sigma=st.one_of(st.floats(max_value=0.0), st.floats(min_value=10.0, exclude_min=True), st.just(math.nan)),
)
def test_bad_sigma(workdir, method, sigma):
    out = _fresh(workdir)
    expect_cli_error(_argv(out, "--method", method, f"--sigma={sigma!r}"), "--sigma", "(0, 10]")
    assert _nothing_written(out)


@settings(max_examples=30)
@given(alpha=st.one_of(st.floats(max_value=0.0), st.floats(min_value=0.5), st.just(math.nan)))
def test_bad_alpha(workdir, alpha):
    out = _fresh(workdir)
    expect_cli_error(_argv(out, f"--alpha={alpha!r}"), "--alpha", "(0, 0.5)")
    assert _nothing_written(out)


@settings(max_examples=40)
@given(
    option=st.sampled_from(["--n", "--n0", "--images"]),
    value=st.one_of(st.integers(max_value=0), st.integers(min_value=MAX_DRAWS + 1)),
)
def test_bad_counts(workdir, option, value):
    out = _fresh(workdir)
    hi = HELDOUT if option == "--images" else MAX_DRAWS
    expect_cli_error(_argv(out, f"{option}={value}"), option, f"[1, {hi}]", repr(value))
    assert _nothing_written(out)


@settings(max_examples=10)
@given(value=st.integers(min_value=HELDOUT + 1, max_value=MAX_DRAWS))
def test_more_images_than_the_heldout_split(workdir, value):
    out = _fresh(workdir)
    expect_cli_error(_argv(out, f"--images={value}"), "--images", f"[1, {HELDOUT}]")
    assert _nothing_written(out)


@settings(max_examples=20)
@given(option=st.sampled_from(["--runs", "--steps"]), value=st.one_of(st.integers(max_value=0), st.integers(1001)))
def test_bad_densepure_options(workdir, option, value):
    out = _fresh(workdir)
    expect_cli_error(_argv(out, "--method", "densepure", f"{option}={value}"), option, "[1, 1000]")
    assert _nothing_written(out)


@settings(max_examples=20)
@given(option=st.sampled_from(["--sigma", "--alpha", "--n", "--n0", "--images"]), value=ARG_TEXT)
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
    argv = ["certify", "--images", "2", "--n", "10", "--n0", "5", "--json", str(target)]
    expect_cli_error(argv, "--json", repr(str(target)))
    if kind == "pickle":
        assert target.read_bytes() == before
    else:
        assert target.is_dir() or not os.path.lexists(target)
    assert no_stray_temp_files(d, target.parent)
