"""Steered inpainting on the bundled shapes model (issue 4, spec sec. 8): the right half of 64 renders is
filled by `Projection` (condiff.guidance.steered.inpaint) with an empty prompt, with and without
self-recurrence; prints the labeller-based rates by where the object lies and the max error on known pixels.

   OMP_NUM_THREADS=1 python benchmarks/guidance_inpaint.py [steps=25]
"""

import sys
import time

import torch

torch.set_num_threads(1)
from condiff.core.grids import make_grid
from condiff.core.sampling import Gaussian, sample
from condiff.data import labeller, shapes
from condiff.guidance.steered import inpaint
from condiff.guidance.universal import SelfRecurrence
from condiff.models.base import load_model
from condiff.solvers import SOLVERS

n, steps = 64, int(sys.argv[1]) if len(sys.argv) > 1 else 25
model = load_model("shapes")
g = torch.Generator().manual_seed(0)
batch = shapes.sample_batch(n, g)
known = batch.images
truth = labeller.label(known)
mask = torch.zeros(1, 1, 32, 32, dtype=torch.bool)
mask[..., 16:] = True  # fill the right half, keep the left half
obj = batch.masks
in_known = ~(obj[:, :, 16:].flatten(1).any(1))  # object entirely in the kept half
in_fill = ~(obj[:, :, :16].flatten(1).any(1))  # object entirely in the filled half
crossing = ~in_known & ~in_fill
raw = model.family.parse_prompt("").expand(n, -1)
cond = {k: v for k, v in model.condition(raw).items() if k != "null"}
grid = make_grid(model.schedule, steps)
print(
    f"renders {n}: object in kept half {int(in_known.sum())}, in filled half {int(in_fill.sum())}, "
    f"crossing {int(crossing.sum())}; steps {steps}"
)
runs = [(n_, gd, 1) for n_ in ["ddpm", "dpmpp-2m"] for gd in [False, True]] + [("ddpm", True, 4)]
for name, guided, k in runs:
    if True:
        gg = torch.Generator().manual_seed(1)
        x = model.prior((n, 3, 32, 32), float(grid[0]), gg)
        den = inpaint(model.denoiser, mask, known) if guided else model.denoiser
        t0 = time.time()
        with torch.no_grad():
            out = sample(den, SelfRecurrence(SOLVERS[name](), k), grid, x, cond, Gaussian(gg)).x.clamp(-1, 1)
        lab = labeller.label(out)
        valid = (lab >= 0).all(1)
        same = (lab == truth).all(1)
        kd = (out[..., :16] - known[..., :16]).abs().max().item()
        print(
            f"{name:9s} k={k} {'projected' if guided else 'unguided '}: valid {valid.float().mean():.3f} | "
            f"all-attr = render: kept-half {same[in_known].float().mean():.3f}, crossing "
            f"{same[crossing].float().mean():.3f} | valid when object in filled half "
            f"{valid[in_fill].float().mean():.3f} | max|known diff| {kd:.3g} | {time.time() - t0:.0f}s"
        )
