"""One PNG sweep per guidance method on the bundled shapes model: the same 8 starting noises and caption in
every row, one row per setting. Writes docs/guidance_sweeps.png (and prints the network rows per sample of
each row, so AG's savings are visible).

    OMP_NUM_THREADS=1 python scripts/guidance_sweeps.py [--prompt "small blue triangle"] [--out
    docs/guidance_sweeps.png]
"""

from __future__ import annotations

import argparse

import torch

from condiff.data.images import labelled_grid, save_png
from condiff.evaluation.evaluate import generate_counted
from condiff.guidance.build import GuidanceOptions
from condiff.models.base import load_model, silence_diffusers
from condiff.models.classifiers import load_guidance_classifier
from condiff.solvers import get_solver

SWEEPS = [
    ("cfg 1", GuidanceOptions(cfg=1.0)),
    ("cfg 3", GuidanceOptions(cfg=3.0)),
    ("cfg 7", GuidanceOptions(cfg=7.0)),
    ("cfg 7, rescale 0.7", GuidanceOptions(cfg=7.0, cfg_rescale=0.7)),
    ("cfg 7, interval 200-800", GuidanceOptions(cfg=7.0, interval=(200.0, 800.0))),
    ("cfg 3, AG 0.9995", GuidanceOptions(cfg=3.0, ag=0.9995)),
    ("cfg 3, AG 0.999", GuidanceOptions(cfg=3.0, ag=0.999)),
    ("cfg 3, PAG 2 (up)", GuidanceOptions(cfg=3.0, pag=2.0, pag_layers=("up",))),
    ("cfg 3, PAG 5 (up)", GuidanceOptions(cfg=3.0, pag=5.0, pag_layers=("up",))),
    ("cfg 3, negative 'large'", GuidanceOptions(cfg=3.0, negative_prompt="large")),
    ("cfg 3, PAG 2 (up), AG 0.9995", GuidanceOptions(cfg=3.0, pag=2.0, pag_layers=("up",), ag=0.9995)),
    # classifier guidance of the caption's color on the unconditional model (cfg 0: the empty prompt only)
    ("uncond. (cfg 0)", GuidanceOptions(cfg=0.0)),
    (
        "uncond., clean clf raw 16",
        GuidanceOptions(cfg=0.0, classifier=load_guidance_classifier("clean"), cg_scale=16.0, cg_raw=True),
    ),
    ("uncond., EluCD 2", GuidanceOptions(cfg=0.0, classifier=load_guidance_classifier("clean"), cg_scale=2.0)),
    ("uncond., EluCD 4", GuidanceOptions(cfg=0.0, classifier=load_guidance_classifier("clean"), cg_scale=4.0)),
    ("uncond., noisy clf 4", GuidanceOptions(cfg=0.0, classifier=load_guidance_classifier("noisy"), cg_scale=4.0)),
    ("uncond., PPAP 16", GuidanceOptions(cfg=0.0, classifier=load_guidance_classifier("ppap"), cg_scale=16.0)),
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompt", default="blue triangle")
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--out", default="docs/guidance_sweeps.png")
    args = ap.parse_args()
    torch.set_num_threads(1)
    silence_diffusers()
    model = load_model("shapes")
    raw = model.family.parse_prompt(args.prompt).expand(args.n, -1)
    rows, labels = [], []
    for label, opts in SWEEPS:
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            images, nfe, per = generate_counted(model, raw, get_solver("dpmpp-2m"), 20, opts.cfg, g, guidance=opts)
        rows.append(images)
        labels.append(f"{label} ({per:.0f} rows)")
        print(f"{label:28s} network rows / sample {per:.2f}")
    fig = labelled_grid(torch.cat(rows), labels, [f"#{i + 1}" for i in range(args.n)], scale=3)
    save_png(fig, args.out)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
