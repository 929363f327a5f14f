"""Adaptive Guidance and LinearAG on the bundled shapes model: network evaluations saved vs accuracy.

Protocol. ``--n`` random conditions of the shapes family drawn as ``condiff eval`` draws them (a generator
seeded with ``--seed``: conditions first, then the start noise per batch), CFG scale 3, DPM-Solver++(2M),
20 uniform-t steps (the bundled model card's setting). Every method starts from the same noises. The network
cost is counted by ``CountRows`` around ``model.denoiser``: batch rows per sample (CFG: 2 per evaluation,
40 for 20 steps); "saved" is 1 - rows / rows(CFG). Accuracy is the exact labeller's ('all' = all four
attributes right), as in ``condiff eval``; "rms to cfg" is the mean per-image RMS pixel difference (images in
[-1, 1]) from CFG's image for the same condition and noise: how far a method strays from what it replaces.

Methods: CFG 3; the conditional model (CFG 1); AG with the cosine in eps space (the spec's rule) and in x0
space, for several gamma_bar; a fixed switch (``GuidanceInterval``: CFG for the first s evaluations, then
conditional only: the static policy AG tries to find per sample); LinearAG with coefficients fitted on
``--fit-n`` separate CFG trajectories (seed + 1) replacing the unconditional branch in the first s evaluations.

Prints a table and writes outputs/guidance_ag.json.

    OMP_NUM_THREADS=1 python benchmarks/guidance_ag.py            # ~10 min on one (shared) core
    OMP_NUM_THREADS=1 python benchmarks/guidance_ag.py --n 64 --fit-n 32 --quick   # smoke run
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from condiff.core.denoiser import X0, Eps
from condiff.core.grids import make_grid
from condiff.core.sampling import Gaussian, sample
from condiff.guidance import CFG
from condiff.guidance.adaptive import AdaptiveGuidance, CountRows
from condiff.guidance.interval import GuidanceInterval
from condiff.guidance.linear_ag import LinearAG, fit_linear_ag
from condiff.models.base import load_model, silence_diffusers
from condiff.solvers import get_solver

SCALE = 3.0
STEPS = 20
SOLVER = "dpmpp-2m"


def run(model, make_guided, n, seed, batch_size, grid, solver):
    """Sample n images with the guided denoiser make_guided(counted_denoiser) (a fresh one per batch)."""
    g = torch.Generator().manual_seed(seed)
    raw, targets = model.family.random_conditions(n, g)
    counter = CountRows(model.denoiser)
    images, t0, guided = [], time.perf_counter(), None
    with torch.no_grad():
        for chunk in torch.split(raw, batch_size):
            cond = model.condition(chunk)
            x = model.prior((chunk.shape[0], *model.family.image_shape), float(grid[0]), g)
            guided = make_guided(counter)
            images.append(sample(guided, solver, grid, x, cond, Gaussian(g)).x.clamp(-1, 1))
    images = torch.cat(images)
    acc = model.family.score(images, targets)
    return images, {
        "accuracy": acc,
        "rows_per_sample": counter.rows / n,
        "calls": counter.calls,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def fit(model, n, seed, batch_size, grid, solver):
    g = torch.Generator().manual_seed(seed)
    raw, _ = model.family.random_conditions(n, g)
    with torch.no_grad():
        cond = model.condition(raw)
        x = model.prior((n, *model.family.image_shape), float(grid[0]), g)
        return fit_linear_ag(model.denoiser, solver, grid, x, cond, SCALE, batch_size=batch_size)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--fit-n", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--quick", action="store_true", help="fewer settings")
    ap.add_argument("--out", default="outputs/guidance_ag.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    silence_diffusers()
    model = load_model("shapes")
    grid = make_grid(model.schedule, STEPS)
    solver = get_solver(SOLVER)

    eps_bars = (0.9999,) if args.quick else (0.999, 0.9999, 0.99999)
    x0_bars = (0.9995,) if args.quick else (0.998, 0.999, 0.9995, 0.9998, 0.9999)
    switches = (10,) if args.quick else (6, 8, 10, 12)
    lin_steps = (5,) if args.quick else (3, 5, 8, 10)

    methods = {"cfg 3": lambda d: CFG(d, SCALE), "cond (cfg 1)": lambda d: CFG(d, 1.0)}
    for gb in eps_bars:
        methods[f"AG eps {gb}"] = lambda d, gb=gb: AdaptiveGuidance(d, SCALE, gb, space=Eps())
    for gb in x0_bars:
        methods[f"AG x0 {gb}"] = lambda d, gb=gb: AdaptiveGuidance(d, SCALE, gb, space=X0())
    for s in switches:
        methods[f"switch after {s}"] = lambda d, s=s: GuidanceInterval(d, SCALE, t_lo=float(grid[s]))

    t0 = time.perf_counter()
    coeffs = fit(model, args.fit_n, args.seed + 1, args.batch_size, grid, solver)
    fit_seconds = round(time.perf_counter() - t0, 1)
    for s in lin_steps:
        methods[f"LinearAG first {s}"] = lambda d, s=s: LinearAG(d, coeffs, s)

    results, reference = {}, None
    for name, make in methods.items():
        images, results[name] = run(model, make, args.n, args.seed, args.batch_size, grid, solver)
        reference = images if reference is None else reference  # the first method is CFG
        results[name]["rms_to_cfg"] = float((images - reference).flatten(1).pow(2).mean(1).sqrt().mean())
        print(name, results[name], flush=True)
    base = results["cfg 3"]
    print(
        f"\n{'method':<22} {'rows/sample':>11} {'saved':>7} {'all':>6} {'d all':>7} {'shape':>6} "
        f"{'rms to cfg':>10} {'s':>6}"
    )
    for name, r in results.items():
        r["saved"] = 1.0 - r["rows_per_sample"] / base["rows_per_sample"]
        r["d_all_points"] = 100.0 * (r["accuracy"]["all"] - base["accuracy"]["all"])
        print(
            f"{name:<22} {r['rows_per_sample']:>11.2f} {r['saved']:>7.1%} {r['accuracy']['all']:>6.3f} "
            f"{r['d_all_points']:>+7.2f} {r['accuracy']['shape']:>6.3f} {r['rms_to_cfg']:>10.4f} "
            f"{r['seconds']:>6.1f}"
        )
    out = {
        "protocol": {
            "model": "shapes",
            "solver": SOLVER,
            "steps": STEPS,
            "cfg": SCALE,
            "n": args.n,
            "seed": args.seed,
            "fit_n": args.fit_n,
            "fit_seed": args.seed + 1,
            "fit_seconds": fit_seconds,
        },
        "linear_ag_fit_r2": [round(float(v), 6) for v in coeffs.r2],
        "results": results,
    }
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
