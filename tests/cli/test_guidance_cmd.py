"""`condiff guidance fit-linear-ag`: bad inputs are one-line errors (exit 2) refused before the model is loaded
and nothing is written; a tiny fit on digits writes a file that loads back and equals, bit for bit, the
coefficients of a direct ``fit_linear_ag`` call with the same seed."""

import json
import math

import pytest
import torch

from clikit import run
from condiff.cli import common, main
from condiff.core.fitted import weights_digest
from condiff.core.grids import make_grid
from condiff.core.sampling import Gaussian
from condiff.guidance.linear_ag import TERMS, fit_linear_ag, load_linear_ag
from condiff.solvers import get_solver


def _fit(out, *extra):
    return [
        "guidance",
        "fit-linear-ag",
        "--model",
        "digits",
        "--cfg",
        "3",
        "--steps",
        "4",
        "--n",
        "8",
        "--out",
        str(out),
        *extra,
    ]


@pytest.fixture
def no_load(monkeypatch):
    """Loading the model fails loudly: a check that passes this fixture ran before any weights were read."""

    def refuse(model):
        raise AssertionError("the model was loaded before the inputs were checked")

    monkeypatch.setattr(common, "load_model", refuse)


@pytest.mark.parametrize(
    "option, value, needle",
    [
        ("--steps", "0", "--steps must be an integer in [1,"),
        ("--steps", "x", "got 'x'"),
        ("--cfg", "nan", "--cfg must be a finite number"),
        ("--cfg", "inf", "--cfg must be a finite number"),
        ("--cfg", "1e9", "--cfg must be a finite number"),
        ("--n", "0", "--n must be an integer in [1,"),
        ("--seed", "-1", "--seed"),
        ("--batch-size", "0", "--batch-size must be an integer"),
        ("--holdout", "-1", "--holdout must be an integer in [0,"),
        ("--solver", "nope", "nope"),
        ("--spacing", "nope", "unknown spacing 'nope'"),
        ("--model", "nope", "'nope' is neither a bundled model"),
    ],
)
def test_bad_options_are_one_line_errors_before_loading(tmp_path, capsys, no_load, option, value, needle):
    """Each bad value exits 2 with one `error:` line naming it; the model is never loaded, no file appears."""
    argv = _fit(tmp_path / "c.safetensors")
    if option in argv:
        argv[argv.index(option) + 1] = value
    else:
        argv += [option, value]
    code, out, err = run(argv, capsys)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and needle in err, err
    assert list(tmp_path.iterdir()) == []


def test_bad_out_is_refused_before_loading(tmp_path, capsys, no_load):
    """--out must end in .safetensors and be a writable file path; refused with nothing written."""
    (tmp_path / "file").write_text("x")
    (tmp_path / "d.safetensors").mkdir()
    cases = [
        (tmp_path / "c.json", "must end in .safetensors"),
        (tmp_path / "d.safetensors", "is a directory"),
        (tmp_path / "file" / "c.safetensors", "not a directory"),
    ]
    for out, needle in cases:
        code, _, err = run(_fit(out), capsys)
        assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and "--out" in err and needle in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.safetensors", "file"]
    assert list((tmp_path / "d.safetensors").iterdir()) == []


def test_missing_required_option_is_a_one_line_error(tmp_path, capsys, no_load):
    """--cfg is required (the coefficients belong to one scale)."""
    argv = _fit(tmp_path / "c.safetensors")
    i = argv.index("--cfg")
    del argv[i : i + 2]
    code, _, err = run(argv, capsys)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and "--cfg" in err


def test_tiny_fit_writes_file_equal_to_direct_library_call(tmp_path, capsys):
    """digits, 4 steps of DPM-Solver++(2M), 8 trajectories, seed 5: the written file loads back with
    load_linear_ag and its times, coefficients, in-sample R^2, regressors and scale equal those of
    fit_linear_ag on the same draws (same generator order) exactly; the summary line names what was fitted and
    its R^2 values match the file's."""
    out = tmp_path / "c.safetensors"
    main(_fit(out, "--seed", "5", "--holdout", "4"))
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 1
    line = printed[0]
    assert line.startswith("fitted 4 evaluations (dpmpp-2m, 4 steps, uniform-t, cfg 3) on 8 trajectories")
    assert "held-out (4) teacher-forced R^2" in line and f"wrote {out}" in line
    got = load_linear_ag(out)

    torch.set_num_threads(1)
    m = common.load_model("digits")
    solver = get_solver("dpmpp-2m")
    grid = make_grid(m.schedule, 4)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        raw, _ = m.family.random_conditions(8, g)  # the eval order: conditions, start points, solver noise
        cond = m.condition(raw)
        x = m.prior((8, *m.family.image_shape), float(grid[0]), g)
        want = fit_linear_ag(m.denoiser, solver, grid, x, cond, 3.0, noise=Gaussian(g), batch_size=256)
    assert got.steps == 4 and got.coef.shape == (4, len(TERMS))
    assert torch.equal(got.times, want.times) and torch.equal(got.times, grid[:-1].to(torch.float64))
    assert torch.equal(got.coef, want.coef) and torch.equal(got.r2, want.r2)
    assert got.regressors == want.regressors and got.scale == want.scale == 3.0
    assert (got.model, got.spacing, got.solver, got.grid) == ("digits", "uniform-t", "dpmpp-2m", tuple(grid.tolist()))
    assert got.weights == weights_digest(m.module)  # what they were fitted for (condiff.core.fitted)
    assert f"min {float(want.r2.min()):.4f}" in line
    assert all(math.isfinite(v) for v in got.coef.flatten().tolist())


def test_linear_ag_option_uses_the_fitted_file(tmp_path, capsys):
    """`condiff eval --linear-ag FILE` runs LinearAG from a `fit-linear-ag` file: the network rows per sample
    drop by exactly the predicted evaluations (2 per step for CFG, 1 for each predicted one), and a file fitted
    for another cfg or another grid is one error line."""
    from clikit import ok as ok_
    from clikit import one_line_error as ole
    from clikit import run as run_

    coeffs = tmp_path / "c.safetensors"
    ok_(
        [
            "guidance",
            "fit-linear-ag",
            "--model",
            "digits",
            "--cfg",
            "3",
            "--steps",
            "4",
            "--n",
            "8",
            "--out",
            str(coeffs),
        ],
        capsys,
    )
    base = ["eval", "--model", "digits", "--n", "4", "--steps", "4", "--json", str(tmp_path / "e.json")]
    ok_(base + ["--cfg", "3", "--linear-ag", str(coeffs), "--linear-ag-steps", "3"], capsys)
    res = json.loads((tmp_path / "e.json").read_text())
    assert res["network_rows_per_sample"] == 2 * 4 - 3 and res["nfe"] == 4 and res["linear_ag"] == str(coeffs)
    code, _, err = run_(base + ["--cfg", "2", "--linear-ag", str(coeffs)], capsys)
    ole(code, err, "was fitted for cfg 3, but this run uses cfg 2")
    code, _, err = run_(
        ["eval", "--model", "digits", "--n", "4", "--steps", "6", "--cfg", "3", "--linear-ag", str(coeffs)], capsys
    )
    ole(code, err, "was fitted for a grid of 4 'uniform-t' steps")
    code, _, err = run_(base + ["--cfg", "3", "--linear-ag", str(coeffs), "--ag", "0.9"], capsys)
    ole(code, err, "--ag and --linear-ag do not compose")
