"""The faint texture in the black background of shapes samples, measured.

Background pixels are those more than two pixels away from the labeller's object mask (the renders are exactly
-1 there). For each setting the script reports, over N samples of random captions (seed 0):

- ``std``: the standard deviation of the background values (all channels; 0 for a perfect black background);
- ``mean``: their mean (-1 for a perfect black background);
- ``checker``: the mean absolute 2x2 checkerboard component |a - b - c + d| / 4 of the background blocks, the
  pattern a 2x pixel-unshuffled network leaves when its four sub-pixel channels disagree;
- ``checker_share``: checker / (the mean absolute deviation of the background from its own mean), i.e. how much
  of the texture is that one pattern.

Usage: OMP_NUM_THREADS=1 python benchmarks/background_texture.py [--n 512] [--json F] [--grid PNG]
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
    a, b = images[:, :, 0::2, 0::2], images[:, :, 0::2, 1::2]
    c, d = images[:, :, 1::2, 0::2], images[:, :, 1::2, 1::2]
    checker = (a - b - c + d).abs() / 4  # (B, 3, 16, 16)
    block_bg = bg[:, 0::2, 0::2] & bg[:, 0::2, 1::2] & bg[:, 1::2, 0::2] & bg[:, 1::2, 1::2]
    chk = checker.permute(0, 2, 3, 1)[block_bg]
    dev = (vals - vals.mean()).abs().mean()
    return {
        "std": float(vals.std()),
        "mean": float(vals.mean()),
        "checker": float(chk.mean()),
        "checker_share": float(chk.mean() / dev) if dev > 0 else 0.0,
        "background_share": float(bg.float().mean()),
    }


SETTINGS = [  # (name, solver, steps, cfg, spacing)
    ("real renders", None, None, None, None),
    ("dpmpp-2m, 20 steps, uniform-t (default)", "dpmpp-2m", 20, 3.0, "uniform-t"),
    ("dpmpp-2m, 20 steps, uniform-logsnr", "dpmpp-2m", 20, 3.0, "uniform-logsnr"),
    ("dpmpp-2m, 20 steps, karras", "dpmpp-2m", 20, 3.0, "karras"),
    ("dpmpp-2m, 100 steps, uniform-t", "dpmpp-2m", 100, 3.0, "uniform-t"),
    ("dpmpp-2m, 20 steps, cfg 1", "dpmpp-2m", 20, 1.0, "uniform-t"),
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
    raw, _ = m.family.random_conditions(args.n, g0)
    rows, tiles = [], []
    for name, solver, steps, cfg, spacing in SETTINGS:
        t0 = time.perf_counter()
        if solver is None:
            images = shapes.sample_batch(args.n, torch.Generator().manual_seed(0)).images
        else:
            g = torch.Generator().manual_seed(0)
            with torch.no_grad():
                images, _ = generate(
                    m, raw, get_solver(solver), steps, cfg, g, SPACINGS[spacing], progress=True, desc=name
                )
        row = {"setting": name, **texture(images.clamp(-1, 1)), "seconds": time.perf_counter() - t0}
        rows.append(row)
        tiles.append(images[:16])
        print(
            f"{name:34s} std {row['std']:.4f}  mean {row['mean']:+.4f}  checker {row['checker']:.4f} "
            f"({100 * row['checker_share']:.0f}% of the texture)",
            flush=True,
        )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"n": args.n, "model": args.model, "results": rows}, indent=2))
    if args.grid is not None:
        save_png(grid_image(torch.cat(tiles).clamp(-1, 1), ncols=16), args.grid)


if __name__ == "__main__":
    main()
