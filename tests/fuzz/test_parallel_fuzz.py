"""Fuzzing of `condiff sample --parallel` and `--parallel-opt` (patch-parallel sampling, condiff.parallel): every
bad value is one ``error:`` line naming it and what is accepted, exit code 2, before any model is loaded, and
nothing is written. The PatchConfig API refuses the same values with one-line ConfigErrors."""

from __future__ import annotations

from pathlib import Path

import pytest
from fuzzkit import expect_api_error, expect_cli_error, no_stray_temp_files
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from condiff.parallel import METHODS, MODES, PatchConfig


def refused(tmp: Path, extra: list[str], *needles: str):
    out = tmp / "grid.png"
    line = expect_cli_error(["sample", "--n", "1", "--steps", "2", "--out", str(out), *extra], *needles)
    assert not out.exists() and not out.with_suffix(".json").exists()
    assert no_stray_temp_files(tmp)
    return line


@pytest.mark.parametrize(
    "extra,needles",
    [
        (["--parallel", "ring"], ("--parallel", "'ring'", "distrifusion, pcpp")),
        (["--parallel", ""], ("--parallel", "distrifusion, pcpp")),
        (["--parallel-opt", "mode=full_sync"], ("--parallel-opt goes with --parallel",)),
        (["--parallel", "pcpp", "--parallel-opt", "mode"], ("KEY=VALUE", "'mode'")),
        (["--parallel", "pcpp", "--parallel-opt", "mode="], ("KEY=VALUE", "'mode='")),
        (["--parallel", "pcpp", "--parallel-opt", "speed=2"], ("--parallel-opt key", "'speed'", "split_batch")),
        (["--parallel", "pcpp", "--parallel-opt", "mode=async"], ("mode", "'async'", "corrected_async_gn")),
        (["--parallel", "pcpp", "--parallel-opt", "warmup=-1"], ("warmup", "-1", "[0, 100000]")),
        (["--parallel", "pcpp", "--parallel-opt", "warmup=1.5"], ("warmup", "'1.5'")),
        (["--parallel", "pcpp", "--parallel-opt", "warmup=lots"], ("warmup", "'lots'")),
        (["--parallel", "pcpp", "--parallel-opt", "window=nan"], ("window", "nan")),
        (["--parallel", "pcpp", "--parallel-opt", "window=-0.5"], ("window", "-0.5")),
        (["--parallel", "pcpp", "--parallel-opt", "window=wide"], ("window", "'wide'")),
        (["--parallel", "distrifusion", "--parallel-opt", "window=0.5"], ("window", "--parallel pcpp")),
        (["--parallel", "pcpp", "--parallel-opt", "split_batch=maybe"], ("split_batch", "'maybe'", "true or false")),
        (["--parallel", "pcpp", "--pipeline", "no-such-folder"], ("--parallel", "--pipeline")),
    ],
)
def test_bad_parallel_options_are_one_line_errors(tmp_path, extra, needles):
    refused(tmp_path, extra, *needles)


@settings(max_examples=25)
@given(st.text(min_size=1, max_size=12))
def test_any_other_method_is_refused(tmp_path_factory, method):
    assume(method not in METHODS and not method.startswith("-") and "\x00" not in method)
    refused(tmp_path_factory.mktemp("m"), ["--parallel", method], "--parallel", "distrifusion, pcpp")


@settings(max_examples=25)
@given(st.sampled_from(["mode", "warmup", "window", "split_batch"]), st.text(min_size=1, max_size=10))
def test_any_bad_value_is_refused(tmp_path_factory, key, value):
    value = value.strip()
    assume(value and "\x00" not in value and not value.startswith("-"))
    if key == "mode":
        assume(value not in MODES)
    elif key == "warmup":
        assume(not (value.isdigit() and value.isascii() and int(value) <= 100000))
    elif key == "window":
        try:
            assume(not (0 <= float(value) <= 1000))
        except ValueError:
            pass
    else:
        assume(value.lower() not in ("true", "false", "1", "0", "yes", "no"))
    refused(tmp_path_factory.mktemp("v"), ["--parallel", "pcpp", "--parallel-opt", f"{key}={value}"], key)


def test_api_refusals():
    expect_api_error(PatchConfig, method="ring", needles=("parallel method", "'ring'"))
    expect_api_error(PatchConfig, mode="fast", needles=("parallel mode", "'fast'"))
    expect_api_error(PatchConfig, warmup_steps=True, needles=("warmup_steps",))
    expect_api_error(PatchConfig, window=float("inf"), needles=("window",))
    expect_api_error(PatchConfig, split_batch="yes", needles=("split_batch",))
