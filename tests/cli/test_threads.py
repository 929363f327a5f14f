"""--threads: the default (OMP_NUM_THREADS, else MKL_NUM_THREADS, else 1; never more than the cores or torch's own
setting), the one-line refusal of a count outside [1, cores] on every command that computes, and the count in the
JSON sidecar and the `reproduce` line, which writes the same bytes again."""

import json
import shlex

import pytest
import torch

from clikit import ok, one_line_error, run
from condiff.cli import common
from condiff.errors import ConfigError

CORES = common.cores()


@pytest.fixture
def env(monkeypatch):
    """No thread variable set, four cores, and torch at four threads (nothing computes at that count here)."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    monkeypatch.setattr(common, "cores", lambda: 4)
    torch.set_num_threads(4)
    yield monkeypatch
    torch.set_num_threads(1)


@pytest.mark.parametrize(
    "variables, torch_threads, expected",
    [
        ({}, 4, 1),  # nothing set: one thread
        ({"OMP_NUM_THREADS": "3"}, 4, 3),
        ({"OMP_NUM_THREADS": "9"}, 4, 4),  # never more than the cores
        ({"OMP_NUM_THREADS": "3"}, 2, 2),  # nor than torch's own setting (a caller's torch.set_num_threads)
        ({"MKL_NUM_THREADS": "2"}, 4, 2),
        ({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "3"}, 4, 1),  # OMP first, as torch reads them
        ({"OMP_NUM_THREADS": "3,1"}, 4, 3),  # OpenMP's nested list: the outer level
        ({"OMP_NUM_THREADS": " "}, 4, 1),  # blank is unset
    ],
)
def test_default_thread_count(env, variables, torch_threads, expected):
    for name, value in variables.items():
        env.setenv(name, value)
    torch.set_num_threads(torch_threads)
    assert common.thread_count() == expected


@pytest.mark.parametrize("value", ["abc", "0", "-2", "1.5"])
def test_bad_thread_variable_is_a_one_line_error(env, value):
    env.setenv("OMP_NUM_THREADS", value)
    with pytest.raises(ConfigError) as e:
        common.thread_count()
    assert str(e.value) == f"OMP_NUM_THREADS must be a positive integer, got {value!r} (unset it or give --threads)"


def test_given_count_is_checked_against_the_cores(env):
    env.setenv("OMP_NUM_THREADS", "1")  # --threads wins over the variables
    assert [common.thread_count(n) for n in (1, 2, 4)] == [1, 2, 4]
    for bad in (0, -1, 5, True):
        with pytest.raises(ConfigError) as e:
            common.thread_count(bad)
        assert str(e.value) == (
            f"--threads must be an integer in [1, 4] (the CPU cores this process may use), got {bad!r}"
        )


def test_every_computing_command_takes_threads():
    import typer

    from condiff.cli.app import app

    computing = {
        "sample",
        "eval",
        "train",
        "finetune",
        "demo",
        "invert",
        "edit",
        "restore",
        "export",
        "bench solvers",
        "bench edit",
        "ems compute",
        "dc search",
        "grid search",
        "guidance fit-linear-ag",
        "guidance train-ppap",
        "guidance fit-minority",
        "ui",
        "classify",
        "certify",
        "predict",
        "unicon",
        "match",
        "features fit",
        "features edit",
        "adapt",
        "forecast",
        "sr search",
        "sr apply",
        "vae sample",
        "vae interpolate",
    }
    found = set()

    def walk(command, prefix):
        for name, sub in getattr(command, "commands", {}).items():
            walk(sub, f"{prefix} {name}".strip())
        if any(p.name == "threads" for p in command.params):
            found.add(prefix)

    walk(typer.main.get_command(app), "")
    assert found == computing


@pytest.mark.parametrize(
    "argv",
    [
        ["sample", "--out", "{d}/a.png"],
        ["eval", "--model", "digits"],
        ["train", "tests/fixtures/tiny_digits.toml", "--out", "{d}/run"],
        ["demo", "--out", "{d}/demo"],
        ["invert", "--image", "{d}/in.png", "--prompt", "red", "--method", "ddim", "--out", "{d}/i.safetensors"],
        ["edit", "--image", "{d}/in.png", "--from", "red", "--to", "blue", "--method", "ddim", "--out", "{d}/e.png"],
        ["restore", "--task", "colorize", "--image", "{d}/in.png", "--out", "{d}/r.png"],
        ["export", "--model", "digits", "--out", "{d}/x"],
        ["bench", "solvers", "--oracle", "gmm"],
        ["bench", "edit", "--n", "1", "--json", "{d}/b.json"],
        ["ems", "compute", "--model", "digits", "--n-data", "4", "--out", "{d}/e.safetensors"],
        ["dc", "search", "--model", "digits", "--nfe", "5", "--cfg", "3", "--out", "{d}/r.json"],
        ["guidance", "fit-linear-ag", "--model", "digits", "--cfg", "3", "--steps", "4", "--out", "{d}/l.safetensors"],
        ["guidance", "train-ppap", "--classifier", "clean", "--model", "shapes", "--out", "{d}/p"],
        ["guidance", "fit-minority", "--model", "shapes", "--out", "{d}/m"],
        ["ui"],
    ],
    ids=lambda argv: " ".join(a for a in argv if not a.startswith("-") and "{d}" not in a)[:40],
)
@pytest.mark.parametrize("threads", ["0", str(CORES + 1)])
def test_threads_outside_the_cores_is_refused_before_any_work(argv, threads, tmp_path, capsys):
    code, _, err = run([a.replace("{d}", str(tmp_path)) for a in argv] + ["--threads", threads], capsys)
    one_line_error(code, err, f"--threads must be an integer in [1, {CORES}] (the CPU cores this process may use)")
    assert list(tmp_path.iterdir()) == []  # nothing written


SAMPLE = ["sample", "--model", "digits", "--prompt", "7", "--solver", "ddpm", "--steps", "3", "--n", "4", "--seed", "5"]


def _side(path):
    return json.loads(path.with_suffix(".json").read_text())


def test_default_follows_omp_num_threads_inside_the_command(tmp_path, capsys, monkeypatch):
    """The count recorded is the one torch ran the command at (torch.get_num_threads() after it), even when
    torch was set higher before: OMP_NUM_THREADS=1 wins."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(CORES)
    ok(SAMPLE + ["--out", str(tmp_path / "a.png")], capsys)
    side = _side(tmp_path / "a.png")
    assert side["threads"] == torch.get_num_threads() == 1
    assert side["reproduce"].endswith(" --threads 1")


@pytest.mark.skipif(CORES < 2, reason="needs two cores")
def test_given_threads_are_recorded_and_reproduce_the_same_bytes(tmp_path, capsys):
    """--threads 2 is recorded in the sidecar and the reproduce line, and that line, run again (with its --out
    moved), writes the same PNG bytes. (Another thread count need not: docs/reliability.md.)"""
    two = tmp_path / "two.png"
    ok(SAMPLE + ["--threads", "2", "--out", str(two)], capsys)
    side = _side(two)
    assert side["threads"] == torch.get_num_threads() == 2
    assert side["reproduce"].endswith(f" --out {two} --threads 2")
    argv = shlex.split(side["reproduce"])[1:]
    again = tmp_path / "again.png"
    argv[argv.index("--out") + 1] = str(again)
    ok(argv, capsys)
    assert _side(again)["threads"] == 2 and again.read_bytes() == two.read_bytes()


def test_eval_json_records_threads(tmp_path, capsys):
    out = tmp_path / "e.json"
    ok(["eval", "--model", "digits", "--solver", "ddim", "--steps", "2", "--n", "4", "--json", str(out)], capsys)
    assert json.loads(out.read_text())["threads"] == 1
