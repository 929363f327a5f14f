"""PAG on the bundled shapes model with the empty prompt (Ahn et al. 2024: PAG improves unconditional
samples). Same initial noise for every configuration (paired); dpmpp-2m, 20 steps; no CFG. Usage:
    OMP_NUM_THREADS=1 python benchmarks/guidance_pag.py [--n 256] [--steps 20] [--scales 1,3,5]
        [--layers mid;down;up_blocks.0] [--seed 0] [--threads 1]

Per sample, from the exact labeller (condiff.data.labeller) on the final image:
- found:  the labeller finds an object (its four labels are all != -1; it gives -1 only for an empty mask);
- single: exactly one 4-connected component of bright pixels (brightest channel > 0) of >= 3 pixels, i.e.
          no second object or stray blob;
- valid:  single, and the mask matches a clean render of the sample's own labels: the best IoU over the 9
          whole-pixel jitter offsets of the renderer (the training data's only positions) is >= 0.8.
Rates are over all n samples; 'iou' is the mean best IoU of the found ones.
- fd:     the Fréchet distance (condiff.evaluation.metrics) between the samples and --real fresh renders (seed 999), in
          the bundled clean classifier's 128-d penultimate features (an FID stand-in); lower is better.
          'fd ref' on the first line is two sets of real renders against each other: the noise floor.
Writes --json (default outputs/guidance_pag.json).
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from condiff.core.files import atomic_write_json
from condiff.core.grids import make_grid
from condiff.core.sampling import initial_noise, sample
from condiff.data import labeller, shapes
from condiff.evaluation.metrics import classifier_features, frechet_distance
from condiff.guidance.pag import PAG
from condiff.models.base import load_model, silence_diffusers
from condiff.models.classifiers import load_classifier
from condiff.solvers import get_solver

MIN_BLOB = 3
VALID_IOU = 0.8


def clean_iou(labels: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Best IoU of each mask with the clean renders of its labels over the renderer's 9 jitter offsets."""
    best = torch.zeros(labels.shape[0])
    found = (labels >= 0).all(1)
    attrs = labels.clamp(min=0)
    cy, cx = shapes.cell_centre(attrs[:, 3])
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            cov = shapes._coverage(attrs, cy + dy, cx + dx)
            best = torch.maximum(best, labeller.iou(cov > 0.5, masks))
    return torch.where(found, best, torch.zeros_like(best))


def scores(images: torch.Tensor) -> dict[str, float]:
    labels = labeller.label(images)
    masks = labeller.masks(images)
    arr = images.detach().float().numpy()
    single = []
    for a in arr:
        lab, n = ndimage.label(a.max(0) > 0.0)
        sizes = ndimage.sum(np.ones_like(lab), lab, index=range(1, n + 1)) if n else []
        single.append(sum(s >= MIN_BLOB for s in sizes) == 1)
    single = torch.tensor(single)
    found = (labels != -1).all(1)
    iou = clean_iou(labels, masks)
    valid = single & found & (iou >= VALID_IOU)
    return {
        "found": float(found.float().mean()),
        "single": float(single.float().mean()),
        "valid": float(valid.float().mean()),
        "iou": float(iou[found].mean()) if found.any() else 0.0,
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--scales", default="1,3,5")
    ap.add_argument("--layers", default="mid;down;up_blocks.0")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--real", type=int, default=2048, help="real renders for the Fréchet distance")
    ap.add_argument("--json", default="outputs/guidance_pag.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    silence_diffusers()
    model = load_model("shapes")
    cond = model.condition(model.family.null_raw(args.n))
    grid = make_grid(model.schedule, args.steps)
    solver = get_solver("dpmpp-2m")
    x = initial_noise(
        model.schedule, float(grid[0]), (args.n, *model.family.image_shape), torch.Generator().manual_seed(args.seed)
    )
    configs = [("none", "-", 0.0)]
    for layers in args.layers.split(";"):
        configs += [(f"pag {layers}", layers, float(s)) for s in args.scales.split(",")]
    features = load_classifier("clean")
    real = classifier_features(shapes.sample_batch(args.real, torch.Generator().manual_seed(999)).images, features)
    ref = classifier_features(shapes.sample_batch(args.n, torch.Generator().manual_seed(998)).images, features)
    fd_ref = frechet_distance(ref, real)
    print(
        f"shapes, empty prompt, n={args.n}, dpmpp-2m {args.steps} steps, seed {args.seed}, no CFG; "
        f"fd ref (n real vs {args.real} real) = {fd_ref:.3f}\n"
    )
    print(
        "| guidance | layers | scale | found | single | valid | mean IoU | fd | s |\n"
        "|---|---|---|---|---|---|---|---|---|"
    )
    rows = []
    for name, layers, s in configs:
        den = model.denoiser if s == 0 else PAG(model.denoiser, s, layers=layers)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = sample(den, solver, grid, x, cond).x.clamp(-1, 1)
        sec = time.perf_counter() - t0
        r = scores(out)
        r["fd"] = frechet_distance(classifier_features(out, features), real)
        rows.append({"guidance": name.split()[0], "layers": layers, "scale": s, **r, "seconds": sec})
        print(
            f"| {name.split()[0]} | {layers} | {s:g} | {r['found']:.3f} | {r['single']:.3f} | {r['valid']:.3f} "
            f"| {r['iou']:.3f} | {r['fd']:.3f} | {sec:.0f} |",
            flush=True,
        )
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(
        args.json,
        {"n": args.n, "steps": args.steps, "seed": args.seed, "fd_ref": fd_ref, "real": args.real, "results": rows},
    )
    print(json.dumps({"best_valid": max(rows, key=lambda r: r["valid"]), "best_fd": min(rows, key=lambda r: r["fd"])}))


if __name__ == "__main__":
    main()
