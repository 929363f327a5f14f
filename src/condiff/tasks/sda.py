"""SDA: diffusion-driven test-time adaptation via Synthetic-Domain Alignment (Guo et al., CVPR 2025).

- The projection (DDA / DiffPure style): diffuse a test image to t*, x_t* = alpha(t*) x + sigma(t*) eps, then denoise
  it back to the clean time with an unconditional source-domain Denoiser and a condiff solver (``project``). This
  maps target images into a "synthetic domain".
- Stage 1, offline: synthesise labelled source-like images with a class-conditional Denoiser (``synthesize``), pass
  them through the *same* projection (Mix of Diffusion, MoD: ``mix_of_diffusion``), and fine-tune the source
  classifier on the results with cross-entropy (``finetune``).
- Stage 2: project the test image and classify it with the fine-tuned classifier, ensembled with the source
  classifier's prediction on the original input (``predict``).

Everything takes objects: Denoisers (``D(x, t, cond) -> x0`` with ``.schedule``), a solver, an ``nn.Module``
classifier (logits), tensors. The classifier given to ``finetune`` is never modified: a fine-tuned copy is returned.
The projection's t* and steps follow DDA in the paper (not retrieved); they are arguments here.

Structure guidance (DDA: Gao et al., "Back to the Source: Diffusion-Driven Adaptation to Test-Time Corruption",
CVPR 2023, Sec. 3.2, eq. 6; ILVR, Choi et al. 2021, is the related replacement step): with ``structure_factor`` D
and ``structure_weight`` w, every solver step from x_t to x_next is followed by

    x_next <- x_next - w * grad_{x_t} sum_i || phi_D(x_in,i) - phi_D(x0_hat(x_t)_i) ||_2,

phi_D = average-pool by D then nearest upsample by D (a low-pass filter), x_in the image being projected and
x0_hat(x_t) the denoiser's clean estimate at that step. DDA's code takes one norm over the whole batch; here each
image has its own norm (the sum), so an image's projection does not depend on the rest of its batch. The same
guided projection is used on the synthetic images (MoD) and at test time. w = 0 (or D None) is the plain projection.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from condiff.core.denoiser import check_batch, diffuse, start_trajectory
from condiff.core.grids import UniformT, make_grid
from condiff.core.sampling import CountingDenoiser, Gaussian, NoiseSource, all_finite, sample
from condiff.core.schedules import grid_times
from condiff.errors import ConfigError, NonFiniteError, check_int, check_real
from condiff.solvers.ddim import DDIM


@dataclass(frozen=True)
class Projection:
    """The noise -> denoise projection: diffuse to ``t_star`` (a time of the denoiser's schedule), then ``steps``
    solver steps back to the clean time."""

    t_star: float
    steps: int = 10
    solver: Any = field(default_factory=DDIM)
    spacing: Any = field(default_factory=UniformT)
    structure_factor: int | None = None
    structure_weight: float = 0.0

    def __post_init__(self):
        check_real("t_star", self.t_star)
        check_int("steps", self.steps, lo=1)
        if self.structure_factor is not None:
            check_int("structure_factor", self.structure_factor, lo=1)
        check_real("structure_weight", self.structure_weight, lo=0.0)
        if not callable(getattr(self.solver, "step", None)):
            raise ConfigError(f"solver must be a condiff solver object, got {self.solver!r}")


def _schedule(denoiser, what: str):
    schedule = getattr(denoiser, "schedule", None)
    if schedule is None:
        raise ConfigError(f"{what} must be a condiff Denoiser with a .schedule, got {type(denoiser).__name__}")
    return schedule


def project(
    denoiser,
    x: torch.Tensor,
    projection: Projection,
    noise: NoiseSource | None = None,
    cond: Mapping[str, Any] | None = None,
) -> torch.Tensor:
    """x_t* = alpha(t*) x + sigma(t*) eps with eps from ``noise``, then ``projection.solver`` from t* to clean on
    ``denoiser`` (unconditional: ``cond`` None by default)."""
    check_batch(x)
    schedule = _schedule(denoiser, "the projection's denoiser")
    noise = noise or Gaussian()
    grid = make_grid(schedule, projection.steps, projection.spacing, t_start=projection.t_star)
    x_t = diffuse(schedule, x, float(grid[0]), noise.sample(x))
    if projection.structure_factor is None or projection.structure_weight == 0:
        return sample(denoiser, projection.solver, grid, x_t, cond, noise).x
    return _guided(denoiser, projection, grid, x, x_t, cond, noise)


def low_pass(x: torch.Tensor, factor: int) -> torch.Tensor:
    """phi_D: average-pool the last two dimensions by ``factor`` and repeat each value back (nearest upsampling);
    both sizes must be multiples of ``factor``."""
    factor = check_int("structure_factor", factor, lo=1)
    h, w = x.shape[-2:]
    if h % factor or w % factor:
        raise ConfigError(f"structure_factor {factor} must divide the image size {h}x{w}")
    flat = x.reshape(-1, 1, h, w)
    low = nn.functional.avg_pool2d(flat, factor)
    return low.repeat_interleave(factor, -2).repeat_interleave(factor, -1).reshape(x.shape)


def _guided(denoiser, projection: Projection, grid, x_in, x_t, cond, noise) -> torch.Tensor:
    """DDA's structure-guided reverse process (eq. 6): each solver step, then x_next -= w grad_{x_t} of the per-image
    norm of phi_D(x_in) - phi_D(x0_hat(x_t))."""
    D = CountingDenoiser(start_trajectory(denoiser), cond)
    times = grid_times(D.schedule, torch.as_tensor(grid, dtype=torch.float64))
    state = projection.solver.init_state(grid)
    target = low_pass(x_in.detach(), projection.structure_factor)
    x = x_t.detach()
    for i in range(len(times) - 1):
        with torch.enable_grad():
            x_req = x.detach().requires_grad_(True)
            x_next, state = projection.solver.step(D, x_req, times[i], times[i + 1], state, noise)
            diff = (target - low_pass(D.last, projection.structure_factor)).flatten(1)
            norm = diff.norm(dim=1).sum()
            (grad,) = torch.autograd.grad(norm, x_req)
        x = (x_next - projection.structure_weight * grad).detach()
        if not all_finite(x):
            raise NonFiniteError(f"non-finite values in the structure-guided projection after step {i}")
    return x


def _labels(labels) -> torch.Tensor:
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.numel() == 0:
        raise ConfigError("labels must be a non-empty 1-D tensor of class indices")
    if labels.is_floating_point() or labels.dtype == torch.bool or labels.is_complex():
        raise ConfigError(f"labels must be an integer tensor, got {labels.dtype}")
    return labels.long()


def synthesize(
    cond_denoiser,
    labels: torch.Tensor,
    shape: tuple[int, ...],
    steps: int = 20,
    solver=None,
    noise: NoiseSource | None = None,
    label_key: str = "class_labels",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Class-conditional synthesis of source-like images: one sample per label from sigma(t_start) z, with
    ``cond = {label_key: labels}``; ``shape`` is one image's shape."""
    labels = _labels(labels)
    schedule = _schedule(cond_denoiser, "the class-conditional denoiser")
    steps = check_int("steps", steps, lo=1)
    if not isinstance(shape, (tuple, list)) or not all(isinstance(s, int) and s > 0 for s in shape):
        raise ConfigError(f"shape must be a tuple of positive ints (one image), got {shape!r}")
    noise = noise or Gaussian()
    grid = make_grid(schedule, steps)
    sigma = float(schedule.sigma(torch.tensor(float(grid[0]), dtype=torch.float64)))
    x = sigma * noise.sample(torch.empty((labels.numel(), *shape), dtype=dtype))
    return sample(cond_denoiser, solver or DDIM(), grid, x, {label_key: labels}, noise).x


def mix_of_diffusion(
    cond_denoiser,
    uncond_denoiser,
    labels: torch.Tensor,
    shape: tuple[int, ...],
    projection: Projection,
    steps: int = 20,
    noise: NoiseSource | None = None,
    label_key: str = "class_labels",
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SDA's stage-1 data: synthesise one image per label with ``cond_denoiser``, then project it with
    ``uncond_denoiser`` (the projection used at test time). Returns (images, labels)."""
    noise = noise or Gaussian()
    images = synthesize(cond_denoiser, labels, shape, steps, None, noise, label_key, dtype)
    return project(uncond_denoiser, images, projection, noise), _labels(labels)


def finetune(
    classifier: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    epochs: int = 20,
    lr: float = 1e-2,
    batch_size: int = 256,
    generator: torch.Generator | None = None,
) -> tuple[nn.Module, list[float]]:
    """A copy of ``classifier`` fine-tuned with cross-entropy (Adam) on (images, labels); ``classifier`` itself is
    untouched. Returns the copy (in eval mode) and the mean loss of each epoch."""
    if not isinstance(classifier, nn.Module):
        raise ConfigError(f"classifier must be an nn.Module, got {type(classifier).__name__}")
    check_batch(images, "images")
    labels = _labels(labels)
    if labels.numel() != images.shape[0]:
        raise ConfigError(f"labels has {labels.numel()} entries but images has {images.shape[0]} rows")
    epochs = check_int("epochs", epochs, lo=1)
    batch_size = check_int("batch_size", batch_size, lo=1)
    lr = check_real("lr", lr, 0.0, 1.0, lo_open=True)
    model = copy.deepcopy(classifier).train()
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("classifier has no trainable parameters")
    opt = torch.optim.Adam(params, lr=lr)
    n, history = images.shape[0], []
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator)
        total = 0.0
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            logits = model(images[idx])
            loss = nn.functional.cross_entropy(logits, labels[idx].to(logits.device))
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * idx.numel()
        history.append(total / n)
    return model.eval(), history


@torch.no_grad()
def predict(
    source: nn.Module,
    adapted: nn.Module,
    x: torch.Tensor,
    projected: torch.Tensor,
    ensemble: bool = True,
) -> torch.Tensor:
    """SDA's stage 2: class probabilities of the adapted classifier on the projected images, averaged with the source
    classifier's on the original images when ``ensemble``."""
    check_batch(x)
    if not isinstance(projected, torch.Tensor) or projected.shape != x.shape:
        raise ConfigError(
            f"projected must have x's shape {tuple(x.shape)}, got {getattr(projected, 'shape', projected)!r}"
        )
    p = adapted(projected).softmax(-1)
    return (p + source(x).softmax(-1)) / 2 if ensemble else p


def accuracy(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """The fraction of rows whose arg-max score is the label."""
    labels = _labels(labels)
    if scores.dim() != 2 or scores.shape[0] != labels.numel():
        raise ConfigError(f"scores must be (n, classes) with n = {labels.numel()}, got {tuple(scores.shape)}")
    return float((scores.argmax(-1).cpu() == labels.cpu()).double().mean())
