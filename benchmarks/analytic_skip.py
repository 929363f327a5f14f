"""Analytic skip ("teleportation"; Wang & Vastola 2023, TMLR 2024; specs sec. 14) on the bundled shapes model.

Protocol. The bundled shapes model under CFG 3 (``CFG(model.denoiser, 3.0)``), ``--n`` random conditions
(``model.family.random_conditions``) and start noises x_T at the default uniform-t grid's start
(sigma/alpha = 20). Reference: DPM-Solver++(2M) with 1000 uniform-t steps from the same x_T (its own error is
estimated against 500 steps on the first 16 samples). For solvers dpmpp-2m and unipc and total NFE in
{4, 5, 6, 8, 10}: the mean per-sample RMS pixel error of the final (clamped) image against the reference,
without the skip and with the skip (0 NFE, then the SAME number of solver steps on a fresh uniform-t grid
from the skip time: same total NFE) at several sigma/alpha values and shares of the budget. "save 1 step" is
the other mode (same_nfe=False): the skip covers exactly the first step of the N-step grid and the solver
runs the other N - 1 steps; it is compared with the plain N - 1-step and N-step runs.
NFE saved at equal error: the no-skip error curve (NFE 4..20) interpolated in log-log gives, for each skip
run at NFE N, the NFE a plain run needs for the same error; saved = that - N (None when past 20;
extrapolated below 3).
Accuracy: ``condiff.evaluation.evaluate.evaluate`` (the exact labeller, all four attributes right) on ``--n-eval``
samples, same seed and noises with and without the chosen skip, at NFE 4, 6 and 10.
Diagnostic: the share of the network's output variance that the Gaussian explains on noised training
images, 1 - E|f_net - f_gauss|^2 / E|f_net - mean f_net|^2, for the score (the TMLR 2024 measure) and for the
x0 prediction, unguided (null caption) and at CFG 3 (their captions), per sigma/alpha.

Prints tables, writes outputs/analytic_skip.json and docs/analytic_skip.png.

    OMP_NUM_THREADS=1 python benchmarks/analytic_skip.py            # ~15 min on one core
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from condiff.core.grids import make_grid
from condiff.core.sampling import initial_noise, sample
from condiff.evaluation.evaluate import evaluate
from condiff.guidance import CFG
from condiff.models.base import load_model, silence_diffusers
from condiff.solvers import get_solver
from condiff.solvers.analytic import AnalyticSkip, model_fit
from condiff.training.recipe import ObjectiveConfig

NFES = (4, 5, 6, 8, 10)
BASELINE_EXTRA = (3, 7, 9, 12, 15, 20)  # no-skip only: to read off the NFE a plain run needs for an equal error
SOLVERS = ("dpmpp-2m", "unipc")
SKIPS = {
    "sigma 10": AnalyticSkip(sigma=10.0),
    "sigma 7": AnalyticSkip(sigma=7.0),
    "sigma 5": AnalyticSkip(sigma=5.0),
    "sigma 3": AnalyticSkip(sigma=3.0),
    "5%": AnalyticSkip(fraction=0.05),
    "10%": AnalyticSkip(fraction=0.10),
    "15%": AnalyticSkip(fraction=0.15),
    "25%": AnalyticSkip(fraction=0.25),
}
EVAL_NFES = (4, 6, 10)
CFG_SCALE = 3.0


def rms(a, b):
    return (a - b).flatten(1).norm(dim=1) / math.sqrt(a[0].numel())


def equal_error_nfe(err, curve):
    """The NFE at which the no-skip curve {nfe: err} reaches ``err``: log-log interpolation between the first
    pair of NFEs that brackets it, extrapolated with the first segment's slope below the smallest NFE; None
    when ``err`` is below the whole curve."""
    pts = sorted(curve.items())
    (n0, e0), (n1, e1) = pts[0], pts[1]
    if err > e0:
        slope = (math.log(e1) - math.log(e0)) / (math.log(n1) - math.log(n0))
        return math.exp(math.log(n0) + (math.log(err) - math.log(e0)) / slope) if slope < 0 else None
    for (n0, e0), (n1, e1) in zip(pts, pts[1:]):
        if e1 <= err <= e0:
            u = 0.0 if e0 == e1 else (math.log(err) - math.log(e0)) / (math.log(e1) - math.log(e0))
            return math.exp(math.log(n0) + u * (math.log(n1) - math.log(n0)))
    return None


def subset(cond, k):
    """The first k samples of a condition mapping (nested for its 'null' entry)."""
    return {c: subset(v, k) if isinstance(v, dict) else v[:k] for c, v in cond.items()}


def gaussian_explained(model, fit, n, seed):
    """How much of the network's output the Gaussian explains on noised training images, per sigma/alpha:
    'score' = 1 - E|s_net - s_gauss|^2 / E|s_net - mean s_net|^2 with s = -(x - alpha D) / sigma^2 (the
    TMLR 2024 paper's measure: dominated by the shared -x/sigma^2 term at high noise), and 'x0' the same
    share for the x0 predictions D themselves (a much stricter measure)."""
    g = torch.Generator().manual_seed(seed + 1)
    x0, raw = model.family.training_batch(0, n, g, seed, ObjectiveConfig())
    cond = model.condition(raw)
    sch = model.schedule

    def share(net, gauss):
        return 1.0 - float(((net - gauss) ** 2).sum() / ((net - net.mean(0)) ** 2).sum())

    out = {}
    for rho in (20.0, 10.0, 5.0, 3.0, 2.0, 1.0, 0.5):
        t = sch.t_for_sigma_ratio(rho)
        a, s = float(sch.alpha(t)), float(sch.sigma(t))
        xt = a * x0 + s * torch.randn(x0.shape, generator=g)
        dg = fit.denoise(sch, xt, t).double()
        row = {}
        for name, w in (("unguided", 0.0), ("cfg3", CFG_SCALE)):
            dn = CFG(model.denoiser, w)(xt, t, cond).double()
            score = lambda d: -(xt.double() - a * d) / s**2  # noqa: E731
            row[f"{name} score"] = share(score(dn), score(dg))
            row[f"{name} x0"] = share(dn, dg)
        out[rho] = row
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=64, help="samples for the error study")
    ap.add_argument("--n-eval", type=int, default=512, help="samples per accuracy evaluation")
    ap.add_argument("--ref-steps", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=Path("outputs/analytic_skip.json"))
    ap.add_argument("--plot", type=Path, default=Path("docs/analytic_skip.png"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    silence_diffusers()
    t_all = time.perf_counter()
    model = load_model("shapes")
    t0 = time.perf_counter()
    fit = model_fit(model)
    fit_seconds = time.perf_counter() - t0
    skips = {k: AnalyticSkip(v.sigma, v.fraction, v.same_nfe, fit) for k, v in SKIPS.items()}
    sch, den = model.schedule, CFG(model.denoiser, CFG_SCALE)
    report = {
        "model": "shapes",
        "cfg": CFG_SCALE,
        "n": args.n,
        "n_eval": args.n_eval,
        "seed": args.seed,
        "reference": f"dpmpp-2m, {args.ref_steps} uniform-t steps, same x_T",
        "fit": {
            "n": fit.n,
            "rank": fit.rank,
            "iso": fit.iso,
            "seconds (fit or cache load)": fit_seconds,
            "top eigenvalues": fit.evals[:5].tolist(),
            "trace": float(fit.evals.sum()) + fit.iso * (fit.dim - fit.rank),
        },
    }

    with torch.no_grad():
        t0 = time.perf_counter()
        report["gaussian_explained"] = gaussian_explained(model, fit, 64, args.seed)
        print("share of the network's output variance explained by the Gaussian fit (score; x0)")
        for rho, row in report["gaussian_explained"].items():
            print(f"  sigma/alpha {rho:5.1f}: " + "  ".join(f"{k} {v:.4f}" for k, v in row.items()))
        g = torch.Generator().manual_seed(args.seed)
        raw, _ = model.family.random_conditions(args.n, g)
        cond = model.condition(raw)
        grid_ref = make_grid(sch, args.ref_steps)
        x_T = initial_noise(sch, float(grid_ref[0]), (args.n, *model.family.image_shape), g)
        t0 = time.perf_counter()
        ref = sample(den, get_solver("dpmpp-2m"), grid_ref, x_T, cond).x.clamp(-1, 1)
        report["reference_seconds"] = time.perf_counter() - t0
        k = min(16, args.n)
        half = sample(
            den, get_solver("dpmpp-2m"), make_grid(sch, args.ref_steps // 2), x_T[:k], subset(cond, k)
        ).x.clamp(-1, 1)
        report["reference_error_vs_half"] = float(rms(half, ref[:k]).mean())
        print(
            f"reference {args.ref_steps} steps: {report['reference_seconds']:.0f}s; mean RMS vs "
            f"{args.ref_steps // 2} steps (first {k}): {report['reference_error_vs_half']:.2e}"
        )

        def err_of(solver, grid, x):
            out = sample(den, get_solver(solver), grid, x, cond)
            return float(rms(out.x.clamp(-1, 1), ref).mean()), out.nfe

        errors = {}
        for solver in SOLVERS:
            rows = {"none": {}}
            for n_ in NFES + BASELINE_EXTRA:
                e, nfe = err_of(solver, make_grid(sch, n_), x_T)
                rows["none"][n_] = {"err": e, "nfe": nfe}
            for name, skip in skips.items():
                rows[name] = {}
                for n_ in NFES:
                    plan = skip.plan(sch, make_grid(sch, n_))
                    e, nfe = err_of(solver, plan.grid, plan.teleport(fit, sch, x_T))
                    rows[name][n_] = {
                        "err": e,
                        "nfe": nfe,
                        "sigma_skip": float(sch.sigma_over_alpha(plan.t_skip)),
                        "steps_skipped": plan.steps,
                    }
            rows["save 1 step"] = {}
            for n_ in NFES:
                grid = make_grid(sch, n_)
                plan = AnalyticSkip(fraction=1.0 / n_, same_nfe=False, fit=fit).plan(sch, grid)
                e, nfe = err_of(solver, plan.grid, plan.teleport(fit, sch, x_T))
                rows["save 1 step"][n_] = {
                    "err": e,
                    "nfe": nfe,
                    "sigma_skip": float(sch.sigma_over_alpha(plan.t_skip)),
                    "steps_skipped": plan.steps,
                }
            errors[solver] = rows
            print(f"[{time.perf_counter() - t_all:.0f}s] errors done for {solver}")
        report["errors"] = errors

    # tables
    for solver, rows in errors.items():
        base = {n_: r["err"] for n_, r in rows["none"].items()}
        print(f"\n{solver}: mean RMS error vs reference (ratio to no skip at the same total NFE)")
        print(f"{'skip':12s} " + " ".join(f"{'NFE ' + str(n_):>16s}" for n_ in NFES))
        for name, row in rows.items():
            cells = []
            for n_ in NFES:
                r = row[n_]
                b = base[n_] if name != "save 1 step" else base.get(r["nfe"], math.nan)
                cells.append(f"{r['err']:.4f} ({r['err'] / b:4.2f})")
            print(f"{name:12s} " + " ".join(f"{c:>16s}" for c in cells))
    # NFE saved at equal error
    saved = {}
    for solver, rows in errors.items():
        curve = {n_: r["err"] for n_, r in rows["none"].items()}
        saved[solver] = {}
        for name, row in rows.items():
            if name == "none":
                continue
            saved[solver][name] = {}
            for n_, r in row.items():
                eq = equal_error_nfe(r["err"], curve)
                saved[solver][name][n_] = None if eq is None else eq - r["nfe"]
    report["nfe_saved_at_equal_error"] = saved
    print(
        "\nNFE saved at equal error (a plain run's NFE for the same error minus the skip run's NFE; "
        "None: below the plain error at NFE 20)"
    )
    for solver, rows in saved.items():
        for name, row in rows.items():
            print(
                f"{solver:9s} {name:12s} "
                + " ".join(f"{'None' if v is None else f'{v:+.1f}':>6s}" for v in row.values())
            )

    # the default: the best skip (mean log error ratio) among those no worse anywhere at NFE <= 10
    safe = {}
    for name in skips:
        ratios = [errors[s][name][n_]["err"] / errors[s]["none"][n_]["err"] for s in SOLVERS for n_ in NFES]
        if max(ratios) <= 1.0:
            safe[name] = sum(math.log(r) for r in ratios) / len(ratios)
    chosen = min(safe, key=safe.get) if safe else None
    report["safe_skips_mean_log_ratio"] = safe
    report["chosen"] = chosen
    print(f"\nskips no worse than none at every solver and NFE <= 10: {sorted(safe)}; chosen: {chosen}")

    # accuracy
    acc = {}
    if chosen is not None:
        with torch.no_grad():
            for solver in SOLVERS:
                for n_ in EVAL_NFES:
                    for name, skip in (("none", None), (chosen, skips[chosen])):
                        res = evaluate(
                            model, get_solver(solver), n_, CFG_SCALE, args.n_eval, args.seed + 1, analytic_skip=skip
                        )
                        acc[f"{solver} NFE {n_} {name}"] = {
                            "accuracy": res["accuracy"],
                            "nfe": res["nfe"],
                            "seconds": res["seconds"],
                        }
                        print(
                            f"[{time.perf_counter() - t_all:.0f}s] eval {solver} NFE {n_} {name:8s}: "
                            f"all {res['accuracy']['all']:.4f} "
                            + " ".join(f"{k} {v:.3f}" for k, v in res["accuracy"].items() if k != "all")
                        )
    report["accuracy"] = acc
    report["seconds"] = time.perf_counter() - t_all
    report["torch_threads"] = torch.get_num_threads()
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    plot(errors, args.plot)
    print(f"\ntotal {report['seconds']:.0f}s; wrote {args.json} and {args.plot}")


def plot(errors, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(errors), figsize=(6 * len(errors), 4.5), sharey=True)
    for ax, (solver, rows) in zip(axes, errors.items()):
        for name, row in rows.items():
            ns = sorted(row)
            style = dict(lw=2.5, color="k") if name == "none" else dict(lw=1.2, ls="--" if "%" in name else "-")
            if name == "save 1 step":
                style = dict(lw=1.2, ls=":", marker="s", color="saddlebrown")
            ax.plot(
                [row[n]["nfe"] for n in ns],
                [row[n]["err"] for n in ns],
                marker=style.pop("marker", "o"),
                ms=3,
                label=name,
                **style,
            )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks([3, 4, 5, 6, 8, 10, 15, 20])
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.get_xaxis().set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("total NFE")
        ax.set_title(f"shapes, CFG 3, {solver}")
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("mean RMS error vs 1000-step reference")
    axes[-1].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
