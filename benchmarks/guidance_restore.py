"""Steered restoration on the bundled shapes model (issue 4, acceptance 6): 64 held-out renders
(shapes.sample_batch, seed 0), the same pieces as `condiff restore` (Projection + SelfRecurrence(ddpm, k)).

* inpainting, right half filled, empty prompt: max |known diff| (must be 0) and the share where the labeller
  reads a valid object (all four labels != -1);
* x4 super-resolution from the 8x8 average-pooled render, empty prompt: share with all four attributes equal
  to the render's, and max |pool(x) - y|;
* colorization from the BT.601 luminance, prompt = the render's color word only (e.g. "red"): share with
  the render's color, and max |Y(x) - y|.

    OMP_NUM_THREADS=1 python benchmarks/guidance_restore.py [steps=25] [k=4] [n=64]
"""

import sys
import time

import torch

torch.set_num_threads(1)
from condiff.core.grids import make_grid  # noqa: E402
from condiff.core.sampling import Gaussian, sample  # noqa: E402
from condiff.data import labeller, shapes  # noqa: E402
from condiff.guidance.steered import Colorize, Inpaint, Projection, SuperResolution  # noqa: E402
from condiff.guidance.universal import SelfRecurrence  # noqa: E402
from condiff.models.base import load_model  # noqa: E402
from condiff.solvers import SOLVERS  # noqa: E402

steps = int(sys.argv[1]) if len(sys.argv) > 1 else 25
k = int(sys.argv[2]) if len(sys.argv) > 2 else 4
n = int(sys.argv[3]) if len(sys.argv) > 3 else 64
model = load_model("shapes")
batch = shapes.sample_batch(n, torch.Generator().manual_seed(0))
x_true, truth = batch.images, labeller.label(batch.images)
grid = make_grid(model.schedule, steps)
solver = SelfRecurrence(SOLVERS["ddpm"](), k)


def cond_for(prompts):
    raw = torch.cat([model.family.parse_prompt(p) for p in prompts])
    return {key: v for key, v in model.condition(raw).items() if key != "null"}


def run(op, y, prompts):
    g = torch.Generator().manual_seed(1)
    x = model.prior((n, 3, 32, 32), float(grid[0]), g)
    t0 = time.time()
    with torch.no_grad():
        out = sample(Projection(model.denoiser, op, y), solver, grid, x, cond_for(prompts), Gaussian(g)).x
    err = float((op(out.double()) - y.double()).abs().max())
    return out, labeller.label(out.clamp(-1, 1)), err, time.time() - t0


print(f"{n} renders (seed 0), ddpm, {steps} steps, self-recurrence k={k} ({steps * k} NFE per image)")
fill = torch.zeros(1, 1, 32, 32, dtype=torch.bool)
fill[..., 16:] = True
op = Inpaint(fill)
out, lab, err, s = run(op, op(x_true), [""] * n)
kd = float((out[..., :16] - x_true[..., :16]).abs().max())
print(
    f"inpaint (right half, empty prompt): valid {(lab >= 0).all(1).float().mean():.3f} | max|known diff| {kd:.3g} "
    f"| max|Ax-y| {err:.3g} | {s:.0f}s"
)
op = SuperResolution(4)
out, lab, err, s = run(op, op(x_true), [""] * n)
print(
    f"sr x4 from 8x8 (empty prompt): all four attributes = render {(lab == truth).all(1).float().mean():.3f} "
    f"| valid {(lab >= 0).all(1).float().mean():.3f} | max|Ax-y| {err:.3g} | {s:.0f}s"
)
op = Colorize()
colors = [shapes.COLORS[int(c)] for c in batch.attrs[:, 1]]
out, lab, err, s = run(op, op(x_true), colors)
print(
    f"colorize (prompt = color word): color = render {(lab[:, 1] == truth[:, 1]).float().mean():.3f} "
    f"| all four = render {(lab == truth).all(1).float().mean():.3f} | max|Ax-y| {err:.3g} | {s:.0f}s"
)
print(
    f"labeller on the renders themselves: valid {(truth >= 0).all(1).float().mean():.3f}, "
    f"color = attrs {(truth[:, 1] == batch.attrs[:, 1]).float().mean():.3f}"
)
