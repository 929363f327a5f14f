"""Parity with diffusers' own pipelines on the tiny SD pipeline (issue 6, acceptance 1): float32, the same
seed (condiff draws diffusers' initial latents, and a stochastic solver's noise from the same generator after
them, as diffusers' schedulers do), 20 steps, CFG 7.5, two images, compared in latent space."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from condiff.core.sampling import Gaussian, sample
from condiff.guidance import CFG, PAG
from condiff.interop import initial_latents
from condiff.solvers import DDIM, DDPM, DPMSolverPP2M, DPMSolverPP3M, Euler, Heun, UniPC

PROMPT, STEPS, CFG_SCALE, SIZE, SEED = "a red cat", 20, 7.5, 16, 0
TOL = 1e-4  # the bound on max |condiff - diffusers| in latent space


def diffusers_latents(pipe_cls, folder, make_scheduler, n=2, **kwargs):
    """diffusers' own latents; ``make_scheduler(config)`` turns the folder's scheduler config into the one used."""
    pipe = pipe_cls.from_pretrained(folder, local_files_only=True, **kwargs.pop("load", {}))
    pipe.scheduler = make_scheduler(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        PROMPT,
        num_inference_steps=STEPS,
        guidance_scale=CFG_SCALE,
        height=SIZE,
        width=SIZE,
        num_images_per_prompt=n,
        generator=torch.Generator().manual_seed(SEED),
        output_type="latent",
        **kwargs,
    )
    return out.images, pipe.scheduler


def condiff_latents(sd, scheduler, guided, solver, n=2):
    """One generator, as in diffusers: the initial latents, then (stochastic solvers) each step's noise."""
    p = dataclasses.replace(sd, scheduler=scheduler)
    g = torch.Generator().manual_seed(SEED)
    x = initial_latents(p, n, SIZE, SIZE, g, steps=STEPS)
    with torch.no_grad():
        return sample(guided(p.denoiser), solver, p.grid(STEPS), x, p.condition([PROMPT], n), Gaussian(g)).x


# condiff solver <-> diffusers scheduler (from the folder's SD config, with these options), the same algorithm
SAME = {
    "ddim": ("DDIMScheduler", {}, DDIM()),
    "dpmpp-2m": ("DPMSolverMultistepScheduler", {}, DPMSolverPP2M()),
    "dpmpp-3m": ("DPMSolverMultistepScheduler", {"solver_order": 3}, DPMSolverPP3M()),
    "unipc": ("UniPCMultistepScheduler", {}, UniPC()),
    "euler": ("EulerDiscreteScheduler", {}, Euler()),
    "heun": ("HeunDiscreteScheduler", {}, Heun()),
    "ddpm": ("DDPMScheduler", {}, DDPM()),  # stochastic: the same generator draws the same noise in order
    # SD 2.x-style v-prediction, and DDIM's other end point (trailing spacing, alpha_cumprod 1 at the end)
    "ddim-v": ("DDIMScheduler", {"prediction_type": "v_prediction"}, DDIM()),
    "dpmpp-2m-v": ("DPMSolverMultistepScheduler", {"prediction_type": "v_prediction"}, DPMSolverPP2M()),
    "ddim-trailing": ("DDIMScheduler", {"timestep_spacing": "trailing", "set_alpha_to_one": True}, DDIM()),
    "dpmpp-2m-sigma-min": ("DPMSolverMultistepScheduler", {"final_sigmas_type": "sigma_min"}, DPMSolverPP2M()),
}


@pytest.mark.parametrize("name", list(SAME))
def test_cfg_sampling_matches_diffusers(sd, tiny_sd_dir, name):
    """condiff's solvers with CFG 7.5 reproduce StableDiffusionPipeline with the diffusers scheduler of the
    same algorithm (created from the folder's config, as users do) to 1e-4 in latent space; the guidance
    visibly matters (CFG 7.5 vs the conditional model differ by far more than the tolerance)."""
    import diffusers
    from diffusers import StableDiffusionPipeline

    cls_name, options, solver = SAME[name]
    cls = getattr(diffusers, cls_name)
    ref, scheduler = diffusers_latents(
        StableDiffusionPipeline, tiny_sd_dir, lambda config: cls.from_config(config, **options)
    )
    ours = condiff_latents(sd, scheduler, lambda d: CFG(d, CFG_SCALE), solver)
    err = float((ours - ref).abs().max())
    print(f"{name}: max |condiff - diffusers| = {err:.3g} (|latent| max {float(ref.abs().max()):.3g})")
    assert err <= TOL
    plain = condiff_latents(sd, scheduler, lambda d: CFG(d, 1.0), solver)
    assert float((plain - ref).abs().max()) > 100 * TOL


@pytest.mark.parametrize("layers", [("mid",), ("mid", "up")], ids=["mid", "mid+up"])
def test_pag_matches_diffusers(sd, tiny_sd_dir, layers):
    """condiff's PAG (scale 3, CFG 7.5, the same layers) reproduces StableDiffusionPAGPipeline to 1e-4 with
    DDIM, and PAG visibly matters (it differs from plain CFG by far more than the tolerance)."""
    from diffusers import DDIMScheduler, StableDiffusionPAGPipeline

    ref, scheduler = diffusers_latents(
        StableDiffusionPAGPipeline,
        tiny_sd_dir,
        DDIMScheduler.from_config,
        pag_scale=3.0,
        load={"pag_applied_layers": list(layers)},
    )
    ours = condiff_latents(sd, scheduler, lambda d: PAG(d, 3.0, layers, cfg_scale=CFG_SCALE), DDIM())
    err = float((ours - ref).abs().max())
    print(f"pag {layers}: max |condiff - diffusers| = {err:.3g}")
    assert err <= TOL
    plain = condiff_latents(sd, scheduler, lambda d: CFG(d, CFG_SCALE), DDIM())
    assert float((plain - ref).abs().max()) > 100 * TOL


def test_dit_matches_diffusers(dit, tiny_dit_dir):
    """condiff DDIM + CFG 4 on the tiny DiT folder (learned-sigma transformer, class labels, null class 1000)
    reproduces DiTPipeline (which guides the eps channels only) in latent space (captured at its VAE decode),
    to float32 round-off relative to the latents' size (|latent| ~700 here: a random eps-network amplified by
    1/alpha ~ 160 at t = 999 of the linear table)."""
    from diffusers import DiTPipeline

    pipe = DiTPipeline.from_pretrained(tiny_dit_dir, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    seen, decode = {}, pipe.vae.decode
    pipe.vae.decode = lambda z, *a, **k: (seen.setdefault("z", z.clone()), decode(z, *a, **k))[1]
    pipe(
        [1, 2],
        guidance_scale=4.0,
        num_inference_steps=STEPS,
        generator=torch.Generator().manual_seed(SEED),
        output_type="np",
    )
    ref = seen["z"] * pipe.vae.config.scaling_factor
    x = initial_latents(dit, 2, SIZE, SIZE, torch.Generator().manual_seed(SEED), steps=STEPS)
    with torch.no_grad():
        ours = sample(CFG(dit.denoiser, 4.0), DDIM(), dit.grid(STEPS), x, dit.condition(["square", "triangle"])).x
    rel = float((ours - ref).abs().max()) / float(ref.abs().max())
    print(f"dit: max |condiff - diffusers| / max |latent| = {rel:.3g}")
    assert rel <= 1e-5
