"""The solver benchmark (condiff.evaluation.bench, condiff.evaluation.peers, `condiff bench solvers`): the diffusers
drivers are
faithful (same grid, same algorithm -> same error as condiff's implementation), the reference is converged,
and on the exact GMM oracle condiff's tuned DPM-Solver-v3 beats every diffusers scheduler at low NFE."""

import json

import pytest

from condiff.cli import main
from condiff.core.schedules import VPDiscrete
from condiff.evaluation import bench
from condiff.evaluation.peers import PEERS, betas_from_alphas_cumprod, trailing_grid
from condiff.solvers import get_solver
from condiff.solvers.ems import gmm_ems

diffusers = pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def problem():
    return bench.gmm_problem(dim=4, components=5, classes=2, seed=3, n=128, cfg=3.0, ref_steps=1024)


@pytest.mark.parametrize("steps", [5, 8, 13, 20])
def test_trailing_grid_is_diffusers_timesteps(steps):
    sch = VPDiscrete.from_betas("linear")
    peer = next(p for p in PEERS if p.label == "dpmpp-2m")
    s = peer.make(betas_from_alphas_cumprod(sch.alphas_cumprod).float())
    s.set_timesteps(steps)
    grid = trailing_grid(1000, steps)
    assert grid[:-1].tolist() == s.timesteps.double().tolist() and grid[-1] == -1.0


def test_reference_is_converged(problem):
    assert problem.info["reference_error_estimate"] < 1e-8


@pytest.mark.parametrize(
    "condiff_name, peer",
    [("ddim", "ddim"), ("euler", "euler"), ("dpmpp-2m", "dpmpp-2m"), ("dpmpp-3m", "dpmpp-3m"), ("unipc", "unipc-bh2")],
)
def test_same_algorithm_same_error(problem, condiff_name, peer):
    """diffusers' scheduler and condiff's solver on the same grid and denoiser: the errors agree to float32
    table round-off, so the comparison measures algorithms, not the driver."""
    cases = [
        bench.CondiffCase(condiff_name, get_solver(condiff_name)),
        bench.DiffusersCase(next(p for p in PEERS if p.label == peer)),
    ]
    rows = bench.run_bench(problem, [5, 10], cases, progress=False)
    for nfe in (5, 10):
        a, b = [r["error"] for r in rows if r["nfe_budget"] == nfe]
        assert abs(a - b) <= 1e-4 * b


def test_tuned_dpm_v3_beats_every_diffusers_scheduler(problem):
    """Acceptance (issue 3): at NFE 5, 8, 10 DPM-Solver-v3 with EMS of the exact model has terminal error
    <= 0.8x the best diffusers scheduler, and beats DPM-Solver++ 2M and 3M."""
    sch = problem.schedule
    ems = gmm_ems(problem.oracle, sch, t_start=float(sch.t_max), t_end=float(sch.t_min), scale=3.0, seed=5)
    cases = [
        bench.CondiffCase("dpm-v3+ems", get_solver("dpm-v3", ems=ems)),
        *[bench.CondiffCase(n, get_solver(n)) for n in ("dpmpp-2m", "dpmpp-3m")],
        *[bench.DiffusersCase(p) for p in PEERS],
    ]
    rows = bench.run_bench(problem, [5, 8, 10], cases, progress=False)
    best = bench.best_ratios(rows)
    for nfe in (5, 8, 10):
        assert best[nfe]["condiff"] == "dpm-v3+ems" and best[nfe]["ratio"] <= 0.8, best[nfe]
        err = {r["solver"]: r["error"] for r in rows if r["nfe_budget"] == nfe and r["impl"] == "condiff"}
        assert err["dpm-v3+ems"] < min(err["dpmpp-2m"], err["dpmpp-3m"])


def test_cli_writes_json_table_and_plot(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "b.json"
    main(
        [
            "bench",
            "solvers",
            "--oracle",
            "gmm",
            "--dim",
            "2",
            "--components",
            "2",
            "--classes",
            "2",
            "--nfe",
            "5",
            "--n",
            "16",
            "--ref-steps",
            "256",
            "--no-tune",
            "--json",
            str(out),
        ]
    )
    text = capsys.readouterr().out
    data = json.loads(out.read_text())
    assert {"solver", "impl", "nfe", "error"} <= set(data["results"][0])
    impls = {r["impl"] for r in data["results"]}
    assert impls == {"condiff", "diffusers", "k-diffusion"} and "best condiff / best peer" in text
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--oracle", "gmm", "--model", "shapes"], "exactly one of --oracle gmm or --model"),
        (["--oracle", "mnist"], "--oracle must be gmm, got 'mnist'"),
        (["--oracle", "gmm", "--nfe", "5,,8"], "--nfe must be a comma-separated list of integers"),
        (["--oracle", "gmm", "--nfe", "0"], "--nfe must be a comma-separated list of integers in [1, 1000], got '0'"),
        (["--oracle", "gmm", "--cfg", "nan"], "--cfg must be a finite number"),
        (["--oracle", "gmm", "--dim", "0"], "--dim must be an integer in [1, 4096], got 0"),
        (["--oracle", "gmm", "--classes", "9", "--components", "3"], "--classes must be an integer in [1, 3], got 9"),
        (["--oracle", "gmm", "--json", "/proc/nope/x.json"], "--json"),
        (["--oracle", "gmm", "--ems", "x.safetensors"], "--ems, --dc-ratios and --grid are for --model"),
        (["--model", "shapes", "--spacing", "cosine"], "'cosine'"),
    ],
)
def test_bad_arguments_are_one_line_errors(capsys, argv, needle):
    with pytest.raises(SystemExit) as e:
        main(["bench", "solvers", *argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1 and needle in err, err
