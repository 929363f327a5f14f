"""Classical forecast baselines on the bundled real series (condiff.data.series): seasonal naive, ETS and ARIMA
with Gaussian predictives, scored on the rolling-origin test windows by the closed-form Gaussian CRPS (mean over
all forecast points) and the normalised CRPS (sum CRPS / sum |y|, TSDiff's metric). Parameters are fitted on each
series' training part only; options per series are condiff.evaluation.forecast_baselines.SPECS.

Usage: OMP_NUM_THREADS=1 python benchmarks/forecast_baselines.py [--json F]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from condiff.core.files import atomic_write_json
from condiff.data.series import SERIES, load_series
from condiff.evaluation.forecast_baselines import METHODS, evaluate


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path, default=None, help="also write the table as JSON here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    import statsmodels

    rows = {}
    print(f"statsmodels {statsmodels.__version__}")
    print(f"{'series':<10} {'points':>6} {'H':>3} {'W':>2} {'method':<15} {'CRPS':>10} {'NCRPS':>8} {'s':>6}")
    for name in SERIES:
        s = load_series(name)
        rows[name] = {"points": s.values.numel(), "horizon": s.horizon, "windows": s.num_windows, "methods": {}}
        for m in METHODS:
            t0 = time.perf_counter()
            r = evaluate(s, (m,))[m]
            r["seconds"] = time.perf_counter() - t0
            rows[name]["methods"][m] = r
            print(
                f"{name:<10} {s.values.numel():>6} {s.horizon:>3} {s.num_windows:>2} {m:<15} "
                f"{r['crps']:>10.4f} {r['ncrps']:>8.4f} {r['seconds']:>6.2f}"
            )
    if args.json is not None:
        atomic_write_json(args.json, {"statsmodels": statsmodels.__version__, "series": rows})


if __name__ == "__main__":
    main()
