"""diffusers interop: diffusers networks and local pipeline folders as condiff parts (docs/diffusers.md).

- ``schedule``: scheduler config -> VP-discrete schedule, prediction type and time grid;
- ``denoiser``: ``wrap_diffusers(model, scheduler)``, a UNet / DiT as a condiff Denoiser;
- ``pipeline``: ``load_pipeline(DIR)``, an offline pipeline folder with text or class conditioning;
- ``latents``: diffusers' initial latents and the VAE around condiff's solvers;
- ``run``: sampling, inversion and editing of a pipeline (the CLI's ``--pipeline``);
- ``export``: a condiff model (the bundled shapes model) written as a diffusers folder;
- ``tiny``: tiny random pipelines for tests and benchmarks.
"""

from condiff.interop.denoiser import DiffusersCall, wrap_diffusers
from condiff.interop.latents import decode, encode, initial_latents, latent_shape
from condiff.interop.pipeline import DiffusersPipeline, load_pipeline
from condiff.interop.schedule import final_time, grid_from_scheduler, prediction_from_config, schedule_from_scheduler

__all__ = [
    "DiffusersCall",
    "wrap_diffusers",
    "decode",
    "encode",
    "initial_latents",
    "latent_shape",
    "DiffusersPipeline",
    "load_pipeline",
    "final_time",
    "grid_from_scheduler",
    "prediction_from_config",
    "schedule_from_scheduler",
]
