"""`condiff forecast` on a tiny saved TSDiff model of the Nile series: the CRPS table's baselines are the exact
Gaussian CRPS of condiff.evaluation.forecast_baselines, the forecast's is the sample CRPS of the quantiles it
reports, the same seed gives the same forecast, and the fan chart and JSON are written."""

from __future__ import annotations

import json

import pytest
import torch

from condiff.cli import main
from condiff.data.series import load_series
from condiff.evaluation.forecast_baselines import evaluate, forecast, score
from condiff.models.tsdiff_series import build_tsdiff_model, tsdiff_recipe_from_dict

TINY = {
    "name": "tiny-tsdiff",
    "family": "tsdiff",
    "model": {"channels": 4, "blocks": 2, "time_dim": 8},
    "data": {"series": "nile"},
    "forecast": {"samples": 4, "steps": 3, "refine_steps": 2},
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("forecast")
    m = build_tsdiff_model(tsdiff_recipe_from_dict(TINY))
    g = torch.Generator().manual_seed(0)
    for p in m.module.parameters():
        p.data.copy_(0.2 * torch.randn(p.shape, generator=g))
    m.save(d / "run" / "model")
    return d


def run(argv, capsys):
    try:
        main(argv)
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr()


def test_forecast_reports_the_baselines_and_writes_a_fan_chart(model_dir, capsys):
    out, js = model_dir / "fan.png", model_dir / "f.json"
    code, cap = run(["forecast", "--model", str(model_dir / "run"), "--out", str(out), "--json", str(js)], capsys)
    assert code == 0, cap.err
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rec = json.loads(js.read_text())
    exact = evaluate(load_series("nile"))
    for b in ("seasonal-naive", "ets", "arima"):
        assert rec["crps"][b] == pytest.approx(exact[b]["crps"], rel=1e-12)
        assert b in cap.out
    assert rec["method"] == "tsdiff-quantile" and rec["samples"] == 4 and rec["horizon"] == 5
    assert len(rec["quantiles"]) == 5 and torch.tensor(rec["quantiles"]).shape == (5, 4, 5)
    q = torch.tensor(rec["quantiles"])
    assert bool(torch.all(q[1:] >= q[:-1] - 1e-9))  # quantiles ordered by level
    assert rec["crps"]["tsdiff-quantile"] > 0 and "condiff forecast" in rec["reproduce"]
    code, _ = run(["forecast", "--model", str(model_dir / "run"), "--json", str(model_dir / "g.json")], capsys)
    assert json.loads((model_dir / "g.json").read_text())["quantiles"] == rec["quantiles"]  # same seed


def test_a_shorter_horizon_scores_the_first_points(model_dir, capsys):
    js = model_dir / "h.json"
    args = ["forecast", "--model", str(model_dir / "run"), "--horizon", "2", "--guidance", "mse", "--json", str(js)]
    code, cap = run(args, capsys)
    assert code == 0, cap.err
    rec = json.loads(js.read_text())
    s = load_series("nile")
    naive = forecast(s, "seasonal-naive")
    want = score(type(naive)(naive.mean[:, :2], naive.std[:, :2]), s.windows()[1][:, :2])["crps"]
    assert rec["crps"]["seasonal-naive"] == pytest.approx(want, rel=1e-12) and rec["context"] == 23


def test_refinement_and_the_end_of_the_series(model_dir, capsys):
    js = model_dir / "r.json"
    code, cap = run(
        ["forecast", "--model", str(model_dir / "run"), "--refine", "ml", "--base", "ets", "--json", str(js)], capsys
    )
    assert code == 0, cap.err
    rec = json.loads(js.read_text())
    assert rec["method"] == "ets+ml" and rec["base_samples_crps"] > 0 and "ets+ml" in rec["crps"]
    out = model_dir / "end.png"
    code, cap = run(["forecast", "--model", str(model_dir / "run"), "--end", "--out", str(out)], capsys)
    assert code == 0 and out.is_file() and "past the end" in cap.out
