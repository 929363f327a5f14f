"""Sampling speed: condiff's loop against a plain loop over diffusers' own schedulers.

Same UNet (the bundled digits model), same timesteps, same CFG scale, batch 64 (128 rows per forward with
CFG). For each scheduler it times: condiff's ``sample`` (CFG object + solver step), a hand-written loop
with diffusers' scheduler (the pipeline pattern: cat, forward, split, mix, scheduler.step), and the pure
network forwards alone (same NFE). The three are timed in turn within each repeat (the order rotating), so
a slow spell of the machine falls on all of them; each time is the best of the repeats.

Two overheads per loop:
- overhead over the forwards: loop time / forward-only time - 1, also in ms per step. It is the difference of
  two measured times, so it carries their noise (a few % on a busy machine);
- loop-only cost: the same loop with the network replaced by a stub that returns a fixed output (no compute),
  in ms per step and as a share of one real forward: what the loop itself adds, measured directly.

It also checks that both loops give the same samples, writes JSON and updates the table in docs/benchmarks.md.
``--clock cpu`` times process CPU time instead of wall time (for a machine with other jobs on it: at one thread
CPU time is not stretched by waiting for a core).

    python benchmarks/sampling_speed.py [--steps 20] [--batch 64] [--cfg 3] [--repeats 3] [--threads 2]
                                        [--clock wall|cpu]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import time
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler  # noqa: E402

from condiff.core.sampling import sample  # noqa: E402
from condiff.guidance import CFG  # noqa: E402
from condiff.models.base import load_model, silence_diffusers  # noqa: E402
from condiff.solvers import DDIM, DPMSolverPP2M  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
LABELS = ("condiff", "diffusers", "forward")


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


class StubUNet(torch.nn.Module):
    """The UNet's interface with no compute: returns one fixed output (the loops' own cost, measured alone)."""

    def __init__(self, out: torch.Tensor):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))  # the wrapper's dtype check reads a weight
        self.out = out

    def forward(self, x, t, class_labels=None):
        return SimpleNamespace(sample=self.out)


def time_interleaved(fns: dict, repeats: int, clock) -> tuple[dict, dict]:
    """Best time of each function over ``repeats`` rounds, the functions run in turn within a round (the order
    rotating by one each round); one warm-up round first. Returns (best times, last outputs)."""
    names = list(fns)
    outs = {k: fns[k]() for k in names}  # warm-up
    best = dict.fromkeys(names, float("inf"))
    for r in range(repeats):
        for k in names[r % len(names) :] + names[: r % len(names)]:
            t0 = clock()
            outs[k] = fns[k]()
            best[k] = min(best[k], clock() - t0)
    return best, outs


def loops(unet, model, cond, class_both, sched, solver, grid, x_T, steps: int, cfg: float) -> dict:
    """The three loops over ``unet`` (the real network or the stub): condiff, diffusers, forward only."""
    stub = isinstance(unet, StubUNet)
    m = dataclasses.replace(model, module=torch.nn.ModuleDict({"unet": unet})) if stub else model
    den = CFG(m.denoiser, cfg)
    ts = sched.timesteps

    def forward(x2, t):
        return unet(x2, t, class_labels=class_both).sample

    def run_condiff():
        return sample(den, solver, grid, x_T.clone(), cond).x

    def run_diffusers():
        sched.set_timesteps(steps)
        x = x_T.clone() * sched.init_noise_sigma
        for t in sched.timesteps:
            eps_u, eps_c = forward(torch.cat([x, x]), t).chunk(2)
            x = sched.step(eps_u + cfg * (eps_c - eps_u), t, x).prev_sample
        return x

    def run_forward_only():
        x2 = torch.cat([x_T, x_T])
        for t in ts:
            forward(x2, t)

    return {"condiff": run_condiff, "diffusers": run_diffusers, "forward": run_forward_only}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--cfg", type=float, default=3.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--clock", choices=sorted(CLOCKS), default="wall", help="wall time, or process CPU time")
    ap.add_argument("--stub-repeats", type=int, default=20, help="repeats of the loop-only (stub network) timing")
    ap.add_argument("--json", type=Path, default=ROOT / "outputs" / "bench" / "sampling_speed.json")
    ap.add_argument("--no-docs", action="store_true", help="do not update docs/benchmarks.md")
    ap.add_argument(
        "--system-allocator", action="store_true", help="leave glibc's allocator at its defaults (no mallopt)"
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from condiff.models.runtime import keep_freed_memory

    keep_freed_memory(not args.system_allocator)  # as the condiff CLI runs (every loop here shares the process)
    clock = CLOCKS[args.clock]
    silence_diffusers()
    model = load_model("digits")
    unet = model.module["unet"]
    b = args.batch
    labels = torch.arange(b) % 10
    cond = model.condition(labels)
    class_both = torch.cat([cond["null"]["class_labels"], labels])

    results = []
    for name, (sched, solver) in schedulers(model.info["schedule_cfg"], args.steps).items():
        ts = sched.timesteps
        nfe = len(ts)
        grid = torch.cat([ts.double(), torch.tensor([-1.0], dtype=torch.float64)])
        g = torch.Generator().manual_seed(0)
        x_T = torch.randn((b, 1, 16, 16), generator=g)
        stub = StubUNet(0.1 * torch.randn((2 * b, 1, 16, 16), generator=g))
        common = (model, cond, class_both, sched, solver, grid, x_T, args.steps, args.cfg)
        with torch.inference_mode():
            timings, outs = time_interleaved(loops(unet, *common), args.repeats, clock)
            bare, _ = time_interleaved(loops(stub, *common), args.stub_repeats, clock)
        diff = float((outs["condiff"] - outs["diffusers"]).abs().max())
        per_forward_ms = 1e3 * timings["forward"] / nfe
        row = {
            "scheduler": name,
            "steps": args.steps,
            "nfe": nfe,
            "batch": b,
            "cfg": args.cfg,
            "condiff_s": timings["condiff"],
            "diffusers_s": timings["diffusers"],
            "forward_s": timings["forward"],
            "ratio": timings["condiff"] / timings["diffusers"],
            "condiff_overhead": timings["condiff"] / timings["forward"] - 1,
            "diffusers_overhead": timings["diffusers"] / timings["forward"] - 1,
            "forward_ms_per_step": per_forward_ms,
            "max_abs_diff": diff,
        }
        for loop in ("condiff", "diffusers"):
            row[f"{loop}_overhead_ms_per_step"] = 1e3 * (timings[loop] - timings["forward"]) / nfe
            # the loop with the stub network, less the stub calls alone: the loop's own work per step
            own_ms = 1e3 * (bare[loop] - bare["forward"]) / nfe
            row[f"{loop}_loop_only_ms_per_step"] = own_ms
            row[f"{loop}_loop_only_share"] = own_ms / per_forward_ms
        results.append(row)

    header = (
        "| scheduler | NFE | batch | condiff s | diffusers s | forward-only s | ratio condiff/diffusers "
        "| condiff overhead | diffusers overhead | condiff loop-only | diffusers loop-only | max abs diff |"
    )
    lines = [header, "|" + "---|" * 12]
    for r in results:
        lines.append(
            f"| {r['scheduler']} | {r['nfe']} | {r['batch']} | {r['condiff_s']:.3f} | {r['diffusers_s']:.3f} "
            f"| {r['forward_s']:.3f} | {r['ratio']:.3f} "
            f"| {100 * r['condiff_overhead']:.1f}% ({r['condiff_overhead_ms_per_step']:.2f} ms/step) "
            f"| {100 * r['diffusers_overhead']:.1f}% ({r['diffusers_overhead_ms_per_step']:.2f} ms/step) "
            f"| {r['condiff_loop_only_ms_per_step']:.3f} ms/step ({100 * r['condiff_loop_only_share']:.2f}%) "
            f"| {r['diffusers_loop_only_ms_per_step']:.3f} ms/step ({100 * r['diffusers_loop_only_share']:.2f}%) "
            f"| {r['max_abs_diff']:.1e} |"
        )
    table = "\n".join(lines)
    print(table)
    for r in results:
        print(
            f"{r['scheduler']}: condiff's loop {100 * r['condiff_overhead']:+.1f}% over the bare forwards "
            f"({r['condiff_overhead_ms_per_step']:+.2f} ms per step of {r['forward_ms_per_step']:.1f} ms), "
            f"diffusers' {100 * r['diffusers_overhead']:+.1f}%; loop-only (stub network): condiff "
            f"{r['condiff_loop_only_ms_per_step']:.3f} ms/step = {100 * r['condiff_loop_only_share']:.2f}% of a "
            f"forward, diffusers {r['diffusers_loop_only_ms_per_step']:.3f} ms/step"
        )
    meta = {
        "torch": torch.__version__,
        "threads": args.threads,
        "clock": args.clock,
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "command": "python benchmarks/sampling_speed.py "
        + f"--steps {args.steps} --batch {args.batch} --cfg {args.cfg} --repeats {args.repeats} "
        f"--threads {args.threads}"
        + (f" --clock {args.clock}" if args.clock != "wall" else "")
        + (" --system-allocator" if args.system_allocator else ""),
        "allocator": "glibc defaults" if args.system_allocator else "keep_freed_memory (as the condiff CLI)",
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    if not args.no_docs:
        update_docs(table, meta)


def update_docs(table: str, meta: dict):
    clock = "process CPU time" if meta.get("clock") == "cpu" else "wall time"
    block = (
        f"Command: `{meta['command']}` (torch {meta['torch']}, {meta['threads']} threads, "
        f"{meta['cpus']} CPUs, {meta['machine']}; allocator: {meta['allocator']}). "
        f"Times are the best of the repeats ({clock}), in seconds; "
        "overhead = loop / forward-only - 1 (and per step); loop-only = the loop's own work per step with the "
        "network stubbed out (and its share of one forward).\n\n"
        f"{table}"
    )
    write_docs_section("sampling_speed", block, "Sampling speed: condiff vs diffusers' scheduler loop")


def write_docs_section(name: str, body: str, heading: str, page: str = "benchmarks.md"):
    """Put ``body`` between the ``<!-- NAME:start -->`` and ``<!-- NAME:end -->`` markers of docs/PAGE,
    replacing what was there, or append it with its markers under ``## heading`` when they are not there yet."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{body}\n{end}"
    path = ROOT / "docs" / page
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if start in text:
        pre, rest = text.split(start, 1)
        text = pre + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + f"\n\n## {heading}\n\n" + block + "\n"
    path.write_text(text)


if __name__ == "__main__":
    main()
