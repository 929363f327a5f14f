"""The measured effect of every fine-tuning run, against the bundled shapes model it started from, judged exactly by
the labeller. Reads the run folders that `condiff finetune` wrote (their finetune.json: trainable parameters,
optimizer-state bytes, wall time) and samples each adapted model (DPM-Solver++(2M), 20 steps, fixed seeds):

- style (LoRA, SaRA, full on the striped style): ``n`` random full prompts at cfg 3: ``style`` (labeller.stripes)
  and ``all`` (every attribute right).
- few-shot (plain fine-tuning and DomainStudio on 10 striped images): style and ``all`` as above, then ``n``
  samples of the empty prompt from the base model's noise: the Spearman correlation of their pairwise distances with
  the base model's samples (same noise), the share of distinct attribute combinations, and the mean distance to the
  nearest of the 10 training images (memorisation: 0 = copies).
- DPO (beta sweep) and SFT on winners: ``n`` held-out partial prompts (never the size; seed apart from the pairs'),
  the adapted and the base model from the same noise: the win rate of the reward (the adapted model's object area
  larger than the base model's; equal areas count half), the clear win rate (a win or loss only when the areas
  differ by 20 pixels or more, the pairs' margin; closer ones count half), the share of large objects, the
  prompted-attribute accuracy (the attributes the prompt names) and the mean L2 distance to the base model's image
  (closeness).

Usage: OMP_NUM_THREADS=1 python benchmarks/finetune.py [--runs runs] [--n 512] [--json F] [--grid PNG] [--docs]
    [--parts style,few_shot,dpo]
(a run whose folder has no finetune.json is reported as missing and skipped; with --parts, the other parts are
read back from --json, as an earlier run wrote them).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from condiff.core.files import atomic_write_json, load_json
from condiff.data import labeller
from condiff.data.images import grid_image, save_png
from condiff.evaluation.diversity import distance_spearman, distinct_fraction, nearest_training_distance
from condiff.evaluation.evaluate import generate_counted
from condiff.models.base import load_model, silence_diffusers
from condiff.models.finetune_data import FewShot, object_area, partial_prompts, prompted_area
from condiff.solvers import DPMSolverPP2M

ROOT = Path(__file__).resolve().parents[1]
STYLE_RUNS = ("shapes-striped-lora", "shapes-striped-sara", "shapes-striped-full")
FEW_SHOT_RUNS = ("shapes-10shot-plain", "shapes-10shot-domainstudio")
DPO_RUNS = (
    "shapes-dpo-beta500",
    "shapes-dpo-beta500-3k",  # condiff finetune shapes-dpo-beta500 --steps 3000 --out runs/shapes-dpo-beta500-3k
    "shapes-dpo",
    "shapes-dpo-beta50000",
    "shapes-dpo-sft",
    "shapes-dpo-prompted",
)
EVAL_SEED, DIVERSITY_SEED, DPO_SEED = 0, 21, 1000  # DPO pairs use seed 7 (recipes' dpo.pair_seed)
TIE = 20.0


def images(model, raw, cfg, seed, z=None):
    g = torch.Generator().manual_seed(seed)
    return generate_counted(model, raw, DPMSolverPP2M(), 20, cfg, g, start_noise=z)[0]


def style_row(model, n):
    g = torch.Generator().manual_seed(EVAL_SEED)
    raw, targets = model.family.random_conditions(n, g)
    x = images(model, raw, 3.0, EVAL_SEED + 1)
    acc = labeller.accuracy(labeller.label(x), targets)
    return {"style": float(labeller.stripes(x).float().mean()), "all": acc["all"]}, x


def unconditional(model, n, z):
    return images(model, model.family.null_raw(n), 1.0, DIVERSITY_SEED, z)


def diversity_row(x, base_x, train):
    return {
        "spearman_vs_base": distance_spearman(base_x, x),
        "distinct_combinations": distinct_fraction(labeller.label(x)),
        "nearest_training_distance": nearest_training_distance(x, train)[1],
    }


def dpo_row(model, base_x, raw, attrs, named, z):
    x = images(model, raw, 3.0, DPO_SEED + 1, z)
    a, b = object_area(x), object_area(base_x)
    wins, losses = int((a > b + TIE).sum()), int((b > a + TIE).sum())
    n = raw.shape[0]
    ok = (labeller.label(x) == attrs) | ~named
    pa, pb = prompted_area(x, raw), prompted_area(base_x, raw)
    return {
        "win_rate": float(((a > b).float() + 0.5 * (a == b).float()).mean()),
        "prompted_win_rate": float(((pa > pb).float() + 0.5 * (pa == pb).float()).mean()),
        "clear_win_rate": (wins + 0.5 * (n - wins - losses)) / n,
        "wins": wins,
        "losses": losses,
        "large": float((labeller.label(x)[:, 2] == 1).float().mean()),
        "prompted_accuracy": float(ok.all(1).float().mean()),
        "distance_to_base": float((x - base_x).flatten(1).norm(dim=1).mean()),
    }


def run_info(path: Path) -> dict | None:
    f = path / "finetune.json"
    if not f.is_file():
        return None
    info = load_json(f)
    keep = ("method", "objective", "trainable_parameters", "trainable_share", "optimizer_state_bytes")
    return {k: info[k] for k in keep} | {"train_minutes": info["train_minutes"], "steps": info["steps"]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=Path, default=ROOT / "runs")
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--json", type=Path, default=ROOT / "outputs" / "finetune" / "finetune.json")
    ap.add_argument("--grid", type=Path, default=None, help="write the before/after image grid here")
    ap.add_argument("--docs", action="store_true", help="write the tables into docs/finetuning.md")
    ap.add_argument("--parts", default="style,few_shot,dpo", help="measure these parts; read the others from --json")
    ap.add_argument("--dpo-checkpoints", default="", help="runs whose kept checkpoints the dpo part also measures")
    ap.add_argument("--checkpoint-steps", default="", help="only these checkpoint steps (comma-separated); default all")
    args = ap.parse_args(argv)
    parts = set(args.parts.split(","))
    args.dpo_checkpoints = [r for r in args.dpo_checkpoints.split(",") if r]
    if not parts <= {"style", "few_shot", "dpo"}:
        ap.error(f"--parts {args.parts!r}: accepted parts are style, few_shot, dpo")
    silence_diffusers()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    base = load_model("shapes")
    out = {"n": args.n, "missing": [], "style": {}, "few_shot": {}, "dpo": {}, "dpo_steps": {}}
    if parts != {"style", "few_shot", "dpo"}:
        out = {"dpo_steps": {}, **load_json(args.json), "missing": []}
    if "dpo" in parts:
        out["dpo_steps"] = {}
    if "style" in parts:
        measure_style(out, base, args)
    if "few_shot" in parts:
        measure_few_shot(out, base, args)
    if "dpo" in parts:
        measure_dpo(out, base, args)
    out["seconds"] = time.perf_counter() - t0
    atomic_write_json(args.json, out)
    print(f"wrote {args.json}")
    if args.docs:
        given = sys.argv[1:] if argv is None else argv
        write_tables(out, " ".join(["python benchmarks/finetune.py", *given]))


def measure_style(out, base, args):
    row, base_style_x = style_row(base, args.n)
    out["style"]["base"] = row
    tiles = [base_style_x[:8]]
    for name in STYLE_RUNS:
        info = run_info(args.runs / name)
        if info is None:
            out["missing"].append(name)
            continue
        row, x = style_row(load_model(args.runs / name / "model"), args.n)
        out["style"][name] = {**info, **row}
        tiles.append(x[:8])
        print(name, out["style"][name], flush=True)
    if args.grid:
        save_png(grid_image(torch.cat(tiles), ncols=8), args.grid)
        print(f"wrote {args.grid}")


def measure_few_shot(out, base, args):
    z = torch.randn(args.n, 3, 32, 32, generator=torch.Generator().manual_seed(DIVERSITY_SEED))
    base_u = unconditional(base, args.n, z)
    train = FewShot.striped(10).images
    out["few_shot"]["base"] = diversity_row(base_u, base_u, train)
    for name in FEW_SHOT_RUNS:
        info = run_info(args.runs / name)
        if info is None:
            out["missing"].append(name)
            continue
        m = load_model(args.runs / name / "model")
        row, _ = style_row(m, args.n)
        out["few_shot"][name] = {**info, **row, **diversity_row(unconditional(m, args.n, z), base_u, train)}
        print(name, out["few_shot"][name], flush=True)


def measure_dpo(out, base, args):
    g = torch.Generator().manual_seed(DPO_SEED)
    raw, attrs, named = partial_prompts(args.n, g)
    zd = torch.randn(args.n, 3, 32, 32, generator=g)
    base_d = images(base, raw, 3.0, DPO_SEED + 1, zd)
    out["dpo"]["base"] = dpo_row(base, base_d, raw, attrs, named, zd)
    for name in DPO_RUNS:
        info = run_info(args.runs / name)
        if info is None:
            out["missing"].append(name)
            continue
        beta = load_json(args.runs / name / "finetune.json")["recipe"]["dpo"]["beta"]
        row = dpo_row(load_model(args.runs / name / "model"), base_d, raw, attrs, named, zd)
        out["dpo"][name] = {**info, "beta": beta if info["objective"] == "dpo" else None, **row}
        print(name, out["dpo"][name], flush=True)
    for name in args.dpo_checkpoints:  # the trade-off along one run: each kept checkpoint's EMA weights
        steps = {int(x) for x in args.checkpoint_steps.split(",") if x}
        for step, model in checkpoint_models(args.runs / name, steps):
            row = dpo_row(model, base_d, raw, attrs, named, zd)
            out["dpo_steps"][f"{name}@{step}"] = {"step": step, **row}
            print(name, step, row, flush=True)


def checkpoint_models(run: Path, steps: set[int]):
    """(step, model with that checkpoint's EMA weights) for the checkpoints a full fine-tuning run kept (those at
    ``steps``, or all where it is empty)."""
    from condiff.core.files import load_tensors

    for ckpt in sorted((run / "checkpoints").glob("step-*")):
        if steps and int(ckpt.name.split("-")[1]) not in steps:
            continue
        model = load_model("shapes")
        params = dict(model.module.named_parameters())
        with torch.no_grad():
            for key, value in load_tensors(ckpt / "ema.safetensors").items():
                params[key].copy_(value)
        yield int(ckpt.name.split("-")[1]), model


def _mb(b):
    return f"{b / 2**20:.2f} MiB"


def write_tables(out: dict, command: str):
    lines = [f"Measured with `OMP_NUM_THREADS=1 {command}` ({out['n']} samples per row, fixed seeds).", ""]
    lines += [
        "| run | trainable | share | optimizer state | train min | style | all |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in out["style"].items():
        if name == "base":
            lines.append(f"| bundled shapes (before) | - | - | - | - | {r['style']:.3f} | {r['all']:.3f} |")
            continue
        lines.append(
            f"| {name} | {r['trainable_parameters']:,} | {100 * r['trainable_share']:.1f}% | "
            f"{_mb(r['optimizer_state_bytes'])} | {r['train_minutes']:.1f} | {r['style']:.3f} | {r['all']:.3f} |"
        )
    lines += [
        "",
        "| few-shot run (10 images) | train min | style | all | Spearman vs base | distinct combinations | "
        "nearest-training distance |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in out["few_shot"].items():
        style = "-" if name == "base" else f"{r['style']:.3f}"
        allv = "-" if name == "base" else f"{r['all']:.3f}"
        mins = "-" if name == "base" else f"{r['train_minutes']:.1f}"
        lines.append(
            f"| {name} | {mins} | {style} | {allv} | {r['spearman_vs_base']:.3f} | "
            f"{r['distinct_combinations']:.3f} | {r['nearest_training_distance']:.2f} |"
        )
    lines += [
        "",
        "| preference run | beta | steps | train min | win rate vs base | clear win rate | prompt-aware win rate | "
        "large | prompted accuracy | distance to base |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in out["dpo"].items():
        beta = "-" if r.get("beta") is None else f"{r['beta']:g}"
        mins = "-" if name == "base" else f"{r['train_minutes']:.1f}"
        steps = "-" if name == "base" else r["steps"]
        lines.append(
            f"| {name} | {beta} | {steps} | {mins} | {r['win_rate']:.3f} | {r['clear_win_rate']:.3f} | "
            f"{r.get('prompted_win_rate', float('nan')):.3f} | {r['large']:.3f} | {r['prompted_accuracy']:.3f} | "
            f"{r['distance_to_base']:.2f} |"
        )
    if out.get("dpo_steps"):
        lines += [
            "",
            "| checkpoint (EMA) | win rate vs base | clear win rate | prompt-aware win rate | large | "
            "prompted accuracy |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for name, r in out["dpo_steps"].items():
            lines.append(
                f"| {name} | {r['win_rate']:.3f} | {r['clear_win_rate']:.3f} | {r['prompted_win_rate']:.3f} | "
                f"{r['large']:.3f} | {r['prompted_accuracy']:.3f} |"
            )
    if out["missing"]:
        lines += ["", f"Not measured (no run folder): {', '.join(out['missing'])}."]
    from sampling_speed import write_docs_section

    write_docs_section("finetune", "\n".join(lines), "Measured effects", page="finetuning.md")


if __name__ == "__main__":
    main()
