"""``condiff guidance``: fit LinearAG's coefficients for a model (Castillo et al., AAAI 2025, arXiv 2312.12487,
"Adaptive Guidance"; condiff.guidance.linear_ag, specs 5a).

``condiff guidance fit-linear-ag --model shapes --cfg 3 --steps 20 --out coeffs.safetensors`` draws ``--n``
random conditions and start points as ``condiff eval`` draws them (one generator seeded with ``--seed``:
conditions first, then the start points of all rows, then any solver noise), records their CFG trajectories
with ``--solver`` on the ``--steps`` grid and fits the per-evaluation least-squares coefficients
(``fit_linear_ag``). The file is read back by ``load_linear_ag``. With ``--holdout M`` another M trajectories
(drawn after the fitting ones from the same generator) are recorded and the teacher-forced R^2 of the fitted
coefficients on them is reported (``predict_record``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import typer

from ..errors import ConfigError

app = typer.Typer(help="Guidance helpers: fit LinearAG coefficients (Castillo et al. 2025).", no_args_is_help=True,
                  add_completion=False)


@dataclass
class _Progress:
    """Forwards every call to ``denoiser`` unchanged and ticks a progress bar (one tick per evaluation)."""

    denoiser: Any
    bar: Any

    @property
    def schedule(self):
        return self.denoiser.schedule

    def __call__(self, x, t, cond=None):
        out = self.denoiser(x, t, cond)
        self.bar.update(1)
        return out


def _summary(r2) -> str:
    """'min A, median B, first half mean C' of a per-evaluation R^2 vector."""
    import torch

    half = r2[: max(1, r2.numel() // 2)]
    return (f"min {float(r2.min()):.4f}, median {float(torch.median(r2)):.4f}, "
            f"first-half mean {float(half.mean()):.4f}")


def draw_starts(model, n: int, grid, generator):
    """(condition mapping, start points [n, ...]) drawn as ``condiff eval`` draws them: conditions first, then
    the start points from the model's prior at the first grid time."""
    raw, _ = model.family.random_conditions(n, generator)
    cond = model.condition(raw)
    x = model.prior((n, *model.family.image_shape), float(grid[0]), generator)
    return cond, x


@app.command("fit-linear-ag")
def fit_linear_ag_cmd(
    model: str = typer.Option(..., help="bundled model name (shapes, digits) or a model directory"),
    cfg: float = typer.Option(..., help="the CFG scale the coefficients are fitted for (LinearAG uses it)"),
    steps: int = typer.Option(..., help="number of solver steps of the grid the coefficients belong to"),
    out: Path = typer.Option(..., help="output coefficient file (.safetensors)"),
    n: int = typer.Option(256, help="CFG trajectories to fit on"),
    seed: int = typer.Option(0, help="random seed (conditions, start points, solver noise)"),
    solver: str = typer.Option("dpmpp-2m", help="solver name (see `condiff solvers`)"),
    spacing: Optional[str] = typer.Option(None, help="time grid: uniform-t, uniform-logsnr, karras (default: the "
                                          "solver's own, else uniform-t)"),
    batch_size: int = typer.Option(256, help="trajectories recorded at once (bounds memory)"),
    holdout: int = typer.Option(0, help="also record this many held-out trajectories and report the "
                                "teacher-forced R^2 on them (0: report the in-sample R^2 only)"),
):
    """Record CFG trajectories of a model and fit LinearAG's per-evaluation coefficients to a safetensors file."""
    import torch
    from tqdm.auto import tqdm

    from ..cli import MAX_SAMPLES, _check_common, _check_out, _family, _load, _solver, _spacing
    from ..grids import make_grid
    from ..guidance.linear_ag import (CFGRecord, _rows, fit_linear_ag, predict_record, record_cfg,
                                      save_linear_ag)
    from ..sampling import Gaussian

    _check_common(steps, cfg, n, batch_size, seed)
    if not 0 <= holdout <= MAX_SAMPLES:
        raise ConfigError(f"--holdout must be an integer in [0, {MAX_SAMPLES}], got {holdout}")
    sol = _solver(solver)
    spacing_name, spc = _spacing(spacing, sol)
    _check_out(out, "--out", ".safetensors")
    _family(model)
    m = _load(model)

    t0 = time.perf_counter()
    grid = make_grid(m.schedule, steps, spc)
    g = torch.Generator().manual_seed(seed)
    bar = tqdm(desc="fit-linear-ag (evaluations)", unit="eval", leave=False)
    try:
        den = _Progress(m.denoiser, bar)
        with torch.no_grad():
            cond, x = draw_starts(m, n, grid, g)
            coeffs = fit_linear_ag(den, sol, grid, x, cond, cfg, noise=Gaussian(g), batch_size=batch_size)
            held = None
            if holdout:
                hcond, hx = draw_starts(m, holdout, grid, g)
                records = []
                for index in torch.split(torch.arange(holdout), batch_size):
                    sub = {k: _rows(v, index, holdout) for k, v in hcond.items()}
                    records.append(record_cfg(den, sol, grid, hx[index], sub, cfg, noise=Gaussian(g))[1])
                held = predict_record(coeffs, CFGRecord.cat(records))[1]
    finally:
        bar.close()
    save_linear_ag(coeffs, out)
    seconds = time.perf_counter() - t0
    line = (f"fitted {coeffs.steps} evaluations ({solver}, {steps} steps, {spacing_name}, cfg {cfg:g}) on {n} "
            f"trajectories; in-sample R^2 {_summary(coeffs.r2)}")
    if held is not None:
        line += f"; held-out ({holdout}) teacher-forced R^2 {_summary(held)}"
    typer.echo(f"{line}; wrote {out} in {seconds:.1f}s")
