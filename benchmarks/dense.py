"""Dense prediction and UniCon on shapes, measured: Lotus (one network evaluation) against the eps-model baseline
(the same network, start, data and training steps; 20 DPM-Solver++(2M) steps, and 5) on mask IoU, depth error and
wall time, and UniCon's directions from one set of weights (image -> mask IoU; mask -> image shape, size and
position read by the exact labeller, and the labeller's object mask against the given one; joint consistency).

    OMP_NUM_THREADS=1 python benchmarks/dense.py [--json F] [--docs] [--n 512]

The models are read from runs/lotus, runs/dense-eps and runs/unicon (`condiff train lotus --out runs/lotus`, ...).
Every score is on --n held-out renders from the generator seeded 2**41 + --seed (default seed 1: training draws its
batches from generators seeded by (seed, step) < 2**41, and its learning curve used 2**41 + 0). --docs writes the
tables into docs/tasks.md and the picture docs/tasks_dense.png.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from sampling_speed import write_docs_section  # noqa: E402

from condiff.core.files import atomic_write_json  # noqa: E402
from condiff.data.images import labelled_grid, save_png  # noqa: E402
from condiff.models.dense import evaluate_dense, heldout_batch, load_dense_model, read_map  # noqa: E402
from condiff.models.unicon import evaluate_unicon, load_unicon_model, mask_map  # noqa: E402

SEED = 1
THRESHOLD_NAMES = {"dynamic": "dynamically thresholded", "clip": "clipped to [-1, 1]", "none": "as predicted"}
CMD = "OMP_NUM_THREADS=1 python benchmarks/dense.py --docs"


def _about(m) -> dict:
    info = m.info
    return {
        "parameters": sum(p.numel() for p in m.module.parameters()),
        "trained_steps": info.get("trained_steps"),
        "train_minutes": info.get("train_minutes"),
    }


def _load(runs: Path, name: str, loader):
    path = runs / name / "model"
    return loader(path) if (path / "condiff.json").is_file() else None


def measure(args) -> dict:
    out = {"n": args.n, "seed": SEED if args.seed is None else args.seed, "threads": torch.get_num_threads()}
    seed = out["seed"]
    lotus = _load(args.runs, "lotus", load_dense_model)
    eps = _load(args.runs, "dense-eps", load_dense_model)
    uni = _load(args.runs, "unicon", load_unicon_model)
    out["missing"] = [n for n, m in (("lotus", lotus), ("dense-eps", eps), ("unicon", uni)) if m is None]
    if lotus is not None:
        out["lotus"] = {**_about(lotus), **evaluate_dense(lotus, args.n, seed)}
        print("lotus", out["lotus"], flush=True)
    if eps is not None:
        out["eps"] = {**_about(eps)}
        for steps, threshold in args.eps:
            key = f"{steps}:{threshold}"
            out["eps"][key] = {"threshold": threshold, **evaluate_dense(eps, args.n, seed, steps, threshold=threshold)}
            print("eps", key, out["eps"][key], flush=True)
    if uni is not None:
        out["unicon"] = {**_about(uni)}
        for w in args.guidance:
            t0 = time.perf_counter()
            res = evaluate_unicon(uni, args.n, seed, steps=20, guidance=w)
            res["seconds"] = time.perf_counter() - t0
            out["unicon"][f"w={w:g}"] = res
            print("unicon", w, res, flush=True)
    return out


def _pct(x) -> str:
    return f"{100 * x:.1f}%"


def tables(out) -> str:
    n, seed = out["n"], out["seed"]
    lines = [
        f"Measured with `{CMD}`: {n} held-out renders (generator seed 2**41 + {seed}, never used in training), "
        f"{out['threads']} thread.",
        "",
    ]
    lo, ep = out.get("lotus"), out.get("eps")
    if lo or ep:
        lines += [
            "| model | NFE | mask IoU | samples with IoU >= 0.95 | depth abs rel | depth RMSE (object) | "
            "depth RMSE (all pixels) | ms per image (mask) | train steps, min |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        rows = [("Lotus (x0 at T, one step)", lo)] if lo else []
        if ep:
            rows += [
                (
                    f"eps-model, DPM-Solver++(2M) {k.split(':')[0]} steps, x0 {THRESHOLD_NAMES[ep[k]['threshold']]}",
                    ep[k] | _about_of(ep),
                )
                for k in ep
                if ":" in k
            ]
        for name, r in rows:
            d = r["depth"]
            lines.append(
                f"| {name} | {r['nfe']} | {r['mask_iou']:.4f} | {_pct(r['mask_iou_ge_0.95'])} | {d['abs_rel']:.4f} | "
                f"{d['rmse']:.4f} | {d['rmse_all']:.4f} | {1000 * r['seconds_per_image']['mask']:.2f} | "
                f"{r['trained_steps']}, {r['train_minutes']:.1f} |"
            )
        if lo and "reconstruction_rmse" in lo:
            lines += [
                "",
                f"Lotus's reconstruction switch returns the input image with RMSE {lo['reconstruction_rmse']:.4f} "
                "(on the [-1, 1] scale).",
            ]
        lines.append("")
    un = out.get("unicon")
    if un:
        lines += [
            "| UniCon (one model, 20 DPM-Solver++(2M) steps) | guidance | image -> mask IoU | mask -> image: shape | "
            "size | position | all three | object mask IoU | joint: mask IoU of image and mask |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for key, r in un.items():
            if not key.startswith("w="):
                continue
            m = r["map_to_image"]
            lines.append(
                f"| trained {un['trained_steps']} steps, {un['train_minutes']:.1f} min | {key[2:]} | "
                f"{r['image_to_map']['mask_iou']:.4f} | {_pct(m['shape'])} | {_pct(m['size'])} | "
                f"{_pct(m['position'])} | {_pct(m['all'])} | {m['mask_iou']:.4f} | "
                f"{r['joint']['consistency_iou']:.4f} |"
            )
    return "\n".join(lines)


def _about_of(ep) -> dict:
    return {k: ep[k] for k in ("trained_steps", "train_minutes", "parameters")}


@torch.no_grad()
def picture(args, path: Path, cols: int = 8):
    """image | true depth | Lotus | eps-model | true mask | Lotus | eps-model | UniCon (image -> mask) | UniCon's
    image for the true mask, for ``cols`` held-out renders."""
    b = heldout_batch(cols, 1000 + (SEED if args.seed is None else args.seed))
    lotus = load_dense_model(args.runs / "lotus" / "model")
    eps = load_dense_model(args.runs / "dense-eps" / "model")
    uni = load_unicon_model(args.runs / "unicon" / "model")

    def gray(m):
        return (m.float() * 2 - 1).unsqueeze(1).expand(-1, 3, -1, -1)

    rows = {
        "image": b.images,
        "true depth": gray(b.depth),
        "Lotus depth (1 NFE)": gray(read_map(lotus.predict(b.images, "depth").x, "depth")),
        "eps depth (20 NFE)": gray(read_map(eps.predict(b.images, "depth", 20).x, "depth")),
        "true mask": gray(b.masks),
        "Lotus mask (1 NFE)": gray(read_map(lotus.predict(b.images, "mask").x, "mask")),
        "eps mask (20 NFE)": gray(read_map(eps.predict(b.images, "mask", 20).x, "mask")),
        "UniCon mask (20 NFE)": gray(uni.image_to_map(b.images, 20)[0][:, 0] > 0),
        "UniCon image for the true mask": uni.map_to_image(mask_map(b.masks), 20)[0],
    }
    grid = torch.stack([t for r in rows.values() for t in r])
    save_png(labelled_grid(grid, list(rows), [str(i) for i in range(cols)], scale=3), path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=Path, default=ROOT / "runs")
    ap.add_argument("--json", type=Path, default=ROOT / "outputs" / "dense" / "dense.json")
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--seed", type=int, default=None, help=f"held-out seed (default {SEED})")
    ap.add_argument(
        "--eps", default="20:dynamic,20:clip,20:none,5:dynamic", help="the eps-model's STEPS:THRESHOLD runs"
    )
    ap.add_argument("--guidance", default="1,2", help="UniCon mask -> image guidance scales (1 = off)")
    ap.add_argument("--docs", action="store_true")
    args = ap.parse_args(argv)
    args.eps = [(int(a), b) for a, b in (item.split(":") for item in args.eps.split(","))]
    args.guidance = [float(s) for s in args.guidance.split(",")]
    torch.set_num_threads(1)
    out = measure(args)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.json, json.loads(json.dumps(out, default=str)))
    print(tables(out))
    if args.docs:
        write_docs_section("dense-tables", tables(out), "Measured", "tasks.md")
        if not out["missing"]:
            picture(args, ROOT / "docs" / "tasks_dense.png")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
