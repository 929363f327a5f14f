"""`condiff adapt` (SDA on digits-C) on a tiny run: the table and the JSON hold one row per corruption x severity,
the source column is the scorer's accuracy on the corrupted test digits (recomputed here), the average is the mean
of the rows, --save writes a classifier that --classifier reuses to the same rows without stage 1, and a
--classifier with a different --t-star or --structure-weight, or a model that is not a digits model, is refused."""

import json

import pytest

from clikit import ok, one_line_error, run
from condiff.data import digits, digits_c
from condiff.models import sda_digits as sd

TINY = [
    "adapt",
    "--synthetic",
    "20",
    "--synthesis-steps",
    "1",
    "--epochs",
    "2",
    "--images",
    "10",
    "--steps",
    "1",
    "--t-star",
    "150",
    "--structure-factor",
    "4",
    "--structure-weight",
    "0.5",
    "--mix-real",
    "--corruptions",
    "noise,contrast",
    "--severities",
    "1,4",
    "--seed",
    "2",
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("adapt")
    from condiff.cli import main

    main([*TINY, "--json", str(d / "a.json"), "--out", str(d / "a.png"), "--save", str(d / "clf")])
    return d


def test_tiny_run_writes_the_table(tiny):
    report = json.loads((tiny / "a.json").read_text())
    assert report["format"] == "condiff.adapt" and report["images"] == 10
    assert [(r["corruption"], r["severity"]) for r in report["rows"]] == [
        ("noise", 1),
        ("noise", 4),
        ("contrast", 1),
        ("contrast", 4),
    ]
    x, y = sd.split()["x_test"][:10], sd.split()["y_test"][:10]
    for r in report["rows"]:
        xc = digits_c.corrupt(r["corruption"], x, r["severity"], 2)
        assert r["source"] == float((digits.scorer().predict(xc) == y).double().mean())
    for k, v in report["average"].items():
        assert v == pytest.approx(sum(r[k] for r in report["rows"]) / 4, abs=1e-15)
    assert report["settings"]["t_star"] == 150.0 and report["settings"]["steps"] == 1
    assert (report["settings"]["structure_factor"], report["settings"]["structure_weight"]) == (4, 0.5)
    assert report["settings"]["mix_real"] and report["stage1"]["finetune_images"] == 20 + 1347
    assert "--structure-factor 4 --structure-weight 0.5" in report["reproduce"] and "--mix-real" in report["reproduce"]
    assert report["reproduce"].startswith("condiff adapt --model digits --corruptions noise,contrast")
    assert (tiny / "a.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_saved_classifier_gives_the_same_rows(tiny, tmp_path, capsys):
    argv = ["adapt", "--classifier", str(tiny / "clf"), "--images", "10", "--corruptions", "noise,contrast"]
    out = ok([*argv, "--severities", "1,4", "--json", str(tmp_path / "b.json")], capsys)
    assert "stage 1" not in out and "| **average** |" in out
    a, b = (json.loads(p.read_text()) for p in (tiny / "a.json", tmp_path / "b.json"))
    assert a["rows"] == b["rows"] and b["settings"] == a["settings"]


def test_classifier_with_another_t_star_is_refused(tiny, capsys):
    code, _, err = run(["adapt", "--classifier", str(tiny / "clf"), "--t-star", "300"], capsys)
    one_line_error(code, err, "--t-star 300.0 differs from the 150.0")
    code, _, err = run(["adapt", "--classifier", str(tiny / "clf"), "--structure-weight", "2"], capsys)
    one_line_error(code, err, "--structure-weight 2.0 differs from the 0.5")


def test_a_model_that_is_not_digits_is_refused(capsys):
    code, _, err = run(["adapt", "--model", "shapes"], capsys)
    one_line_error(code, err, "--model must be a digits model")
