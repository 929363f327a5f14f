"""PPAP (Go et al., CVPR 2023) on the unconditional (empty-prompt) shapes model: guide the color attribute with
the LoRA experts of `condiff guidance train-ppap`, against the naive off-the-shelf baseline (the same clean
classifier applied to x_t), over one scale sweep, on the same seeds (issue 4, acceptance 4). Usage:

    OMP_NUM_THREADS=1 python benchmarks/guidance_ppap.py --ppap runs/ppap \
        [--classifier runs/shapes-clean-classifier/model] [--n 512] [--steps 20] [--solver dpmpp-2m] \
        [--scales 0.5,1,2,4,8] [--seed 0] [--json outputs/guidance_ppap.json]

Targets: colors drawn uniformly (one generator seeded with --seed: targets, then the start points; every
configuration starts from the same x_T). Guidance: ADM classifier guidance x0 += (sigma^2 / alpha) s grad log
p(color | x_t) (condiff.guidance.classifier) with either the routed experts or the clean classifier as the noisy
classifier. Per configuration, from the exact labeller (condiff.data.labeller) on the final images:
- color: the labeller's color equals the target (chance 1/6);
- found: the labeller finds an object; valid: one object whose mask matches a clean render of its own labels
  (IoU >= 0.8; the rule of benchmarks/guidance_pag.py ``scores``); color & valid: both;
- nfe (network evaluations per sample, counted by the loop) and seconds.
A second table gives the color accuracy of each expert and of the clean classifier on noisy clean renders
x_t = alpha x0 + sigma eps, t uniform in each expert's interval (512 renders, seed + 1). Prints markdown tables;
writes JSON (atomically).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent))

from guidance_pag import MIN_BLOB, VALID_IOU, clean_iou  # noqa: E402

from condiff.core.denoiser import coefficients  # noqa: E402
from condiff.core.files import atomic_write_json  # noqa: E402
from condiff.core.grids import make_grid  # noqa: E402
from condiff.core.sampling import Gaussian, sample  # noqa: E402
from condiff.data import labeller, shapes  # noqa: E402
from condiff.guidance.attribute import TARGET_KEY, classifier_guidance  # noqa: E402
from condiff.guidance.ppap import load_ppap, ppap_attribute_guidance, read_ppap_meta  # noqa: E402
from condiff.models.base import load_model, silence_diffusers  # noqa: E402
from condiff.solvers import get_solver  # noqa: E402

COLOR = list(shapes.ATTRIBUTES).index("color")  # the labeller's column


def run(den, m, grid, solver, targets, x_T, batch, seed):
    """Sample one image per target from the fixed start points; scores, nfe, seconds."""
    t0 = time.perf_counter()
    out, nfe = [], 0
    g = torch.Generator().manual_seed(seed + 2)
    for tgt, x in zip(torch.split(targets, batch), torch.split(x_T, batch)):
        cond = m.condition(m.family.null_raw(tgt.shape[0]))
        cond.pop("null")
        cond[TARGET_KEY] = tgt
        with torch.no_grad():
            res = sample(den, solver, grid, x, cond, Gaussian(g))
        out.append(res.x.clamp(-1, 1))
        nfe = res.nfe
    images = torch.cat(out)
    seconds = time.perf_counter() - t0
    lab = labeller.label(images)
    color = lab[:, COLOR] == targets
    found, valid = validity(images, lab)
    return {
        "color_accuracy": float(color.float().mean()),
        "found": float(found.float().mean()),
        "valid": float(valid.float().mean()),
        "color_and_valid": float((color & valid).float().mean()),
        "nfe": nfe,
        "seconds": round(seconds, 1),
    }


def validity(images, lab):
    """Per sample (found, valid), the rule of benchmarks/guidance_pag.py ``scores``: found = the labeller reads
    an object; valid = found, exactly one bright component of >= MIN_BLOB pixels, and IoU >= VALID_IOU with a
    clean render of its own labels."""
    single = []
    for a in images.detach().float().numpy():
        comp, k = ndimage.label(a.max(0) > 0.0)
        sizes = ndimage.sum(np.ones_like(comp), comp, index=range(1, k + 1)) if k else []
        single.append(sum(s >= MIN_BLOB for s in sizes) == 1)
    found = (lab != -1).all(1)
    valid = torch.tensor(single) & found & (clean_iou(lab, labeller.masks(images)) >= VALID_IOU)
    return found, valid


def noisy_accuracy(experts, net, schedule, n, seed):
    """Color accuracy of the clean classifier and of each expert on noisy renders in each expert's interval."""
    g = torch.Generator().manual_seed(seed + 1)
    b = shapes.sample_batch(n, g)
    rows = []
    for k in range(experts.n_experts):
        lo, hi = experts.interval(k)
        t = lo + (hi - lo) * torch.rand(n, generator=g, dtype=torch.float64)
        a, s = coefficients(schedule, t, b.images)
        x_t = a * b.images + s * torch.randn(b.images.shape, generator=g)
        with torch.no_grad():
            clean = net.head(net(x_t), "color").argmax(1)
            ours = net.head(experts(x_t, t), "color").argmax(1)
        rows.append(
            {
                "expert": k,
                "interval": [lo, hi],
                "clean": float((clean == b.attrs[:, COLOR]).float().mean()),
                "expert_acc": float((ours == b.attrs[:, COLOR]).float().mean()),
            }
        )
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ppap", default="runs/ppap")
    p.add_argument("--classifier", default=None, help="default: the classifier recorded in the experts' ppap.json")
    p.add_argument("--n", type=int, default=512)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--solver", default="dpmpp-2m")
    p.add_argument("--scales", default="0.5,1,2,4,8")
    p.add_argument("--methods", default="naive,ppap")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default="outputs/guidance_ppap.json")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    silence_diffusers()
    m = load_model("shapes")
    meta = read_ppap_meta(a.ppap)
    net = load_model(a.classifier or meta["classifier"]).module["classifier"].eval()
    experts = load_ppap(a.ppap, net)
    grid = make_grid(m.schedule, a.steps)
    solver = get_solver(a.solver)
    g = torch.Generator().manual_seed(a.seed)
    targets = torch.randint(len(shapes.ATTRIBUTES["color"]), (a.n,), generator=g)
    x_T = m.prior((a.n, *m.family.image_shape), float(grid[0]), g)
    makers = {
        "naive": lambda s: classifier_guidance(m.denoiser, net, "color", s),
        "ppap": lambda s: ppap_attribute_guidance(m.denoiser, experts, "color", s),
    }
    rows = [{"method": "none", "scale": 0.0, **run(m.denoiser, m, grid, solver, targets, x_T, a.batch, a.seed)}]
    print(rows[-1], flush=True)
    for name in a.methods.split(","):
        if name not in makers:
            raise SystemExit(f"unknown method {name!r}; accepted: {', '.join(makers)}")
        for s in (float(v) for v in a.scales.split(",")):
            rows.append(
                {"method": name, "scale": s, **run(makers[name](s), m, grid, solver, targets, x_T, a.batch, a.seed)}
            )
            print(rows[-1], flush=True)
    noisy = noisy_accuracy(experts, net, m.schedule, 512, a.seed)
    print(
        f"\nColor guidance on the empty-prompt shapes model ({a.n} samples, {a.solver}, {a.steps} steps, "
        f"seed {a.seed}; chance 0.167)\n"
    )
    print("| method | scale | color acc | found | valid | color & valid | NFE | seconds |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['method']} | {r['scale']:g} | {r['color_accuracy']:.3f} | {r['found']:.3f} | {r['valid']:.3f} "
            f"| {r['color_and_valid']:.3f} | {r['nfe']} | {r['seconds']:.1f} |"
        )
    print("\nColor accuracy on noisy renders (512, t uniform in each expert's interval)\n")
    print("| expert | t interval | clean classifier | expert |\n|---|---|---|---|")
    for r in noisy:
        print(
            f"| {r['expert']} | [{r['interval'][0]:.1f}, {r['interval'][1]:.1f}) | {r['clean']:.3f} | "
            f"{r['expert_acc']:.3f} |"
        )
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(
        a.json,
        {
            "n": a.n,
            "steps": a.steps,
            "solver": a.solver,
            "seed": a.seed,
            "ppap": str(a.ppap),
            "classifier": a.classifier or meta["classifier"],
            "experts": {k: meta[k] for k in ("n_experts", "rank", "alpha", "t_min", "t_max")},
            "results": rows,
            "noisy_accuracy": noisy,
        },
    )


if __name__ == "__main__":
    main()
