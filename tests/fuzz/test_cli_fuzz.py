"""Property-based fuzzing of the CLI (called in-process through ``condiff.cli.main``).

Every bad input must end in exit code 2 with one ``error: `` line on stderr that names the bad value, no
traceback, and no half-written output; all of them are refused before any model weights are read.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

import pytest
from fuzzkit import IS_ROOT, TINY_RECIPE, expect_cli_error, no_stray_temp_files, run_cli
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from condiff.core.grids import MAX_STEPS, SPACINGS
from condiff.data import text
from condiff.solvers import SOLVERS

MAX_SAMPLES = 1_000_000
SEED_MAX = 2**63 - 1

# argv strings as a shell could pass them: anything but NUL and lone surrogates
ARG_TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=24)
WORD = st.text(st.characters(whitelist_categories=("Ll", "Lu", "Nd"), max_codepoint=0x24F), min_size=1, max_size=12)
COMMANDS = st.sampled_from(["sample", "eval"])


def _base(command: str, workdir: Path) -> list[str]:
    """A valid command line (no model is loaded before its own checks fail)."""
    if command == "sample":
        return ["sample", "--model", "digits", "--out", str(workdir / "grid.png")]
    return ["eval", "--model", "digits", "--json", str(workdir / "eval.json")]


def _fresh(workdir: Path) -> Path:
    return Path(tempfile.mkdtemp(dir=workdir))


# ---- registry names ------------------------------------------------------------------------------------


@settings(max_examples=25)
@given(command=COMMANDS, name=ARG_TEXT)
def test_unknown_solver(workdir, command, name):
    assume(name not in SOLVERS)
    expect_cli_error(_base(command, workdir) + [f"--solver={name}"], repr(name), "accepted: ddpm")


@settings(max_examples=20)
@given(command=COMMANDS, name=ARG_TEXT)
def test_unknown_spacing(workdir, command, name):
    assume(name not in SPACINGS)
    expect_cli_error(_base(command, workdir) + [f"--spacing={name}"], repr(name), "accepted: uniform-t")


@settings(max_examples=20)
@given(command=COMMANDS, name=ARG_TEXT)
def test_unknown_model_name(workdir, command, name):
    assume(name not in ("shapes", "digits") and not os.path.lexists(name))
    base = _base(command, workdir)
    expect_cli_error(base[:1] + [f"--model={name}"] + base[3:], repr(name), "shapes, digits")


# ---- numbers --------------------------------------------------------------------------------------------

LIMITS = {"--steps": MAX_STEPS, "--n": MAX_SAMPLES, "--batch-size": MAX_SAMPLES}


@settings(max_examples=40)
@given(command=COMMANDS, option=st.sampled_from(sorted(LIMITS)), data=st.data())
def test_out_of_range_counts(workdir, command, option, data):
    value = data.draw(st.one_of(st.integers(max_value=0), st.integers(min_value=LIMITS[option] + 1)))
    expect_cli_error(_base(command, workdir) + [f"{option}={value}"], option, str(value))


@settings(max_examples=15)
@given(
    command=st.sampled_from(["sample", "eval", "train"]),
    seed=st.one_of(st.integers(max_value=-1), st.integers(min_value=SEED_MAX + 1)),
)
def test_out_of_range_seed(workdir, command, seed):
    base = (
        ["train", str(TINY_RECIPE), "--out", str(workdir / "never")] if command == "train" else _base(command, workdir)
    )
    expect_cli_error(base + [f"--seed={seed}"], "--seed", str(seed))
    assert not (workdir / "never").exists()


NOT_AN_INTEGER = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False).filter(lambda x: x != int(x)).map(repr),
    WORD.filter(lambda w: not re.fullmatch(r"[+-]?[\d_]+(\.0*)?", w.strip())),
    st.sampled_from(["", "nan", "inf", "1e3", "0x10", "1/2", "--"]),
)


@settings(max_examples=30)
@given(command=COMMANDS, option=st.sampled_from(["--steps", "--n", "--batch-size", "--seed"]), value=NOT_AN_INTEGER)
def test_non_integer_counts(workdir, command, option, value):
    expect_cli_error(_base(command, workdir) + [f"{option}={value}"], option, repr(value))


@settings(max_examples=25)
@given(command=COMMANDS, scale=st.floats().filter(lambda x: not abs(x) <= 1e4))
def test_nan_inf_and_huge_cfg(workdir, command, scale):
    expect_cli_error(_base(command, workdir) + [f"--cfg={scale!r}"], "--cfg", str(scale), "10000")


@settings(max_examples=10)
@given(command=COMMANDS, value=WORD.filter(lambda w: not re.fullmatch(r"\d+", w)))
def test_non_number_cfg(workdir, command, value):
    assume(value.lower().strip("+-") not in ("nan", "inf", "infinity"))
    expect_cli_error(_base(command, workdir) + [f"--cfg={value}"], "--cfg", repr(value))


# ---- prompts --------------------------------------------------------------------------------------------

VOCAB_WORDS = sorted(text.VOCAB)
SEPARATORS = st.sampled_from([" ", "  ", ", ", "\t", " ,"])


@settings(max_examples=30)
@given(
    known=st.lists(st.sampled_from(VOCAB_WORDS), max_size=3, unique_by=lambda w: text.VOCAB[w][0]),
    unknown=st.text("abcdefghijklmnopqrstuvwxyz-", min_size=1, max_size=10),
    sep=SEPARATORS,
    position=st.integers(0, 3),
    upper=st.booleans(),
)
def test_shapes_prompt_with_unknown_word(workdir, known, unknown, sep, position, upper):
    assume(unknown not in text.VOCAB and unknown not in text.ALIASES and unknown not in text.FILLER)
    words = known[:position] + [unknown.upper() if upper else unknown] + known[position:]
    prompt = sep.join(words)
    expect_cli_error(
        ["sample", "--model", "shapes", f"--prompt={prompt}", "--out", str(workdir / "p.png")],
        repr(unknown),
        "accepted words: small",
    )
    assert not (workdir / "p.png").exists()


@settings(max_examples=20)
@given(slot=st.integers(0, len(text.SLOTS) - 1), data=st.data(), sep=SEPARATORS)
def test_shapes_prompt_with_repeated_attribute(workdir, slot, data, sep):
    name, words = text.SLOTS[slot]
    first, second = data.draw(st.sampled_from(words)), data.draw(st.sampled_from(words))
    others = data.draw(
        st.lists(
            st.sampled_from([w for w in VOCAB_WORDS if text.VOCAB[w][0] != slot]),
            max_size=2,
            unique_by=lambda w: text.VOCAB[w][0],
        )
    )
    words = data.draw(st.permutations([first, second] + others))
    prompt = sep.join(words)
    # two adjacent words that make one position ("top left") are one position, not two
    assume(all(f"{a}-{b}" not in text.VOCAB and f"{a}-{b}" not in text.ALIASES for a, b in zip(words, words[1:])))
    expect_cli_error(
        ["sample", "--model", "shapes", f"--prompt={prompt}", "--out", str(workdir / "p.png")],
        f"names the {name} twice",
        repr(prompt),
    )


@settings(max_examples=15)
@given(prompt=ARG_TEXT)
def test_digits_prompt_must_be_one_digit(workdir, prompt):
    words = prompt.lower().split()
    while len(words) > 1 and words[0] in ("a", "an", "the", "digit", "number"):  # 'digit 7' is a caption of 7
        words = words[1:]
    assume(words not in [[str(i)] for i in range(10)])
    expect_cli_error(
        ["sample", "--model", "digits", f"--prompt={prompt}", "--out", str(workdir / "d.png")], repr(prompt), "0-9"
    )


def test_empty_shapes_prompt_is_unconditional(workdir):
    """The empty caption is valid (the null condition): it samples, and the sidecar reproduces it."""
    out = workdir / "empty.png"
    code, stdout, err = run_cli(
        [
            "sample",
            "--model",
            "shapes",
            "--prompt",
            "",
            "--steps",
            "1",
            "--n",
            "1",
            "--solver",
            "ddim",
            "--out",
            str(out),
        ]
    )
    assert code == 0 and "Traceback" not in err, err
    side = json.loads(out.with_suffix(".json").read_text())
    assert side["prompt"] == "" and "--prompt ''" in side["reproduce"]
    assert out.is_file() and no_stray_temp_files(workdir)


# ---- output paths ---------------------------------------------------------------------------------------


def _unwritable_dir(workdir: Path, kind: str) -> Path:
    """A directory no file can be created in (as root, permissions do not apply: use /sys or /proc)."""
    if kind == "under-file":
        f = workdir / "a-regular-file"
        f.write_text("x")
        return f
    if kind == "under-file-deep":
        f = workdir / "a-regular-file"
        f.write_text("x")
        return f / "sub" / "dir"
    if kind == "read-only":
        if IS_ROOT:
            return Path("/sys")
        d = workdir / "read-only"
        d.mkdir(exist_ok=True)
        d.chmod(0o555)
        return d
    return Path("/proc/no-such-process-dir")


@settings(max_examples=25)
@given(
    command=COMMANDS,
    kind=st.sampled_from(["under-file", "under-file-deep", "read-only", "proc"]),
    stem=st.text("abcdefghij_-0123456789", min_size=1, max_size=10),
)
def test_unwritable_output(workdir, command, kind, stem):
    d = _fresh(workdir)
    target = _unwritable_dir(d, kind) / (stem + (".png" if command == "sample" else ".json"))
    option = "--out" if command == "sample" else "--json"
    base = _base(command, workdir)
    argv = base[:3] + [option, str(target)]
    expect_cli_error(argv, option, repr(str(target)))
    assert not os.path.lexists(target) and no_stray_temp_files(d, target.parent)


@settings(max_examples=20)
@given(
    command=COMMANDS,
    stem=st.text("abcdefghij_-0123456789", min_size=1, max_size=10),
    suffix=st.sampled_from(["", ".jpg", ".jpeg", ".pn", ".png.txt", ".txt", ".json.bak", ".npy", "."]),
)
def test_wrong_output_suffix(workdir, command, stem, suffix):
    option, want = ("--out", ".png") if command == "sample" else ("--json", ".json")
    target = workdir / (stem + suffix)
    assume(target.suffix.lower() != want)
    expect_cli_error(_base(command, workdir)[:3] + [option, str(target)], option, want, repr(str(target)))
    assert not target.exists()


@settings(max_examples=10)
@given(command=COMMANDS, stem=st.text("abcdefghij", min_size=1, max_size=8))
def test_directory_as_output_file(workdir, command, stem):
    d = _fresh(workdir)
    target = d / (stem + (".png" if command == "sample" else ".json"))
    target.mkdir()
    option = "--out" if command == "sample" else "--json"
    expect_cli_error(_base(command, workdir)[:3] + [option, str(target)], option, "is a directory")
    assert target.is_dir() and not any(target.iterdir()) and no_stray_temp_files(d)


@settings(max_examples=10)
@given(
    kind=st.sampled_from(["file", "under-file", "under-file-deep", "read-only"]),
    stem=st.text("abcdefghij", min_size=1, max_size=8),
)
def test_train_output_directory_not_writable(workdir, kind, stem):
    d = _fresh(workdir)
    if kind == "file":
        target = d / stem
        target.write_text("not a directory")
    else:
        target = _unwritable_dir(d, kind) / stem
    expect_cli_error(["train", str(TINY_RECIPE), "--out", str(target)], "--out", repr(str(target)))
    assert no_stray_temp_files(d)


# ---- input paths ----------------------------------------------------------------------------------------


@settings(max_examples=10)
@given(stem=st.text("abcdefghij_-", min_size=1, max_size=10), as_dir=st.booleans())
def test_train_missing_recipe_or_directory(workdir, stem, as_dir):
    d = _fresh(workdir)
    recipe = d / (stem + ".toml")
    if as_dir:
        recipe.mkdir()
    expect_cli_error(["train", str(recipe), "--out", str(d / "run")], repr(str(recipe)), ".toml")
    assert not (d / "run").exists()


@settings(max_examples=10)
@given(
    kind=st.sampled_from(["empty-dir", "regular-file", "missing"]), stem=st.text("abcdefghij", min_size=1, max_size=8)
)
def test_model_path_is_not_a_model_directory(workdir, kind, stem):
    d = _fresh(workdir)
    model = d / stem
    if kind == "empty-dir":
        model.mkdir()
    elif kind == "regular-file":
        model.write_text("{}")
    expect_cli_error(["sample", "--model", str(model), "--out", str(d / "o.png")], repr(str(model)))
    assert not (d / "o.png").exists()


GARBAGE_META = st.one_of(
    st.binary(max_size=64).map(lambda b: ("bytes", b)),
    st.sampled_from([b"", b"{", b'{"family": "digits"', b"\xff\xfe{}", b"[" * 5000, b"1" * 5000]).map(
        lambda b: ("bytes", b)
    ),
    st.sampled_from([[], 3, "digits", None, [1, 2]]).map(lambda v: ("json", v)),
    st.fixed_dictionaries(
        {},
        optional={
            "family": st.just("digits"),
            "prediction": st.just("eps"),
            "schedule": st.just({"type": "vp_discrete"}),
            "model": st.just({}),
        },
    )
    .filter(lambda m: len(m) < 4)
    .map(lambda v: ("json", v)),
    st.fixed_dictionaries(
        {
            "family": st.one_of(st.just("digits"), ARG_TEXT, st.integers(), st.lists(st.integers(), max_size=2)),
            "prediction": st.one_of(st.just("eps"), ARG_TEXT, st.none()),
            "schedule": st.one_of(
                st.just({"type": "vp_discrete"}), st.dictionaries(ARG_TEXT, st.integers(), max_size=2), st.integers()
            ),
            "model": st.one_of(st.just({}), st.integers(), st.text(max_size=3)),
        }
    )
    .filter(
        lambda m: (
            not (
                m["family"] == "digits"
                and m["prediction"] == "eps"
                and m["schedule"] == {"type": "vp_discrete"}
                and m["model"] == {}
            )
        )
    )
    .map(lambda v: ("json", v)),
)


@settings(max_examples=25)
@given(meta=GARBAGE_META)
def test_model_directory_with_garbage_condiff_json(workdir, meta):
    d = _fresh(workdir)
    model = d / "model"
    model.mkdir()
    kind, value = meta
    (model / "condiff.json").write_bytes(value if kind == "bytes" else json.dumps(value).encode())
    line = expect_cli_error(["sample", "--model", str(model), "--out", str(d / "o.png")])
    assert str(model) in line
    assert not (d / "o.png").exists()


# ---- the command line itself ----------------------------------------------------------------------------


@settings(max_examples=15)
@given(
    command=st.sampled_from(["sample", "eval", "train", "models", "solvers"]),
    option=st.text("abcdefghijklmnopqrstuvwxyz-", min_size=1, max_size=12),
)
def test_unknown_option(workdir, command, option):
    known = {
        "model",
        "prompt",
        "solver",
        "steps",
        "cfg",
        "n",
        "seed",
        "spacing",
        "batch-size",
        "out",
        "out-dir",
        "json",
        "resume",
        "help",
        "no-resume",
        "guide",
        "guide-scale",
    }
    assume(option.strip("-") not in known and not any(k.startswith(option.strip("-")) for k in known))
    assume(option.strip("-"))
    flag = "--" + option.strip("-")
    expect_cli_error([command, flag, "1"], flag)


def _commands() -> set[str]:
    """Every name `condiff` answers as a command (its registered commands and groups)."""
    import typer

    from condiff.cli import app

    return set(typer.main.get_command(app).commands)


COMMANDS = _commands()


@settings(max_examples=10)
@given(name=ARG_TEXT)
def test_unknown_command(name):
    assume(name not in COMMANDS and name.strip())
    assume(not name.startswith("-"))
    line = expect_cli_error([name])
    assert repr(name)[1:-1].replace("\\'", "'") in line or name.replace("\n", " ") in line


@pytest.mark.parametrize("command", ["sample", "eval"])
def test_option_without_value(command, workdir):
    expect_cli_error(_base(command, workdir) + ["--steps"], "--steps")
