"""``condiff grid``: search a model's time grids for a solver (condiff.solvers.grid_search) and show a grids file.

``condiff grid search --model shapes --cfg 3 --steps 5,8,10 --out grid.json`` draws ``--n`` random conditions
and starts (``--seed``: keep it apart from the seeds you evaluate with) at ``--t-start``, solves each start
with ``--ref-steps`` DPM-Solver++(2M) steps for the reference end point, and searches one grid per step count
from the trailing grid (diffusers' trailing timesteps, from that start). ``condiff sample|eval|bench solvers
--grid grid.json`` read it back.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer

from condiff.cli import common
from condiff.cli.dc import parse_list
from condiff.cli.options import ThreadsOpt
from condiff.errors import ConfigError, check_int
from condiff.guidance.schedules import MAX_SCALE

app = typer.Typer(
    help="Time grids searched on a model for a solver (in the spirit of Align Your Steps, Sabour et al. 2024).",
    no_args_is_help=True,
    add_completion=False,
)

MAX_GRID_STEPS = 100
MAX_N = 10_000


@app.command("search")
def search_cmd(
    model: str = typer.Option(..., help="bundled model name (shapes, digits) or a model directory"),
    steps: str = typer.Option(..., help=f"comma-separated step counts, each in [1, {MAX_GRID_STEPS}], e.g. 5,8,10"),
    cfg: float = typer.Option(3.0, help="guidance scale the grids are searched at"),
    solver: str = typer.Option("dpmpp-2m", help="the (deterministic) solver the grids are for"),
    n: int = typer.Option(16, help="random conditions + starts the grids are fitted on"),
    seed: int = typer.Option(100, help="seed of the fitting starts (keep it apart from the seeds you evaluate)"),
    ref_steps: int = typer.Option(500, help="DPM-Solver++(2M) steps of the reference end points"),
    max_evals: int = typer.Option(0, help="solves of the batch per grid (0: 40 per step)"),
    t_start: Optional[str] = typer.Option(
        None,
        help="where the grids start: 'max' (the schedule's t_max, diffusers' trailing start) or a time "
        "[default: where condiff's grids start, sigma/alpha <= 20]",
    ),
    out: Path = typer.Option(..., help="output grids file (.json)"),
    threads: ThreadsOpt = None,
):
    """Search one time grid per step count that minimises the solver's terminal error against a many-step
    reference, and write them to a JSON grids file (read by --grid)."""
    import torch
    from tqdm.auto import tqdm

    from condiff import __version__
    from condiff.core.fitted import FittedFor, weights_digest
    from condiff.core.grids import UniformT, make_grid
    from condiff.guidance import CFG
    from condiff.solvers import get_solver
    from condiff.solvers.grid_search import (
        SearchedGrids,
        reference_end,
        save_grids,
        search_grid,
        trailing_times,
    )
    from condiff.training.recipe import check_seed

    step_list = parse_list(steps, "--steps", int, 1, MAX_GRID_STEPS, "integers")
    if not -MAX_SCALE <= cfg <= MAX_SCALE:  # NaN fails too
        raise ConfigError(f"--cfg must be a finite number in [{-MAX_SCALE:g}, {MAX_SCALE:g}], got {cfg}")
    check_int("--n", n, 1, MAX_N)
    check_int("--ref-steps", ref_steps, max(step_list), 100_000)
    check_int("--max-evals", max_evals, 0, 1_000_000, accepted="0 (40 per step) or a count")
    check_seed(seed, "--seed")
    sol = common.make_solver(solver, None)
    if sol.stochastic:
        raise ConfigError(f"--solver {solver} is stochastic: a grid search needs a deterministic solver")
    common.check_out(out, "--out", ".json")
    common.family_of(model)
    common.use_threads(threads)
    m = common.load_model(model)
    t0_grid, _ = common.start_of(m, model, t_start, False)
    t0_grid = m.schedule.default_t_start() if t0_grid is None else t0_grid

    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(seed)
    raw, _ = m.family.random_conditions(n, g)
    cond = m.condition(raw)
    x_T = m.prior((n, *m.family.image_shape), float(t0_grid), g)
    den = CFG(m.denoiser, cfg)
    fine = make_grid(m.schedule, ref_steps, UniformT(), t_start=t0_grid)
    x_ref = reference_end(den, cond, x_T, fine, get_solver("dpmpp-2m"), progress=f"reference ({ref_steps} steps)")
    found = {}
    for k in step_list:
        bar = tqdm(total=max_evals or 40 * k, desc=f"grid search {k} steps", leave=False)

        def tick(evals, total, best, bar=bar):
            bar.total = total
            bar.n = evals
            bar.set_postfix(error=f"{best:.4g}", refresh=False)
            bar.refresh()

        try:
            res = search_grid(
                den, cond, x_T, x_ref, sol, trailing_times(m.schedule, t0_grid, k), max_evals or None, tick
            )
        finally:
            bar.close()
        found[k] = res
        typer.echo(
            f"{k} steps: terminal error {res.initial_error:.4g} (trailing grid) -> {res.error:.4g} "
            f"({res.evaluations} solves); times {', '.join(f'{t:.1f}' for t in res.times)}"
        )
    seconds = time.perf_counter() - t0
    reproduce = common.reproduce(
        "grid search",
        [
            ("--model", model),
            ("--steps", steps),
            ("--cfg", cfg),
            ("--solver", solver),
            ("--n", n),
            ("--seed", seed),
            ("--ref-steps", ref_steps),
            ("--max-evals", max_evals),
            ("--t-start", t_start),
            ("--out", out),
        ],
    )
    meta = {
        "n": n,
        "seed": seed,
        "reference": f"dpmpp-2m, {ref_steps} uniform-t steps",
        "objective": "mean per-sample RMS distance to the reference end point",
        "initial": "trailing",
        "seconds": round(seconds, 2),
        "threads": torch.get_num_threads(),
        "condiff_version": __version__,
        "torch_version": torch.__version__,
        "reproduce": reproduce,
    }
    fitted = FittedFor(model, weights_digest(m.module), float(cfg))
    save_grids(out, SearchedGrids(found, solver, fitted, meta))
    typer.echo(f"wrote {out} in {seconds:.1f}s")


@app.command("show")
def show_cmd(path: Path = typer.Argument(..., help="a grids file written by `condiff grid search`")):
    """Validate a grids file and print its grids."""
    from condiff.core.fitted import describe
    from condiff.solvers.grid_search import load_grids

    common.refuse_pickled_inputs({"PATH": path})
    r = load_grids(path)
    typer.echo(f"{path}: solver {r.solver}, searched for {describe(r.fitted, ('model', 'cfg'))}")
    for k, g in sorted(r.grids.items()):
        typer.echo(
            f"{k} steps: {', '.join(f'{t:.2f}' for t in g.times)} (error {g.initial_error:.4g} -> {g.error:.4g})"
        )
