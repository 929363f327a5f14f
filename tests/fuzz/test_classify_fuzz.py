"""Property-based fuzzing of `condiff classify` (the Diffusion Classifier): bad --stages / --keep / --pairs /
--error / --seed values, bad candidate lists and attributes, garbage files as --image and unwritable --json paths.

The contract is the fuzz suite's (fuzzkit): exit code 2, one ``error: `` line naming the bad value and what is
accepted, no traceback, the refusal before any model weights are read, and nothing written (no --json file, no
stray temporary file). One valid run checks the other side: the ranking is printed and the JSON written whole.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest
import torch
from fuzzkit import IS_ROOT, bad_json_target, expect_cli_error, no_stray_temp_files, run_cli
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from condiff.data import shapes, text
from condiff.data.images import write_image
from condiff.tasks.diffusion_classifier import ERRORS, MAX_PAIRS

ARG_TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=24)
COUNTS = st.lists(st.integers(0, 2 * MAX_PAIRS), min_size=1, max_size=4)
SEED_MAX = 2**63 - 1


@pytest.fixture(scope="module")
def image(workdir) -> Path:
    x = shapes.render_batch(torch.tensor([[0, 1, 1, 4]]), torch.Generator().manual_seed(0)).images
    return write_image(x, workdir / "green_circle.png")


def _argv(image: Path, out: Path, *extra: str) -> list[str]:
    return ["classify", "--image", str(image), "--candidates", "red,green,blue", "--json", str(out / "c.json"), *extra]


def _fresh(workdir: Path) -> Path:
    return Path(tempfile.mkdtemp(dir=workdir))


def _nothing_written(out: Path) -> bool:
    return not (out / "c.json").exists() and no_stray_temp_files(out)


def _valid_stages(stages: list[int], keep: list[int] | None) -> bool:
    ok = all(1 <= s <= MAX_PAIRS for s in stages) and all(b > a for a, b in zip(stages, stages[1:]))
    if keep is None:
        return ok and len(stages) == 1
    ok = ok and len(keep) == len(stages) and all(1 <= k <= MAX_PAIRS for k in keep)
    return ok and all(b <= a for a, b in zip(keep, keep[1:]))


# ---- numbers ------------------------------------------------------------------------------------------------


@settings(max_examples=40)
@given(stages=COUNTS, keep=st.one_of(st.none(), COUNTS))
def test_bad_stages_and_keep(image, workdir, stages, keep):
    """Stages that are not strictly increasing pair counts in [1, 10000], or keep counts that are not one
    non-increasing positive count per stage, are refused naming the option."""
    assume(not _valid_stages(stages, keep))
    out = _fresh(workdir)
    extra = ["--stages", ",".join(map(str, stages))] + ([] if keep is None else ["--keep", ",".join(map(str, keep))])
    line = expect_cli_error(_argv(image, out, *extra))
    assert "--stages" in line or "--keep" in line, line
    assert _nothing_written(out)


@settings(max_examples=30)
@given(option=st.sampled_from(["--stages", "--keep"]), value=ARG_TEXT)
def test_stage_lists_that_are_not_integers(image, workdir, option, value):
    items = value.split(",")
    assume(not all(p.strip().isascii() and p.strip().isdigit() for p in items))
    out = _fresh(workdir)
    extra = [f"{option}={value}"] + (["--stages", "20,100"] if option == "--keep" else [])
    expect_cli_error(_argv(image, out, *extra), option, repr(value), "comma-separated positive integers")
    assert _nothing_written(out)


@settings(max_examples=20)
@given(stages=st.integers(1, MAX_PAIRS), pairs=st.integers(-(10**12), 10**12))
def test_bad_pairs(image, workdir, stages, pairs):
    assume(not stages <= pairs <= MAX_PAIRS)
    out = _fresh(workdir)
    expect_cli_error(_argv(image, out, "--stages", str(stages), f"--pairs={pairs}"), "--pairs", str(pairs))
    assert _nothing_written(out)


@settings(max_examples=20)
@given(name=ARG_TEXT)
def test_unknown_error(image, workdir, name):
    assume(name not in ERRORS)
    out = _fresh(workdir)
    expect_cli_error(_argv(image, out, f"--error={name}"), "--error", repr(name), "accepted: l2, l1, huber")
    assert _nothing_written(out)


@settings(max_examples=15)
@given(seed=st.one_of(st.integers(max_value=-1), st.integers(min_value=SEED_MAX + 1)))
def test_out_of_range_seed(image, workdir, seed):
    out = _fresh(workdir)
    expect_cli_error(_argv(image, out, f"--seed={seed}"), "--seed", str(seed))
    assert _nothing_written(out)


# ---- candidates -----------------------------------------------------------------------------------------------

KNOWN = st.sampled_from(list(text.VOCAB))


@settings(max_examples=30)
@given(known=st.lists(KNOWN, min_size=1, max_size=3, unique=True), unknown=st.text("qxzjkv", min_size=3, max_size=8))
def test_candidates_with_unknown_words(image, workdir, known, unknown):
    out = _fresh(workdir)
    cands = ",".join([*known, unknown])
    expect_cli_error(_argv(image, out)[:4] + [cands] + _argv(image, out)[5:], "--candidates", repr(unknown))
    assert _nothing_written(out)


@settings(max_examples=30)
@given(
    cands=st.one_of(
        KNOWN,  # one candidate
        st.lists(KNOWN, min_size=1, max_size=4).map(lambda w: ",".join(w + [""])),  # an empty item
        KNOWN.map(lambda w: f"{w},{w}"),  # the same condition twice
        KNOWN.map(lambda w: f"{w}, a {w}"),
        st.just(",".join(["red"] * 101)),
    )
)
def test_bad_candidate_lists(image, workdir, cands):
    out = _fresh(workdir)
    argv = _argv(image, out)
    line = expect_cli_error(argv[:4] + [cands] + argv[5:], "--candidates")
    assert any(s in line for s in ("2 to 100", "non-empty", "twice")), line
    assert _nothing_written(out)


@settings(max_examples=20)
@given(attribute=ARG_TEXT)
def test_unknown_attribute(image, workdir, attribute):
    assume(attribute not in shapes.ATTRIBUTES)
    out = _fresh(workdir)
    expect_cli_error(_argv(image, out, f"--attribute={attribute}"), "--attribute", repr(attribute), "color")
    assert _nothing_written(out)


@settings(max_examples=20)
@given(attr=st.sampled_from(list(shapes.ATTRIBUTES)), data=st.data())
def test_candidates_outside_the_attribute(image, workdir, attr, data):
    other = data.draw(st.sampled_from([w for a, ws in shapes.ATTRIBUTES.items() if a != attr for w in ws]))
    out = _fresh(workdir)
    argv = _argv(image, out)
    cands = f"{shapes.ATTRIBUTES[attr][0]},{other}"
    expect_cli_error(argv[:4] + [cands] + argv[5:] + ["--attribute", attr], repr(other), f"--attribute {attr}")
    assert _nothing_written(out)


@settings(max_examples=20)
@given(prompt=ARG_TEXT)
def test_digits_candidates_must_be_digits(image, workdir, prompt):
    assume("," not in prompt and prompt.strip() and not prompt.strip().isdigit())
    out = _fresh(workdir)
    argv = ["classify", "--model", "digits", "--image", str(image), "--candidates", f"3,{prompt}"]
    expect_cli_error(argv + ["--json", str(out / "c.json")], "--candidates", "digit 0-9")
    assert _nothing_written(out)


def test_no_candidates_and_no_attribute(image, workdir):
    out = _fresh(workdir)
    expect_cli_error(["classify", "--image", str(image), "--json", str(out / "c.json")], "--candidates", "--attribute")
    assert _nothing_written(out)


# ---- files ------------------------------------------------------------------------------------------------------


@settings(max_examples=25)
@given(data=st.binary(max_size=600), name=st.text("abcdefgh", min_size=1, max_size=6))
def test_garbage_image_files(workdir, data, name):
    out = _fresh(workdir)
    path = out / f"{name}.png"
    path.write_bytes(data)
    expect_cli_error(_argv(path, out), repr(str(path)), "accepted")
    assert _nothing_written(out)


def test_missing_image_and_directory_image(workdir):
    out = _fresh(workdir)
    expect_cli_error(_argv(out / "none.png", out), "not found", repr(str(out / "none.png")))
    expect_cli_error(_argv(out, out), "directory", repr(str(out)))
    assert _nothing_written(out)


@settings(max_examples=15)
@given(
    kind=st.sampled_from(["suffix", "directory", "under-file"] + ([] if IS_ROOT else ["read-only"])),
    stem=st.text("abcdefghij_-0123456789", min_size=1, max_size=10),
)
def test_unwritable_json(image, workdir, kind, stem):
    d = _fresh(workdir)
    target = bad_json_target(d, kind, stem)
    argv = ["classify", "--image", str(image), "--candidates", "red,green", "--json", str(target)]
    expect_cli_error(argv, "--json", repr(str(target)))
    assert (target.is_dir() or not os.path.lexists(target)) and no_stray_temp_files(d, target.parent)


@settings(max_examples=15)
@given(name=ARG_TEXT)
def test_unknown_model(image, workdir, name):
    assume(name not in ("shapes", "digits") and not os.path.lexists(name))
    out = _fresh(workdir)
    expect_cli_error(_argv(image, out, f"--model={name}"), repr(name), "shapes, digits")
    assert _nothing_written(out)


# ---- a valid run ----------------------------------------------------------------------------------------------


def test_valid_run_prints_the_ranking_and_writes_the_json(image, workdir):
    out = _fresh(workdir)
    argv = _argv(image, out, "--stages", "4,8", "--keep", "2,1", "--error", "l1")
    code, stdout, stderr = run_cli(argv)
    assert code == 0, stderr
    report = json.loads((out / "c.json").read_text())
    assert report["format"] == "condiff.classify" and report["candidates"] == ["red", "green", "blue"]
    assert [r["candidate"] for r in report["ranking"]][0] == report["prediction"]
    assert sorted(r["pairs"] for r in report["ranking"]) == [4, 8, 8] and report["nfe"] == 3 * 4 + 2 * 4
    assert report["config"]["error"] == "l1" and "--keep 2,1" in report["reproduce"]
    assert f"1. {report['prediction']}" in stdout and no_stray_temp_files(out)
