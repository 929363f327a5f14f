"""``condiff dc``: search DC-Solver's compensation ratios for a model (Zhao, Wang, Zhou & Lu 2024, "DC-Solver",
ECCV; condiff.solvers.dc_search).

``condiff dc search --model shapes --nfe 5,8,10 --cfg 3 --out ratios.json`` draws ``--n-data`` random
conditions and initial noises, builds a ``--ref-steps`` DDIM reference per guidance scale on the same noises,
searches one ratio per step for every (NFE, CFG) and fits the cascade polynomial regression when the table
determines it. The file is read back by condiff.solvers.dc_search.load_ratios / ratios_for / dc_solver_for.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Optional

import typer

from condiff.cli import common
from condiff.cli.options import ThreadsOpt
from condiff.errors import ConfigError, check_int
from condiff.guidance.schedules import MAX_SCALE

app = typer.Typer(
    help="DC-Solver: search dynamic-compensation ratios (Zhao et al. 2024).", no_args_is_help=True, add_completion=False
)

MIN_NFE, MAX_NFE = 3, 1000  # steps 1-2 keep ratio 1, so fewer than 3 steps have nothing to search
MAX_DATA = 10_000


def parse_list(text: str, option: str, kind, lo, hi, what: str) -> list:
    """A comma-separated list of ``kind`` values in [lo, hi], without blanks or repeats (ConfigError)."""
    want = f"{option} must be a comma-separated list of {what} in [{lo:g}, {hi:g}]"
    items = str(text).split(",")
    out = []
    for item in items:
        item = item.strip()
        try:
            v = kind(item)
        except ValueError:
            raise ConfigError(f"{want}, got {text!r}") from None
        if isinstance(v, float) and not math.isfinite(v) or not lo <= v <= hi:
            raise ConfigError(f"{want}, got {text!r}")
        if v in out:
            raise ConfigError(f"{option} repeats {item}, got {text!r}")
        out.append(v)
    return out


@app.command("search")
def search_cmd(
    model: str = typer.Option(..., help="bundled model name (shapes, digits) or a model directory"),
    nfe: str = typer.Option(
        ..., help=f"comma-separated numbers of steps (= NFE), each in [{MIN_NFE}, {MAX_NFE}], e.g. 5,8,10"
    ),
    cfg: str = typer.Option(..., help="comma-separated guidance scales, e.g. 3 or 3,5,7.5"),
    n_data: int = typer.Option(10, help="random conditions + initial noises the ratios are searched on"),
    ref_steps: int = typer.Option(200, help="steps of the DDIM reference (refined with every searched grid point)"),
    iters: int = typer.Option(20, help="AdamW iterations per step"),
    lr: float = typer.Option(0.1, help="AdamW learning rate"),
    seed: int = typer.Option(0, help="random seed (conditions and noises)"),
    spacing: str = typer.Option("uniform-t", help="time grid: uniform-t, uniform-logsnr, karras"),
    base: str = typer.Option("unipc", help="solver compensated: unipc, dpmpp-2m, dpmpp-3m"),
    axis: str = typer.Option("lambda", help="interpolation variable: lambda (log alpha/sigma) or t (the paper's)"),
    bounded: bool = typer.Option(False, help="search p in rho = 1 + 0.5 tanh(p) instead of rho"),
    out: Path = typer.Option(..., help="output ratios file (.json)"),
    threads: ThreadsOpt = None,
):
    """Search DC ratios per (NFE, CFG) on a model and write them, with a CPR fit, to a JSON ratios file."""
    import torch
    from tqdm.auto import tqdm

    from condiff import __version__
    from condiff.core.fitted import weights_digest
    from condiff.core.grids import make_grid
    from condiff.errors import one_of
    from condiff.guidance import CFG
    from condiff.solvers.dc_search import CPR, DCRatios, fit_cpr, reference_trajectory, save_ratios, search
    from condiff.solvers.dc_solver import AXES, BASES
    from condiff.training.recipe import check_seed

    nfes = parse_list(nfe, "--nfe", int, MIN_NFE, MAX_NFE, "integers")
    cfgs = parse_list(cfg, "--cfg", float, -MAX_SCALE, MAX_SCALE, "finite numbers")
    check_int("--n-data", n_data, 1, MAX_DATA)
    check_int("--ref-steps", ref_steps, max(nfes), 100_000)
    check_int("--iters", iters, 1, 100_000)
    if not math.isfinite(lr) or lr <= 0:
        raise ConfigError(f"--lr must be a positive finite number, got {lr}")
    check_seed(seed, "--seed")
    _, spc = common.spacing_of(spacing)
    if base not in BASES:
        raise one_of("--base", base, BASES)
    if axis not in AXES:
        raise one_of("--axis", axis, AXES)
    common.check_out(out, "--out", ".json")
    common.family_of(model)
    common.use_threads(threads)
    m = common.load_model(model)

    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(seed)
    raw, _ = m.family.random_conditions(n_data, g)
    cond = m.condition(raw)
    grids = {n: make_grid(m.schedule, n, spc) for n in nfes}
    x_T = m.prior((n_data, *m.family.image_shape), float(grids[nfes[0]][0]), g)  # PFGM++ models: their prior
    entries, metrics = {}, {}
    bar = tqdm(total=len(cfgs) * sum(nfes), desc="dc search", leave=False)
    try:
        for w in cfgs:
            den = CFG(m.denoiser, w)
            ref = reference_trajectory(
                den, cond, x_T, list(grids.values()), ref_steps, spc, progress=f"reference cfg {w:g}"
            )
            for n in nfes:
                bar.set_postfix(nfe=n, cfg=f"{w:g}")
                res = search(
                    den,
                    cond,
                    x_T,
                    grids[n],
                    BASES[base],
                    ref,
                    iters,
                    lr,
                    bounded,
                    progress=lambda i, steps, rho: bar.update(1),
                    axis=AXES[axis],
                )
                entries[(n, float(w))] = res.ratios
                metrics[(n, float(w))] = {"mse_base": res.mse_base, "mse_dc": res.mse_dc}
    finally:
        bar.close()
    try:
        cpr: CPR | None = fit_cpr(entries)
        note = f"CPR degrees (u, CFG, NFE) = {cpr.degrees}"
    except ConfigError as e:
        cpr, note = None, f"no CPR fit ({e})"
    seconds = time.perf_counter() - t0
    reproduce = common.reproduce(
        "dc search",
        [
            ("--model", model),
            ("--nfe", nfe),
            ("--cfg", cfg),
            ("--n-data", n_data),
            ("--ref-steps", ref_steps),
            ("--iters", iters),
            ("--lr", lr),
            ("--seed", seed),
            ("--spacing", spacing),
            ("--base", base),
            ("--axis", axis),
            ("--bounded" if bounded else "--no-bounded", True),
            ("--out", out),
        ],
    )
    meta = {
        "n_data": n_data,
        "ref_steps": ref_steps,
        "reference": "ddim",
        "iters": iters,
        "lr": lr,
        "seed": seed,
        "bounded": bounded,
        "seconds": round(seconds, 2),
        "threads": torch.get_num_threads(),
        "condiff_version": __version__,
        "torch_version": torch.__version__,
        "reproduce": reproduce,
    }
    save_ratios(out, DCRatios(entries, cpr, base, axis, 2, spacing, model, meta, metrics, weights_digest(m.module)))
    for (n, w), r in entries.items():
        mt = metrics[(n, w)]
        typer.echo(
            f"nfe {n} cfg {w:g}: ratios {', '.join(f'{v:.3f}' for v in r)}; final-state MSE to the "
            f"reference {mt['mse_base']:.3e} ({base}) -> {mt['mse_dc']:.3e} (dc)"
        )
    typer.echo(f"{note}; wrote {out} in {seconds:.1f}s")


@app.command("show")
def show_cmd(
    path: Path = typer.Argument(..., help="a ratios file written by `condiff dc search`"),
    nfe: Optional[int] = typer.Option(None, help="also print the ratios used at this NFE (searched, else CPR)"),
    cfg: Optional[float] = typer.Option(None, help="the guidance scale for --nfe"),
):
    """Validate a ratios file and print its entries (and the ratios for --nfe/--cfg)."""
    from condiff.solvers.dc_search import load_ratios, ratios_for

    if (nfe is None) != (cfg is None):
        raise ConfigError("--nfe and --cfg go together")
    r = load_ratios(path)
    typer.echo(
        f"{path}: base {r.base}, axis {r.axis}, dc_order {r.dc_order}, spacing {r.spacing}, "
        f"model {r.model}, CPR {'degrees ' + str(r.cpr.degrees) if r.cpr else 'none'}"
    )
    for (n, w), ratios in sorted(r.entries.items()):
        typer.echo(f"nfe {n} cfg {w:g}: {', '.join(f'{v:.4f}' for v in ratios)}")
    if nfe is not None:
        typer.echo(f"-> nfe {nfe} cfg {cfg:g}: {', '.join(f'{v:.4f}' for v in ratios_for(r, nfe, cfg))}")
