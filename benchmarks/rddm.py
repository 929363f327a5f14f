"""RDDM (Liu et al., CVPR 2024) against a plain conditional DDPM on shapes restoration, at equal network evaluations:
PSNR and the labeller's attribute accuracy (all four attributes right) of the restorations for denoise, deblur and
inpaint (``condiff.models.rddm_restore``: the degradations, the two model kinds, ``evaluate_restore``).

    OMP_NUM_THREADS=1 python benchmarks/rddm.py [--json F] [--n 256] [--nfe 5,10] [--picture P] [--eps]

The models are read from runs/rddm-shapes and runs/ddpm-restore-shapes (`condiff train rddm-shapes --out
runs/rddm-shapes`, `condiff train ddpm-restore-shapes --out runs/ddpm-restore-shapes`): the same start, data,
batch and steps. Every score is on --n held-out renders per degradation from the generator seeded 2**41 + --seed
(default 1; training draws from generators seeded by (seed, step) < 2**41 and its learning curve used seed 0), the
degradation's randomness from a generator seeded by (seed, degradation). Network evaluations are counted, not
assumed: RDDM takes one per step, the DDPM's DDIM one per step. The sampling settings (RDDM's eta, the DDPM's
solver and x0 limit: ``rddm_restore.RDDM_ETA``, ``DDPM_SOLVER``, ``DDPM_THRESHOLD``) were chosen on validation
renders (seed 2, /work/notes/h20/rddm_docs.md), never on these. runs/rddm-shapes-res-noise (RDDM with the residual
+ noise objective) is scored too when present, and --eps adds runs/ddpm-restore-shapes-eps. Acceptance (issue 20,
line 2): RDDM above the DDPM on both PSNR and accuracy for at least two of the three degradations at equal NFE.
The picture: degraded | DDPMs | RDDMs | clean for a few held-out renders per degradation, at the first --nfe.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from condiff.core.files import atomic_write_json
from condiff.data.images import labelled_grid, save_png, write_image
from condiff.models.rddm_restore import (
    DDPM_SOLVER,
    DDPM_THRESHOLD,
    DEGRADATIONS,
    RDDM_ETA,
    evaluate_restore,
    heldout_degraded,
    load_restore_model,
)

ROOT = Path(__file__).resolve().parents[1]
SEED = 1
CMD = "OMP_NUM_THREADS=1 python benchmarks/rddm.py"
MODELS = {"rddm": "rddm-shapes", "ddpm": "ddpm-restore-shapes"}
# optional, if trained: RDDM with the residual + noise objective (rddm-shapes with model.objective =
# "pred_res_noise", the first version); --eps adds the eps-model variant of the baseline (model.prediction = "eps",
# runs/ddpm-restore-shapes-eps)
OPTIONAL = {"rddm-res-noise": "rddm-shapes-res-noise"}
EPS = {"ddpm-eps": "ddpm-restore-shapes-eps"}
NAMES = {"rddm": "RDDM", "rddm-res-noise": "RDDM (res+noise)", "ddpm": "DDPM (v)", "ddpm-eps": "DDPM (eps)"}
BASELINES = ("ddpm", "ddpm-eps")
RDDMS = ("rddm", "rddm-res-noise")


def load_models(runs: Path, eps: bool = False) -> dict:
    models = {k: load_restore_model(runs / name) for k, name in MODELS.items()}
    for k, name in {**OPTIONAL, **(EPS if eps else {})}.items():
        if (runs / name / "model" / "condiff.json").is_file():
            models[k] = load_restore_model(runs / name)
    return models


def _about(m) -> dict:
    return {
        "parameters": sum(p.numel() for p in m.module.parameters()),
        "trained_steps": m.info.get("trained_steps"),
        "train_minutes": m.info.get("train_minutes"),
    }


def measure(args) -> dict:
    out = {"n": args.n, "seed": args.seed, "threads": torch.get_num_threads(), "nfe": args.nfe}
    out["sampling"] = {"rddm_eta": RDDM_ETA, "ddpm_solver": DDPM_SOLVER, "ddpm_threshold": DDPM_THRESHOLD}
    models = load_models(args.runs, args.eps)
    out["models"] = list(models)
    for kind, m in models.items():
        out[kind] = {"about": {**_about(m), "prediction": m.config.get("prediction", "eps")}}
        if m.kind == "rddm":
            out[kind]["about"]["objective"] = m.objective
        else:
            NAMES[kind] = f"DDPM ({out[kind]['about']['prediction']})"
        for nfe in args.nfe:
            out[kind][str(nfe)] = evaluate_restore(m, args.n, args.seed, nfe)
            print(kind, nfe, json.dumps(out[kind][str(nfe)]), flush=True)
    out["acceptance"] = {}
    for base in (b for b in BASELINES if b in models):
        for nfe in args.nfe:
            wins = []
            for task in DEGRADATIONS:  # the shipped RDDM (rddm-shapes) against the baseline
                r, d = out["rddm"][str(nfe)][task], out[base][str(nfe)][task]
                assert r["nfe"] == d["nfe"] == nfe, (r["nfe"], d["nfe"], nfe)
                if r["psnr"] > d["psnr"] and r["accuracy"]["all"] > d["accuracy"]["all"]:
                    wins.append(task)
            out["acceptance"][f"{base}:{nfe}"] = {"rddm_wins_both": wins, "met": len(wins) >= 2}
    return out


def _trained(about) -> str:
    minutes = about["train_minutes"]
    return f"{about['trained_steps']} steps, " + ("untrained" if minutes is None else f"{minutes:.1f} min")


def _pct(x) -> str:
    return f"{100 * x:.1f}%"


def table(out) -> str:
    models = out["models"]
    trained = "; ".join(f"{NAMES[k]}: {_trained(out[k]['about'])}" for k in models)
    lines = [
        f"Measured with `{CMD}`: {out['n']} held-out renders per degradation (generator seed 2**41 + {out['seed']}), "
        f"{out['threads']} thread. {trained} (training minutes on the shared CPU). Sampling (chosen on validation "
        f"renders, seed 2): RDDM eta {out['sampling']['rddm_eta']:g}; DDPM {out['sampling']['ddpm_solver']}, x0 "
        f"limit {out['sampling']['ddpm_threshold']}. PSNR: mean ± standard error; accuracy: the labeller reads all "
        "four attributes right.",
        "",
        "| degradation | input PSNR, accuracy | NFE | "
        + " | ".join(f"{NAMES[k]} PSNR" for k in models)
        + " | "
        + " | ".join(f"{NAMES[k]} accuracy" for k in models)
        + " |",
        "|---|---|---|" + "---|" * (2 * len(models)),
    ]
    for task in DEGRADATIONS:
        for nfe in out["nfe"]:
            rows = [out[k][str(nfe)][task] for k in models]
            lines.append(
                f"| {task} | {rows[0]['input_psnr']:.2f} dB, {_pct(rows[0]['input_accuracy'])} | {nfe} | "
                + " | ".join(f"{r['psnr']:.2f} ± {r['psnr_se']:.2f}" for r in rows)
                + " | "
                + " | ".join(_pct(r["accuracy"]["all"]) for r in rows)
                + " |"
            )
    lines.append("")
    for key, acc in out["acceptance"].items():
        base, nfe = key.split(":")
        wins = ", ".join(acc["rddm_wins_both"]) or "none"
        lines.append(
            f"- {nfe} NFE, against {NAMES[base]}: RDDM is higher on both PSNR and accuracy for {wins} "
            f"({'met' if acc['met'] else 'not met'}: at least two of three)."
        )
    return "\n".join(lines)


@torch.no_grad()
def picture(args, path: Path, cols: int = 6):
    """Rows degraded | DDPMs | RDDMs | clean for each degradation, ``cols`` held-out renders each, at the first NFE."""
    models = load_models(args.runs, args.eps)
    for k, m in models.items():
        if m.kind == "ddpm":
            NAMES[k] = f"DDPM ({m.config.get('prediction', 'eps')})"
    nfe = args.nfe[0]
    rows, images = [], []
    for task in DEGRADATIONS:
        b, x_in = heldout_degraded(task, cols, 1000 + args.seed)
        shown = [(f"{task}: degraded", x_in.clamp(-1, 1))]
        shown += [
            (f"{NAMES[k]}, {nfe} NFE", models[k].restore(x_in, task, nfe, args.seed).x)
            for k in BASELINES
            if k in models
        ]
        shown += [
            (f"{NAMES[k]}, {nfe} NFE", models[k].restore(x_in, task, nfe, args.seed).x) for k in RDDMS if k in models
        ]
        shown.append(("clean", b.images))
        for label, x in shown:
            rows.append(label)
            images.append(x)
    save_png(labelled_grid(torch.cat(images), rows, [str(i) for i in range(cols)], scale=3), path)


def examples(directory: Path, seed: int = 2000) -> list[Path]:
    """One held-out render per degradation, degraded, as PNG inputs for `condiff restore --method rddm`
    (<directory>/shape_<task>.png) and the clean render (shape_clean.png)."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for task in DEGRADATIONS:
        b, x_in = heldout_degraded(task, 1, seed)
        paths.append(directory / f"shape_{task}.png")
        write_image(x_in.clamp(-1, 1), paths[-1])
    write_image(b.images, directory / "shape_clean.png")
    return paths


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=Path, default=ROOT / "runs")
    ap.add_argument("--json", type=Path, default=ROOT / "outputs" / "rddm" / "rddm.json")
    ap.add_argument("--picture", type=Path, default=ROOT / "outputs" / "rddm" / "rddm.png")
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--nfe", default="5,10", help="network evaluations per restoration, comma-separated")
    ap.add_argument("--eps", action="store_true", help="also score the eps-model baseline (ddpm-restore-shapes-eps)")
    args = ap.parse_args(argv)
    args.nfe = [int(s) for s in args.nfe.split(",")]
    torch.set_num_threads(1)
    out = measure(args)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.json, json.loads(json.dumps(out, default=str)))
    print(table(out))
    args.picture.parent.mkdir(parents=True, exist_ok=True)
    picture(args, args.picture)
    ex = examples(args.picture.parent / "examples")
    print(f"wrote {args.json}, {args.picture} and the example inputs {', '.join(str(p) for p in ex)}")


if __name__ == "__main__":
    main()
