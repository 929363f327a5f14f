"""diffusers' schedulers as peers: the same eps model, the same trailing grid, diffusers' own update rules.

Every peer is built from one VP-discrete table (``trained_betas`` derived from condiff's float64
``alphas_cumprod``) with ``timestep_spacing="trailing"`` (DPMSolverSinglestep, which has no such option, gets
the same timesteps explicitly) and a final step into sigma = 0 (UniPC bh1: to the smallest training sigma, see
PEERS), so for N steps all of them visit the timesteps ``round(1000 - k 1000/N) - 1`` (k = 0..N-1) that
``trailing_grid`` gives condiff.
``run_peer`` drives a scheduler in diffusers' pipeline pattern (scale_model_input, model, step). The Karras
(Euler, Heun) schedulers live on x / alpha; the driver converts at both ends, so every peer starts from the
same VP sample x_T and returns a sample at sigma = 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from condiff.errors import ConfigError


@dataclass(frozen=True)
class Peer:
    """A diffusers scheduler class with its keyword arguments; ``evals`` model calls per step."""

    label: str
    cls_name: str
    kwargs: dict = field(default_factory=dict)
    evals: int = 1
    custom_timesteps: bool = False  # no timestep_spacing option: the trailing timesteps are passed explicitly

    def make(self, betas: torch.Tensor):
        import diffusers

        cls = getattr(diffusers, self.cls_name)
        spacing = {} if self.custom_timesteps else {"timestep_spacing": "trailing"}
        return cls(num_train_timesteps=betas.numel(), trained_betas=betas.tolist(), **spacing, **self.kwargs)

    def steps_for_nfe(self, nfe: int) -> int:
        """Steps whose NFE is at most ``nfe`` (Heun: 2N - 1, the last step is Euler)."""
        return nfe if self.evals == 1 else (nfe + 1) // 2


_MS = dict(algorithm_type="dpmsolver++", final_sigmas_type="zero", lower_order_final=True)
PEERS = (
    Peer("ddim", "DDIMScheduler", dict(set_alpha_to_one=True, clip_sample=False)),
    Peer("dpmpp-2m", "DPMSolverMultistepScheduler", dict(solver_order=2, **_MS)),
    Peer("dpmpp-3m", "DPMSolverMultistepScheduler", dict(solver_order=3, **_MS)),
    Peer("dpmpp-2s", "DPMSolverSinglestepScheduler", dict(solver_order=2, **_MS), custom_timesteps=True),
    # bh1 with final_sigmas_type="zero" returns NaN in diffusers (B(h) = -h is infinite on the step to sigma = 0),
    # so its bh1 peers stop at the smallest training sigma, as diffusers' default final_sigmas_type does.
    Peer(
        "unipc-bh1", "UniPCMultistepScheduler", dict(solver_type="bh1", solver_order=2, final_sigmas_type="sigma_min")
    ),
    Peer("unipc-bh2", "UniPCMultistepScheduler", dict(solver_type="bh2", solver_order=2, final_sigmas_type="zero")),
    Peer(
        "unipc-bh1-3", "UniPCMultistepScheduler", dict(solver_type="bh1", solver_order=3, final_sigmas_type="sigma_min")
    ),
    Peer("unipc-bh2-3", "UniPCMultistepScheduler", dict(solver_type="bh2", solver_order=3, final_sigmas_type="zero")),
    Peer("euler", "EulerDiscreteScheduler", dict(final_sigmas_type="zero")),
    Peer("heun", "HeunDiscreteScheduler", {}, evals=2),
)


def betas_from_alphas_cumprod(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    ac = alphas_cumprod.double()
    prev = torch.cat([torch.ones(1, dtype=ac.dtype), ac[:-1]])
    return 1.0 - ac / prev


def trailing_grid(num_train: int, steps: int) -> torch.Tensor:
    """diffusers' trailing timesteps for ``steps`` steps, then condiff's clean point t = -1 (float64)."""
    if not 1 <= steps <= num_train:
        raise ConfigError(f"steps must be in [1, {num_train}] for a {num_train}-step table, got {steps}")
    ts = torch.round(torch.arange(num_train, 0, -num_train / steps, dtype=torch.float64)) - 1.0
    return torch.cat([ts, torch.tensor([-1.0], dtype=torch.float64)])


def run_peer(
    peer: Peer, scheduler, eps_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x_T: torch.Tensor, steps: int
) -> tuple[torch.Tensor, int]:
    """Sample with a diffusers scheduler from the VP sample ``x_T``; returns (x at sigma = 0, NFE).

    ``eps_fn(x_vp, t)`` is the (guided) eps model at a float timestep; the Karras schedulers' scaled model
    input ``x / sqrt(sigma^2 + 1)`` is exactly the VP sample."""
    if peer.custom_timesteps:
        num_train = len(scheduler.alphas_cumprod)
        scheduler.set_timesteps(timesteps=trailing_grid(num_train, steps)[:-1].long().tolist())
    else:
        scheduler.set_timesteps(steps)
    karras = hasattr(scheduler, "sigmas") and float(getattr(scheduler, "init_noise_sigma", 1.0)) > 1.0
    x = x_T * (1.0 + float(scheduler.sigmas[0]) ** 2) ** 0.5 if karras else x_T
    nfe = 0
    for t in scheduler.timesteps:
        inp = scheduler.scale_model_input(x, t)
        eps = eps_fn(inp, t.to(torch.float64))
        nfe += 1
        x = scheduler.step(eps, t, x).prev_sample
    return x, nfe
