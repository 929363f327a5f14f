"""Inversion time per image, paired: DDIM, DCI and null-text inverting the same 50 held-out renders in
turn, twice, in one process (so machine load hits them alike). Usage:
    OMP_NUM_THREADS=1 python benchmarks/inversion_time.py [--threads 1] [--n 50] [--steps 50]
"""

import argparse
import time

import torch

from condiff.core.grids import make_grid
from condiff.data import text
from condiff.evaluation.editbench import edit_cases
from condiff.inversion import get_method
from condiff.models.base import load_model, silence_diffusers


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--steps", type=int, default=50)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    silence_diffusers()
    model = load_model("shapes")
    cases = edit_cases(args.n, seed=0)
    cond = model.condition(text.attrs_to_tokens(cases.attrs))
    grid = make_grid(model.schedule, args.steps)
    times = {}
    for _ in range(2):
        for name in ("ddim", "dci", "null-text", "edit-friendly"):
            method = get_method(name)
            t0 = time.perf_counter()
            method.invert(model.denoiser, grid, cases.images, cond, torch.Generator().manual_seed(0))
            times.setdefault(name, []).append((time.perf_counter() - t0) / args.n)
    print("| method | invert s / image (two runs) |\n|---|---|")
    for name, ts in times.items():
        print(f"| {name} | {ts[0]:.3f}, {ts[1]:.3f} |")


if __name__ == "__main__":
    main()
