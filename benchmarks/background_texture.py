"""The faint texture in the black background of shapes samples, measured.

Background pixels are those more than two pixels away from the labeller's object mask (the renders are exactly
-1 there). For each setting the script reports, over N samples of random captions (seed 0):

- ``std``: the standard deviation of the background values (all channels; 0 for a perfect black background);
- ``mean``: their mean (-1 for a perfect black background);
- ``periodic``: the 2x2-periodic part of the texture: per image and channel, the background means of the four
  sub-pixel phases (even/odd row x even/odd column) minus their average, as an RMS over phases, images and
  channels. A 2x pixel-unshuffled network sees those phases as separate channels; this is the checkerboard and
  stripe pattern it leaves (its power spectrum peaks at the Nyquist frequencies);
- ``periodic_share``: periodic^2 / std^2, the share of the background's variance in that pattern.

The cause (condiff.core.start_noise): the starting noise's sub-pixel means survive sampling, about half of them
(correlation 0.86 with the output's phase means). ``--centre-subpixels`` equalizes them; starting the grid at the
schedule's last time (``--t-start max``, fine for this v-prediction model) removes most of the rest.

Usage: OMP_NUM_THREADS=1 python benchmarks/background_texture.py [--n 512] [--json F] [--grid PNG]
(--grid also writes PNG_x8.png, the same tiles with values v -> 8 (v + 1) - 1, so the texture shows.)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from condiff.core.grids import SPACINGS
from condiff.data import labeller, shapes
from condiff.data.images import grid_image, save_png
from condiff.evaluation.evaluate import generate
from condiff.models.base import load_model, silence_diffusers
from condiff.solvers import get_solver


def background(images: torch.Tensor) -> torch.Tensor:
    """(B, H, W) bool: pixels more than two pixels away from the labeller's object mask."""
    grown = [ndimage.binary_dilation(m, iterations=2) for m in labeller.masks(images).numpy()]
    return ~torch.from_numpy(np.stack(grown))


def texture(images: torch.Tensor) -> dict:
    """The statistics of the module docstring for (B, 3, 32, 32) images in [-1, 1]."""
    bg = background(images)
    vals = images.permute(0, 2, 3, 1)[bg]  # (pixels, 3)
    phase = torch.zeros(images.shape[0], images.shape[1], 4)
    for k, (p, q) in enumerate(((0, 0), (0, 1), (1, 0), (1, 1))):
        b = bg[:, p::2, q::2].float()[:, None]  # (B, 1, 16, 16)
        phase[:, :, k] = (images[:, :, p::2, q::2] * b).sum(dim=(2, 3)) / b.sum(dim=(2, 3)).clamp(min=1)
    periodic = float((phase - phase.mean(dim=2, keepdim=True)).pow(2).mean().sqrt())
    std = float(vals.std())
    return {
        "std": std,
        "mean": float(vals.mean()),
        "periodic": periodic,
        "periodic_share": periodic**2 / std**2 if std > 0 else 0.0,
        "background_share": float(bg.float().mean()),
    }


SETTINGS = [  # (name, solver, steps, cfg, spacing, t_start, centre_subpixels)
    ("real renders", None, None, None, None, None, 1),
    ("default (dpmpp-2m, 20 steps, uniform-t)", "dpmpp-2m", 20, 3.0, "uniform-t", None, 1),
    ("100 steps", "dpmpp-2m", 100, 3.0, "uniform-t", None, 1),
    ("cfg 1", "dpmpp-2m", 20, 1.0, "uniform-t", None, 1),
    ("ddpm (stochastic), 50 steps", "ddpm", 50, 3.0, "uniform-t", None, 1),
    ("--t-start max", "dpmpp-2m", 20, 3.0, "uniform-t", "max", 1),
    ("--centre-subpixels", "dpmpp-2m", 20, 3.0, "uniform-t", None, 2),
    ("--centre-subpixels --t-start max", "dpmpp-2m", 20, 3.0, "uniform-t", "max", 2),
]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--model", default="shapes")
    ap.add_argument("--json", type=Path, default=Path("outputs/bench/background_texture.json"))
    ap.add_argument("--grid", type=Path, default=None, help="write the first 16 samples of each setting here")
    args = ap.parse_args()
    silence_diffusers()
    m = load_model(args.model)
    g0 = torch.Generator().manual_seed(0)
    raw, targets = m.family.random_conditions(args.n, g0)
    rows, tiles = [], []
    for name, solver, steps, cfg, spacing, t_start, centre in SETTINGS:
        t0 = time.perf_counter()
        if solver is None:
            images = shapes.sample_batch(args.n, torch.Generator().manual_seed(0)).images
        else:
            g = torch.Generator().manual_seed(0)
            with torch.no_grad():
                images, _ = generate(
                    m,
                    raw,
                    get_solver(solver),
                    steps,
                    cfg,
                    g,
                    SPACINGS[spacing],
                    progress=True,
                    desc=name,
                    t_start=None if t_start is None else m.schedule.t_max,
                    centre_subpixels=centre,
                )
        acc = m.family.score(images, targets)["all"] if solver is not None else 1.0
        row = {"setting": name, **texture(images.clamp(-1, 1)), "all": acc, "seconds": time.perf_counter() - t0}
        rows.append(row)
        tiles.append(images[:16])
        print(
            f"{name:42s} std {row['std']:.4f}  mean {row['mean']:+.4f}  periodic {row['periodic']:.4f} "
            f"({100 * row['periodic_share']:.0f}% of the variance)  all {acc:.3f}",
            flush=True,
        )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"n": args.n, "model": args.model, "results": rows}, indent=2))
    if args.grid is not None:  # one row per setting; then the same with the dark end stretched 8x
        tiles = torch.cat(tiles).clamp(-1, 1)
        save_png(grid_image(tiles, ncols=16), args.grid)
        save_png(
            grid_image(((tiles + 1) * 8 - 1).clamp(-1, 1), ncols=16), args.grid.with_name(args.grid.stem + "_x8.png")
        )


if __name__ == "__main__":
    main()
