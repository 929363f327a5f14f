"""Classifier guidance of the color attribute on the unconditional (empty-prompt) shapes model (issue 4,
acceptance 4): the clean classifier applied to x_t (naive), the same classifier with EluCD's calibration, the
noise-aware classifier and, when given, PPAP's LoRA experts, over one scale sweep, on the same seeds.

    OMP_NUM_THREADS=1 python benchmarks/guidance_classifier.py --n 512 --steps 50 \
        [--clean clean] [--noisy noisy] \
        [--ppap src/condiff/bundled/shapes-ppap] --json outputs/guidance_classifier.json

Targets are colors drawn uniformly (seed 0); the exact labeller reads the samples. "valid" = it finds one
object (no -1 in its reading). Chance color accuracy is 1/6. Prints a markdown table; writes JSON."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from condiff.core.files import atomic_write_json
from condiff.core.grids import make_grid
from condiff.core.sampling import Gaussian, sample
from condiff.data import labeller
from condiff.guidance.attribute import TARGET_KEY, classifier_guidance, elucd_guidance
from condiff.models.base import load_model, silence_diffusers
from condiff.models.classifiers import load_classifier, load_guidance_classifier
from condiff.solvers import SOLVERS


def run(den, m, grid, solver, n, batch, seed):
    g = torch.Generator().manual_seed(seed)
    targets = torch.randint(6, (n,), generator=g)
    out = []
    for chunk in torch.split(targets, batch):
        cond = m.condition(m.family.null_raw(chunk.shape[0]))
        cond.pop("null")
        cond[TARGET_KEY] = chunk
        x = m.prior((chunk.shape[0], 3, 32, 32), float(grid[0]), g)
        with torch.no_grad():
            out.append(sample(den, solver, grid, x, cond, Gaussian(g)).x.clamp(-1, 1))
    lab = labeller.label(torch.cat(out))
    valid = (lab >= 0).all(1)
    return {"color_accuracy": float((lab[:, 1] == targets).float().mean()), "valid": float(valid.float().mean())}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=512)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--solver", default="ddpm")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--scales",
        default="0,1,2,4,8,16",
        help="one list for every method, or per method: 'naive=1,4,16;elucd=1,2,4' (0 = unguided)",
    )
    p.add_argument("--clean", default="clean", help="clean classifier: bundled name or directory")
    p.add_argument("--noisy", default="noisy", help="noise-aware classifier: bundled name or directory")
    p.add_argument("--ppap", default="src/condiff/bundled/shapes-ppap", help="PPAP experts directory")
    p.add_argument("--methods", default="naive,elucd,noisy,ppap")
    p.add_argument("--json", default="outputs/guidance_classifier.json")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    silence_diffusers()
    m = load_model("shapes")
    grid = make_grid(m.schedule, a.steps)
    solver = SOLVERS[a.solver]()
    methods = a.methods.split(",")
    clean = load_classifier(a.clean) if {"naive", "elucd"} & set(methods) else None
    noisy = load_classifier(a.noisy) if "noisy" in methods else None
    makers = {
        "naive": lambda s: classifier_guidance(m.denoiser, clean, "color", s),
        "elucd": lambda s: elucd_guidance(m.denoiser, clean, "color", s, grid),
        "noisy": lambda s: classifier_guidance(m.denoiser, noisy, "color", s),
    }
    if a.ppap and "ppap" in methods:
        from condiff.guidance.ppap import ppap_attribute_guidance

        experts = load_guidance_classifier(a.ppap)
        makers["ppap"] = lambda s: ppap_attribute_guidance(m.denoiser, experts, "color", s)
    rows = []
    if "=" in a.scales:
        per = {k.strip(): [float(v) for v in vs.split(",")] for k, vs in (p.split("=") for p in a.scales.split(";"))}
    else:
        per = {k: [float(v) for v in a.scales.split(",")] for k in makers}
    if any(0.0 in v for v in per.values()) or "=" in a.scales:
        per = {k: [0.0] + [v for v in vs if v != 0] for k, vs in per.items()}
    for name in [x for x in methods if x in makers]:
        for s in per.get(name, []):
            if s == 0 and rows and rows[0]["scale"] == 0:
                continue  # scale 0 is the unguided model for every method: measured once
            t0 = time.perf_counter()
            res = run(makers[name](s) if s else m.denoiser, m, grid, solver, a.n, a.batch, a.seed)
            rows.append({"method": name if s else "none", "scale": s, **res, "seconds": time.perf_counter() - t0})
            print(json.dumps(rows[-1]), flush=True)
    print("\n| method | scale | color accuracy | valid |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['scale']:g} | {r['color_accuracy']:.3f} | {r['valid']:.3f} |")
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(a.json, {"n": a.n, "steps": a.steps, "solver": a.solver, "seed": a.seed, "results": rows})


if __name__ == "__main__":
    main()
