"""`condiff bench solvers`: every condiff solver and diffusers' schedulers on one problem, error against NFE.
`condiff bench edit` (defined in commands/edit.py): every editing method on held-out shapes renders."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from condiff.cli import common, edit
from condiff.cli.dc import parse_list
from condiff.cli.options import AllowMismatchOpt, ThreadsOpt
from condiff.errors import ConfigError, check_int

app = typer.Typer(help="Benchmarks: condiff against diffusers, side by side.", no_args_is_help=True)


@app.command("solvers")
@common.reports_fit_warnings
def solvers_cmd(
    oracle: Optional[str] = typer.Option(None, help="exact oracle problem: gmm"),
    model: Optional[str] = typer.Option(
        None, help="or a bundled VP-discrete model (shapes, digits), against a 1000-step reference"
    ),
    dim: int = typer.Option(8, help="gmm: dimension"),
    components: int = typer.Option(8, help="gmm: number of mixture components"),
    classes: int = typer.Option(4, help="gmm: number of classes"),
    seed: int = typer.Option(0, help="seed of the GMM, the start points and the conditions"),
    nfe: str = typer.Option("5,8,10,20", help="comma-separated NFE budgets"),
    cfg: float = typer.Option(1.0, help="guidance scale (1 = conditional)"),
    n: int = typer.Option(512, help="number of start points (default 512 for gmm; use ~32 for a model)"),
    ref_steps: int = typer.Option(0, help="reference steps (default: 2048 RK4 steps for gmm, 1000 for a model)"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="write {config, results, best, table} here"),
    plot: Optional[Path] = typer.Option(None, help="log-log error-vs-NFE plot (default: beside --json)"),
    tune: bool = typer.Option(
        True,
        help="gmm: also run DPM-Solver-v3 with EMS and DC-Solver with searched "
        "ratios, both tuned on data the evaluation does not use",
    ),
    ems: Optional[Path] = typer.Option(None, "--ems", help="model: EMS file for a dpm-v3 case"),
    dc_ratios: Optional[Path] = typer.Option(None, "--dc-ratios", help="model: ratios file for a dc-solver case"),
    grid: Optional[list[Path]] = typer.Option(
        None, "--grid", help="model: a grids file from `condiff grid search` (its solver on its grids; repeatable)"
    ),
    spacing: str = typer.Option(
        "trailing",
        help="model: 'trailing' (diffusers' timesteps; its schedulers run "
        "too) or a condiff spacing (uniform-t is the grid of `condiff sample`, where "
        "--ems/--dc-ratios files apply; condiff solvers only)",
    ),
    allow_mismatch: AllowMismatchOpt = False,
    threads: ThreadsOpt = None,
):
    """Terminal error against the reference ODE solution for every solver, condiff and diffusers."""
    import math

    from condiff.evaluation import bench
    from condiff.training.recipe import check_seed

    if (oracle is None) == (model is None):
        raise ConfigError("give exactly one of --oracle gmm or --model NAME")
    if oracle is not None and oracle != "gmm":
        raise ConfigError(f"--oracle must be gmm, got {oracle!r}")
    nfes = sorted(parse_list(nfe, "--nfe", int, 1, 1000, "integers"))
    check_seed(seed, "--seed")
    if not math.isfinite(cfg) or abs(cfg) > 100:
        raise ConfigError(f"--cfg must be a finite number with |cfg| <= 100, got {cfg}")
    check_int("--n", n, 1, 100_000)
    if ref_steps != 0:  # 0: the default; the reference is also run at half the steps, so at least 2
        check_int("--ref-steps", ref_steps, 2, 100_000)
    if json_out is not None:
        common.check_out(json_out, "--json", ".json")
    plot = plot if plot is not None else (json_out.with_suffix(".png") if json_out is not None else None)
    if plot is not None:
        common.check_out(plot, "--plot", ".png")
    grid = grid or []
    if oracle is not None and (ems is not None or dc_ratios is not None or grid):
        raise ConfigError("--ems, --dc-ratios and --grid are for --model (the gmm oracle tunes its own with --tune)")
    if model is not None and spacing != "trailing":
        from condiff.core.grids import SPACINGS
        from condiff.errors import one_of

        if spacing not in SPACINGS:
            raise one_of("--spacing", spacing, ["trailing", *SPACINGS])
    threads = common.use_threads(threads)
    if oracle == "gmm":
        check_int("--dim", dim, 1, 4096)
        check_int("--components", components, 1, 1024)
        check_int("--classes", classes, 1, components)
        problem = bench.gmm_problem(dim, components, classes, seed, n, cfg, ref_steps or 2048)
    else:
        loaded = common.load_model(model)
        common.check_solver_files(loaded, model, cfg, ems, dc_ratios, allow_mismatch, grid)
        from condiff.core.grids import SPACINGS

        problem = bench.model_problem(
            loaded,
            n,
            cfg,
            seed,
            ref_steps or 1000,
            name=model,
            spacing=None if spacing == "trailing" else SPACINGS[spacing],
        )
    cases = bench.default_cases()
    if oracle is not None and tune:
        cases += bench.tuned_cases(problem, nfes)
    if model is not None:
        cases += bench.file_cases(problem, model, nfes, cfg, ems, dc_ratios)
        cases += bench.grid_cases(problem, grid, cfg)
    rows = bench.run_bench(problem, nfes, cases)
    text = bench.table(rows)
    problem.info["threads"] = threads
    typer.echo(f"{problem.name}: {json.dumps(problem.info)}")
    typer.echo(text)
    best = bench.best_ratios(rows)
    if json_out is not None:
        from condiff.core.files import atomic_write_json

        atomic_write_json(
            json_out,
            {"config": problem.info, "results": rows, "best": {str(k): v for k, v in best.items()}, "table": text},
        )
        typer.echo(f"wrote {json_out}")
    if plot is not None:
        bench.plot(rows, plot, title=problem.name)
        typer.echo(f"wrote {plot}")


app.command("edit")(edit.bench_edit_cmd)
