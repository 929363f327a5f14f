"""The CLI: listing, sampling with a reproducible sidecar (and each tile's caption), eval's table and JSON,
--version, and one-line errors (exit code 2)."""

import json

import pytest
import torch
from PIL import Image

from clikit import ok, one_line_error, run


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
    assert out.startswith("name") and "\nshapes " in out and "\ndigits " in out


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
    assert set(res["quality"]) == {"frechet", "precision", "recall", "features"} and res["quality"]["frechet"] > 0


EVAL_ARGS = [
    "eval",
    "--model",
    "digits",
    "--solver",
    "ddim",
    "--steps",
    "3",
    "--cfg",
    "2",
    "--n",
    "6",
    "--seed",
    "1",
    "--pag",
    "1",
]


def test_eval_prints_a_short_table(tmp_path, capsys):
    """stdout is the run, one row per metric, NFE, network rows and seconds, as in the JSON (not the JSON)."""
    out = ok(EVAL_ARGS + ["--json", str(tmp_path / "e.json")], capsys)
    res = json.loads((tmp_path / "e.json").read_text())
    q = res["quality"]
    assert out.splitlines() == [
        "digits: ddim, 3 steps uniform-t, cfg 2, n 6, seed 1 (pag=1.0)",
        f"  class accuracy        {res['accuracy']['class']:.3f}",
        f"  Frechet distance      {q['frechet']:.2f}  ({q['features']})",
        f"  precision             {q['precision']:.3f}",
        f"  recall                {q['recall']:.3f}",
        "  NFE                   3",
        "  network rows          9 per sample",
        f"  seconds               {res['seconds']:.1f}",
        f"wrote {tmp_path / 'e.json'} (every setting and result)",
    ]
    assert ok(EVAL_ARGS, capsys).splitlines()[-1] == "(--json FILE writes every setting and result)"


def test_version(capsys):
    from condiff import __version__

    assert ok(["--version"], capsys) == f"condiff {__version__}\n"


def test_sample_sidecar_records_each_tiles_caption(tmp_path, capsys):
    """Random captions: the sidecar's captions tokenize back to the conditions the seed draws, one per tile."""
    from condiff.data.text import tokenize_batch
    from condiff.models.shapes import ShapesFamily

    out = tmp_path / "g.png"
    ok(["sample", "--model", "shapes", "--steps", "1", "--n", "5", "--seed", "4", "--out", str(out)], capsys)
    captions = json.loads(out.with_suffix(".json").read_text())["captions"]
    drawn, _ = ShapesFamily().random_conditions(5, torch.Generator().manual_seed(4))
    assert len(captions) == 5 and torch.equal(tokenize_batch(captions), drawn)
    ok(["sample", "--model", "digits", "--prompt", "7", "--steps", "1", "--n", "3", "--out", str(out)], capsys)
    assert json.loads(out.with_suffix(".json").read_text())["captions"] == ["7", "7", "7"]


@pytest.mark.parametrize(
    "command",
    [
        ["sample"],
        ["invert", "--image", "x.png", "--prompt", "red", "--method", "ddim", "--out", "i.safetensors"],
        ["edit", "--image", "x.png", "--from", "red", "--to", "blue", "--method", "ddim", "--out", "e.png"],
    ],
)
def test_model_with_pipeline_is_one_error(tmp_path, capsys, command):
    code, _, err = run(command + ["--model", "digits", "--pipeline", str(tmp_path)], capsys)
    one_line_error(code, err, "--model does not combine with --pipeline")


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
