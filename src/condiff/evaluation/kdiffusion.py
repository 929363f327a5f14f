"""k-diffusion's samplers as peers (Crowson's k-diffusion, its ``sampling`` module), driving a condiff denoiser.

k-diffusion samples in the parametrisation of Karras et al. 2022 (EDM, eq. 1 with s(t) = 1): x = x0 + sigma n,
and calls a model ``D(x, sigma) -> x0``. A VP sample x_vp at time t is x = x_vp / alpha(t) with sigma =
sigma(t) / alpha(t), so a condiff VP denoiser gives k-diffusion's model as

    D(x, sigma) = D_vp(x / sqrt(1 + sigma^2), t(sigma)),   t(sigma): the schedule's time at log-SNR -2 log sigma.

Every peer starts from the same VP sample x_T (scaled by 1 / alpha(t_start)) and ends at sigma = 0, where x is
the clean sample in both parametrisations. ``sigmas_of`` turns a condiff grid (diffusers' trailing timesteps in
``condiff bench solvers``) into k-diffusion's sigmas; ``karras_sigmas`` is k-diffusion's own schedule
(rho = 7), which its users pick.

Loading: the package's ``__init__`` imports its training stack (torchvision, kornia, wandb, clip), which condiff
does not install, so ``sampling_module`` loads the ``sampling`` module alone and gives it a ``utils`` module
holding the one helper it uses (``append_dims``). Install the peer with
``pip install --no-deps -r requirements-peers.txt`` (``make venv`` does).
"""

from __future__ import annotations

import importlib.util
import math
import sys
import types
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable

import torch

from condiff.errors import ConfigError

F64 = torch.float64
INSTALL = "pip install --no-deps -r requirements-peers.txt"


def _append_dims(x: torch.Tensor, target_dims: int) -> torch.Tensor:
    """x with trailing singleton dimensions up to ``target_dims`` (what k-diffusion's utils.append_dims does)."""
    missing = target_dims - x.ndim
    if missing < 0:
        raise ValueError(f"input has {x.ndim} dims but target_dims is {target_dims}, which is less")
    return x[(...,) + (None,) * missing]


@lru_cache(maxsize=1)
def sampling_module() -> types.ModuleType:
    """k-diffusion's ``sampling`` module, loaded without the package's ``__init__`` (see the module docstring)."""
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"the k-diffusion peer is not installed; install it with: {INSTALL}")
    root = list(spec.submodule_search_locations)[0]
    name = "condiff_peer_k_diffusion"  # a private package name: a real `import k_diffusion` stays untouched
    pkg = types.ModuleType(name)
    pkg.__path__ = [root]
    utils = types.ModuleType(f"{name}.utils")
    utils.append_dims = _append_dims
    pkg.utils = utils
    sys.modules[name], sys.modules[f"{name}.utils"] = pkg, utils
    sspec = importlib.util.spec_from_file_location(f"{name}.sampling", f"{root}/sampling.py")
    mod = importlib.util.module_from_spec(sspec)
    sys.modules[f"{name}.sampling"] = mod
    try:
        sspec.loader.exec_module(mod)
    except ImportError as e:  # torchsde / torchdiffeq missing
        raise ConfigError(f"the k-diffusion peer cannot load ({e}); install it with: {INSTALL}") from None
    return mod


@dataclass(frozen=True)
class KPeer:
    """A k-diffusion sampler (``sample_<fn>``) with keyword arguments; ``evals`` model calls per step (the last
    step, into sigma = 0, is a single Euler evaluation for the two-evaluation samplers)."""

    label: str
    fn: str
    kwargs: dict = field(default_factory=dict)
    evals: int = 1

    def steps_for_nfe(self, nfe: int) -> int:
        return nfe if self.evals == 1 else (nfe + 1) // 2


KPEERS = (
    KPeer("k-euler", "euler"),
    KPeer("k-heun", "heun", evals=2),
    KPeer("k-dpm-2", "dpm_2", evals=2),
    KPeer("k-lms", "lms"),
    KPeer("k-dpmpp-2s", "dpmpp_2s_ancestral", {"eta": 0.0}, evals=2),  # eta = 0: the deterministic 2S
    KPeer("k-dpmpp-2m", "dpmpp_2m"),
)


def sigmas_of(schedule, grid) -> torch.Tensor:
    """k-diffusion's sigmas (sigma / alpha, float64) of a condiff grid whose last point is the clean time."""
    g = torch.as_tensor(grid, dtype=F64)
    noisy = torch.stack([torch.as_tensor(schedule.sigma_over_alpha(t), dtype=F64).reshape(()) for t in g[:-1]])
    return torch.cat([noisy, torch.zeros(1, dtype=F64)])


def karras_sigmas(schedule, steps: int, t_start: float | None = None) -> torch.Tensor:
    """k-diffusion's Karras schedule (rho = 7) from sigma(t_start) (default: the schedule's t_max) to
    sigma(t_min), then 0."""
    t_start = schedule.t_max if t_start is None else t_start
    hi = float(schedule.sigma_over_alpha(t_start))
    lo = float(schedule.sigma_over_alpha(schedule.t_min))
    return sampling_module().get_sigmas_karras(steps, lo, hi, rho=7.0).to(F64)


def run_kpeer(
    peer: KPeer,
    schedule,
    x0_fn: Callable[[torch.Tensor, float], torch.Tensor],
    x_T: torch.Tensor,
    sigmas: torch.Tensor,
) -> tuple[torch.Tensor, int]:
    """Sample with k-diffusion's ``peer`` over ``sigmas`` (descending, last 0) from the VP sample ``x_T`` at
    sigma = sigmas[0]; ``x0_fn(x_vp, t)`` is the (guided) x0 prediction. Returns (the clean sample, NFE)."""
    fn = getattr(sampling_module(), f"sample_{peer.fn}")
    nfe = 0

    def model(x, sigma):
        nonlocal nfe
        nfe += 1
        s = float(sigma.reshape(-1)[0])
        t = float(schedule.t_from_log_snr(torch.tensor(-2.0 * math.log(s), dtype=F64)))
        return x0_fn(x / (1.0 + s * s) ** 0.5, t).to(x.dtype)

    s0 = float(sigmas[0])
    x = x_T * (1.0 + s0 * s0) ** 0.5
    out = fn(model, x, sigmas.to(x.dtype), disable=True, **peer.kwargs)
    return out, nfe
