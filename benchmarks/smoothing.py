"""Certified l2 accuracy of the digits scorer under randomized smoothing (condiff.tasks.smoothing; the API behind
``condiff certify``): plain (Cohen et al. 2019: the scorer under noise), denoised (one-shot denoised smoothing
with the bundled digits model, unconditional; Carlini et al. 2023) and DensePure (K = 3 stochastic DDIM runs of
4 steps, majority vote; Xiao et al. 2023), at sigma 0.25 and 0.5, on the first --images held-out digits.

Units: sigma and radii are l2 distances in [0, 1] pixel units over the 16x16 pixels. With n draws and alpha the
largest certifiable radius is sigma * Phi^{-1}(alpha^(1/n)) (n = 500, alpha = 0.001: 2.19 sigma, so radius 0.5
is certifiable at sigma 0.25), so the curves are capped there. Not in scope: a classifier trained on
Gaussian-noised digits (Cohen et al.'s baseline) and rRCM.

Usage: OMP_NUM_THREADS=1 python benchmarks/smoothing.py [--json F] [--images 20] [--n 500] [--n0 50]
       [--alpha 0.001] [--seed 0] [--no-plot]
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
METHODS = ("plain", "denoised", "densepure")
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
                ax.plot(CURVE, r["curve"], label=f"{r['method']} ({r['denoiser_nfe_per_certification']:g} NFE)")
        ax.set_title(f"sigma = {sigma:g}")
        ax.set_xlabel("l2 radius ([0, 1] pixel units)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("certified accuracy")
    fig.suptitle("digits scorer under randomized smoothing", fontsize=10)
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
    args = ap.parse_args()
    silence_diffusers()
    m = load_model("digits")
    m.module.requires_grad_(False)
    results = []
    t0 = time.perf_counter()
    for sigma in SIGMAS:
        for method in METHODS:
            r = certify_images(method, sigma, args.n, args.n0, args.alpha, args.images, args.seed, RUNS, STEPS, m)
            r["curve"] = curve(r["certificates"])
            results.append(r)
            acc = r["certified_accuracy"]
            print(
                f"sigma {sigma:g} {method:>9}: certified accuracy r=0 {acc['0']:.3f}  r=0.25 {acc['0.25']:.3f}  "
                f"r=0.5 {acc['0.5']:.3f}  r=0.75 {acc['0.75']:.3f}  ({r['abstained']} abstained; "
                f"{r['denoiser_nfe_per_certification']:g} model NFE + {r['classifier_evals_per_certification']} "
                f"scorer evals per certification; {r['seconds']:.1f}s)",
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
