"""`condiff sample` / `condiff eval` with --analytic-skip: bad values are one `error:` line with exit code 2
(before any weights are read), and a good one samples with the same NFE and records itself in the sidecar."""

import json
import shlex

import pytest

from clikit import run
from condiff.cli import main


@pytest.mark.parametrize("command", ["sample", "eval"])
@pytest.mark.parametrize(
    "value, needle",
    [
        ("-1", "'-1'"),
        ("nan", "'nan'"),
        ("150%", "'150%'"),
        ("abc", "'abc'"),
        ("", "''"),
        ("30", "--analytic-skip 30 is at or above sigma/alpha at the grid's start"),
        ("90%", "--analytic-skip 90% of 4 step(s) reaches the grid's last noisy point"),
    ],
)
def test_bad_analytic_skip_is_one_line_exit_2(command, value, needle, capsys, tmp_path, monkeypatch):
    """Each bad value names itself and the accepted forms on one line; nothing is fitted or cached."""
    monkeypatch.setenv("CONDIFF_CACHE", str(tmp_path))
    code, out, err = run([command, "--model", "digits", "--steps", "4", "--analytic-skip", value], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --analytic-skip") and needle in lines[0], err
    assert "accepted" in lines[0] and "Traceback" not in err + out
    assert not (tmp_path / "analytic").exists()


def test_sample_with_analytic_skip_records_and_reproduces(tmp_path, capsys, monkeypatch):
    """`--analytic-skip 30%` with 4 steps costs 4 NFE (same total budget), fits and caches the digits
    Gaussian under $CONDIFF_CACHE, records the value in the sidecar, and its `reproduce` command (which
    reuses the cache) writes the same PNG bytes."""
    monkeypatch.setenv("CONDIFF_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the CLI's default thread count follows it
    out = tmp_path / "a.png"
    main(["sample", "--model", "digits", "--analytic-skip", "30%", "--steps", "4", "--n", "4", "--out", str(out)])
    side = json.loads(out.with_suffix(".json").read_text())
    assert side["analytic_skip"] == "30%" and side["nfe"] == 4 and side["steps"] == 4
    assert "--analytic-skip 30%" in side["reproduce"]
    assert len(list((tmp_path / "cache" / "analytic").glob("digits-*.safetensors"))) == 1
    argv = shlex.split(side["reproduce"])
    assert argv[0] == "condiff"
    again = tmp_path / "b.png"
    argv[argv.index("--out") + 1] = str(again)
    main(argv[1:])
    assert again.read_bytes() == out.read_bytes()
    capsys.readouterr()


def test_eval_with_analytic_skip_reports_it(tmp_path, capsys, monkeypatch):
    """`condiff eval --analytic-skip 5` spends the full --steps budget and records the skip in its JSON."""
    monkeypatch.setenv("CONDIFF_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    main(
        [
            "eval",
            "--model",
            "digits",
            "--steps",
            "4",
            "--n",
            "20",
            "--analytic-skip",
            "5",
            "--json",
            str(tmp_path / "e.json"),
        ]
    )
    res = json.loads((tmp_path / "e.json").read_text())
    assert res["analytic_skip"] == "5" and res["nfe"] == 4 and 0 <= res["accuracy"]["class"] <= 1
    capsys.readouterr()
