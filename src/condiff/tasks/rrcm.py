"""rRCM: a robust representation consistency model for randomized smoothing (Lei et al., ICLR 2025, "Robust
Representation Consistency Model via Contrastive Denoising").

rRCM replaces the diffusion denoiser in front of the base classifier (denoised smoothing, DensePure) with one
network evaluation of an encoder trained on points of the diffusion trajectory, so a smoothed prediction costs one
forward of a small network instead of a diffusion-model call (or K reverse runs) per noise draw.

Pre-training (contrastive denoising, sec. 3). For a clean image x0, one noise eps and two adjacent times
t_n < t_{n+1} of an N-point grid, the points x_{t_n} = alpha(t_n) x0 + sigma(t_n) eps and x_{t_{n+1}} lie on the
same trajectory. The online encoder's representation q = h_theta(x_{t_{n+1}}, t_{n+1}) is pulled towards the EMA
target's k = h_{theta^-}(x_{t_n}, t_n) of the same image and pushed from the targets of the other images in the
batch (InfoNCE at temperature tau, the paper's contrastive term in representation space), and kept consistent with
the target's representation of the clean endpoint k0 = h_{theta^-}(x0, t_min) (the consistency term, here
1 - cos(q, k0)):

    L = InfoNCE(q, k; tau) + lambda_c (1 - cos(q, k0)),    theta^- <- mu theta^- + (1 - mu) theta after each step.

Fine-tuning (sec. 3): the encoder and a linear head learn labels on the smoothing draws themselves, mapped onto the
trajectory: for the smoothing noise sigma (classifier units) the draw x + delta, delta ~ N(0, sigma^2 I), is the
forward-process point x_{t*} = alpha(t*) (scale (x + delta) + shift) with sigma(t*) / alpha(t*) = scale sigma
(``condiff.tasks.smoothing.smoothing_time``), and the loss is the cross-entropy of head(h(x_{t*}, t*)). The same
map feeds the trained network at certification (``OneStepClassifier``): one network evaluation per draw.

Cohen et al.'s Gaussian-augmentation classifier is the same fine-tuning without the pre-training (the baseline).
Everything takes objects: a schedule, ``nn.Module`` networks with ``represent(x_t, t)`` (pre-training) and
``forward(x_t, t) -> logits`` (fine-tuning, certification).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from condiff.core.denoiser import diffuse
from condiff.errors import ConfigError, check_int, check_real
from condiff.tasks.smoothing import smoothing_time, to_forward_process


def adjacent_times(schedule, n: int, grid: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """(t_lo, t_hi), n pairs of adjacent times t_k < t_{k+1} of the uniform grid of ``grid`` + 1 times on
    [t_min, t_max] (k uniform in 0..grid-1), float64."""
    n = check_int("n", n, lo=1)
    grid = check_int("grid", grid, lo=1)
    times = torch.linspace(float(schedule.t_min), float(schedule.t_max), grid + 1, dtype=torch.float64)
    k = torch.randint(0, grid, (n,), generator=generator)
    return times[k], times[k + 1]


def info_nce(query: Tensor, keys: Tensor, temperature: float) -> Tensor:
    """Per-row InfoNCE: row i's positive is keys[i], the other rows' keys are its negatives (cosine similarities
    over ``temperature``)."""
    temperature = check_real("temperature", temperature, 0.0, lo_open=True, accepted="a finite number > 0")
    if query.shape != keys.shape or query.dim() != 2:
        raise ConfigError(
            f"query and keys must be (B, D) of one shape, got {tuple(query.shape)} and {tuple(keys.shape)}"
        )
    logits = F.normalize(query, dim=1) @ F.normalize(keys, dim=1).T / temperature
    return F.cross_entropy(logits, torch.arange(query.shape[0]), reduction="none")


def contrastive_denoising_loss(
    online: nn.Module,
    target: nn.Module,
    schedule,
    x0: Tensor,
    t_lo: Tensor,
    t_hi: Tensor,
    eps: Tensor,
    temperature: float = 0.2,
    consistency: float = 1.0,
) -> tuple[Tensor, dict]:
    """The pre-training loss per sample (InfoNCE between the online representation at t_hi and the target's at
    t_lo on the same trajectory, plus ``consistency`` x (1 - cos) to the target's clean-endpoint representation)
    and its two terms' means. The target is read without gradients."""
    consistency = check_real("consistency", consistency, 0.0, accepted="a finite number >= 0")
    q = online.represent(diffuse(schedule, x0, t_hi, eps), t_hi)
    with torch.no_grad():
        k = target.represent(diffuse(schedule, x0, t_lo, eps), t_lo)
        t0 = torch.full_like(t_lo, float(schedule.t_min))
        k0 = target.represent(x0, t0)
    contrast = info_nce(q, k, temperature)
    align = 1.0 - F.cosine_similarity(q, k0, dim=1)
    return contrast + consistency * align, {"contrastive": contrast.mean().item(), "consistency": align.mean().item()}


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, decay: float) -> None:
    """theta^- <- decay theta^- + (1 - decay) theta, parameter by parameter (buffers copied)."""
    decay = check_real("decay", decay, 0.0, 1.0, accepted="a number in [0, 1]")
    for p_t, p in zip(target.parameters(), online.parameters(), strict=True):
        p_t.lerp_(p.detach(), 1.0 - decay)
    for b_t, b in zip(target.buffers(), online.buffers(), strict=True):
        b_t.copy_(b)


def smoothing_point(
    schedule,
    x_noisy: Tensor,
    sigma: float,
    scale: float = 1.0,
    shift: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """(x_{t*}, t*) for smoothing draws ``x_noisy`` = x + delta at noise ``sigma`` (classifier units): the
    forward-process point the encoder reads, and t* per row (float64)."""
    t_star = smoothing_time(schedule, sigma, scale)
    x_t = to_forward_process(schedule, x_noisy, t_star, scale, shift)
    return x_t, torch.full((x_noisy.shape[0],), t_star, dtype=torch.float64)


def noisy_label_loss(
    net: nn.Module,
    schedule,
    x: Tensor,
    labels: Tensor,
    sigma: float,
    generator: torch.Generator | None = None,
    scale: float = 1.0,
    shift: float = 0.0,
) -> Tensor:
    """Per-sample cross-entropy of ``net`` on fresh smoothing draws of the clean ``x`` (classifier units):
    the fine-tuning loss (and, alone from the start, Cohen et al.'s Gaussian-augmentation training)."""
    delta = torch.randn(x.shape, generator=generator, dtype=x.dtype) * sigma
    x_t, t = smoothing_point(schedule, x + delta, sigma, scale, shift)
    return F.cross_entropy(net(x_t, t), labels, reduction="none")


@dataclass(frozen=True)
class OneStepClassifier:
    """The smoothing base classifier of rRCM (and of a Gaussian-augmentation classifier): labels (N,) of draws
    x + delta (classifier units) from one evaluation of ``net`` at (x_{t*}, t*), for ``smoothing.certify``."""

    net: nn.Module
    schedule: object
    sigma: float
    scale: float = 1.0
    shift: float = 0.0

    @torch.no_grad()
    def __call__(self, x_noisy: Tensor) -> Tensor:
        x_t, t = smoothing_point(self.schedule, x_noisy, self.sigma, self.scale, self.shift)
        return self.net(x_t, t).argmax(1)
