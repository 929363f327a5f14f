"""``condiff ems``: empirical model statistics for the dpm-v3 solver (Zheng, Lu, Chen & Zhu 2023,
"DPM-Solver-v3", NeurIPS; sec. 3.1 and App. C).

``condiff ems compute`` estimates l, s, b (condiff.solvers.ems.compute_ems) for one model at one CFG scale, on real
training images of the model's family (``training_batch``), over the lambda range the CLI samples
(``make_grid``'s end points: ``schedule.default_t_start()`` to ``schedule.t_min``), and writes them atomically
as safetensors. ``condiff ems show`` prints what a file holds. Statistics are per model and per guidance scale.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import typer

from condiff.cli import common
from condiff.cli.options import ThreadsOpt
from condiff.errors import ConfigError, check_real
from condiff.guidance.schedules import MAX_SCALE

app = typer.Typer(help="Empirical model statistics (EMS) for the dpm-v3 solver (DPM-Solver-v3).", no_args_is_help=True)

MAX_GRID = 100_000
MAX_DATA = 1_000_000
JVP_CHOICES = ("auto", "forward-ad", "central-difference")


def _check(grid: int, n_data: int, batch_size: int, cfg: float, seed: int, jvp: str):
    from condiff.training.recipe import check_seed

    if not 1 <= grid <= MAX_GRID:
        raise ConfigError(f"--grid must be an integer in [1, {MAX_GRID}], got {grid}")
    if not 2 <= n_data <= MAX_DATA:
        raise ConfigError(f"--n-data must be an integer in [2, {MAX_DATA}] (variances need 2 points), got {n_data}")
    if not 1 <= batch_size <= MAX_DATA:
        raise ConfigError(f"--batch-size must be an integer in [1, {MAX_DATA}], got {batch_size}")
    check_real("--cfg", cfg, -MAX_SCALE, MAX_SCALE, f"a finite number with |cfg| <= {MAX_SCALE:g}")
    if jvp not in JVP_CHOICES:
        raise ConfigError(f"unknown --jvp {jvp!r}; accepted: {', '.join(JVP_CHOICES)}")
    check_seed(seed, "--seed")


@app.command("compute")
def compute(
    model: str = typer.Option(..., help="bundled model name (shapes, digits) or a model directory"),
    cfg: float = typer.Option(3.0, help="classifier-free guidance scale the statistics are for (1 = conditional)"),
    n_data: int = typer.Option(256, help="number of real training images"),
    grid: int = typer.Option(200, help="number of lambda-grid intervals"),
    seed: int = typer.Option(0, help="random seed (data, noises, probes)"),
    batch_size: int = typer.Option(64, help="data points per network batch (bounds memory)"),
    jvp: str = typer.Option(
        "auto",
        help="Jacobian-vector products: auto (forward AD if the model supports it, "
        "else central differences), forward-ad, central-difference",
    ),
    out: Path = typer.Option(..., help="output .safetensors file"),
    threads: ThreadsOpt = None,
):
    """Estimate the statistics of a model at a CFG scale and write them for `--solver dpm-v3 --ems FILE`."""
    import torch

    from condiff import __version__
    from condiff.core.fitted import weights_digest
    from condiff.guidance import CFG
    from condiff.solvers.ems import JVPS, compute_ems
    from condiff.solvers.pfgmpp import GaussianNoise
    from condiff.training.recipe import ObjectiveConfig

    _check(grid, n_data, batch_size, cfg, seed, jvp)
    common.check_out(out, "--out", ".safetensors")
    family = common.family_of(model)
    g = torch.Generator().manual_seed(seed)
    try:  # real training images, before any weights are read
        x0, raw = family.training_batch(0, n_data, g, seed, ObjectiveConfig())
    except ConfigError as e:
        raise ConfigError(f"--n-data {n_data} is more than the {family.name} training data allows ({e})") from None
    common.use_threads(threads)
    m = common.load_model(model)
    cond = m.condition(raw)
    sch = m.schedule
    t0 = time.perf_counter()
    # PFGM++ models are perturbed with their own kernel noise; Gaussian ones draw z inside compute_ems
    z = None if isinstance(m.noise, GaussianNoise) else m.noise.unit(x0.shape, g, x0.dtype)
    ems = compute_ems(
        CFG(m.denoiser, cfg),
        x0,
        cond,
        sch,
        sch.default_t_start(),
        sch.t_min,
        grid,
        g,
        batch_size,
        progress="EMS",
        jvp=None if jvp == "auto" else JVPS[jvp],
        noise=z,
        meta={
            "model": model,
            "cfg": cfg,
            "seed": seed,
            "weights": weights_digest(m.module),
            "schedule": m.info.get("schedule_cfg"),
            "info": {"condiff_version": __version__, "torch_threads": torch.get_num_threads(), "family": m.family.name},
        },
    )
    seconds = time.perf_counter() - t0
    ems = dataclasses.replace(ems, info={**ems.info, "seconds": round(seconds, 2)})
    ems.save(out)
    typer.echo(
        f"wrote {out} ({grid} intervals, lambda {ems.lam_range[0]:.3f}..{ems.lam_range[1]:.3f}, {n_data} "
        f"images, cfg {cfg}, jvp {ems.info['jvp']}, {seconds:.1f}s)"
    )


@app.command("show")
def show(path: Path = typer.Argument(..., help="a .safetensors file written by `condiff ems compute`")):
    """Print the metadata and value ranges of an EMS file."""
    from condiff.solvers.ems import load_ems

    ems = load_ems(path)
    summary = {
        **ems.metadata(),
        "lam_range": list(ems.lam_range),
        **{f"{k}_range": [float(getattr(ems, k).min()), float(getattr(ems, k).max())] for k in "lsb"},
    }
    typer.echo(json.dumps(summary, indent=2, sort_keys=True))
