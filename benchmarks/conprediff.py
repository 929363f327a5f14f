"""ConPreDiff's context-prediction loss (Yang et al. 2023) on the digits recipe, with and without, at equal steps and
over two seeds: class accuracy, Fréchet distance, precision and recall of each model (`condiff eval`'s protocol:
DPM-Solver++(2M), 20 steps, cfg 3, 512 samples, seed 0), and the training time its run recorded.

The runs (2,000 steps each, one thread):
    condiff train digits-conprediff --seed 0 --out runs/digits-conprediff-seed0
    condiff train digits-conprediff --seed 1 --out runs/digits-conprediff-seed1
    condiff train digits --seed 1 --out runs/digits-seed1
and the bundled digits model, which is the digits recipe's seed-0 run (the docs tier retrains it bit for bit).

Usage: OMP_NUM_THREADS=1 python benchmarks/conprediff.py [--runs runs] [--json F] [--docs]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from condiff.core.files import atomic_write_json
from condiff.evaluation.evaluate import evaluate
from condiff.models.base import load_model, silence_diffusers
from condiff.solvers import DPMSolverPP2M

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=Path, default=ROOT / "runs")
    ap.add_argument("--json", type=Path, default=ROOT / "outputs" / "conprediff" / "conprediff.json")
    ap.add_argument("--docs", action="store_true", help="write the table into docs/training.md")
    args = ap.parse_args(argv)
    silence_diffusers()
    torch.set_num_threads(1)
    models = {
        ("digits", 0): "digits",
        ("digits", 1): args.runs / "digits-seed1" / "model",
        ("digits-conprediff", 0): args.runs / "digits-conprediff-seed0" / "model",
        ("digits-conprediff", 1): args.runs / "digits-conprediff-seed1" / "model",
    }
    rows = []
    for (recipe, seed), where in models.items():
        if where != "digits" and not Path(where).is_dir():
            print(f"missing {where}")
            continue
        m = load_model(where)
        res = evaluate(m, DPMSolverPP2M(), 20, 3.0, 512, seed=0)
        row = {
            "recipe": recipe,
            "seed": seed,
            "model": str(where),
            "class": res["accuracy"]["class"],
            **{k: res["quality"][k] for k in ("frechet", "precision", "recall")},
            "train_minutes": m.info.get("train_minutes"),
        }
        rows.append(row)
        print(row, flush=True)
    atomic_write_json(args.json, rows)
    print(f"wrote {args.json}")
    if args.docs:
        lines = [
            "Measured with `OMP_NUM_THREADS=1 python benchmarks/conprediff.py --docs` (`condiff eval`'s protocol: "
            "512 samples, seed 0, cfg 3, DPM-Solver++(2M) 20 steps).",
            "",
            "| recipe | seed | class accuracy | Fréchet distance | precision | recall | train min |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in rows:
            mins = "-" if r["train_minutes"] is None else f"{r['train_minutes']:.1f}"
            lines.append(
                f"| {r['recipe']} | {r['seed']} | {r['class']:.3f} | {r['frechet']:.2f} | {r['precision']:.3f} | "
                f"{r['recall']:.3f} | {mins} |"
            )
        from sampling_speed import write_docs_section

        heading = "ConPreDiff: the context-prediction loss"
        write_docs_section("conprediff", "\n".join(lines), heading, page="training.md")


if __name__ == "__main__":
    main()
