"""Property-based fuzzing of the fast-solver options and commands: --solver-opt, --dynamic-threshold, --ems and
--dc-ratios on `sample` / `eval`, and the list options of `condiff dc search` and `condiff bench solvers`.

The contract is the fuzz suite's (fuzzkit): exit code 2, one ``error: `` line naming the bad value, no
traceback, and the refusal happens before any model weights are read.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from fuzzkit import expect_cli_error
from hypothesis import assume, given, settings
from hypothesis import strategies as st

COMMANDS = st.sampled_from(["sample", "eval"])
ARG_TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=16)


def _base(command: str, workdir: Path) -> list[str]:
    if command == "sample":
        return ["sample", "--model", "digits", "--out", str(workdir / "grid.png")]
    return ["eval", "--model", "digits", "--json", str(workdir / "eval.json")]


@settings(max_examples=30)
@given(command=COMMANDS, value=ARG_TEXT)
def test_bad_solver_option_values(tmp_path_factory, command, value):
    """UniPC's order must be 1, 2 or 3: any other value is refused, naming it."""
    assume(value.strip() not in {"1", "2", "3"})
    line = expect_cli_error(
        _base(command, tmp_path_factory.mktemp("w")) + ["--solver", "unipc", "--solver-opt", f"order={value}"]
    )
    assert "order" in line


@settings(max_examples=20)
@given(command=COMMANDS, key=st.from_regex(r"[a-z_]{1,10}", fullmatch=True))
def test_unknown_solver_option_keys(tmp_path_factory, command, key):
    assume(key not in {"order", "variant", "corrector", "lower_order_final"})
    expect_cli_error(
        _base(command, tmp_path_factory.mktemp("w")) + ["--solver", "unipc", "--solver-opt", f"{key}=1"],
        repr(key)[1:-1],
    )


@settings(max_examples=25)
@given(
    command=COMMANDS,
    ratio=st.one_of(st.floats(max_value=0.0), st.floats(min_value=1.0, exclude_min=True), st.just(math.nan)),
)
def test_bad_dynamic_threshold(tmp_path_factory, command, ratio):
    expect_cli_error(
        _base(command, tmp_path_factory.mktemp("w")) + ["--dynamic-threshold", repr(ratio)], "--dynamic-threshold"
    )


@settings(max_examples=25)
@given(
    command=COMMANDS,
    flag=st.sampled_from([("--ems", "dpm-v3", "x.safetensors"), ("--dc-ratios", "dc-solver", "x.json")]),
    content=st.binary(max_size=64),
)
def test_garbage_statistics_and_ratios_files(tmp_path_factory, command, flag, content):
    """Random bytes as an EMS or ratios file: a one-line InputFileError naming the file."""
    option, solver, name = flag
    w = tmp_path_factory.mktemp("w")
    path = w / name
    path.write_bytes(content)
    expect_cli_error(_base(command, w) + ["--solver", solver, option, str(path)], str(path))


BAD_LISTS = st.one_of(
    st.lists(st.integers(-50, 2000), min_size=1, max_size=4)
    .filter(lambda v: any(x < 1 or x > 1000 for x in v))
    .map(lambda v: ",".join(map(str, v))),
    st.lists(st.integers(1, 50), min_size=1, max_size=3).map(lambda v: ",".join(map(str, v)) + ",,"),
    st.from_regex(r"[a-z ;.]{1,8}", fullmatch=True),
)


@settings(max_examples=30)
@given(nfe=BAD_LISTS)
def test_bench_bad_nfe_lists(nfe):
    expect_cli_error(["bench", "solvers", "--oracle", "gmm", "--nfe", nfe], "--nfe")


@settings(max_examples=30)
@given(nfe=BAD_LISTS)
def test_dc_search_bad_nfe_lists(tmp_path_factory, nfe):
    out = tmp_path_factory.mktemp("w") / "r.json"
    expect_cli_error(["dc", "search", "--model", "digits", "--nfe", nfe, "--cfg", "3", "--out", str(out)], "--nfe")
    assert not out.exists()


GRID_JSON = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-5, 2000), st.floats(allow_nan=True), st.text(max_size=8)),
    lambda inner: st.one_of(
        st.lists(inner, max_size=6),
        st.dictionaries(
            st.sampled_from(["format", "version", "solver", "grids", "steps", "times", "fitted_for", "x"]), inner
        ),
    ),
    max_leaves=20,
)


@settings(max_examples=30)
@given(
    command=COMMANDS,
    content=st.one_of(st.binary(max_size=64), GRID_JSON.map(lambda v: json.dumps(v).encode())),
)
def test_garbage_grid_files(tmp_path_factory, command, content):
    """Random bytes or random JSON as a --grid file: one line naming the file (a grids file needs its format
    tag, so none of these is accepted)."""
    w = tmp_path_factory.mktemp("w")
    path = w / "grid.json"
    path.write_bytes(content)
    expect_cli_error(_base(command, w) + ["--grid", str(path)], str(path))


@settings(max_examples=30)
@given(
    steps=BAD_LISTS.filter(
        lambda s: "," not in s or any(not p.strip().isdigit() or not 1 <= int(p) <= 100 for p in s.split(","))
    )
)
def test_grid_search_bad_step_lists(tmp_path_factory, steps):
    out = tmp_path_factory.mktemp("w") / "g.json"
    expect_cli_error(["grid", "search", "--model", "digits", "--steps", steps, "--out", str(out)], "--steps")
    assert not out.exists()


@settings(max_examples=20)
@given(content=st.binary(max_size=96), scale=st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True)))
def test_garbage_lora_folders(tmp_path_factory, content, scale):
    """Random bytes as a LoRA's weights file (and any --lora-scale): one line naming the folder or the scale."""
    w = tmp_path_factory.mktemp("w")
    (w / "lora").mkdir()
    (w / "lora" / "pytorch_lora_weights.safetensors").write_bytes(content)
    argv = [
        "sample",
        "--model",
        "shapes",
        "--n",
        "1",
        "--steps",
        "1",
        "--out",
        str(w / "x.png"),
        "--lora",
        str(w / "lora"),
    ]
    if scale is not None:
        argv += ["--lora-scale", repr(scale)]
    expect_cli_error(argv)
