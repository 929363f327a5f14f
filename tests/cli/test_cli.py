"""The CLI: listing, sampling with a reproducible sidecar, eval JSON, and one-line errors (exit code 2)."""

import json

import pytest
from PIL import Image

from clikit import ok, run


def test_solvers_lists_canonical_names(capsys):
    out = ok(["solvers"], capsys)
    names = [line.split()[0] for line in out.strip().splitlines()]
    from condiff.solvers import SOLVERS

    assert names == list(SOLVERS)
    assert {
        "ddpm",
        "ddim",
        "euler",
        "heun",
        "dpmpp-2m",
        "dpmpp-3m",
        "dpmpp-2s",
        "unipc",
        "dpm-v3",
        "dc-solver",
        "edm-heun",
        "edm-sde",
    } <= set(names)


def test_models_lists_bundled(capsys):
    out = ok(["models"], capsys)
    assert out.startswith("shapes") and "\ndigits" in out


def test_sample_writes_png_and_sidecar_reproducibly(tmp_path, capsys):
    args = [
        "sample",
        "--model",
        "digits",
        "--prompt",
        "7",
        "--solver",
        "ddim",
        "--steps",
        "4",
        "--cfg",
        "2",
        "--n",
        "4",
        "--seed",
        "3",
    ]
    ok(args + ["--out", str(tmp_path / "a.png")], capsys)
    ok(args + ["--out", str(tmp_path / "b.png")], capsys)
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    side = json.loads((tmp_path / "a.json").read_text())
    assert side["seed"] == 3 and side["solver"] == "ddim" and side["nfe"] == 4
    assert "condiff sample --model digits --prompt" in side["reproduce"]
    assert Image.open(tmp_path / "a.png").size[0] > 16


def test_eval_json_has_accuracy_nfe_seconds(tmp_path, capsys):
    ok(
        [
            "eval",
            "--model",
            "digits",
            "--solver",
            "dpmpp-2m",
            "--steps",
            "5",
            "--cfg",
            "3",
            "--n",
            "20",
            "--json",
            str(tmp_path / "e.json"),
        ],
        capsys,
    )
    res = json.loads((tmp_path / "e.json").read_text())
    assert set(res["accuracy"]) == {"class"} and 0 <= res["accuracy"]["class"] <= 1
    assert res["nfe"] == 5 and res["seconds"] > 0


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["sample", "--solver", "nope"], "'nope'"),
        (["sample", "--steps", "0"], "--steps"),
        (["sample", "--steps", "-3"], "--steps"),
        (["sample", "--cfg", "nan"], "--cfg"),
        (["sample", "--cfg", "1e9"], "--cfg"),
        (["sample", "--prompt", "large purple blob"], "'purple'"),
        (["sample", "--model", "/no/such/model"], "/no/such/model"),
        (["sample", "--spacing", "weird"], "'weird'"),
        (["sample", "--out", "x.jpg"], "x.jpg"),
        (["sample", "--model", "digits", "--prompt", "12"], "'12'"),
        (["eval"], "--model"),
        (["train", "/no/such/recipe.toml"], "recipe.toml"),
        (["bogus"], "bogus"),
        (["sample", "--steps", "abc"], "--steps"),
    ],
)
def test_user_errors_are_one_line_with_exit_code_2(argv, needle, capsys):
    code, out, err = run(argv, capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], err
    assert "Traceback" not in err + out
