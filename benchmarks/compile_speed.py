"""torch.compile, channels_last and bfloat16 on CPU: speed and exactness of `condiff sample --compile /
--channels-last / --bf16`.

For a bundled model, one batch and one solver, it samples the same trajectory (same x_T, condition, grid) with
the network run six ways: eager (as loaded), --channels-last, --compile, both, --bf16 (bfloat16 autocast) and
--bf16 with both, each applied to a fresh load
by condiff.models.runtime exactly as the CLI does. It reports per way: the first call (with --compile: the
compile), the best of the repeats (the ways run in turn within each repeat, so a slow spell of the machine falls
on all of them), the speed-up over eager, and the max abs difference of the samples against eager's. Writes
JSON and a markdown table, and updates the table in docs/benchmarks.md.

    python benchmarks/compile_speed.py [--model digits] [--batch 64] [--steps 20] [--solver dpmpp-2m] [--cfg 3]
                                       [--repeats 3] [--threads 2] [--clock wall|cpu]

Where torch.compile does not work (no C++ compiler, an inductor error), the compiled rows say so (the one-line
error of `condiff sample --compile`) and the others are still measured.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from sampling_speed import write_docs_section  # noqa: E402  (a sibling script: run as python benchmarks/compile_speed.py)

from condiff.core.grids import make_grid  # noqa: E402
from condiff.core.sampling import sample  # noqa: E402
from condiff.errors import ConfigError  # noqa: E402
from condiff.guidance import CFG  # noqa: E402
from condiff.models import runtime  # noqa: E402
from condiff.models.base import load_model, silence_diffusers  # noqa: E402
from condiff.solvers import get_solver  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
WAYS = {  # name: (--compile, --channels-last, --bf16)
    "eager": (False, False, False),
    "channels-last": (False, True, False),
    "compile": (True, False, False),
    "compile + channels-last": (True, True, False),
    "bf16": (False, False, True),
    "bf16 + compile + channels-last": (True, True, True),
}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="digits")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--solver", default="dpmpp-2m")
    ap.add_argument("--cfg", type=float, default=3.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--clock", choices=sorted(CLOCKS), default="wall", help="wall time, or process CPU time")
    ap.add_argument("--json", type=Path, default=ROOT / "outputs" / "bench" / "compile_speed.json")
    ap.add_argument("--no-docs", action="store_true", help="do not update docs/benchmarks.md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    clock = CLOCKS[args.clock]
    silence_diffusers()

    solver = get_solver(args.solver)
    runs, rows = {}, {}
    for name, (compile_net, channels_last, bf16) in WAYS.items():
        m = load_model(args.model)
        rows[name] = {"way": name, "compile": compile_net, "channels_last": channels_last, "bf16": bf16, "error": None}
        try:
            runtime.run_faster(m, compile_net, channels_last, bf16)
        except ConfigError as err:
            rows[name]["error"] = str(err)
            continue
        g = torch.Generator().manual_seed(0)
        raw, _ = m.family.random_conditions(args.batch, g)
        cond = m.condition(raw)
        grid = make_grid(m.schedule, args.steps, solver.default_spacing) if solver.default_spacing else None
        grid = make_grid(m.schedule, args.steps) if grid is None else grid
        x_T = m.prior((args.batch, *m.family.image_shape), float(grid[0]), torch.Generator().manual_seed(1))
        den = CFG(m.denoiser, args.cfg)
        runs[name] = lambda den=den, grid=grid, x_T=x_T, cond=cond: sample(den, solver, grid, x_T.clone(), cond).x

    outs, best = {}, {}
    with torch.inference_mode():
        for name, fn in runs.items():  # the first call: with --compile, the compile
            t0 = clock()
            try:
                outs[name] = fn()
            except Exception as err:  # a compile that fails on the model itself: report it, measure the rest
                rows[name]["error"] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                continue
            rows[name]["first_call_s"] = clock() - t0
        names = [n for n in runs if n in outs]
        best = dict.fromkeys(names, float("inf"))
        for r in range(args.repeats):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                t0 = clock()
                out = runs[name]()
                best[name] = min(best[name], clock() - t0)
                if not torch.equal(out, outs[name]):  # every repeat gives the same samples
                    rows[name]["deterministic"] = False
    for name in names:
        rows[name].update(
            seconds=best[name],
            speedup=best["eager"] / best[name] if "eager" in best else None,
            max_abs_diff=float((outs[name] - outs["eager"]).abs().max()) if "eager" in outs else None,
            deterministic=rows[name].get("deterministic", True),
        )

    lines = [
        "| network | first call s | best s | speed-up vs eager | max abs diff vs eager |",
        "|---|---|---|---|---|",
    ]
    for row in rows.values():
        if "seconds" not in row:
            lines.append(f"| {row['way']} | failed: {row['error']} | | | |")
            continue
        lines.append(
            f"| {row['way']} | {row['first_call_s']:.2f} | {row['seconds']:.3f} | {row['speedup']:.3f}x "
            f"| {row['max_abs_diff']:.1e} |"
        )
    table = "\n".join(lines)
    print(table)
    meta = {
        "torch": torch.__version__,
        "threads": args.threads,
        "clock": args.clock,
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "model": args.model,
        "batch": args.batch,
        "steps": args.steps,
        "solver": args.solver,
        "cfg": args.cfg,
        "command": "python benchmarks/compile_speed.py "
        + f"--model {args.model} --batch {args.batch} --steps {args.steps} --solver {args.solver} "
        f"--cfg {args.cfg} --repeats {args.repeats} --threads {args.threads}"
        + (f" --clock {args.clock}" if args.clock != "wall" else ""),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"meta": meta, "results": list(rows.values())}, indent=2))
    if not args.no_docs:
        update_docs(table, meta)


def update_docs(table: str, meta: dict):
    clock = "process CPU time" if meta.get("clock") == "cpu" else "wall time"
    block = (
        f"Command: `{meta['command']}` (torch {meta['torch']}, {meta['threads']} threads, "
        f"{meta['cpus']} CPUs, {meta['machine']}): {meta['steps']} steps of {meta['solver']} with CFG "
        f"{meta['cfg']:g} on a batch of {meta['batch']} ({2 * meta['batch']} network rows). Times ({clock}) are "
        "seconds per trajectory: the first call (with --compile: the compile), then the best of the repeats.\n\n"
        f"{table}"
    )
    write_docs_section("compile_speed", block, "torch.compile, channels_last and bfloat16 on CPU")


if __name__ == "__main__":
    main()
