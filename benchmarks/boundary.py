"""Optimal boundary condition for x4 super-resolution on shapes (Ma et al., ICLR 2024), measured: the shared x_T that
`condiff sr search` finds on validation renders, against random starts (one fresh draw per image), on held-out
renders the search never saw; PSNR (mean and standard error, the paired difference and its standard error) and the
exact labeller's attribute accuracy, with bicubic upsampling, the prior's mean x_T = 0 and the search's worst
candidate beside them.

    OMP_NUM_THREADS=1 python benchmarks/boundary.py [--json F] [--png F] [--n 256]

The model is read from runs/sr-shapes (`condiff train sr-shapes --out runs/sr-shapes`). The search scores
--candidates prior draws (generator 2**43 + seed) on --n-val validation renders (generator 2**42 + seed); the
held-out renders come from the generator seeded 2**41 + 1 (``dense.heldout_batch``; training draws its batches from
generators seeded by (seed, step) < 2**41), and the random starts from the generator seeded 7.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

from condiff.core.files import atomic_write_json  # noqa: E402
from condiff.data.images import labelled_grid, save_png  # noqa: E402
from condiff.evaluation.editbench import psnr  # noqa: E402
from condiff.models.dense import heldout_batch  # noqa: E402
from condiff.models.sr import (  # noqa: E402
    attribute_accuracy,
    degrade,
    load_sr_model,
    save_start,
    search_start,
    upsample,
)
from condiff.tasks.boundary import mean_se  # noqa: E402

HELDOUT_SEED = 1
RANDOM_SEED = 7
CMD = "OMP_NUM_THREADS=1 python benchmarks/boundary.py"


def row(name: str, out: torch.Tensor, truth: torch.Tensor, attrs: torch.Tensor) -> dict:
    p = psnr(out, truth)
    mean, se = mean_se(p)
    return {"method": name, "psnr": mean, "psnr_se": se, "accuracy": attribute_accuracy(out, attrs), "per_image": p}


def measure(args) -> dict:
    m = load_sr_model(args.model)
    t0 = time.perf_counter()
    res = search_start(m, args.candidates, args.n_val, args.steps, args.solver, args.seed)
    search_seconds = time.perf_counter() - t0
    if args.xt is not None:
        args.xt.parent.mkdir(parents=True, exist_ok=True)
        save_start(args.xt, res.x_T, args.steps, args.solver, m.config["upsample"])
    worst = int(torch.argmin(res.scores))
    cands = m.random_start(args.candidates, args.steps, 2**43 + args.seed)  # the search's candidates, drawn again
    assert torch.equal(cands[res.index], res.x_T)

    b = heldout_batch(args.n, HELDOUT_SEED)
    low = degrade(b.images)
    t0 = time.perf_counter()
    outs = {
        "bicubic": upsample(low),
        "random x_T (per image)": m.upscale(low, None, args.steps, args.solver, seed=RANDOM_SEED),
        "searched x_T (shared)": m.upscale(low, res.x_T, args.steps, args.solver),
        "worst candidate (shared)": m.upscale(low, cands[worst], args.steps, args.solver),
        "x_T = 0 (prior mean)": m.upscale(low, torch.zeros_like(res.x_T), args.steps, args.solver),
    }
    eval_seconds = time.perf_counter() - t0
    rows = [row(k, v, b.images, b.attrs) for k, v in outs.items()]
    by = {r["method"]: r for r in rows}
    s, r = by["searched x_T (shared)"], by["random x_T (per image)"]
    diff_mean, diff_se = mean_se(s["per_image"] - r["per_image"])
    margin = s["psnr"] - r["psnr"]
    unpaired_se = (s["psnr_se"] ** 2 + r["psnr_se"] ** 2) ** 0.5
    for x in rows:
        del x["per_image"]
    return {
        "model": str(args.model),
        "trained_steps": m.info.get("trained_steps"),
        "train_minutes": m.info.get("train_minutes"),
        "n": args.n,
        "heldout_seed": HELDOUT_SEED,
        "random_seed": RANDOM_SEED,
        "steps": args.steps,
        "solver": args.solver,
        "search": {
            "candidates": args.candidates,
            "n_val": args.n_val,
            "seed": args.seed,
            "index": res.index,
            "validation_psnr_best": float(res.scores[res.index]),
            "validation_psnr_mean": float(res.scores.mean()),
            "validation_psnr_worst": float(res.scores[worst]),
            "worst_index": worst,
            "seconds": search_seconds,
            "minutes": search_seconds / 60,
        },
        "rows": rows,
        "searched_minus_random": {
            "margin_db": margin,
            "unpaired_se": unpaired_se,
            "margin_over_unpaired_se": margin / unpaired_se,
            "paired_mean_db": diff_mean,
            "paired_se": diff_se,
            "beats_by_more_than_2_se": bool(margin > 2 * unpaired_se),
        },
        "eval_seconds": eval_seconds,
        "threads": torch.get_num_threads(),
        "command": CMD,
    }


def tables(out: dict) -> str:
    s = out["search"]
    lines = [
        f"Held-out renders: {out['n']}; sampler: {out['steps']} {out['solver']} steps (deterministic); search: best of "
        f"{s['candidates']} prior draws by mean PSNR on {s['n_val']} validation renders ({s['minutes']:.1f} min).",
        "",
        "| x4 SR from 8x8 | PSNR (dB) | s.e. | shape | color | size | position | all four |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in out["rows"]:
        a = r["accuracy"]
        lines.append(
            f"| {r['method']} | {r['psnr']:.2f} | {r['psnr_se']:.2f} | {a['shape']:.3f} | {a['color']:.3f} | "
            f"{a['size']:.3f} | {a['position']:.3f} | {a['all']:.3f} |"
        )
    d = out["searched_minus_random"]
    lines += [
        "",
        f"Searched minus random: {d['margin_db']:+.2f} dB, {d['margin_over_unpaired_se']:.1f} standard errors of the "
        f"difference of the two means ({d['unpaired_se']:.3f} dB); paired per image {d['paired_mean_db']:+.2f} "
        f"+- {d['paired_se']:.3f} dB. On the validation renders the chosen candidate scored "
        f"{s['validation_psnr_best']:.2f} dB, the candidates {s['validation_psnr_mean']:.2f} dB on average and "
        f"{s['validation_psnr_worst']:.2f} dB at worst.",
    ]
    return "\n".join(lines)


@torch.no_grad()
def picture(args, x_T: torch.Tensor | None, path: Path, cols: int = 8):
    m = load_sr_model(args.model)
    b = heldout_batch(cols, 1000 + HELDOUT_SEED)
    low = degrade(b.images)
    rows = {
        "8x8 input": upsample(low, "nearest"),
        "random x_T": m.upscale(low, None, args.steps, args.solver, seed=RANDOM_SEED),
        "searched x_T": m.upscale(low, x_T, args.steps, args.solver),
        "truth": b.images,
    }
    grid = torch.stack([rows[k][i] for k in rows for i in range(cols)])
    path.parent.mkdir(parents=True, exist_ok=True)
    save_png(labelled_grid(grid, list(rows), [str(i) for i in range(cols)], scale=3), path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=ROOT / "runs" / "sr-shapes" / "model")
    ap.add_argument("--json", type=Path, default=ROOT / "outputs" / "boundary" / "boundary.json")
    ap.add_argument("--png", type=Path, default=ROOT / "outputs" / "boundary" / "boundary.png")
    ap.add_argument("--xt", type=Path, default=ROOT / "outputs" / "boundary" / "xT.safetensors")
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--candidates", type=int, default=64)
    ap.add_argument("--n-val", type=int, default=64)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--solver", default="dpmpp2m")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    out = measure(args)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.json, json.loads(json.dumps(out, default=str)))
    print(tables(out))
    from condiff.models.sr import load_start_file

    picture(args, load_start_file(args.xt)[0], args.png)
    print(f"wrote {args.json}, {args.png} and {args.xt}")


if __name__ == "__main__":
    sys.exit(main())
