"""Training the noise-aware level classifier of minority guidance (Um, Lee, Ye, ICLR 2024, "Don't Play
Favorites: Minority Guidance for Diffusion Models", sec. 3.2): minority scores of the training samples, quantile
levels, and a classifier p_psi(l | x_t) trained with cross-entropy on x_t ~ q(x_t | x0), t uniform. The network
is any ``net(x, t01) -> (B, L)`` the caller builds; the guidance itself is ``condiff.guidance.minority``."""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from condiff.core.denoiser import diffuse
from condiff.core.schedules import unit_time
from condiff.errors import ConfigError
from condiff.guidance.minority import MinorityClassifier, minority_score, quantile_levels, squared_error
from condiff.training.objectives import UniformTime


def level_loss(net, schedule, x0: torch.Tensor, labels: torch.Tensor, generator) -> torch.Tensor:
    """Per-sample cross-entropy of ``net(x_t, unit_time(t))`` against the level labels, x_t ~ q(x_t | x0),
    t uniform on the schedule's range."""
    t = UniformTime().sample(schedule, x0.shape[0], generator)
    eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
    logits = net(diffuse(schedule, x0, t, eps), unit_time(t, schedule.t_min, schedule.t_max))
    return F.cross_entropy(logits, labels, reduction="none")


def train_level_classifier(
    net,
    schedule,
    x0: torch.Tensor,
    labels: torch.Tensor,
    steps: int = 1000,
    batch_size: int = 128,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    generator: torch.Generator | None = None,
    progress=None,
) -> list[float]:
    """Train ``net(x, unit_time(t)) -> (B, L)`` in place with AdamW on random batches of (x0, labels) (``level_loss``),
    a cosine learning-rate decay to lr/10. Returns the loss of every step. ``progress(step, loss)`` is called
    after each step when given."""
    for name, v in (("steps", steps), ("batch_size", batch_size)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ConfigError(f"minority classifier {name} must be a positive integer, got {v!r}")
    if labels.shape != (x0.shape[0],):
        raise ConfigError(f"need one level label per sample: x0 has {x0.shape[0]} rows, labels {tuple(labels.shape)}")
    g = generator or torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    net.train()
    losses = []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        idx = torch.randint(x0.shape[0], (min(batch_size, x0.shape[0]),), generator=g)
        loss = level_loss(net, schedule, x0[idx], labels[idx], g).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if progress is not None:
            progress(step, losses[-1])
    net.eval()
    return losses


def level_accuracy(net, schedule, x0: torch.Tensor, labels: torch.Tensor, t: float, generator=None) -> dict:
    """Accuracy of the level classifier at time t (t = schedule.t_min: almost clean) on (x0, labels): overall
    and per true level (a list; NaN where a level has no sample)."""
    tt = torch.full((x0.shape[0],), float(t), dtype=torch.float64)
    eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
    with torch.no_grad():
        logits = net(diffuse(schedule, x0, tt, eps), unit_time(tt, schedule.t_min, schedule.t_max))
    pred = logits.argmax(1)
    per = [
        float((pred[labels == k] == k).float().mean()) if bool((labels == k).any()) else float("nan")
        for k in range(logits.shape[1])
    ]
    return {"accuracy": float((pred == labels).float().mean()), "per_level": per}


def fit_minority_classifier(
    denoiser,
    x0: torch.Tensor,
    levels: int,
    t: float,
    n: int = 5,
    cond=None,
    steps: int = 1000,
    batch_size: int = 128,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    generator: torch.Generator | None = None,
    net=None,
    distance: Callable = squared_error,
    progress=None,
    score_batch_size: int | None = None,
    holdout: float = 0.05,
) -> tuple[MinorityClassifier, torch.Tensor, torch.Tensor]:
    """The whole fit on training samples ``x0``: minority scores at (t, n) with ``cond`` (the empty prompt for
    an unconditional model; cond tensors with one row per sample), quantile levels over all samples, then a
    noise-aware level classifier trained on all but a random ``holdout`` fraction (the paper's 5% validation
    split), whose accuracy on the held-out samples (almost clean, t_min, and at the score's t) goes to ``info``.
    ``net`` is the noise-aware classifier to train in place, ``net(x_t, t01) -> (B, L)`` with t01 in [0, 1]
    (for example ``condiff.nets.AttributeClassifier(heads={"level": L}, noise_aware=True)``).
    Returns (the MinorityClassifier, the scores, the boolean held-out mask)."""
    if not 0 <= holdout < 1:
        raise ConfigError(f"holdout must be a fraction in [0, 1), got {holdout!r}")
    g = generator or torch.Generator().manual_seed(0)
    scores = minority_score(denoiser, x0, t, n, g, distance, cond, score_batch_size)
    thresholds, labels = quantile_levels(scores, levels)
    held = torch.zeros(x0.shape[0], dtype=torch.bool)
    held[torch.randperm(x0.shape[0], generator=g)[: int(round(holdout * x0.shape[0]))]] = True
    if not callable(net):
        raise ConfigError(f"the minority level classifier must be a network net(x, t01) -> (B, {levels}), got {net!r}")
    sch = denoiser.schedule
    losses = train_level_classifier(
        net, sch, x0[~held], labels[~held], steps, batch_size, lr, weight_decay, g, progress
    )
    info = {
        "train_loss_first100": sum(losses[:100]) / len(losses[:100]),
        "train_loss_last100": sum(losses[-100:]) / len(losses[-100:]),
        "steps": steps,
        "train_samples": int((~held).sum()),
        "heldout_samples": int(held.sum()),
    }
    if bool(held.any()):
        info["heldout_accuracy"] = {
            f"t={tt:g}": level_accuracy(net, sch, x0[held], labels[held], tt, g) for tt in (float(sch.t_min), float(t))
        }
    return MinorityClassifier(net, thresholds, float(t), n, info, (float(sch.t_min), float(sch.t_max))), scores, held
