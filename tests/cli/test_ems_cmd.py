"""`condiff ems compute` / `condiff ems show`: one-line errors with exit code 2 (nothing written), and a tiny real
run on digits that writes a loadable statistics file usable by the dpm-v3 solver."""

import json

import pytest
import torch

from clikit import run
from condiff.cli import main
from condiff.core.fitted import weights_digest
from condiff.models.base import load_model
from condiff.solvers.ems import check_ems_fits, load_ems


def compute_argv(out, *extra):
    return ["ems", "compute", "--model", "digits", "--n-data", "4", "--grid", "4", "--out", str(out), *extra]


def one_line_error(code, out, err, needle):
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and needle in err, err
    assert "Traceback" not in out + err


@pytest.mark.parametrize(
    "option, value, needle",
    [
        ("--model", "nope", "'nope' is neither a bundled model"),
        ("--model", "/no/such/dir", "/no/such/dir"),
        ("--grid", "0", "--grid must be an integer in [1, 100000], got 0"),
        ("--grid", "-5", "--grid must be an integer in [1, 100000], got -5"),
        ("--grid", "x", "got 'x'"),
        ("--n-data", "0", "--n-data must be an integer in [2, 1000000]"),
        ("--n-data", "-1", "got -1"),
        ("--n-data", "1", "variances need 2 points"),
        ("--n-data", "5000", "--n-data 5000"),
        ("--batch-size", "0", "--batch-size"),
        ("--cfg", "nan", "--cfg must be a finite number"),
        ("--seed", "-1", "--seed"),
        ("--jvp", "magic", "unknown --jvp 'magic'"),
        ("--out", "stats.bin", "--out must end in .safetensors"),
    ],
)
def test_bad_options_are_one_line_errors(tmp_path, capsys, option, value, needle):
    argv = compute_argv(tmp_path / "e.safetensors")
    if option in argv:
        argv[argv.index(option) + 1] = value if option != "--out" else str(tmp_path / value)
    else:
        argv += [option, value]
    one_line_error(*run(argv, capsys), needle)
    assert list(tmp_path.iterdir()) == []


def test_unwritable_out_is_refused_before_any_work(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    one_line_error(*run(compute_argv(blocker / "e.safetensors"), capsys), "--out")
    one_line_error(*run(compute_argv(tmp_path), capsys), "--out")


def test_out_is_required(capsys):
    code, out, err = run(["ems", "compute", "--model", "digits"], capsys)
    one_line_error(code, out, err, "--out")


@pytest.mark.parametrize("content", [b"", b"garbage, not safetensors", b"\xff" * 64])
def test_show_refuses_garbage_files(tmp_path, capsys, content):
    p = tmp_path / "bad.safetensors"
    p.write_bytes(content)
    one_line_error(*run(["ems", "show", str(p)], capsys), "bad.safetensors")
    one_line_error(*run(["ems", "show", str(tmp_path / "missing.safetensors")], capsys), "not found")


def test_tiny_run_on_digits_writes_loadable_statistics(tmp_path, capsys):
    """4 training digits, 4 grid intervals: the file loads, fits the digits model, records its provenance, and
    drives the dpm-v3 solver to finite samples; `ems show` prints it."""
    out = tmp_path / "digits.safetensors"
    main(compute_argv(out, "--cfg", "2", "--seed", "3"))
    printed = capsys.readouterr().out
    assert "wrote" in printed and "jvp central-difference" in printed
    ems = load_ems(out)
    m = load_model("digits")
    check_ems_fits(ems, m.family.image_shape, m.schedule)
    assert ems.sample_shape == (1, 16, 16) and ems.n_grid == 4 and ems.n_data == 4
    assert ems.model == "digits" and ems.cfg == 2.0 and ems.seed == 3
    assert ems.weights == weights_digest(m.module)  # the weights they were computed on (condiff.core.fitted)
    # bundled UNets have no forward-AD rule for CPU flash attention: the estimator fell back
    assert ems.info["jvp"] == "central-difference" and ems.info["seconds"] > 0
    t0, t1 = ems.info["t_start"], ems.info["t_end"]
    assert (t0, t1) == (m.schedule.default_t_start(), m.schedule.t_min)
    assert all(bool(torch.isfinite(getattr(ems, k)).all()) for k in "lsb")

    from condiff.evaluation.evaluate import generate
    from condiff.solvers import DPMSolverV3

    images, nfe = generate(m, torch.tensor([3, 7]), DPMSolverV3(ems=ems), 4, 2.0, torch.Generator().manual_seed(0))
    assert nfe == 4 and bool(torch.isfinite(images).all())
    main(["ems", "show", str(out)])
    shown = json.loads(capsys.readouterr().out)
    assert shown["n_grid"] == 4 and shown["sample_shape"] == [1, 16, 16] and shown["cfg"] == 2.0
