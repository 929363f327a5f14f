"""Property-based fuzzing of `condiff invert`, `condiff edit` and `condiff bench edit`: bad numbers, bad method
names, bad --method-opt strings and garbage files as --image / --inversion.

The contract is the fuzz suite's (fuzzkit): exit code 2, one ``error: `` line naming the bad value, no
traceback, and the refusal happens before any model weights are read. The method names and their options
come from condiff.inversion.METHODS, so a method added there is fuzzed too.
"""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from fuzzkit import expect_cli_error, no_stray_temp_files
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from condiff.core.grids import make_grid
from condiff.data import shapes
from condiff.data.images import write_image
from condiff.inversion.methods import METHODS

COMMANDS = st.sampled_from(["invert", "edit"])
NAMES = st.sampled_from(list(METHODS))
TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=16)
# (method, option) pairs whose value is not a free string: a name or a non-finite number is refused for all
TYPED = [(name, f.name) for name, cls in METHODS.items() for f in fields(cls) if not isinstance(f.default, str)]


@pytest.fixture(scope="module")
def source(workdir) -> Path:
    x = shapes.render_batch(torch.tensor([[0, 0, 1, 0]]), torch.Generator().manual_seed(0)).images
    return write_image(x, workdir / "source.png")


def _argv(command: str, source: Path, out_dir: Path, method: str = "ddim") -> list[str]:
    if command == "invert":
        return [
            "invert",
            "--image",
            str(source),
            "--prompt",
            "large red circle top-left",
            f"--method={method}",
            "--out",
            str(out_dir / "inv.safetensors"),
        ]
    return [
        "edit",
        "--image",
        str(source),
        "--from",
        "large red circle top-left",
        "--to",
        "large blue circle",
        f"--method={method}",
        "--out",
        str(out_dir / "edit.png"),
    ]


def _nothing_written(out_dir: Path) -> bool:
    return not any(p.name.startswith(("inv", "edit", "bench")) for p in out_dir.iterdir()) and no_stray_temp_files(
        out_dir
    )


@settings(max_examples=25)
@given(
    command=COMMANDS,
    option=st.sampled_from(["--steps", "--seed"]),
    value=st.one_of(st.integers(max_value=0), st.integers(min_value=1001, max_value=10**30)),
)
def test_bad_steps_and_seeds(source, tmp_path_factory, command, option, value):
    """--steps outside [1, 1000] and negative or too-large seeds are refused, naming the option."""
    assume(option == "--steps" or value < 0 or value > 2**63 - 1)
    out = tmp_path_factory.mktemp("w")
    expect_cli_error(_argv(command, source, out) + [option, str(value)], option)
    assert _nothing_written(out)


@settings(max_examples=25)
@given(
    option=st.sampled_from(["--n", "--steps", "--batch-size", "--examples"]),
    value=st.one_of(st.integers(max_value=0), st.integers(min_value=100_001, max_value=10**12)),
)
def test_bench_edit_bad_numbers(tmp_path_factory, option, value):
    out = tmp_path_factory.mktemp("w")
    expect_cli_error(
        ["bench", "edit", "--methods", "ddim", "--json", str(out / "bench.json"), option, str(value)], option
    )
    assert _nothing_written(out)


@settings(max_examples=30)
@given(command=COMMANDS, name=TEXT)
def test_unknown_method_names(source, tmp_path_factory, command, name):
    assume(name not in METHODS)
    out = tmp_path_factory.mktemp("w")
    expect_cli_error(_argv(command, source, out, name), "unknown editing method")
    assert _nothing_written(out)


@settings(max_examples=30)
@given(names=TEXT)
def test_bench_edit_bad_method_lists(tmp_path_factory, names):
    items = [p.strip() for p in names.split(",")]
    assume(names.strip() != "all" and not (all(i in METHODS for i in items) and len(set(items)) == len(items)))
    out = tmp_path_factory.mktemp("w")
    line = expect_cli_error(["bench", "edit", f"--methods={names}", "--json", str(out / "bench.json")])
    assert "--methods" in line or "unknown editing method" in line, line
    assert _nothing_written(out)


@settings(max_examples=30)
@given(command=COMMANDS, method=NAMES, text=TEXT.filter(lambda s: "=" not in s))
def test_option_strings_without_a_value(source, tmp_path_factory, command, method, text):
    """A --method-opt without '=' is refused as not KEY=VALUE."""
    out = tmp_path_factory.mktemp("w")
    expect_cli_error(_argv(command, source, out, method) + [f"--method-opt={text}"], "--method-opt must be KEY=VALUE")
    assert _nothing_written(out)


@settings(max_examples=30)
@given(command=COMMANDS, method=NAMES, key=st.from_regex(r"[a-z_]{1,12}", fullmatch=True), value=TEXT)
def test_unknown_option_keys(source, tmp_path_factory, command, method, key, value):
    assume(key not in {f.name for f in fields(METHODS[method])})
    out = tmp_path_factory.mktemp("w")
    expect_cli_error(_argv(command, source, out, method) + [f"--method-opt={key}={value}"], repr(key))
    assert _nothing_written(out)


BAD_VALUES = st.one_of(
    st.from_regex(r"[a-zA-Z_][a-zA-Z0-9_]{0,7}", fullmatch=True).filter(lambda s: s not in ("true", "false")),
    st.sampled_from(["NaN", "Infinity", "-Infinity", "1e999", "-1e999", "[1]", "{}", "null"]),
)


@settings(max_examples=40)
@given(command=COMMANDS, pair=st.sampled_from(TYPED), value=BAD_VALUES)
def test_bad_option_values(source, tmp_path_factory, command, pair, value):
    """A name, a non-finite number or a JSON list/object/null for a number or true/false option: refused,
    naming the option."""
    method, key = pair
    out = tmp_path_factory.mktemp("w")
    expect_cli_error(_argv(command, source, out, method) + [f"--method-opt={key}={value}"], key)
    assert _nothing_written(out)


@settings(max_examples=25)
@given(command=COMMANDS, content=st.binary(max_size=64))
def test_garbage_image_files(tmp_path_factory, command, content):
    """Random bytes as --image: a one-line InputFileError naming the file."""
    out = tmp_path_factory.mktemp("w")
    path = out / "garbage.png"
    path.write_bytes(content)
    expect_cli_error(_argv(command, path, out), str(path))
    assert _nothing_written(out)


@settings(max_examples=25)
@given(content=st.binary(max_size=64))
def test_garbage_inversion_files(source, tmp_path_factory, content):
    out = tmp_path_factory.mktemp("w")
    path = out / "garbage.safetensors"
    path.write_bytes(content)
    expect_cli_error(
        ["edit", "--image", str(source), "--to", "blue", "--inversion", str(path), "--out", str(out / "edit.png")],
        "--inversion",
        str(path),
    )
    assert _nothing_written(out)


def _shapes_schedule():
    from condiff.core.schedules import schedule_from_config
    from condiff.models.base import resolve_model

    return schedule_from_config(resolve_model("shapes")[1]["schedule"])


JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 60) | st.floats(allow_nan=False) | TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=3),
    max_leaves=8,
)
OPTIONAL = {
    "prompt": st.one_of(st.just("large red circle top-left"), TEXT, JSONISH),
    "tokens": JSONISH,
    "options": st.one_of(st.just({}), JSONISH),
    "info": JSONISH,
    "image_sha256": st.one_of(TEXT, JSONISH),
}
SHAPES_GRIDS = {k: make_grid(_shapes_schedule(), k).tolist() for k in range(1, 7)}


# anything at all; then method and grid present (the file loads), then the shapes model's real grid too, so
# the later checks (steps, model, prompt, options, grid, image digest) are reached
META = st.one_of(
    JSONISH,
    st.fixed_dictionaries(
        {}, optional={"method": st.one_of(NAMES, TEXT), "steps": JSONISH, "grid": JSONISH, "model": JSONISH, **OPTIONAL}
    ),
    st.fixed_dictionaries(
        {
            "method": NAMES,
            "grid": st.lists(st.floats(0, 1000), min_size=2, max_size=6),
            "steps": st.one_of(st.integers(-2, 8), JSONISH),
            "model": st.one_of(st.just("shapes"), JSONISH),
        },
        optional=OPTIONAL,
    ),
    st.integers(1, 6).flatmap(
        lambda k: st.fixed_dictionaries(
            {"method": NAMES, "grid": st.just(SHAPES_GRIDS[k]), "steps": st.just(k), "model": st.just("shapes")},
            optional=OPTIONAL,
        )
    ),
)


@settings(max_examples=80)
@given(meta=META, raw=st.booleans())
def test_fuzzed_inversion_metadata(source, tmp_path_factory, meta, raw):
    """A real safetensors file whose condiff_inversion metadata is fuzzed (or not JSON at all): refused on one
    line naming --inversion, before any model loads (a fuzzed file never matches the image's digest)."""
    out = tmp_path_factory.mktemp("w")
    path = out / "fuzzed.safetensors"
    text = json.dumps(meta) if not raw else json.dumps(meta)[:-1]
    save_file({"latent": torch.zeros(1, 3, 32, 32)}, str(path), metadata={"condiff_inversion": text})
    expect_cli_error(
        ["edit", "--image", str(source), "--to", "blue", "--inversion", str(path), "--out", str(out / "edit.png")],
        "--inversion",
    )
    assert _nothing_written(out)
