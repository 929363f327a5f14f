"""diffusers scheduler configs -> condiff schedule, prediction and time grid.

condiff's ``VPDiscrete`` time *is* diffusers' timestep (integer t reads the table; t = -1 is the clean point,
``set_alpha_to_one``), so a diffusers DDPM-family scheduler maps over without any time conversion:

- schedule: ``VPDiscrete(scheduler.alphas_cumprod)``, the scheduler's own float32 table (widened to float64),
  not a recomputation, so the noise levels agree bit for bit with what diffusers uses;
- prediction: ``prediction_type`` epsilon / v_prediction / sample -> ``Eps`` / ``V`` / ``X0``;
- grid: the timesteps that diffusers' ``set_timesteps`` gives (its spacing, ``steps_offset``), then the
  point the scheduler's last step lands on. DDIM (Song et al. 2021, eq. 12) ends at ``final_alpha_cumprod``:
  alpha_cumprod = 1 (t = -1) with ``set_alpha_to_one``, else ``alphas_cumprod[0]`` (t = 0, what Stable
  Diffusion's config asks for). DPM-Solver(++) ends at sigma = 0 (t = -1) with ``final_sigmas_type='zero'``,
  else at the smallest training sigma (t = 0).
"""

from __future__ import annotations

import torch

from condiff.core.denoiser import X0, Eps, Prediction, V
from condiff.core.schedules import VPDiscrete
from condiff.errors import ConfigError, one_of

PREDICTION_TYPES = {"epsilon": Eps(), "v_prediction": V(), "sample": X0()}


def schedule_from_scheduler(scheduler) -> VPDiscrete:
    """The VP-discrete schedule of a diffusers DDPM-family scheduler (one that has ``alphas_cumprod``)."""
    table = getattr(scheduler, "alphas_cumprod", None)
    if table is None:
        raise ConfigError(
            f"scheduler {type(scheduler).__name__} has no alphas_cumprod table; condiff reads "
            f"DDPM-family schedulers (DDPM, DDIM, PNDM, DPMSolver*, UniPC, Euler, Heun, LMS)"
        )
    return VPDiscrete(alphas_cumprod=torch.as_tensor(table).double())


def prediction_from_config(config) -> Prediction:
    """The condiff Prediction for a scheduler config's ``prediction_type`` (default epsilon)."""
    kind = dict(config).get("prediction_type", "epsilon")
    if kind not in PREDICTION_TYPES:
        raise one_of("scheduler prediction_type", kind, PREDICTION_TYPES)
    return PREDICTION_TYPES[kind]


def final_time(scheduler) -> float:
    """Where the scheduler's last step lands, in condiff's VP-discrete time (-1: clean, 0: the first table entry)."""
    cfg = dict(scheduler.config)
    if "set_alpha_to_one" in cfg and type(scheduler).__name__ in (
        "DDIMScheduler",
        "DDIMInverseScheduler",
        "PNDMScheduler",
    ):
        return -1.0 if cfg["set_alpha_to_one"] else 0.0
    if cfg.get("final_sigmas_type", "zero") == "sigma_min":
        return 0.0
    return -1.0


def grid_from_scheduler(scheduler, steps: int) -> torch.Tensor:
    """condiff's descending float64 grid for ``steps`` steps of ``scheduler``: its timesteps, then
    ``final_time``. The scheduler passed in is not modified (a copy is set up)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= len(scheduler.alphas_cumprod):
        raise ConfigError(f"steps must be an integer in [1, {len(scheduler.alphas_cumprod)}], got {steps!r}")
    cfg = dict(scheduler.config)
    if cfg.get("use_karras_sigmas") or cfg.get("use_exponential_sigmas") or cfg.get("use_beta_sigmas"):
        raise ConfigError(
            "scheduler configs with use_karras/exponential/beta sigmas feed rounded timesteps to the "
            "network at non-table noise levels; use condiff's own spacing (--spacing karras) instead"
        )
    copy = type(scheduler).from_config(scheduler.config)
    copy.set_timesteps(steps)
    ts = torch.as_tensor(copy.timesteps).double()
    # Heun (2 evaluations a step) and PNDM's PLMS warm-up list a timestep twice in a row: keep each once
    ts = torch.unique_consecutive(ts)
    if ts.numel() != steps:
        raise ConfigError(
            f"{type(scheduler).__name__} gives {ts.numel()} distinct timesteps for {steps} steps; "
            f"condiff needs one grid point per step"
        )
    end = final_time(scheduler)
    if float(ts[-1]) <= end:  # e.g. linspace spacing ends at t = 0 and the final alpha is table[0]: no step left
        ts = ts[ts > end]
    return torch.cat([ts, torch.tensor([end], dtype=torch.float64)])
