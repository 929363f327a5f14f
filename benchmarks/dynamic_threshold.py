"""Dynamic thresholding (``--dynamic-threshold``) on the shapes model: attribute accuracy and background level.

Imagen's dynamic thresholding divides x0 by its per-sample ``ratio`` quantile s whenever s > 1. A shapes image is
mostly black background, exactly -1 in the data: any overshoot past -1 of the guided x0 raises s above 1, and
the division then pulls the whole background towards 0 (grey), at every step.

Protocol: the samples of ``condiff eval --model shapes --n N --seed 0 --cfg W [--dynamic-threshold 0.995]``
(dpmpp-2m, 20 uniform-t steps; the same conditions and noise in every row), scored by the exact labeller
(``all``: all four attributes right). The background is the pixels more than two pixels away from the
labeller's object mask (as in benchmarks/background_texture.py); ``bg mean`` is their mean on the [-1, 1]
scale (-1: black, as in every training image), ``bg 8-bit`` the same as a 0-255 grey level.

    OMP_NUM_THREADS=1 python benchmarks/dynamic_threshold.py --n 256      # ~10 min on one loaded core
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from condiff.core.grids import make_grid
from condiff.core.sampling import Gaussian, sample
from condiff.data import labeller
from condiff.evaluation.evaluate import generate
from condiff.guidance import CFG, DynamicThresholding
from condiff.guidance.build import GuidanceOptions
from condiff.models.base import load_model, silence_diffusers
from condiff.solvers import get_solver


def background_mean(images: torch.Tensor) -> float:
    """Mean value of the pixels more than two pixels away from the labeller's object mask ([-1, 1] scale)."""
    grown = [ndimage.binary_dilation(m, iterations=2) for m in labeller.masks(images).numpy()]
    bg = ~torch.from_numpy(np.stack(grown))
    return float(images.permute(0, 2, 3, 1)[bg].mean())


def static_clip(m, raw, solver, steps, w, g):
    """``generate`` with the guided x0 clipped to [-1, 1] at every step (``DynamicThresholding`` with
    ``max_value=1``: static thresholding; no CLI option), on the same conditions and noise."""
    grid = make_grid(m.schedule, steps)
    den = DynamicThresholding(CFG(m.denoiser, w), max_value=1.0)
    out = []
    with torch.no_grad():
        for chunk in torch.split(raw, 256):
            x = m.prior((chunk.shape[0], *m.family.image_shape), float(grid[0]), g)
            out.append(sample(den, solver, grid, x, m.condition(chunk), Gaussian(g)).x.clamp(-1, 1))
    return torch.cat(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cfgs", default="3,7,30")
    ap.add_argument("--ratio", type=float, default=0.995)
    ap.add_argument("--rescale", type=float, default=0.7, help="also run --cfg-rescale at this phi (0: skip)")
    ap.add_argument("--only-static", action="store_true", help="run the static-clip rows only")
    ap.add_argument("--json", type=Path, default=Path("outputs/bench/dynamic_threshold.json"))
    args = ap.parse_args()
    silence_diffusers()
    m = load_model("shapes")
    solver = get_solver("dpmpp-2m")
    rows = []
    settings = [("plain CFG", None, None), (f"--dynamic-threshold {args.ratio}", args.ratio, None)]
    if args.rescale:
        settings.append((f"--cfg-rescale {args.rescale}", None, args.rescale))
    settings.append(("static clip of x0 (library)", "static", None))
    for w in (float(c) for c in args.cfgs.split(",")):
        for label, ratio, phi in settings:
            if args.only_static and ratio != "static":
                continue
            g = torch.Generator().manual_seed(args.seed)  # as condiff eval: conditions first, then the noise
            raw, targets = m.family.random_conditions(args.n, g)
            guidance = None if phi is None else GuidanceOptions(cfg=w, cfg_rescale=phi)
            t0 = time.perf_counter()
            if ratio == "static":
                images = static_clip(m, raw, solver, 20, w, g)
            else:
                images, _ = generate(m, raw, solver, 20, w, g, dynamic_threshold=ratio, guidance=guidance)
            acc = m.family.score(images, targets)
            bg = background_mean(images)
            rows.append(
                {
                    "cfg": w,
                    "setting": label,
                    "all": acc["all"],
                    "accuracy": acc,
                    "bg_mean": bg,
                    "bg_8bit": (bg + 1) / 2 * 255,
                    "seconds": time.perf_counter() - t0,
                }
            )
            r = rows[-1]
            print(f"cfg {w:5g}  {label:28s} all {r['all']:.3f}  bg mean {bg:+.3f} ({r['bg_8bit']:.0f}/255)", flush=True)
    print("\n| cfg | setting | all | bg mean | bg 8-bit |\n|---:|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['cfg']:g} | {r['setting']} | {r['all']:.3f} | {r['bg_mean']:+.3f} | {r['bg_8bit']:.0f} |")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"n": args.n, "seed": args.seed, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
