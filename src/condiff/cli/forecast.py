"""``condiff forecast``: probabilistic forecasts of one of statsmodels' series with a TSDiff model
(``condiff.models.tsdiff_series``; Kollovieh et al., NeurIPS 2023).

``condiff forecast --model runs/tsdiff-co2 [--horizon H] [--samples S] [--guidance mse|quantile] [--seed N]
[--out fan.png] [--json F]`` forecasts the series' test windows (the rolling-origin split of
``condiff.data.series``: the last windows, horizons back to back) by observation self-guidance, and prints the
mean CRPS of the forecast beside seasonal-naive, ETS and ARIMA (exact Gaussian CRPS; the forecast's from its
samples). ``--refine ml|langevin --base seasonal-naive|ets|arima`` instead draws S samples from the base
forecaster's Gaussian predictive and refines them with the model (TSDiff sec. 3.2), printing the CRPS before and
after. ``--end`` forecasts past the series' last point (no truth, so no CRPS). ``--horizon`` (1 to the model's
horizon) forecasts the first H points of each window from the window's L - H points before it.

--out writes a fan chart (PNG: 5-95 % and 25-75 % bands, the median, the truth), --json the samples' quantiles,
the CRPS table and the options; both are written atomically once everything has been computed. Every user error is
one ``error:`` line with exit code 2, raised before any weights are read.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer

from condiff.cli import common
from condiff.cli.options import ThreadsOpt
from condiff.errors import ConfigError, check_int, one_of

GUIDANCES = ("mse", "quantile")
REFINERS = ("ml", "langevin")
BASES = ("seasonal-naive", "ets", "arima")
MAX_SAMPLES = 10_000
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


def forecast_cmd(
    model: Path = typer.Option(
        ..., help="a tsdiff model folder, or the run folder holding it as model/ (condiff train tsdiff-co2)"
    ),
    horizon: Optional[int] = typer.Option(
        None, help="points to forecast, 1 to the model's horizon (default: the model's)"
    ),
    samples: Optional[int] = typer.Option(
        None, help=f"forecast samples, 1 to {MAX_SAMPLES} (default: the recipe's forecast.samples)"
    ),
    guidance: Optional[str] = typer.Option(
        None, help="observation self-guidance: mse or quantile (default: the recipe's forecast.guidance)"
    ),
    refine: Optional[str] = typer.Option(
        None, help="refine a base forecaster's samples instead: ml (gradient steps) or langevin"
    ),
    base: Optional[str] = typer.Option(
        None, help="the forecaster --refine refines: seasonal-naive, ets or arima (default: seasonal-naive)"
    ),
    end: bool = typer.Option(False, "--end", help="forecast past the series' last point (no truth, no CRPS)"),
    seed: int = typer.Option(0, help="random seed of the noise"),
    out: Optional[Path] = typer.Option(None, help="write a fan chart here (.png)"),
    json_file: Optional[Path] = typer.Option(None, "--json", help="write a JSON report here (.json)"),
    threads: ThreadsOpt = None,
):
    """Forecast a series' test windows (or past its end) with a TSDiff model; CRPS against seasonal-naive, ETS and
    ARIMA, and a fan chart."""
    import torch

    from condiff import __version__
    from condiff.core.files import atomic_write_bytes, atomic_write_json
    from condiff.models import tsdiff_series as ts

    if horizon is not None:
        check_int("--horizon", horizon, 1, 10_000)
    if samples is not None:
        check_int("--samples", samples, 1, MAX_SAMPLES)
    if guidance is not None and guidance not in GUIDANCES:
        raise one_of("--guidance", guidance, GUIDANCES)
    if refine is not None and refine not in REFINERS:
        raise one_of("--refine", refine, REFINERS)
    if base is not None and base not in BASES:
        raise one_of("--base", base, BASES)
    if base is not None and refine is None:
        raise ConfigError(f"--base is the forecaster --refine refines; pass --refine ml|langevin with --base {base}")
    if refine is not None and guidance is not None:
        raise ConfigError(f"--guidance is for self-guided forecasts; --refine {refine} refines a base forecaster")
    if end and refine is not None:
        raise ConfigError("--end forecasts past the series' last point by self-guidance; --refine needs the test split")
    common.check_seed(seed)
    threads = common.use_threads(threads)
    if out is not None:
        common.check_out(out, "--out", ".png")
    if json_file is not None:
        common.check_out(json_file, "--json", ".json")
        if out is not None and json_file.resolve() == out.resolve():
            raise ConfigError(f"--json and --out are the same file {str(out)!r}; choose another")
    common.refuse_pickled_inputs({"--model": model})
    m = ts.load_tsdiff_model(model, "--model")
    if horizon is not None and horizon > m.horizon:
        raise ConfigError(f"--horizon must be an integer in [1, {m.horizon}] (the model's horizon), got {horizon}")
    h = m.horizon if horizon is None else horizon
    f = m.forecast_config
    S = f.samples if samples is None else samples
    series = m.series()
    t0 = time.perf_counter()
    table, base_crps = {}, None
    if end:
        contexts = ts.end_context(m, h, series)
        guidance = guidance or f.guidance
        fc = m.forecast(contexts, h, S, guidance, seed)
        method = f"tsdiff-{guidance}"
    else:
        contexts, targets, _ = ts.split_windows(m, h, series)
        from condiff.evaluation.forecast_baselines import score

        for b in BASES:
            table[b] = score(ts.base_forecast(series, b, h), targets)["crps"]
        if refine is None:
            guidance = guidance or f.guidance
            fc = m.forecast(contexts, h, S, guidance, seed)
            method = f"tsdiff-{guidance}"
        else:
            base = base or "seasonal-naive"
            start = ts.gaussian_samples(ts.base_forecast(series, base, h), S, seed)
            base_crps = ts.crps(start, targets)
            fc = m.refine(contexts, start, refine, seed)
            method = f"{base}+{refine}"
        table[method] = ts.crps(fc, targets)
    seconds = time.perf_counter() - t0
    q = torch.quantile(fc, torch.tensor(QUANTILES, dtype=torch.float64), dim=0)
    record = {
        "command": "forecast",
        "model": str(model),
        "model_path": str(m.path),
        "series": series.name,
        "split": "end of the series"
        if end
        else f"test: the last {series.num_windows} windows of horizon "
        f"{series.horizon} (first {h} points each), origins {series.origins}",
        "method": method,
        "horizon": h,
        "context": m.length - h,
        "samples": S,
        "guidance": guidance,
        "refine": refine,
        "base": base,
        "seed": seed,
        "crps": table or None,
        "base_samples_crps": base_crps,
        "quantile_levels": list(QUANTILES),
        "quantiles": q.tolist(),
        "seconds": seconds,
        "threads": threads,
        "condiff_version": __version__,
        "reproduce": common.reproduce(
            "forecast",
            [
                ("--model", model),
                ("--horizon", horizon),
                ("--samples", samples),
                ("--guidance", guidance if refine is None else None),
                ("--refine", refine),
                ("--base", base),
                ("--end", end),
                ("--seed", seed),
                ("--out", out),
                ("--json", json_file),
            ],
        ),
    }
    png = None
    if out is not None:
        title = f"{series.name}: {method}, {S} samples"
        if end:
            v = series.values
            x = torch.arange(v.numel() + h, dtype=torch.float64)
            start_i = max(0, v.numel() - 3 * series.context_length)
            panel = {
                "title": title,
                "history": (x[start_i : v.numel()], v[start_i:]),
                "fans": [(x[v.numel() :], fc[:, 0])],
            }
        else:
            panel = ts.forecast_panel(series, fc, h, title + f", CRPS {table[method]:.3f}")
        png = ts.fan_chart_png([panel])
    if png is not None:
        atomic_write_bytes(out, png)
    if json_file is not None:
        atomic_write_json(json_file, record)
    if table:
        typer.echo(f"{series.name}: mean CRPS on the test split ({series.num_windows} windows, horizon {h})")
        for name, value in table.items():
            typer.echo(f"  {name:<24} {value:10.4f}")
        if base_crps is not None:
            typer.echo(f"  {base + ' (its samples)':<24} {base_crps:10.4f}")
    else:
        med = q[2, 0].tolist()
        typer.echo(f"{series.name}: median forecast past the end: " + ", ".join(f"{v:.4g}" for v in med))
    wrote = [str(p) for p in (out, json_file) if p is not None]
    typer.echo(f"({seconds:.1f} s)" + (f" wrote {' and '.join(wrote)}" if wrote else ""))
