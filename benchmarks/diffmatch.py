"""DiffMatch (Nam et al., ICLR 2024) on held-out warps: the average end-point error (AEPE, pixels, over valid pixels,
averaged over pairs) of the correlation volume's soft-argmax initialisation, of DiffMatch's sampled flow and of the
direct regression of the flow with the same network (trained beside it by the recipe), overall and per warp size
(translation magnitude, scale, rotation), plus the zero flow for scale and a few sampling variants.

The held-out pairs come from a generator seeded 2**40 + seed (condiff.models.diffmatch.eval_pairs), which training's
per-step generators never reach.

    condiff train diffmatch --out runs/diffmatch
    OMP_NUM_THREADS=1 python benchmarks/diffmatch.py [--model runs/diffmatch] [--n 256] [--json F] [--docs]

--docs writes the table into docs/tasks.md and the picture
docs/tasks_matching.png (source, target, true flow, initial flow, DiffMatch's flow, the regression's flow).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

from condiff.core.files import atomic_write_json
from condiff.data.images import labelled_grid, save_png
from condiff.data.matching import flow_to_rgb
from condiff.models.diffmatch import eval_pairs, load_diffmatch_model
from condiff.tasks.diffmatch import end_point_error

ROOT = Path(__file__).resolve().parents[1]
BATCH = 64


def bins(max_shift: float, max_scale: float, max_rotation: float) -> dict:
    """Three equal-width bins of |translation| (px), |ln scale| (shown as scale ranges) and |rotation| (deg)."""
    ls = math.log(max_scale)
    return {
        "translation": [(max_shift * i / 3, max_shift * (i + 1) / 3) for i in range(3)],
        "scale": [(ls * i / 3, ls * (i + 1) / 3) for i in range(3)],
        "rotation": [(max_rotation * i / 3, max_rotation * (i + 1) / 3) for i in range(3)],
    }


def bin_label(kind: str, lo: float, hi: float) -> str:
    """A bin's label, free of '|' (it goes into a markdown table)."""
    if kind == "translation":
        return f"translation {lo:.0f}-{hi:.0f} px"
    if kind == "scale":
        return f"scale in [{math.exp(-hi):.2f}, {math.exp(-lo):.2f}] or [{math.exp(lo):.2f}, {math.exp(hi):.2f}]"
    return f"rotation {lo:.1f}-{hi:.1f} deg (either way)"


@torch.no_grad()
def run(model, pairs, steps: int, hypotheses: int, t_start: float | None, seed: int = 0):
    """Per-pair AEPE of DiffMatch with these sampling options (and the flows)."""
    import dataclasses

    m = model
    if t_start is not None:
        cfg = dict(m.config)
        cfg["sampling"] = {**cfg["sampling"], "t_start": t_start}
        m = dataclasses.replace(model, config=cfg)
    epe, flows = [], []
    for i in range(0, pairs.source.shape[0], BATCH):
        sl = slice(i, i + BATCH)
        flow, _ = m.match(pairs.source[sl], pairs.target[sl], steps=steps, seed=seed + i, hypotheses=hypotheses)
        epe.append(end_point_error(flow, pairs.flow[sl], pairs.valid[sl]))
        flows.append(flow)
    return torch.cat(epe), torch.cat(flows)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=ROOT / "runs" / "diffmatch")
    ap.add_argument("--n", type=int, default=256, help="held-out pairs")
    ap.add_argument("--seed", type=int, default=0, help="held-out set: generator seeded 2**40 + seed")
    ap.add_argument("--json", type=Path, default=ROOT / "outputs" / "diffmatch" / "diffmatch.json")
    ap.add_argument("--docs", action="store_true", help="write the table and docs/tasks_matching.png")
    ap.add_argument("--quick", action="store_true", help="the main configuration only (no sampling variants)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    model = load_diffmatch_model(args.model)
    s = model.sampling
    pairs = eval_pairs(model, args.n, args.seed)
    t0 = time.perf_counter()
    conds = [model.condition(pairs.source[i : i + BATCH], pairs.target[i : i + BATCH]) for i in range(0, args.n, BATCH)]
    init = torch.cat([c.init_flow for c in conds])
    per_pair = {
        "zero flow": end_point_error(torch.zeros_like(pairs.flow), pairs.flow, pairs.valid),
        "init (soft-argmax)": end_point_error(init, pairs.flow, pairs.valid),
    }
    reg = None
    if model.has_regressor:
        reg = torch.cat([model.regress(c) for c in conds])
        per_pair["regression (same net)"] = end_point_error(reg, pairs.flow, pairs.valid)
    main_key = f"DiffMatch ({s.solver} {s.steps} steps, {s.hypotheses} hyp.)"
    t1 = time.perf_counter()
    per_pair[main_key], flow = run(model, pairs, s.steps, s.hypotheses, None)
    seconds = time.perf_counter() - t1
    variants = []
    if not args.quick:
        variants = [(s.steps, 1, None), (max(1, s.steps // 2), s.hypotheses, None), (5, s.hypotheses, 0.5)]
        for steps, hyp, ts in variants:
            key = f"DiffMatch ({s.solver} {steps} steps, {hyp} hyp.{', from init at t=' + str(ts) if ts else ''})"
            per_pair[key] = run(model, pairs, steps, hyp, ts)[0]
    print(f"evaluated in {time.perf_counter() - t0:.0f} s ({seconds:.1f} s for the main DiffMatch run)", flush=True)

    edges = bins(model.data.max_shift, model.data.max_scale, model.data.max_rotation)
    values = {
        "translation": pairs.params[:, 4],
        "scale": pairs.params[:, 2].log().abs(),
        "rotation": pairs.params[:, 3].abs(),
    }
    table = [{"bin": "all", "n": args.n, **{k: float(v.nanmean()) for k, v in per_pair.items()}}]
    for kind, ranges in edges.items():
        for j, (lo, hi) in enumerate(ranges):
            v = values[kind]
            sel = (v >= lo) & ((v < hi) if j < 2 else (v <= hi + 1e-6))
            table.append(
                {
                    "bin": bin_label(kind, lo, hi),
                    "n": int(sel.sum()),
                    **{k: float(e[sel].nanmean()) for k, e in per_pair.items()},
                }
            )
    for row in table:
        print(row, flush=True)
    record = {
        "model": str(args.model),
        "n": args.n,
        "seed": args.seed,
        "sampling": dict(model.config["sampling"]),
        "train_minutes": model.info.get("train_minutes"),
        "trained_steps": model.info.get("trained_steps"),
        "main": main_key,
        "diffmatch_seconds": seconds,
        "table": table,
    }
    atomic_write_json(args.json, record)
    print(f"wrote {args.json}")
    if args.docs:
        write_docs(record, list(per_pair))
        picture(pairs, init, flow, reg, ROOT / "docs" / "tasks_matching.png")


def write_docs(record: dict, methods: list[str]):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from sampling_speed import write_docs_section

    short = [m for m in methods if "hyp." not in m or m == record["main"]]
    lines = [
        f"Measured with `OMP_NUM_THREADS=1 python benchmarks/diffmatch.py --docs`: {record['n']} held-out pairs "
        f"(seed {record['seed']}), AEPE in pixels over valid pixels (lower is better), the model of "
        f"`condiff train diffmatch` ({record['trained_steps']} steps, {record['train_minutes']:.1f} min).",
        "",
        "| warps | pairs | " + " | ".join(short) + " |",
        "|---|---:|" + "---:|" * len(short),
    ]
    for row in record["table"]:
        lines.append(f"| {row['bin']} | {row['n']} | " + " | ".join(f"{row[m]:.3f}" for m in short) + " |")
    others = [m for m in methods if m not in short]
    if others:
        lines += ["", "Sampling variants (all pairs):", "", "| sampling | AEPE |", "|---|---:|"]
        lines += [f"| {m} | {record['table'][0][m]:.3f} |" for m in [record["main"], *others]]
    page = "tasks.md"
    write_docs_section("diffmatch", "\n".join(lines), "DiffMatch: measured", page=page)


def picture(pairs, init, flow, reg, path: Path, rows: int = 5):
    """Rows: held-out pairs (chosen across translation sizes); columns: source, target, true flow, initial flow,
    DiffMatch's flow (and the regression's); the flows coloured on the row's true-flow scale, invalid target
    pixels of the true flow in grey."""
    order = pairs.params[:, 4].argsort()
    pick = order[torch.linspace(0, len(order) - 1, rows).round().long()]
    tiles, labels = [], []
    for i in pick.tolist():
        top = float(pairs.flow[i].norm(dim=0).max())
        true = flow_to_rgb(pairs.flow[i : i + 1], top)[0]
        true = torch.where(pairs.valid[i], true, torch.zeros_like(true))
        row = [pairs.source[i], pairs.target[i], true, flow_to_rgb(init[i : i + 1], top)[0]]
        row.append(flow_to_rgb(flow[i : i + 1], top)[0])
        if reg is not None:
            row.append(flow_to_rgb(reg[i : i + 1], top)[0])
        tiles += row
        tx, ty, sc, rot, _ = pairs.params[i].tolist()
        labels.append(f"t=({tx:.1f},{ty:.1f}) s={sc:.2f} r={rot:.0f}")
    cols = ["source", "target", "true flow", "init flow", "DiffMatch"] + (["regression"] if reg is not None else [])
    save_png(labelled_grid(torch.stack(tiles), labels, cols, scale=3), path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
