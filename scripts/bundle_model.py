"""Bundle a trained model into the package: copy RUN/model to src/condiff/bundled/NAME, evaluate it at the
acceptance settings and write its model card (README.md) and metrics into condiff.json.

    python scripts/bundle_model.py runs/digits digits --n 512
    python scripts/bundle_model.py runs/shapes shapes --n 512
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import torch

from condiff.core.files import atomic_write_json, atomic_write_text, load_json
from condiff.data import digits
from condiff.evaluation.evaluate import evaluate
from condiff.models.base import bundled_dir, load_model, silence_diffusers
from condiff.solvers import DPMSolverPP2M

ROOT = Path(__file__).resolve().parent.parent


QUALITY = ("frechet", "precision", "recall")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("run", type=Path)
    ap.add_argument("name")
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: OMP_NUM_THREADS, else 1)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads or int(os.environ.get("OMP_NUM_THREADS", "1")))
    silence_diffusers()
    src = args.run / "model"
    dst = bundled_dir(args.name)
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    meta = load_json(dst / "condiff.json")
    model = load_model(dst)
    metrics = {}
    for w in (1.0, 3.0):
        res = evaluate(model, DPMSolverPP2M(), 20, w, args.n, seed=0)
        metrics[f"cfg{w:g}"] = {"accuracy": res["accuracy"], "nfe": res["nfe"], "seconds": round(res["seconds"], 1)}
        if res["quality"]:  # digits: Fréchet distance, precision and recall against the held-out digits
            metrics[f"cfg{w:g}"]["quality"] = {k: res["quality"][k] for k in QUALITY}
        print(json.dumps(metrics[f"cfg{w:g}"]))
    if args.name == "digits":
        metrics["scorer_heldout_accuracy"] = digits.scorer().heldout_accuracy
    meta["metrics"] = metrics
    atomic_write_json(dst / "condiff.json", meta)
    curve = load_json(args.run / "learning_curve.json") if (args.run / "learning_curve.json").exists() else []
    params = sum(p.numel() for p in model.module.parameters())
    recipe = meta["recipe"]
    lines = [
        f"# condiff bundled model: {args.name}",
        "",
        f"- family: `{meta['family']}`; prediction: `{meta['prediction']}`; schedule: "
        f"{json.dumps({k: v for k, v in recipe['schedule'].items()})}",
        f"- parameters: {params / 1e6:.2f} M (diffusers `{type(model.module['unet']).__name__}`"
        + (" + condiff `SlotTextEncoder`" if "text_encoder" in model.module else "")
        + ")",
        f"- trained: {meta['trained_steps']} steps, batch {recipe['train']['batch_size']}, "
        f"{meta['train_minutes']:.1f} CPU-minutes of training compute ({recipe['train']['threads']} thread(s))",
        "",
        "## How it was made",
        "",
        "```",
        f"condiff train {args.name} --out {args.run}",
        f"python scripts/bundle_model.py {args.run} {args.name} --n {args.n}",
        "```",
        "",
        "## Measured",
        "",
        f"`condiff eval --model {args.name} --solver dpmpp-2m --steps 20 --cfg W --n {args.n} --seed 0`:",
        "",
        "| cfg | " + " | ".join([*metrics["cfg3"]["accuracy"], *metrics["cfg3"].get("quality", {})]) + " |",
        "|---|" + "---|" * (len(metrics["cfg3"]["accuracy"]) + len(metrics["cfg3"].get("quality", {}))),
    ]
    for key in ("cfg1", "cfg3"):
        values = [*metrics[key]["accuracy"].values(), *metrics[key].get("quality", {}).values()]
        lines.append(f"| {key[3:]} | " + " | ".join(f"{v:.3f}" for v in values) + " |")
    if args.name == "digits":
        lines += [
            "",
            f"Scorer (MLP on real digits) held-out accuracy: {metrics['scorer_heldout_accuracy']:.3f}. Fréchet "
            "distance (lower is better), precision and recall (k-NN manifolds, k = 3) against the 450 held-out "
            "digits, in the scorer's 256 hidden units: docs/training.md, 'Digits quality'.",
        ]
    if curve:
        lines += [
            "",
            "## Learning curve (EMA weights, dpmpp-2m 20 steps, cfg "
            f"{recipe['train']['eval_cfg']}, {recipe['train']['eval_n']} samples)",
            "",
            "| step | train minutes | " + " | ".join(curve[0]["accuracy"]) + " |",
            "|---|---|" + "---|" * len(curve[0]["accuracy"]),
        ]
        for e in curve:
            lines.append(
                f"| {e['step']} | {e['train_minutes']:.1f} | "
                + " | ".join(f"{v:.3f}" for v in e["accuracy"].values())
                + " |"
            )
    lines += [
        "",
        "Load it with diffusers too: `UNet2DConditionModel.from_pretrained(path / 'unet')` or "
        "`UNet2DModel.from_pretrained(path / 'unet')`; the DDPMScheduler config is in `scheduler/`.",
        "",
    ]
    if curve:
        plot_curve(curve, args.name, ROOT / "docs" / f"{args.name}_learning_curve.png")
        lines += ["", f"Plot: docs/{args.name}_learning_curve.png", ""]
    atomic_write_text(dst / "README.md", "\n".join(lines))
    print(f"bundled {dst}")


def plot_curve(curve, name, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    minutes = [e["train_minutes"] for e in curve]
    for key in curve[0]["accuracy"]:
        ax.plot(minutes, [e["accuracy"][key] for e in curve], marker="o", label=key)
    ax.set_xlabel("training compute (CPU minutes)")
    ax.set_ylabel("accuracy (exact judge)")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(f"{name}: accuracy of EMA samples vs training time")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    sys.exit(main())
