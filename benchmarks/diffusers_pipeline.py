"""Speed of condiff against diffusers' own StableDiffusionPipeline on the tiny SD pipeline (issue 6, acceptance 5).

Protocol. The tiny random Stable Diffusion folder of ``condiff.interop.tiny.build_tiny_sd`` (UNet2DConditionModel
8/16 channels, 16x16 images, 8x8 latents), batch ``--batch`` (8) of one prompt, ``--steps`` (20) steps, CFG 7.5,
float32, CPU, same seed. For DDIM and DPM-Solver++(2M): diffusers runs ``pipe(prompt, num_images_per_prompt=B,
output_type="latent")`` with DDIMScheduler / DPMSolverMultistepScheduler; condiff runs
``sample(CFG(denoiser, 7.5), solver, grid, x, cond)`` on the same network, latents and grid (prompt encoding
included on both sides, VAE decoding on neither). Each timing is the median of ``--repeats`` runs after one
warm-up; the last column is the max |condiff - diffusers| of the latents (the parity check, <= 1e-4).
The tiny network makes per-step overhead (scheduler and guidance code) a large share of the time, so the ratio
is an upper bound on condiff's overhead for real Stable Diffusion, whose UNet dominates.

Prints a table, writes outputs/bench/diffusers_pipeline.json.

    OMP_NUM_THREADS=1 python benchmarks/diffusers_pipeline.py        # ~20 s on one core
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

import torch

from condiff.core.files import atomic_write_json
from condiff.core.sampling import sample
from condiff.guidance import CFG
from condiff.interop import initial_latents, load_pipeline
from condiff.interop.tiny import build_tiny_sd
from condiff.solvers import DDIM, DPMSolverPP2M

PROMPT, CFG_SCALE, SIZE = "a red cat", 7.5, 16


def median_time(fn, repeats: int) -> tuple[float, torch.Tensor]:
    out = fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=Path("outputs/bench/diffusers_pipeline.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, StableDiffusionPipeline

    folder = build_tiny_sd(Path(tempfile.mkdtemp(prefix="condiff-bench-")) / "tiny_sd")
    pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    ours = load_pipeline(folder)
    rows = []
    for name, sched_cls, solver in (
        ("ddim", DDIMScheduler, DDIM()),
        ("dpmpp-2m", DPMSolverMultistepScheduler, DPMSolverPP2M()),
    ):
        pipe.scheduler = sched_cls.from_config(pipe.scheduler.config)
        p = dataclasses.replace(ours, scheduler=pipe.scheduler)

        def run_diffusers():
            with torch.no_grad():
                return pipe(
                    PROMPT,
                    num_inference_steps=args.steps,
                    guidance_scale=CFG_SCALE,
                    height=SIZE,
                    width=SIZE,
                    num_images_per_prompt=args.batch,
                    generator=torch.Generator().manual_seed(0),
                    output_type="latent",
                ).images

        def run_condiff():
            with torch.no_grad():
                x = initial_latents(p, args.batch, SIZE, SIZE, torch.Generator().manual_seed(0))
                cond = p.condition([PROMPT], args.batch)
                return sample(CFG(p.denoiser, CFG_SCALE), solver, p.grid(args.steps), x, cond).x

        t_d, ref = median_time(run_diffusers, args.repeats)
        t_c, out = median_time(run_condiff, args.repeats)
        rows.append(
            {
                "solver": name,
                "diffusers_s": t_d,
                "condiff_s": t_c,
                "ratio": t_c / t_d,
                "max_abs_diff": float((out - ref).abs().max()),
            }
        )

    print(
        f"tiny SD pipeline, batch {args.batch}, {args.steps} steps, CFG {CFG_SCALE}, float32, "
        f"{args.threads} thread(s), median of {args.repeats}"
    )
    print("| solver | diffusers (s) | condiff (s) | condiff / diffusers | max abs diff (latents) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['solver']} | {r['diffusers_s']:.3f} | {r['condiff_s']:.3f} | {r['ratio']:.2f} | "
            f"{r['max_abs_diff']:.2e} |"
        )
    atomic_write_json(
        args.json, {"config": vars(args) | {"json": str(args.json)}, "rows": rows, "torch_version": torch.__version__}
    )
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
