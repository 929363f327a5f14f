"""Minority guidance (Um, Lee, Ye, ICLR 2024, "Don't Play Favorites: Minority Guidance for Diffusion Models",
arXiv 2301.12334; specs/sampling_guidance.md sec. 7).

1. Minority score (the paper's eq. 6, "Tweedie reconstruction loss"): for a clean sample x0 and one fixed
   perturbation time t,

       l(x0) = E_eps d(x0, x0_hat(alpha_t x0 + sigma_t eps, t)),      eps ~ N(0, I),

   estimated with ``n`` Monte-Carlo draws. x0_hat is Tweedie's E[x0 | x_t] (the denoiser). A sample the model
   reconstructs badly from a mild perturbation lies in a low-density region: large l = minority. The paper uses
   d = LPIPS(VGG); LPIPS needs pretrained VGG weights that cannot be fetched offline here, so condiff's default d
   is the squared error ||x0 - x0_hat||^2 (any callable d(a, b) -> (B,) can be passed).
2. Minority levels (sec. 3.2): L quantile bins of l over the training set, thresholds at the quantiles i/L
   (i = 1..L-1); label 0 = the most common samples, L-1 = the most minority.
3. Minority classifier p_psi(l | x_t): a noise-aware classifier over the L levels, trained with cross-entropy
   on x_t ~ q(x_t | x0), t uniform (as ADM's noisy classifier).
4. Guidance (eq. 8): grad log p~(x_t) = grad log p(x_t) + w grad_{x_t} log p_psi(l~ | x_t), i.e. classifier
   guidance (condiff.guidance.classifier) toward the target level l~ (default L-1) with scale w.

Defaults in the paper (LSUN-Bedrooms): t = 60 of 1000 steps, n = 5, L = 100, w = 3.5, l~ = L-1.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from condiff.core.denoiser import coefficients
from condiff.errors import ConfigError, InputFileError
from condiff.guidance.classifier import ClassifierGuidance, from_logits
from condiff.nets.classifier import unit_time
from condiff.guidance.cfg import _check_scale

LEVEL_KEY = "minority_level"
META_FILE = "minority.json"


def squared_error(x0: torch.Tensor, x0_hat: torch.Tensor) -> torch.Tensor:
    """d(a, b) = ||a - b||^2 per sample, shape (B,)."""
    return (x0 - x0_hat).pow(2).flatten(1).sum(1)


def minority_score(denoiser, x0: torch.Tensor, t: float, n: int = 5, generator: torch.Generator | None = None,
                   distance: Callable = squared_error, cond=None, batch_size: int | None = None) -> torch.Tensor:
    """l(x0) = mean over ``n`` draws of d(x0, D(alpha_t x0 + sigma_t eps, t, cond)), shape (B,) (module doc, 1).

    Runs without gradients; eps is drawn from ``generator`` in x0's dtype, one (B, ...) batch per draw (so the
    result does not depend on ``batch_size``, which only bounds the rows per denoiser call; cond tensors with B
    rows are split with x0)."""
    if batch_size is not None and batch_size < x0.shape[0]:
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
        from condiff.guidance.linear_ag import _rows

        b = x0.shape[0]
        chunks = list(torch.split(torch.arange(b), batch_size))

        def chunked(x, tt, c):
            return torch.cat([denoiser(x[i], tt, _rows(c, i, b)) for i in chunks])

        chunked.schedule = denoiser.schedule
        return minority_score(chunked, x0, t, n, generator, distance, cond)
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ConfigError(f"the minority score needs n >= 1 Monte-Carlo draws, got {n!r}")
    sch = denoiser.schedule
    if not (isinstance(t, (int, float)) and sch.t_min <= float(t) <= sch.t_max):
        raise ConfigError(f"the minority score's time t must be a number in [{sch.t_min}, {sch.t_max}], got {t!r}")
    a, s = coefficients(sch, float(t), x0)
    total = torch.zeros(x0.shape[0], dtype=torch.float64)
    with torch.no_grad():
        for _ in range(n):
            eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
            x0_hat = denoiser(a * x0 + s * eps, float(t), cond)
            total += distance(x0, x0_hat).double()
    return total / n


def assign_levels(scores: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """Level of each score: l such that thresholds[l-1] <= score < thresholds[l] (0..L-1, L = len + 1)."""
    return torch.bucketize(scores.double(), thresholds.double(), right=True)


def quantile_levels(scores: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(thresholds (L-1,), labels (B,)): thresholds at the quantiles i/L of ``scores``, labels 0 (most common)
    .. L-1 (most minority)."""
    if not isinstance(levels, int) or isinstance(levels, bool) or levels < 2:
        raise ConfigError(f"minority levels L must be an integer >= 2, got {levels!r}")
    scores = scores.double().reshape(-1)
    if scores.numel() < levels:
        raise ConfigError(f"{levels} minority levels need at least {levels} scores, got {scores.numel()}")
    thresholds = torch.quantile(scores, torch.arange(1, levels, dtype=torch.float64) / levels)
    return thresholds, assign_levels(scores, thresholds)


@dataclass
class MinorityClassifier:
    """A noise-aware level classifier with the score settings it was fitted with (``thresholds`` (L-1,), score
    time ``t``, ``n`` draws). Called as ``mc(x, t) -> (B, L)`` logits with the schedule's t; the net itself sees
    t mapped to [0, 1] over ``t_range`` (the schedule's (t_min, t_max); see ``unit_time``). ``info`` holds
    free-form metrics."""

    net: Any
    thresholds: torch.Tensor
    t: float
    n: int = 5
    info: dict = field(default_factory=dict)
    t_range: tuple = (0.0, 1.0)

    @property
    def levels(self) -> int:
        return int(self.thresholds.numel()) + 1

    def __call__(self, x, t):
        return self.net(x, unit_time(t, *self.t_range))

    def label(self, scores: torch.Tensor) -> torch.Tensor:
        return assign_levels(scores, self.thresholds)


def level_loss(net, schedule, x0: torch.Tensor, labels: torch.Tensor, generator) -> torch.Tensor:
    """Per-sample cross-entropy of ``net(x_t, unit_time(t))`` against the level labels, x_t ~ q(x_t | x0),
    t uniform on the schedule's range."""
    from condiff.models.shapes_classifier import noisy
    from condiff.training.objectives import UniformTime

    t = UniformTime().sample(schedule, x0.shape[0], generator)
    eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
    logits = net(noisy(schedule, x0, t, eps), unit_time(t, schedule.t_min, schedule.t_max))
    return F.cross_entropy(logits, labels, reduction="none")


def train_level_classifier(net, schedule, x0: torch.Tensor, labels: torch.Tensor, steps: int = 1000,
                           batch_size: int = 128, lr: float = 1e-3, weight_decay: float = 0.0,
                           generator: torch.Generator | None = None, progress=None) -> list[float]:
    """Train ``net(x, unit_time(t)) -> (B, L)`` in place with AdamW on random batches of (x0, labels) (``level_loss``),
    a cosine learning-rate decay to lr/10. Returns the loss of every step. ``progress(step, loss)`` is called
    after each step when given."""
    import math

    for name, v in (("steps", steps), ("batch_size", batch_size)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ConfigError(f"minority classifier {name} must be a positive integer, got {v!r}")
    if labels.shape != (x0.shape[0],):
        raise ConfigError(f"need one level label per sample: x0 has {x0.shape[0]} rows, labels "
                          f"{tuple(labels.shape)}")
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
    from condiff.models.shapes_classifier import noisy

    tt = torch.full((x0.shape[0],), float(t), dtype=torch.float64)
    eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
    with torch.no_grad():
        logits = net(noisy(schedule, x0, tt, eps), unit_time(tt, schedule.t_min, schedule.t_max))
    pred = logits.argmax(1)
    per = [float((pred[labels == k] == k).float().mean()) if bool((labels == k).any()) else float("nan")
           for k in range(logits.shape[1])]
    return {"accuracy": float((pred == labels).float().mean()), "per_level": per}


def fit_minority_classifier(denoiser, x0: torch.Tensor, levels: int, t: float, n: int = 5, cond=None,
                            steps: int = 1000, batch_size: int = 128, lr: float = 1e-3, weight_decay: float = 0.0,
                            generator: torch.Generator | None = None, net=None, distance: Callable = squared_error,
                            progress=None, score_batch_size: int | None = None, holdout: float = 0.05
                            ) -> tuple[MinorityClassifier, torch.Tensor, torch.Tensor]:
    """The whole fit on training samples ``x0``: minority scores at (t, n) with ``cond`` (the empty prompt for
    an unconditional model; cond tensors with one row per sample), quantile levels over all samples, then a
    noise-aware level classifier trained on all but a random ``holdout`` fraction (the paper's 5% validation
    split), whose accuracy on the held-out samples (almost clean, t_min, and at the score's t) goes to ``info``.
    ``net`` defaults to ``AttributeClassifier(heads={"level": L}, noise_aware=True)`` for the images' shape.
    Returns (the MinorityClassifier, the scores, the boolean held-out mask)."""
    if not 0 <= holdout < 1:
        raise ConfigError(f"holdout must be a fraction in [0, 1), got {holdout!r}")
    g = generator or torch.Generator().manual_seed(0)
    scores = minority_score(denoiser, x0, t, n, g, distance, cond, score_batch_size)
    thresholds, labels = quantile_levels(scores, levels)
    held = torch.zeros(x0.shape[0], dtype=torch.bool)
    held[torch.randperm(x0.shape[0], generator=g)[: int(round(holdout * x0.shape[0]))]] = True
    if net is None:
        from condiff.nets.classifier import AttributeClassifier

        net = AttributeClassifier(heads={"level": levels}, in_channels=x0.shape[1], noise_aware=True,
                                  sample_size=x0.shape[-1])
    sch = denoiser.schedule
    losses = train_level_classifier(net, sch, x0[~held], labels[~held], steps, batch_size, lr, weight_decay, g,
                                    progress)
    info = {"train_loss_first100": sum(losses[:100]) / len(losses[:100]),
            "train_loss_last100": sum(losses[-100:]) / len(losses[-100:]), "steps": steps,
            "train_samples": int((~held).sum()), "heldout_samples": int(held.sum())}
    if bool(held.any()):
        info["heldout_accuracy"] = {f"t={tt:g}": level_accuracy(net, sch, x0[held], labels[held], tt, g)
                                    for tt in (float(sch.t_min), float(t))}
    return MinorityClassifier(net, thresholds, float(t), n, info, (float(sch.t_min), float(sch.t_max))), scores, held


@dataclass
class MinorityGuidance:
    """Classifier guidance toward minority level ``level`` (default L-1, the most minority) with scale w
    (module doc, 4): x0 = x0_u + (sigma^2 / alpha) w grad_x log p_psi(level | x_t). ``classifier`` is a
    MinorityClassifier (or any ``logits(x, t)`` with ``levels`` given). The denoiser gets cond unchanged."""

    denoiser: Any
    classifier: Any
    scale: float | Callable = 1.0
    level: int | None = None
    levels: int | None = None

    def __post_init__(self):
        _check_scale(self.scale)
        if not callable(self.classifier):
            raise ConfigError(f"minority guidance needs a callable level classifier, got {self.classifier!r}")
        L = self.levels if self.levels is not None else getattr(self.classifier, "levels", None)
        if not isinstance(L, int) or L < 2:
            raise ConfigError(f"minority guidance needs the number of levels (>= 2), got {L!r}")
        level = L - 1 if self.level is None else self.level
        if not isinstance(level, int) or isinstance(level, bool) or not 0 <= level < L:
            raise ConfigError(f"minority level must be an integer in [0, {L - 1}], got {self.level!r}")
        self.level, self.levels = level, L
        target = from_logits(self.classifier, LEVEL_KEY)
        fixed = {LEVEL_KEY: level}
        self._guide = ClassifierGuidance(self.denoiser, lambda x, t, cond: target(x, t, fixed), self.scale, drop=())

    @property
    def schedule(self):
        return self.denoiser.schedule

    def __call__(self, x, t, cond=None):
        return self._guide(x, t, cond)


def save_minority(mc: MinorityClassifier, directory, tensors: dict | None = None) -> Path:
    """Write ``directory/classifier`` (the net's safetensors + config, via ``save_pretrained``),
    ``directory/minority.json`` (thresholds, t, n, levels, info) and, if given, ``tensors`` (e.g. the training
    scores) as ``directory/scores.safetensors``, atomically."""
    from condiff.core.files import atomic_dir, atomic_write_json, save_tensors

    if not hasattr(mc.net, "save_pretrained"):
        raise ConfigError(f"only a diffusers ModelMixin classifier can be saved, got {type(mc.net).__name__}")
    directory = Path(directory)
    with atomic_dir(directory) as tmp:
        mc.net.save_pretrained(tmp / "classifier")
        atomic_write_json(tmp / META_FILE, {
            "method": "minority guidance (Um, Lee, Ye, ICLR 2024)", "levels": mc.levels,
            "thresholds": [float(v) for v in mc.thresholds.double()], "t": mc.t, "n": mc.n,
            "t_range": [float(v) for v in mc.t_range],
            "distance": "squared_error", "info": mc.info})
        if tensors:
            save_tensors(tmp / "scores.safetensors", tensors)
    return directory


def load_minority(directory) -> MinorityClassifier:
    """Read what ``save_minority`` wrote (an AttributeClassifier and its thresholds)."""
    from condiff.core.files import load_json
    from condiff.models.base import load_pretrained
    from condiff.nets.classifier import AttributeClassifier

    directory = Path(directory)
    if not (directory / META_FILE).is_file():
        raise InputFileError(f"{str(directory)!r} is not a minority classifier directory (no {META_FILE})")
    meta = load_json(directory / META_FILE)
    try:
        thresholds = torch.tensor([float(v) for v in meta["thresholds"]], dtype=torch.float64)
        t, n = float(meta["t"]), int(meta["n"])
        t_range = tuple(float(v) for v in meta.get("t_range", (0.0, 1.0)))
        if len(t_range) != 2 or not t_range[0] < t_range[1]:
            raise ValueError(f"t_range must be [t_min, t_max] with t_min < t_max, got {meta.get('t_range')}")
    except (KeyError, TypeError, ValueError) as e:
        raise InputFileError(f"{str(directory / META_FILE)!r} is malformed ({type(e).__name__}: {e})") from None
    net = load_pretrained(AttributeClassifier, directory / "classifier").eval()
    if net.head_sizes != [thresholds.numel() + 1]:
        raise InputFileError(f"{str(directory)!r}: the classifier has heads {net.head_sizes}, but the "
                             f"thresholds give {thresholds.numel() + 1} levels")
    return MinorityClassifier(net, thresholds, t, n, meta.get("info", {}), t_range)
