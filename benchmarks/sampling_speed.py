"""Sampling speed: condiff's loop against a plain loop over diffusers' own schedulers.

Same UNet (the bundled digits model), same timesteps, same CFG scale, batch 64 (128 rows per forward with
CFG). For each scheduler it times: condiff's ``sample`` (CFG object + solver step), a hand-written loop
with diffusers' scheduler (the pipeline pattern: cat, forward, split, mix, scheduler.step), and the pure
network forwards alone (same NFE). It prints the ratio condiff / diffusers and each loop's overhead over
the pure forward time, checks that both loops give the same samples, writes JSON and updates the table in
docs/benchmarks.md.

    python benchmarks/sampling_speed.py [--steps 20] [--batch 64] [--cfg 3] [--repeats 3] [--threads 2]
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
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler  # noqa: E402

from condiff.core.sampling import sample  # noqa: E402
from condiff.guidance import CFG  # noqa: E402
from condiff.models.base import load_model, silence_diffusers  # noqa: E402
from condiff.solvers import DDIM, DPMSolverPP2M  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def schedulers(sched_cfg: dict, steps: int):
    common = dict(num_train_timesteps=1000, beta_schedule=sched_cfg["beta_schedule"])
    ddim = DDIMScheduler(**common, clip_sample=False, set_alpha_to_one=True, timestep_spacing="leading", steps_offset=1)
    dpm = DPMSolverMultistepScheduler(
        **common,
        algorithm_type="dpmsolver++",
        solver_order=2,
        timestep_spacing="leading",
        steps_offset=1,
        final_sigmas_type="zero",
    )
    for s in (ddim, dpm):
        s.set_timesteps(steps)
    return {"ddim": (ddim, DDIM()), "dpmpp-2m": (dpm, DPMSolverPP2M())}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--cfg", type=float, default=3.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=ROOT / "outputs" / "bench" / "sampling_speed.json")
    ap.add_argument("--no-docs", action="store_true", help="do not update docs/benchmarks.md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    silence_diffusers()
    model = load_model("digits")
    unet = model.module["unet"]
    b = args.batch
    labels = torch.arange(b) % 10
    cond = model.condition(labels)
    class_both = torch.cat([cond["null"]["class_labels"], labels])

    def forward(x2, t):
        return unet(x2, t, class_labels=class_both).sample

    results = []
    for name, (sched, solver) in schedulers(model.info["schedule_cfg"], args.steps).items():
        ts = sched.timesteps
        grid = torch.cat([ts.double(), torch.tensor([-1.0], dtype=torch.float64)])
        g = torch.Generator().manual_seed(0)
        x_T = torch.randn((b, 1, 16, 16), generator=g)
        den = CFG(model.denoiser, args.cfg)

        def run_condiff():
            return sample(den, solver, grid, x_T.clone(), cond).x

        def run_diffusers():
            sched.set_timesteps(args.steps)
            x = x_T.clone() * sched.init_noise_sigma
            for t in sched.timesteps:
                eps_u, eps_c = forward(torch.cat([x, x]), t).chunk(2)
                x = sched.step(eps_u + args.cfg * (eps_c - eps_u), t, x).prev_sample
            return x

        def run_forward_only():
            x2 = torch.cat([x_T, x_T])
            for t in ts:
                forward(x2, t)

        timings = {}
        outs = {}
        with torch.inference_mode():
            for label, fn in (("condiff", run_condiff), ("diffusers", run_diffusers), ("forward", run_forward_only)):
                fn()  # warm-up
                best = float("inf")
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    outs[label] = fn()
                    best = min(best, time.perf_counter() - t0)
                timings[label] = best
        diff = float((outs["condiff"] - outs["diffusers"]).abs().max())
        row = {
            "scheduler": name,
            "steps": args.steps,
            "nfe": len(ts),
            "batch": b,
            "cfg": args.cfg,
            "condiff_s": timings["condiff"],
            "diffusers_s": timings["diffusers"],
            "forward_s": timings["forward"],
            "ratio": timings["condiff"] / timings["diffusers"],
            "condiff_overhead": timings["condiff"] / timings["forward"] - 1,
            "diffusers_overhead": timings["diffusers"] / timings["forward"] - 1,
            "max_abs_diff": diff,
        }
        results.append(row)

    header = (
        "| scheduler | NFE | batch | condiff s | diffusers s | forward-only s | ratio condiff/diffusers "
        "| condiff overhead | diffusers overhead | max abs diff |"
    )
    lines = [header, "|" + "---|" * 10]
    for r in results:
        lines.append(
            f"| {r['scheduler']} | {r['nfe']} | {r['batch']} | {r['condiff_s']:.3f} | {r['diffusers_s']:.3f} "
            f"| {r['forward_s']:.3f} | {r['ratio']:.3f} | {100 * r['condiff_overhead']:.1f}% "
            f"| {100 * r['diffusers_overhead']:.1f}% | {r['max_abs_diff']:.1e} |"
        )
    table = "\n".join(lines)
    print(table)
    meta = {
        "torch": torch.__version__,
        "threads": args.threads,
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "command": "python benchmarks/sampling_speed.py "
        + f"--steps {args.steps} --batch {args.batch} --cfg {args.cfg} --repeats {args.repeats} "
        f"--threads {args.threads}",
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    if not args.no_docs:
        update_docs(table, meta)


def update_docs(table: str, meta: dict):
    path = ROOT / "docs" / "benchmarks.md"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    start, end = "<!-- sampling_speed:start -->", "<!-- sampling_speed:end -->"
    block = (
        f"{start}\nCommand: `{meta['command']}` (torch {meta['torch']}, {meta['threads']} threads, "
        f"{meta['cpus']} CPUs, {meta['machine']}). Times are the best of the repeats, in seconds.\n\n"
        f"{table}\n{end}"
    )
    if start in text:
        pre, rest = text.split(start, 1)
        text = pre + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + "\n\n## Sampling speed: condiff vs diffusers' scheduler loop\n\n" + block + "\n"
    path.write_text(text)


if __name__ == "__main__":
    main()
