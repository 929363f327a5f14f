"""Certified l2 accuracy on the held-out digits under randomized smoothing (condiff.tasks.smoothing, tasks.rrcm;
the API behind ``condiff certify``): plain (Cohen et al. 2019: the scorer under noise), denoised (one-shot denoised
smoothing with the bundled digits model, unconditional; Carlini et al. 2023), DensePure (K = 3 stochastic DDIM
runs of 4 steps, majority vote; Xiao et al. 2023), Cohen et al.'s Gaussian-augmentation classifier (``noise``) and
rRCM (Lei et al. 2025), the last two one-step networks trained per sigma (recipes noise-digits-SIGMA and
rrcm-digits-SIGMA, read from --runs/<recipe>), at sigma 0.25 and 0.5, on the first --images held-out digits.

Units: sigma and radii are l2 distances in [0, 1] pixel units over the 16x16 pixels. With n draws and alpha the
largest certifiable radius is sigma * Phi^{-1}(alpha^(1/n)) (n = 500, alpha = 0.001: 2.19 sigma, so radius 0.5
is certifiable at sigma 0.25), so the curves are capped there.

Usage: OMP_NUM_THREADS=1 python benchmarks/smoothing.py [--json F] [--images 20] [--n 500] [--n0 50]
       [--alpha 0.001] [--seed 0] [--methods plain,denoised,...] [--reuse F] [--runs runs] [--no-plot]
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

from condiff.core.files import atomic_write_json
from condiff.models.base import load_model, silence_diffusers
from condiff.models.certify_digits import certify_images

ROOT = Path(__file__).resolve().parents[1]
FIGURE = ROOT / "docs" / "tasks_certify.png"
SIGMAS = (0.25, 0.5)
METHODS = ("plain", "denoised", "densepure", "noise", "rrcm")
ONE_STEP = ("noise", "rrcm")
RUNS, STEPS = 3, 4
CURVE = [round(0.05 * i, 2) for i in range(21)]  # radius 0 .. 1


def curve(certificates) -> list[float]:
    return [sum(1 for c in certificates if c["correct"] and c["radius"] >= r) / len(certificates) for r in CURVE]


def plot(results, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(SIGMAS), figsize=(5 * len(SIGMAS), 3.6), sharey=True)
    for ax, sigma in zip(axes, SIGMAS):
        for r in results:
            if r["sigma"] == sigma:
                nfe = r["denoiser_nfe_per_certification"] + r["classifier_evals_per_certification"]
                ax.plot(CURVE, r["curve"], label=f"{r['method']} ({nfe:g} network evals / cert.)")
        ax.set_title(f"sigma = {sigma:g}")
        ax.set_xlabel("l2 radius ([0, 1] pixel units)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("certified accuracy")
    fig.suptitle("held-out digits under randomized smoothing (certified accuracy)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path)
    ap.add_argument("--images", type=int, default=20)
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--n0", type=int, default=50)
    ap.add_argument("--alpha", type=float, default=0.001)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    ap.add_argument("--runs", type=Path, default=ROOT / "runs", help="folder of the noise/rrcm training runs")
    ap.add_argument("--reuse", type=Path, help="a JSON from an earlier run: its results are kept, not recomputed")
    args = ap.parse_args()
    methods = [s for s in args.methods.split(",") if s]
    bad = [s for s in methods if s not in METHODS]
    if bad:
        ap.error(f"--methods: unknown {bad}, accepted: {', '.join(METHODS)}")
    reused = []
    if args.reuse is not None:
        import json

        old = json.loads(args.reuse.read_text())
        same = all(old[k] == getattr(args, k) for k in ("images", "n", "n0", "alpha", "seed"))
        if not same:
            ap.error(f"--reuse {args.reuse}: its images/n/n0/alpha/seed differ from this run's")
        reused = [r for r in old["results"] if r["method"] not in methods]
    silence_diffusers()
    m = load_model("digits")
    m.module.requires_grad_(False)
    results = list(reused)
    t0 = time.perf_counter()
    for sigma in SIGMAS:
        for method in methods:
            classifier = None
            if method in ONE_STEP:
                from condiff.models.robust_digits import load_robust_model

                classifier = load_robust_model(args.runs / f"{method}-digits-{sigma:g}")
            r = certify_images(
                method, sigma, args.n, args.n0, args.alpha, args.images, args.seed, RUNS, STEPS, m, classifier
            )
            r["curve"] = curve(r["certificates"])
            results.append(r)
            acc = r["certified_accuracy"]
            print(
                f"sigma {sigma:g} {method:>9}: certified accuracy r=0 {acc['0']:.3f}  r=0.25 {acc['0.25']:.3f}  "
                f"r=0.5 {acc['0.5']:.3f}  r=0.75 {acc['0.75']:.3f}  ({r['abstained']} abstained; "
                f"{r['denoiser_nfe_per_certification']:g} model NFE + {r['classifier_evals_per_certification']} "
                f"{r['base_classifier']} evals per certification; {r['seconds']:.1f}s)",
                flush=True,
            )
    report = {
        "format": "condiff.bench.smoothing",
        "images": args.images,
        "n": args.n,
        "n0": args.n0,
        "alpha": args.alpha,
        "seed": args.seed,
        "runs": RUNS,
        "steps": STEPS,
        "radii": CURVE,
        "radius_units": "l2 over the 16x16 pixels in [0, 1] pixel units",
        "results": results,
        "seconds": time.perf_counter() - t0,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "torch_version": torch.__version__,
    }
    if args.json is not None:
        atomic_write_json(args.json, report)
        print(f"wrote {args.json}")
    if not args.no_plot:
        plot(results, FIGURE)
        print(f"wrote {FIGURE}")


if __name__ == "__main__":
    main()
