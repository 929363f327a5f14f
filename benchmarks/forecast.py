"""TSDiff forecasting on statsmodels' series (co2, sunspots, nile), measured: mean CRPS on each series' test split
(the last windows, horizons back to back: ``condiff.data.series``) of seasonal-naive, ETS and ARIMA (Gaussian
predictives, exact CRPS; ``condiff.evaluation.forecast_baselines``), TSDiff's self-guided forecasts (MSE and
quantile guidance, Kollovieh et al. 2023 sec. 3.1) and the refinement (sec. 3.2, ML and Langevin) of each base
forecaster's samples, CRPS before (its samples) and after. Sample CRPS is the plug-in energy form over S samples.

    OMP_NUM_THREADS=1 python benchmarks/forecast.py [--json F] [--plot P] [--samples 100] [--tune]

The models are read from runs/tsdiff-<series> (`condiff train tsdiff-co2 --out runs/tsdiff-co2`, ...; nile's from
runs/tsdiff-nile-pool-se, the model trained over a pool of yearly series), or from the runs --model SERIES=RUN
names (e.g. --model nile=runs/tsdiff-nile, nile's model trained on nile alone). Fixed seeds:
the forecast noise and the base samples come from generators seeded --seed (default 0). --tune instead scores a
small grid of forecast settings on validation windows at the end of each training part (never the test split) with
32 samples and seed 1, which is how the recipes' [forecast] tables were chosen.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

from condiff.core.files import atomic_write_bytes, atomic_write_json
from condiff.data.series import SERIES, load_series
from condiff.evaluation.forecast_baselines import (
    SPECS,
    arima_forecast,
    ets_forecast,
    score,
    seasonal_naive_forecast,
)
from condiff.models import tsdiff_series as ts

ROOT = Path(__file__).resolve().parents[1]
BASES = ("seasonal-naive", "ets", "arima")
REFINERS = ("ml", "langevin")
RUN_NAMES = {"nile": "tsdiff-nile-pool-se"}  # series -> run folder under --runs (default tsdiff-<series>)
TUNE_GRID = {
    "mse": [{"std": s} for s in (0.03, 0.1, 0.3)]
    + [{"std": s, "mse_weight": w} for s in (0.3, 1.0) for w in (0.3, 0.1)],
    "quantile": [{"quantile_scale": s} for s in (0.25, 0.5, 1.0, 2.0, 4.0)],
    "ml": [{"refine_lr": lr, "refine_weight": w} for lr in (0.01, 0.03, 0.1) for w in (1.0, 10.0)],
}


def with_forecast(m: ts.TSDiffModel, **changes) -> ts.TSDiffModel:
    """The model with [forecast] values changed (a copy; the weights are shared)."""
    return dataclasses.replace(m, config={**m.config, "forecast": {**m.config["forecast"], **changes}})


def _line(name: str, method: str, value: float, extra: str = ""):
    print(f"{name:<9} {method:<28} {value:>10.4f} {extra}", flush=True)


def evaluate_series(m: ts.TSDiffModel, samples: int, seed: int) -> dict:
    s = m.series()
    contexts, targets, origins = ts.split_windows(m, series=s)
    rows = {}
    for b in BASES:
        rows[b] = {"crps": score(ts.base_forecast(s, b), targets)["crps"], "kind": "gaussian (exact CRPS)"}
        _line(s.name, b, rows[b]["crps"])
    fans = {}
    for g in ("mse", "quantile"):
        t0 = time.perf_counter()
        fc = m.forecast(contexts, samples=samples, guidance=g, seed=seed)
        fans[g] = fc
        rows[f"tsdiff-{g}"] = {"crps": ts.crps(fc, targets), "seconds": time.perf_counter() - t0}
        _line(s.name, f"tsdiff-{g}", rows[f"tsdiff-{g}"]["crps"], f"({rows[f'tsdiff-{g}']['seconds']:.0f} s)")
    for b in BASES:
        start = ts.gaussian_samples(ts.base_forecast(s, b), samples, seed)
        rows[f"{b} samples"] = {"crps": ts.crps(start, targets)}
        _line(s.name, f"{b} samples", rows[f"{b} samples"]["crps"])
        for r in REFINERS:
            t0 = time.perf_counter()
            out = m.refine(contexts, start, r, seed)
            rows[f"{b}+{r}"] = {"crps": ts.crps(out, targets), "seconds": time.perf_counter() - t0}
            _line(s.name, f"{b}+{r}", rows[f"{b}+{r}"]["crps"])
    return {
        "series": s.name,
        "points": s.values.numel(),
        "split": {
            "train_end": s.train_end,
            "origins": origins,
            "horizon": s.horizon,
            "context": s.context_length,
            "windows": s.num_windows,
        },
        "samples": samples,
        "seed": seed,
        "model": str(m.path),
        "trained_steps": m.info.get("trained_steps"),
        "train_minutes": m.info.get("train_minutes"),
        "forecast": m.config["forecast"],
        "crps": rows,
        "_fans": fans,
    }


def validation_base(s, method: str, origins):
    """A base forecaster fitted on the points before the first validation origin, forecasting the validation
    windows."""
    args = (s.values, origins[0], origins, s.horizon)
    if method == "seasonal-naive":
        return seasonal_naive_forecast(*args, season=s.season)
    ets, arima = SPECS[s.name]
    return ets_forecast(*args, **ets) if method == "ets" else arima_forecast(*args, **arima)


def tune_series(m: ts.TSDiffModel, samples: int = 32, seed: int = 1) -> dict:
    s = m.series()
    ctx, tgt = ts.validation_windows(s)
    H = s.horizon
    origins = [s.train_end - (s.num_windows - w) * H for w in range(s.num_windows)]
    out = {}
    for g in ("mse", "quantile"):
        for change in TUNE_GRID[g]:
            v = ts.crps(with_forecast(m, **change).forecast(ctx, samples=samples, guidance=g, seed=seed), tgt)
            out.setdefault(g, []).append({**change, "crps": v})
            _line(s.name, f"valid {g} {change}", v)
    naive = validation_base(s, "seasonal-naive", origins)
    start = ts.gaussian_samples(naive, samples, seed)
    out["seasonal-naive samples"] = ts.crps(start, tgt)
    _line(s.name, "valid seasonal-naive samples", out["seasonal-naive samples"])
    for change in TUNE_GRID["ml"]:
        v = ts.crps(with_forecast(m, **change).refine(ctx, start, "ml", seed), tgt)
        out.setdefault("ml", []).append({**change, "crps": v})
        _line(s.name, f"valid ml {change}", v)
    return out


def plot(results: list[dict], path: Path):
    """Fan charts of each series' forecast by its recipe's guidance (forecast.guidance)."""
    panels = []
    for r in results:
        s = load_series(r["series"])
        which = r["forecast"]["guidance"]
        fc = r["_fans"][which]
        title = f"{s.name}: TSDiff {which} self-guidance, test split, CRPS {r['crps'][f'tsdiff-{which}']['crps']:.3f}"
        title += f" (seasonal-naive {r['crps']['seasonal-naive']['crps']:.3f})"
        panels.append(ts.forecast_panel(s, fc, s.horizon, title))
    atomic_write_bytes(path, ts.fan_chart_png(panels))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=Path, default=ROOT / "runs")
    ap.add_argument("--series", default=",".join(SERIES), help="comma-separated series")
    ap.add_argument("--json", type=Path, default=None, help="write the tables as JSON here")
    ap.add_argument("--plot", type=Path, default=None, help="write the fan charts of the three series here (.png)")
    ap.add_argument("--samples", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", action="append", default=[], help="SERIES=RUN: the run to read for a series")
    ap.add_argument("--tune", action="store_true", help="score the settings grid on validation windows instead")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    names = [n for n in args.series.split(",") if n]
    runs = {n: args.runs / RUN_NAMES.get(n, f"tsdiff-{n}") for n in names}
    for item in args.model:
        n, _, run = item.partition("=")
        if n not in runs or not run:
            ap.error(f"--model {item!r}: accepted SERIES=RUN with SERIES one of {', '.join(names)}")
        runs[n] = Path(run)
    models = {n: ts.load_tsdiff_model(runs[n], str(runs[n])) for n in names}
    if args.tune:
        res = {n: tune_series(m) for n, m in models.items()}
        if args.json:
            atomic_write_json(args.json, {"validation": res})
        return
    results = [evaluate_series(m, args.samples, args.seed) for m in models.values()]
    ok = {
        r["series"]: {
            "tsdiff_below_seasonal_naive": min(r["crps"]["tsdiff-mse"]["crps"], r["crps"]["tsdiff-quantile"]["crps"])
            < r["crps"]["seasonal-naive"]["crps"],
            "refinement_improves": {
                f"{b}+{m}": r["crps"][f"{b}+{m}"]["crps"] < r["crps"][f"{b} samples"]["crps"]
                for b in BASES
                for m in REFINERS
            },
        }
        for r in results
    }
    print(ok)
    if args.json:
        atomic_write_json(
            args.json,
            {
                "command": "OMP_NUM_THREADS=1 python " + " ".join(["benchmarks/forecast.py", *sys.argv[1:]]),
                "torch": torch.__version__,
                "series": [{k: v for k, v in r.items() if k != "_fans"} for r in results],
                "acceptance": ok,
            },
        )
    if args.plot:
        plot(results, args.plot)


if __name__ == "__main__":
    main()
