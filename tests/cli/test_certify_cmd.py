"""`condiff certify` on the digits scorer (tiny runs): each method finishes and writes the JSON whole, the radius
of every certificate is sigma * Phi^-1(p_lower) of its recorded counts (the Clopper-Pearson bound recomputed), the
certified accuracy is read off the certificates, --runs / --steps belong to densepure only, and the one-step
methods (noise, rrcm) run their --classifier network with no diffusion-model evaluation."""

import json

import pytest
from scipy.stats import beta, norm

from clikit import ok, one_line_error, run

TINY = ["certify", "--model", "digits", "--images", "4", "--n", "50", "--n0", "10"]
KEYS = {
    "format",
    "method",
    "sigma",
    "n",
    "n0",
    "alpha",
    "images",
    "runs",
    "steps",
    "seed",
    "radius_units",
    "certified_accuracy",
    "abstained",
    "denoiser_nfe_per_certification",
    "classifier_evals_per_certification",
    "base_classifier",
    "classifier_trained_sigma",
    "seconds",
    "certificates",
    "model",
    "threads",
    "condiff_version",
    "torch_version",
    "reproduce",
}


@pytest.mark.parametrize(
    "method, extra, nfe",
    [("plain", [], 0), ("denoised", [], 60), ("densepure", ["--runs", "2", "--steps", "3"], 60 * 2 * 3)],
)
def test_tiny_run_writes_the_certificates(method, extra, nfe, tmp_path, capsys):
    out = ok([*TINY, "--method", method, "--sigma", "0.25", "--json", str(tmp_path / "c.json"), *extra], capsys)
    assert "certified accuracy at l2 radius" in out and "network evaluations per certification" in out
    report = json.loads((tmp_path / "c.json").read_text())
    assert set(report) == KEYS and report["format"] == "condiff.certify" and report["method"] == method
    assert set(report["certified_accuracy"]) == {"0", "0.25", "0.5", "0.75"}
    assert report["denoiser_nfe_per_certification"] == nfe
    rows = report["certificates"]
    assert len(rows) == 4 and [r["index"] for r in rows] == [0, 1, 2, 3]
    for r in rows:
        assert r["n"] == 50 and 0 <= r["count"] <= 50
        p = 0.0 if r["count"] == 0 else float(beta.ppf(0.001, r["count"], 50 - r["count"] + 1))
        assert r["p_lower"] == pytest.approx(p, rel=1e-9, abs=1e-12)
        if p > 0.5:
            assert r["prediction"] >= 0 and r["radius"] == pytest.approx(0.25 * norm.ppf(p), rel=1e-9)
        else:
            assert r["prediction"] == -1 and r["radius"] == 0.0
    for radius, acc in report["certified_accuracy"].items():
        assert acc == sum(r["correct"] and r["radius"] >= float(radius) for r in rows) / 4
    assert not list(tmp_path.glob(".*.tmp"))


def test_same_seed_same_certificates(tmp_path, capsys):
    for name in ("a", "b"):
        ok([*TINY, "--method", "denoised", "--seed", "3", "--json", str(tmp_path / f"{name}.json")], capsys)
    a, b = (json.loads((tmp_path / f"{x}.json").read_text())["certificates"] for x in "ab")
    assert a == b


@pytest.mark.parametrize("method", ["plain", "denoised"])
@pytest.mark.parametrize("option", ["--runs", "--steps"])
def test_densepure_options_refused_with_other_methods(method, option, tmp_path, capsys):
    code, _, err = run([*TINY, "--method", method, option, "2", "--json", str(tmp_path / "c.json")], capsys)
    one_line_error(code, err, f"{option} applies to --method densepure only")
    assert list(tmp_path.iterdir()) == []


def test_non_digits_model_refused(tmp_path, capsys):
    code, _, err = run(["certify", "--model", "shapes", *TINY[3:], "--json", str(tmp_path / "c.json")], capsys)
    one_line_error(code, err, "--model must be a digits model")
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def noise_net(tmp_path_factory):
    from condiff.cli.train import run_trainer
    from condiff.models.robust_digits import make_robust_trainer, robust_recipe_from_dict

    r = robust_recipe_from_dict(
        {
            "name": "tiny",
            "family": "robust_digits",
            "model": {"kind": "noise", "sigma": 0.25, "hidden": 16, "dim": 8},
            "train": {"steps": 2, "batch_size": 8, "eval_every": 0},
        }
    )
    d = tmp_path_factory.mktemp("noise")
    run_trainer(make_robust_trainer(r, d, progress=False))
    return d


def test_one_step_method_runs_its_classifier_without_the_diffusion_model(noise_net, tmp_path, capsys):
    out = ok([*TINY, "--method", "noise", "--classifier", str(noise_net), "--json", str(tmp_path / "c.json")], capsys)
    assert "0 diffusion model, 60 noise network (one step)" in out
    report = json.loads((tmp_path / "c.json").read_text())
    assert set(report) == KEYS and report["denoiser_nfe_per_certification"] == 0
    assert report["classifier_trained_sigma"] == 0.25 and "--classifier" in report["reproduce"]
    assert len(report["certificates"]) == 4


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--method", "rrcm"], "--method rrcm needs --classifier DIR"),
        (["--method", "plain", "--classifier", "CLS"], "--classifier applies to --method noise or rrcm only"),
        (["--method", "rrcm", "--classifier", "CLS"], "is a noise model; --method rrcm needs a rrcm one"),
    ],
)
def test_one_step_options_are_checked(noise_net, argv, needle, tmp_path, capsys):
    argv = [str(noise_net) if a == "CLS" else a for a in argv]
    code, _, err = run([*TINY, *argv, "--json", str(tmp_path / "c.json")], capsys)
    one_line_error(code, err, needle)
    assert list(tmp_path.iterdir()) == []
