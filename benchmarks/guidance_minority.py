"""Minority guidance (Um, Lee, Ye, ICLR 2024) on the imbalanced shapes model (issue 4, acceptance 5): the model is
fine-tuned on shapes in which cyan is 5% of the data (the packaged recipe shapes-minority); sampling the empty prompt
(the unconditional model) with guidance toward a high minority level should raise cyan's share >= 3x over
unguided sampling while the labeller still reads a valid object in >= 90% of the samples.

    OMP_NUM_THREADS=1 python benchmarks/guidance_minority.py --model runs/shapes-minority/model \
        --minority runs/shapes-minority/minority --n 512 --json outputs/guidance_minority.json \
        --png docs/guidance_minority.png

The minority classifier comes from `condiff guidance fit-minority` (it records its own command). Every setting
samples from the same start noise and solver noise (generator seeded with --seed). "valid" = the exact labeller
(condiff.data.labeller.label) finds an object: no -1 in its reading (a non-empty largest bright component).
"on palette" (stricter) = valid and the object's mean RGB is within 0.25 of a palette color. "rare share" = the
fraction of ALL samples the labeller reads as cyan (invalid samples count as not cyan).
Also reports the score diagnostics on the classifier's own training renders (re-drawn from its seed): the mean
score per color and cyan's share per level. Prints markdown tables; writes JSON and a PNG (a row per setting)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from condiff.core.files import atomic_write_json, load_tensors
from condiff.core.grids import make_grid
from condiff.core.sampling import Gaussian, sample
from condiff.data import labeller, shapes
from condiff.data.images import labelled_grid, save_png
from condiff.guidance.minority import MinorityGuidance
from condiff.models.base import load_model, silence_diffusers
from condiff.models.minority import load_minority
from condiff.solvers import get_solver
from condiff.training.recipe import ObjectiveConfig

RARE = shapes.COLORS.index("cyan")
PALETTE_TOL = 0.25


def run(den, m, grid, solver, n, batch, seed):
    """Samples of the empty prompt, (images, nfe per sample, seconds)."""
    g = torch.Generator().manual_seed(seed)
    out, nfe, t0 = [], 0, time.perf_counter()
    for size in [len(c) for c in torch.split(torch.arange(n), batch)]:
        with torch.no_grad():
            cond = m.condition(m.family.null_raw(size))
        cond.pop("null")
        x = m.prior((size, *m.family.image_shape), float(grid[0]), g)
        with torch.no_grad():
            res = sample(den, solver, grid, x, cond, Gaussian(g))
        out.append(res.x.clamp(-1, 1))
        nfe = res.nfe
    return torch.cat(out), nfe, time.perf_counter() - t0


def on_palette(images, masks, tol=PALETTE_TOL):
    """Per sample: the object's mean RGB (in [0, 1]) is within ``tol`` (Euclidean) of a palette color (a stricter
    check than "valid": it rejects e.g. white or muddy objects that the labeller still maps to a color)."""
    ok = torch.zeros(images.shape[0], dtype=torch.bool)
    for i in range(images.shape[0]):
        if bool(masks[i].any()):
            rgb = (images[i][:, masks[i]].mean(1) + 1) / 2
            ok[i] = bool(((shapes.PALETTE - rgb[None]).norm(dim=1).min()) < tol)
    return ok


def judge(images):
    lab = labeller.label(images)
    valid = (lab >= 0).all(1)
    palette = on_palette(images, labeller.masks(images)) & valid
    colors = torch.bincount(lab[valid, 1], minlength=len(shapes.COLORS)).double() / images.shape[0]
    return {
        "rare_share": float(colors[RARE]),
        "valid": float(valid.double().mean()),
        "on_palette": float(palette.double().mean()),
        "rare_share_of_valid": float((lab[valid, 1] == RARE).double().mean()) if bool(valid.any()) else 0.0,
        "color_shares": {c: round(float(v), 4) for c, v in zip(shapes.COLORS, colors)},
    }


def diagnostics(m, mc, mc_dir):
    """Score per color and cyan's share per level on the classifier's training renders (exactly as the fit drew
    them: the family's training batch from a generator seeded with the fit's seed)."""
    info = mc.info
    if "seed" not in info or "renders" not in info:
        return {}
    g = torch.Generator().manual_seed(info["seed"])
    x0, _ = m.family.training_batch(0, info["renders"], g, info["seed"], ObjectiveConfig())
    saved = load_tensors(mc_dir / "scores.safetensors")
    scores, held = saved["scores"], saved["heldout"].bool()
    colors = labeller.label(x0)[:, 1]
    levels = mc.label(scores)
    per_color = {
        c: {"mean": float(scores[colors == k].mean()), "share_of_data": float((colors == k).double().mean())}
        for k, c in enumerate(shapes.COLORS)
    }
    rare = colors == RARE
    auc = float((scores[rare][:, None] > scores[~rare][None]).double().mean())
    per_level = [
        {
            "level": int(l_),
            "rare_share": float(rare[levels == l_].double().mean()),
            "mean_score": float(scores[levels == l_].mean()),
        }
        for l_ in range(mc.levels)
    ]
    return {
        "per_color": per_color,
        "rare_vs_rest_auc": auc,
        "per_level": per_level,
        "classifier": {k: v for k, v in info.items() if k != "command"},
        "fit_command": info.get("command"),
        "heldout": int(held.sum()),
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="runs/shapes-minority/model")
    p.add_argument("--minority", default="runs/shapes-minority/minority")
    p.add_argument("--n", type=int, default=512)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--solver", default="dpmpp-2m")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scales", default="0,1,2,4,8")
    p.add_argument("--levels", default="top", help="comma list of target levels; 'top' = L-1")
    p.add_argument("--level-sweep-scale", type=float, default=None, help="also sweep every level at this scale")
    p.add_argument("--show", type=int, default=12, help="samples per row in the PNG")
    p.add_argument("--json", default="outputs/guidance_minority.json")
    p.add_argument("--png", default="docs/guidance_minority.png")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    silence_diffusers()
    mc_dir = Path(a.minority)
    m = load_model(a.model)
    mc = load_minority(mc_dir)
    grid = make_grid(m.schedule, a.steps)
    solver = get_solver(a.solver)
    top = mc.levels - 1
    levels = [top if v == "top" else int(v) for v in a.levels.split(",")]
    settings = [(0.0, top)] + [(float(w), lv) for lv in levels for w in a.scales.split(",") if float(w) != 0]
    if a.level_sweep_scale is not None:
        settings += [(a.level_sweep_scale, lv) for lv in range(mc.levels) if (a.level_sweep_scale, lv) not in settings]
    diag = diagnostics(m, mc, mc_dir)
    rows, shown, base = [], [], None
    for w, lv in settings:
        den = m.denoiser if w == 0 else MinorityGuidance(m.denoiser, mc, w, lv)
        images, nfe, secs = run(den, m, grid, solver, a.n, a.batch, a.seed)
        res = {"scale": w, "level": lv if w else None, "nfe": nfe, "seconds": round(secs, 1), **judge(images)}
        if w == 0:
            base = res["rare_share"]
        res["rare_ratio"] = res["rare_share"] / base if base else float("nan")
        rows.append(res)
        shown.append(images[: a.show])
        print(
            f"w={w:g} level={res['level']}: rare {res['rare_share']:.3f} (x{res['rare_ratio']:.2f}) valid "
            f"{res['valid']:.3f} nfe {nfe} ({secs:.0f}s)",
            flush=True,
        )
    print("\n| w | level | cyan share | x unguided | valid | on palette | cyan share of valid | NFE |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['scale']:g} | {'-' if r['level'] is None else r['level']} | {r['rare_share']:.3f} | "
            f"{r['rare_ratio']:.2f} | {r['valid']:.3f} | {r['on_palette']:.3f} | {r['rare_share_of_valid']:.3f} | "
            f"{r['nfe']} |"
        )
    if diag:
        print(
            f"\nscore diagnostics on {diag['classifier'].get('renders')} training renders: cyan-vs-rest AUC "
            f"{diag['rare_vs_rest_auc']:.3f}"
        )
        print("| color | share of data | mean score |\n|---|---|---|")
        for c, v in diag["per_color"].items():
            print(f"| {c} | {v['share_of_data']:.3f} | {v['mean']:.4f} |")
        print("| level | cyan share | mean score |\n|---|---|---|")
        for v in diag["per_level"]:
            print(f"| {v['level']} | {v['rare_share']:.3f} | {v['mean_score']:.4f} |")
    cmd = "OMP_NUM_THREADS=1 python benchmarks/guidance_minority.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(a).items() if v is not None
    )
    atomic_write_json(
        a.json,
        {
            "command": cmd,
            "model": a.model,
            "minority": a.minority,
            "n": a.n,
            "solver": a.solver,
            "steps": a.steps,
            "seed": a.seed,
            "levels": mc.levels,
            "score_t": mc.t,
            "score_draws": mc.n,
            "results": rows,
            "diagnostics": diag,
            "valid_definition": "labeller.label reads no -1 (a non-empty object)",
            "on_palette_definition": f"valid and the object's mean RGB in [0, 1] is within "
            f"{PALETTE_TOL} (Euclidean) of a palette color",
        },
    )
    labels = [
        f"w={r['scale']:g}" + ("" if r["level"] is None else f" l={r['level']}") + f" cyan {r['rare_share']:.2f}"
        for r in rows
    ]
    save_png(labelled_grid(torch.cat(shown), labels, [str(i) for i in range(a.show)], scale=2), a.png)
    print(f"wrote {a.json} and {a.png}")


if __name__ == "__main__":
    main()
