"""Latent diffusion around condiff's solvers: the initial latents, and the VAE on both sides
(Rombach et al. 2022, sec. 3: z = scaling_factor * E(x), x = D(z / scaling_factor)).

``initial_latents`` draws exactly what diffusers' ``prepare_latents`` draws for the same CPU generator: one
``torch.randn`` of shape (batch, C, H / f, W / f) in float32, times the scheduler's ``init_noise_sigma``, so a
condiff run and a diffusers run with the same seed start from the same tensor, image for image.
"""

from __future__ import annotations

import torch

from condiff.errors import ConfigError


def latent_shape(pipe, batch: int, height: int, width: int) -> tuple[int, int, int, int]:
    """(batch, C, H / f, W / f); H and W must be multiples of the VAE factor f (and give an even latent
    grid for patch-based transformers)."""
    f = pipe.vae_scale_factor
    patch = int(pipe.network.config.get("patch_size") or 1)
    step = f * patch
    for name, v in (("--height", height), ("--width", width)):
        if isinstance(v, bool) or not isinstance(v, int) or v < step or v % step:
            raise ConfigError(
                f"{name} must be a positive multiple of {step} for this pipeline "
                f"(VAE factor {f}{f' x patch {patch}' if patch > 1 else ''}), got {v!r}"
            )
    return (batch, pipe.latent_channels, height // f, width // f)


def default_size(pipe) -> int:
    """The image size the network was configured for: sample_size * VAE factor."""
    size = pipe.network.config.get("sample_size") or 64
    size = size[0] if isinstance(size, (list, tuple)) else size
    return int(size) * pipe.vae_scale_factor


def initial_latents(
    pipe,
    batch: int,
    height: int,
    width: int,
    generator: torch.Generator | None,
    dtype: torch.dtype = torch.float32,
    steps: int | None = None,
) -> torch.Tensor:
    """diffusers' ``prepare_latents``: randn(shape, generator) * init_noise_sigma (module docstring).

    With ``steps`` (the scheduler set up for that many steps, as the pipeline does before drawing) the result
    is what the network sees at the first step, ``scale_model_input(latents, t_0)``: the VP-space sample
    condiff's solvers integrate. It is the same tensor for DDPM/DDIM/DPM-Solver/UniPC (init_noise_sigma 1, no
    input scaling); for the Karras-form schedulers (Euler, Heun, LMS, ...: latents = x / alpha) it divides by
    sqrt(sigma_0^2 + 1)."""
    shape = latent_shape(pipe, batch, height, width)
    z = torch.randn(shape, generator=generator, dtype=dtype)
    if steps is None:
        return z * float(getattr(pipe.scheduler, "init_noise_sigma", 1.0))
    sched = type(pipe.scheduler).from_config(pipe.scheduler.config)
    sched.set_timesteps(steps)
    z = z * sched.init_noise_sigma
    return sched.scale_model_input(z, sched.timesteps[0])


def _factors(vae) -> tuple[float, float]:
    cfg = vae.config
    return float(cfg.get("scaling_factor", 1.0) or 1.0), float(cfg.get("shift_factor", 0.0) or 0.0)


def decode(pipe, latents: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] from latents (identity for a pixel-space pipeline)."""
    if pipe.vae is None:
        return latents
    scale, shift = _factors(pipe.vae)
    with torch.no_grad():
        return pipe.vae.decode(latents / scale + shift, return_dict=False)[0]


def encode(pipe, images: torch.Tensor) -> torch.Tensor:
    """Latents of images in [-1, 1]: the posterior mode times scaling_factor (deterministic)."""
    if pipe.vae is None:
        return images
    scale, shift = _factors(pipe.vae)
    with torch.no_grad():
        return (pipe.vae.encode(images).latent_dist.mode() - shift) * scale
