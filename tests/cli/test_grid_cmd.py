"""`condiff grid search` / `condiff grid show` and `--grid FILE` on sample, eval and bench solvers: a tiny real
search on digits writes a loadable file that sample reads back (on exactly its times), and every misuse is one
`error:` line with exit code 2."""

import json

import pytest
import torch

from clikit import ok, one_line_error, record_grids, run
from condiff.cli import main
from condiff.solvers.grid_search import load_grids


def _search(out, *extra):
    args = ["grid", "search", "--model", "digits", "--steps", "2,3", "--n", "2", "--ref-steps", "20"]
    return [*args, "--max-evals", "6", "--out", str(out), *extra]


@pytest.fixture(scope="module")
def grid_file(tmp_path_factory):
    from condiff.cli import main

    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("grid") / "g.json"
    main(_search(out))
    return out


def test_search_writes_a_file_with_a_grid_per_step_count(grid_file):
    g = load_grids(grid_file)
    assert sorted(g.grids) == [2, 3] and g.solver == "dpmpp-2m" and g.fitted.cfg == 3.0
    assert g.fitted.model == "digits" and len(g.fitted.weights) == 64
    for k, entry in g.grids.items():
        # from condiff's default start (sigma / alpha = 20) down to the clean point
        assert entry.steps == k and abs(entry.times[0] - 966.9427) < 1e-3 and entry.times[-1] == -1.0
        assert entry.error <= entry.initial_error and 1 <= entry.evaluations <= 6
    assert g.search["n"] == 2 and "grid search --model digits" in g.search["reproduce"]


def test_show_prints_each_grid(grid_file, capsys):
    out = ok(["grid", "show", str(grid_file)], capsys)
    assert "solver dpmpp-2m, searched for model 'digits'" in out and "2 steps: 966.94" in out


def test_sample_runs_on_the_files_times(grid_file, tmp_path, capsys, monkeypatch):
    """The sampler visits exactly the searched times, and the sidecar's command reproduces the run with --grid
    (and no --spacing)."""
    seen = record_grids(monkeypatch)
    argv = ["sample", "--model", "digits", "--grid", str(grid_file), "--steps", "3", "--n", "2"]
    ok([*argv, "--out", str(tmp_path / "s.png")], capsys)
    assert seen == [list(load_grids(grid_file).grids[3].times)]
    side = json.loads((tmp_path / "s.json").read_text())
    assert side["grid"] == str(grid_file) and f"--grid {grid_file}" in side["reproduce"]
    assert "--spacing" not in side["reproduce"]


def test_another_solver_on_the_grid_gets_a_note(grid_file, tmp_path, capsys):
    argv = ["sample", "--model", "digits", "--grid", str(grid_file), "--steps", "2", "--n", "2", "--solver", "ddim"]
    main([*argv, "--out", str(tmp_path / "d.png")])
    err = capsys.readouterr().err
    assert f"note: --grid {str(grid_file)!r} was searched for --solver dpmpp-2m; running ddim on it" in err


def test_eval_reports_the_grid(grid_file, capsys):
    out = ok(["eval", "--model", "digits", "--grid", str(grid_file), "--steps", "2", "--n", "8"], capsys)
    assert f"grid={grid_file}" in out


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--steps", "4"], "has no grid of 4 steps (it has 2, 3); give one of those as --steps"),
        (["--steps", "2", "--spacing", "karras"], "--grid and --spacing both set the time grid"),
        (["--steps", "2", "--model", "shapes"], "was searched for model 'digits'"),
        (["--steps", "2", "--cfg", "5"], "was searched for cfg 3, but this run uses cfg 5"),
        (["--steps", "2", "--t-start", "500"], "starts at t=966.943, but this run starts at t=500"),
    ],
)
def test_sample_with_a_grid_misused_is_one_line(grid_file, tmp_path, capsys, extra, needle):
    argv = ["sample", "--model", "digits", "--grid", str(grid_file), "--n", "2", "--out", str(tmp_path / "x.png")]
    code, _, err = run([*argv, *extra], capsys)
    one_line_error(code, err, needle)


def test_bench_runs_the_grid_case(grid_file, tmp_path, capsys):
    """A grids file from diffusers' trailing start (--t-start max) runs on the bench's trailing problem; one
    from another start gives rows that say why instead of errors."""
    trailing = tmp_path / "trailing.json"
    ok(_search(trailing, "--t-start", "max"), capsys)
    out = tmp_path / "b.json"
    argv = ["bench", "solvers", "--model", "digits", "--cfg", "3", "--n", "2", "--nfe", "2,3", "--ref-steps", "20"]
    ok([*argv, "--grid", str(trailing), "--grid", str(grid_file), "--json", str(out)], capsys)
    rows = [r for r in json.loads(out.read_text())["results"] if r["solver"].startswith("dpmpp-2m+grid")]
    assert [r["solver"] for r in rows] == ["dpmpp-2m+grid (trailing)"] * 2 + ["dpmpp-2m+grid (g)"] * 2
    assert [r["nfe"] for r in rows[:2]] == [2, 3] and all(r["error"] is not None for r in rows[:2])
    assert all(
        r["error"] is None and "starts at t=966.943, the problem's starts at t=999" in r["note"] for r in rows[2:]
    )


@pytest.mark.parametrize(
    "contents, needle",
    [
        ("not json", "g.json"),
        ('{"format": "x"}', "is not a valid grids file"),
    ],
)
def test_bad_grid_files_are_one_line(tmp_path, capsys, contents, needle):
    bad = tmp_path / "g.json"
    bad.write_text(contents)
    code, _, err = run(["sample", "--model", "digits", "--grid", str(bad), "--out", str(tmp_path / "x.png")], capsys)
    one_line_error(code, err, needle)


def test_a_pickled_grid_file_is_refused(tmp_path, capsys):
    bad = tmp_path / "g.json"
    bad.write_bytes(b"\x80\x04\x95" + b"\x00" * 20)
    code, _, err = run(["grid", "show", str(bad)], capsys)
    one_line_error(code, err, "pickle")


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--steps", "0"], "--steps must be a comma-separated list of integers in [1, 100], got '0'"),
        (["--steps", "2,2"], "--steps repeats 2"),
        (["--steps", "2", "--n", "0"], "--n must be an integer in [1, 10000], got 0"),
        (["--steps", "5", "--ref-steps", "3"], "--ref-steps must be an integer in [5,"),
        (["--steps", "2", "--solver", "ddpm"], "--solver ddpm is stochastic"),
        (["--steps", "2", "--solver", "nope"], "'nope'"),
        (["--steps", "2", "--cfg", "nan"], "--cfg must be a finite number"),
        (["--steps", "2", "--max-evals", "-1"], "--max-evals"),
        (["--steps", "2", "--t-start", "x"], "--t-start must be 'max' or a number"),
        (["--steps", "2", "--out", "g.txt"], "--out"),
    ],
)
def test_search_misuse_is_one_line(tmp_path, capsys, extra, needle):
    argv = ["grid", "search", "--model", "digits", "--out", str(tmp_path / "g.json")]
    if "--out" in extra:
        argv = argv[:-2]
        extra = [*extra[:-1], str(tmp_path / extra[-1])]
    code, _, err = run([*argv, *extra], capsys)
    one_line_error(code, err, needle)
