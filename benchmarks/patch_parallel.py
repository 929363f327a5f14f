"""Patch-parallel sampling of the bundled shapes model on 4 gloo ranks (CPU emulation; condiff.parallel):
how far each DistriFusion mode and PCPP drift from the single-process samples as the step count grows, the exact
labeller's accuracy per mode, and the bytes each method sends per network evaluation (counted on every rank,
summed over ranks, after the warm-up).

    OMP_NUM_THREADS=1 python benchmarks/patch_parallel.py [--json F] [--n 32] [--steps 10,20,40]

Every rank samples the same --n random captions from the same noise (seed 0; DPM-Solver++(2M), CFG 3); the
deviation is the root-mean-square and the largest pixel difference (images in [-1, 1]) against the
single-process samples of the same captions and noise. Deviation runs split the latent into 4 row bands
(split_batch off); the byte table adds the default layout (CFG's halves on two groups of 2 bands).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CMD = "OMP_NUM_THREADS=1 python benchmarks/patch_parallel.py"
WORLD = 4
RUNS = [  # (method, GroupNorm mode, PCPP window, split_batch)
    ("distrifusion", "full_sync", 0.3, False),
    ("distrifusion", "sync_gn", 0.3, False),
    ("distrifusion", "corrected_async_gn", 0.3, False),
    ("distrifusion", "stale_gn", 0.3, False),
    ("distrifusion", "no_sync", 0.3, False),
    ("pcpp", "sync_gn", 0.3, False),
    ("pcpp", "corrected_async_gn", 0.3, False),
    ("pcpp", "stale_gn", 0.3, False),
    ("pcpp", "stale_gn", 1.0, False),
    ("distrifusion", "sync_gn", 0.3, True),
    ("distrifusion", "corrected_async_gn", 0.3, True),
    ("distrifusion", "stale_gn", 0.3, True),
]
KINDS = ("kv", "halo", "gn", "output")


def _generate(model, n: int, steps: int, seed: int = 0):
    from condiff.evaluation.evaluate import generate_counted
    from condiff.solvers import get_solver

    g = torch.Generator().manual_seed(seed)
    raw, attrs = model.family.random_conditions(n, g)
    images, _, _ = generate_counted(model, raw, get_solver("dpmpp-2m"), steps, 3.0, g, batch_size=n)
    return images, attrs


def _worker(rank, world, n, steps_list, path):
    from condiff.cli.psample import ParallelModel
    from condiff.models.base import load_model
    from condiff.parallel import PatchConfig, PatchEngine
    from condiff.parallel.comm import total_over_ranks

    m = load_model("shapes")
    ref = {}
    if rank == 0:
        for steps in steps_list:
            ref[steps] = _generate(m, n, steps)
    rows, byte_rows = [], []
    for method, mode, window, split in RUNS:
        for steps in steps_list:
            eng = PatchEngine(PatchConfig(method=method, mode=mode, window=window, split_batch=split))
            t0 = time.perf_counter()
            images, _ = _generate(ParallelModel(m, eng), n, steps)
            seconds = time.perf_counter() - t0
            eng.close()
            if rank == 0:
                base, attrs = ref[steps]
                d = images.double() - base.double()
                acc = m.family.score(images, attrs)
                rows.append(
                    {
                        "method": method,
                        "mode": mode,
                        "window": window if method == "pcpp" else None,
                        "layout": f"2 groups x {WORLD // 2} bands" if split else f"{WORLD} bands",
                        "steps": steps,
                        "rms_deviation": float(d.pow(2).mean().sqrt()),
                        "max_deviation": float(d.abs().max()),
                        "accuracy": {k: float(v) for k, v in acc.items()},
                        "single_process_accuracy": {k: float(v) for k, v in m.family.score(base, attrs).items()},
                        "seconds": seconds,
                    }
                )
                print(f"{method} {mode} steps {steps}: rms {rows[-1]['rms_deviation']:.4g}", flush=True)
    for split in (False, True):
        for method, window in (("distrifusion", 0.3), ("pcpp", 0.3), ("pcpp", 1.0)):
            eng = PatchEngine(PatchConfig(method=method, window=window, split_batch=split))
            _generate(ParallelModel(m, eng), n, 10)
            eng.close()
            after = [s for s, sync in zip(eng.counter.steps, eng.synchronous) if not sync]
            mean = [sum(s.get(k, 0) for s in after) / len(after) for k in KINDS]
            per_kind = dict(zip(KINDS, total_over_ranks(mean)))
            byte_rows.append(
                {
                    "method": method,
                    "window": window if method == "pcpp" else None,
                    "layout": f"2 groups x {WORLD // 2} bands" if split else f"{WORLD} bands",
                    "bytes_per_evaluation": per_kind,
                    "total": sum(per_kind.values()),
                }
            )
    if rank == 0:
        torch.save({"deviation": rows, "bytes": byte_rows}, path)


def tables(res: dict) -> str:
    steps = sorted({r["steps"] for r in res["deviation"]})
    head = "| method | layout | mode | " + " | ".join(f"RMS dev. {s} steps" for s in steps)
    head += " | " + " | ".join(f"`all` {s}" for s in steps) + " |"
    lines = [head, "|" + "---|" * (3 + 2 * len(steps))]
    keyed = {}
    for r in res["deviation"]:
        name = r["method"] + (f" (p={r['window']:g})" if r["window"] is not None else "")
        keyed.setdefault((name, r["layout"], r["mode"]), {})[r["steps"]] = r
    for (name, layout, mode), by in keyed.items():
        devs = " | ".join(f"{by[s]['rms_deviation']:.2e} (max {by[s]['max_deviation']:.2f})" for s in steps)
        accs = " | ".join(f"{by[s]['accuracy']['all']:.3f}" for s in steps)
        lines.append(f"| {name} | {layout} | {mode} | {devs} | {accs} |")
    singles = {}
    for r in res["deviation"]:
        singles[r["steps"]] = r["single_process_accuracy"]["all"]
    zeros = " | ".join("0" for _ in steps)
    lines.append(f"| single process | 1 | - | {zeros} | " + " | ".join(f"{singles[s]:.3f}" for s in steps) + " |")
    lines += ["", "| method | layout | K/V | halos | GroupNorm | output | total | vs DistriFusion |", "|" + "---|" * 8]
    df = {r["layout"]: r["total"] for r in res["bytes"] if r["method"] == "distrifusion"}
    for r in res["bytes"]:
        name = r["method"] + (f" (p={r['window']:g})" if r["window"] is not None else "")
        b = r["bytes_per_evaluation"]
        cells = " | ".join(f"{b[k] / 1024:.1f} KiB" for k in KINDS)
        lines.append(
            f"| {name} | {r['layout']} | {cells} | {r['total'] / 1024:.1f} KiB | {r['total'] / df[r['layout']]:.0%} |"
        )
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path, default=ROOT / "outputs" / "patch_parallel" / "patch_parallel.json")
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--steps", default="10,20,40")
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    from condiff.core.files import atomic_write_json
    from condiff.parallel.launch import spawn

    steps = [int(s) for s in args.steps.split(",")]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "res.pt")
        spawn(_worker, WORLD, args.n, steps, path)
        res = torch.load(path, weights_only=False)
    res.update(world=WORLD, n=args.n, steps=steps, command=CMD, minutes=(time.perf_counter() - t0) / 60)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.json, json.loads(json.dumps(res)))
    print(tables(res))
    print(f"wrote {args.json} ({res['minutes']:.1f} min)")


if __name__ == "__main__":
    sys.exit(main())
