"""Sampling, inversion and editing of a diffusers pipeline folder with condiff's methods (the CLI's
``--pipeline``).

``sample_pipeline`` runs any condiff solver and guidance (``guidance.build``) on the pipeline's network in
latent space and decodes through the VAE. By default the time grid is the one the folder's scheduler visits
(``interop.schedule.grid_from_scheduler``), and the initial latents are diffusers' (``initial_latents``),
so with the same seed condiff and diffusers start from the same tensor; a negative prompt replaces the empty
prompt in the null branch, as in diffusers. ``invert_pipeline`` / ``edit_pipeline`` run an editing method of
``condiff.inversion.methods`` on the VAE latents of an image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from condiff.core.denoiser import take_rows
from condiff.core.grids import make_grid
from condiff.core.sampling import Gaussian, sample
from condiff.errors import ConfigError
from condiff.guidance.build import GuidanceOptions, build_guidance
from condiff.interop.latents import decode, default_size, encode, initial_latents


@dataclass(frozen=True)
class PipelineSample:
    latents: torch.Tensor
    images: torch.Tensor  # [-1, 1]
    nfe: int
    grid: torch.Tensor


def pipeline_grid(pipe, steps: int, spacing=None) -> torch.Tensor:
    """The scheduler's own grid (``spacing`` None) or condiff's ``make_grid`` with a spacing object."""
    return pipe.grid(steps) if spacing is None else make_grid(pipe.schedule, steps, spacing)


def sample_pipeline(
    pipe,
    prompts: Sequence[str],
    n: int,
    solver,
    steps: int,
    options: GuidanceOptions,
    seed: int,
    height: int | None = None,
    width: int | None = None,
    negative: str | None = None,
    spacing=None,
    batch_size: int | None = None,
) -> PipelineSample:
    """``n`` samples of each prompt (module docstring). One generator seeded with ``seed`` draws the initial
    latents (as diffusers does) and then the solver's noise, batch by batch of ``batch_size`` prompts-rows."""
    if options.negative_prompt is not None:
        raise ConfigError("pass a pipeline's negative prompt as negative=..., it replaces the empty prompt")
    height = default_size(pipe) if height is None else height
    width = default_size(pipe) if width is None else width
    grid = pipeline_grid(pipe, steps, spacing)
    g = torch.Generator().manual_seed(seed)
    total = len(prompts) * n
    if spacing is None:  # the scheduler's grid: diffusers' latents, as its first step sees them
        x = initial_latents(pipe, total, height, width, g, steps=steps)
    else:  # condiff's grid: x_T = sigma(t_start) N(0, I) (condiff.core.sampling.initial_noise)
        x = initial_latents(pipe, total, height, width, g) * float(pipe.schedule.sigma(float(grid[0])))
    cond = pipe.condition(list(prompts), n, negative)
    guided = build_guidance(pipe.denoiser, options)
    size = total if batch_size is None else max(1, int(batch_size))
    outs, nfe = [], 0
    with torch.no_grad():
        for start in range(0, total, size):
            rows = slice(start, min(start + size, total))
            out = sample(guided, solver, grid, x[rows], take_rows(cond, rows, total), Gaussian(g))
            outs.append(out.x)
            nfe += out.nfe
    latents = torch.cat(outs)
    return PipelineSample(latents, decode(pipe, latents).clamp(-1, 1), nfe, grid)


def invert_pipeline(pipe, method, image: torch.Tensor, prompt: str, steps: int, seed: int):
    """(inverted state, reconstruction image): ``method`` (an EditMethod) inverts the VAE latents of ``image``
    (1, 3, H, W) in [-1, 1] under ``prompt`` on condiff's grid for the pipeline schedule."""
    x0 = encode(pipe, image)
    cond = pipe.condition([prompt])
    grid = make_grid(pipe.schedule, steps)
    state = method.invert(pipe.denoiser, grid, x0, cond, torch.Generator().manual_seed(seed))
    with torch.no_grad():
        recon = method.reconstruct(pipe.denoiser, state, cond, torch.Generator().manual_seed(seed))
    return state, decode(pipe, recon).clamp(-1, 1)


def edit_pipeline(pipe, method, state, prompt: str, seed: int, reconstruct: bool = False) -> torch.Tensor:
    """The edit: the inverted ``state`` sampled under ``prompt``, decoded (``reconstruct``: the method's
    reconstruction under the source prompt instead)."""
    fn = method.reconstruct if reconstruct else method.sample
    with torch.no_grad():
        z = fn(pipe.denoiser, state, pipe.condition([prompt]), torch.Generator().manual_seed(seed))
    return decode(pipe, z).clamp(-1, 1)
