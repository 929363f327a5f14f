"""Randomized smoothing with diffusion denoisers: certified l2 robustness for any base classifier.

**Randomized smoothing** (Cohen, Rosenfeld and Kolter, "Certified Adversarial Robustness via Randomized
Smoothing", ICML 2019). For a base classifier f and noise level sigma the smoothed classifier is

    g(x) = argmax_c P(f(x + delta) = c),   delta ~ N(0, sigma^2 I).

If the top class has probability p_A >= p_A_lower > 1/2, g is constant on the l2 ball of radius (their Thm. 1
with p_B = 1 - p_A)

    R = sigma * Phi^{-1}(p_A_lower).

``predict`` and ``certify`` are their Monte Carlo algorithms (Cohen et al., Sec. 3.2, "Pseudocode for certification
and prediction"): PREDICT draws n samples and returns the top class when a two-sided binomial test of n_A against
n_A + n_B at 1/2 has p-value <= alpha, else abstains; CERTIFY selects the class c_A from n0 draws, counts it in n
fresh draws, and takes the one-sided (1 - alpha) Clopper-Pearson lower bound

    p_A_lower = B(alpha; n_A, n - n_A + 1)   (the alpha quantile of a Beta distribution; 0 when n_A = 0),

certifying radius sigma * Phi^{-1}(p_A_lower) when p_A_lower > 1/2, else abstaining (``ABSTAIN``).

**Denoised smoothing** (Salman et al., "Denoised Smoothing", NeurIPS 2020; Carlini et al., "(Certified!!)
Adversarial Robustness for Free!", ICLR 2023). The base classifier is f(denoise(x + delta)). A diffusion model's
forward process x_t = alpha(t) x_0 + sigma(t) eps matches the smoothing noise after a rescaling: with

    x_t* = alpha(t*) (x + delta),   delta ~ N(0, sigma^2 I),   sigma(t*) / alpha(t*) = sigma,

x_t* is distributed exactly as the forward process at t* (Carlini et al., Sec. 3, their eq. for t*:
(1 - a_bar_t*) / a_bar_t* = sigma^2). ``smoothing_time`` finds t* on any ``NoiseSchedule`` (optionally the
nearest time of a grid of allowed times, e.g. a DDPM table's integer steps); ``one_shot_denoise`` is one
evaluation x0_hat = D(x_t*, t*) (Carlini et al.'s Tweedie denoise). Where the classifier's inputs and the
model's data differ by an affine map (images in [0, 1], a model in [-1, 1]: ``scale=2, shift=-1``), the noise is
rescaled too: sigma_eff = scale * sigma.

**DensePure** (Xiao et al., "DensePure: Understanding Diffusion Models for Adversarial Robustness", ICLR 2023).
Instead of one denoising step, run the reverse process from t* down to the clean time K times (K seeds of a
stochastic solver) and take the majority vote of the base classifier over the K results (their Sec. 4, Alg. 1);
``densepure_votes`` returns the K labels, ``DensePureClassifier`` the vote (ties go to the lowest label), and
``purify`` one multi-step run.

The base classifier is any callable (an ``nn.Module``) mapping a batch to logits (N, C) or to integer labels (N,);
this module never imports a model family.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
from scipy.stats import beta as beta_dist
from scipy.stats import binomtest, norm

from condiff.core.denoiser import check_batch
from condiff.core.grids import UniformT, make_grid
from condiff.core.sampling import Gaussian, sample
from condiff.errors import ConfigError, check_int, check_real

Tensor = torch.Tensor
ABSTAIN = -1
MAX_DRAWS = 100_000_000


# ---------------------------------------------------------------- statistics (Cohen et al. 2019)


def clopper_pearson_lower(successes: int, trials: int, alpha: float) -> float:
    """The one-sided (1 - alpha) Clopper-Pearson lower confidence bound on a binomial proportion (Clopper and
    Pearson 1934; Cohen et al. 2019's LowerConfBound): the alpha quantile of Beta(k, n - k + 1), 0 when k = 0.

    Equal to ``statsmodels.stats.proportion.proportion_confint(k, n, alpha=2 * alpha, method="beta")[0]``."""
    n = check_int("trials", trials, lo=1, hi=MAX_DRAWS)
    k = check_int("successes", successes, lo=0, hi=n, accepted=f"an integer in [0, trials={n}]")
    a = check_real("alpha", alpha, 0.0, 0.5, lo_open=True, hi_open=True)
    if k == 0:
        return 0.0
    return float(beta_dist.ppf(a, k, n - k + 1))


def certified_radius(p_lower: float, sigma: float) -> float:
    """sigma * Phi^{-1}(p_lower) (Cohen et al. 2019, Thm. 1 with p_B = 1 - p_A); 0 when p_lower <= 1/2."""
    p = check_real("p_lower", p_lower, 0.0, 1.0)
    s = check_real("sigma", sigma, 0.0, lo_open=True, accepted="a finite number > 0")
    return 0.0 if p <= 0.5 else float(s * norm.ppf(p))


def _labels(out, rows: int, num_classes: int) -> Tensor:
    """A base classifier's output as integer labels: argmax of (N, C) logits, or (N,) integer labels."""
    if not isinstance(out, Tensor):
        raise ConfigError(f"the base classifier must return a tensor (logits (N, C) or labels (N,)), got {out!r}")
    if out.dim() == 2 and out.is_floating_point():
        if out.shape[1] != num_classes:
            raise ConfigError(f"the base classifier returned {out.shape[1]} logits per row, num_classes={num_classes}")
        out = out.argmax(1)
    if out.dim() != 1 or out.shape[0] != rows or out.is_floating_point() or out.is_complex():
        raise ConfigError(
            f"the base classifier must return logits (N, C) or integer labels (N,) for N={rows} rows, "
            f"got {out.dtype} of shape {tuple(out.shape)}"
        )
    if rows and (int(out.min()) < 0 or int(out.max()) >= num_classes):
        raise ConfigError(f"the base classifier returned labels outside [0, {num_classes - 1}]")
    return out.long()


def _check_common(x, sigma, num_classes, batch_size) -> tuple[Tensor, float, int, int]:
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() < 1:
        shown = f"{x.dtype} of shape {tuple(x.shape)}" if isinstance(x, Tensor) else repr(x)
        raise ConfigError(f"x must be one example as a floating tensor without a batch dimension, got {shown}")
    sigma = check_real("sigma", sigma, 0.0, lo_open=True, accepted="a finite number > 0")
    num_classes = check_int("num_classes", num_classes, lo=2, hi=1_000_000)
    batch_size = check_int("batch_size", batch_size, lo=1, hi=1 << 20)
    return x, sigma, num_classes, batch_size


def sample_counts(
    classify: Callable[[Tensor], Tensor],
    x: Tensor,
    sigma: float,
    num: int,
    num_classes: int,
    batch_size: int = 1000,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Counts (num_classes,) of f(x + delta) over ``num`` draws delta ~ N(0, sigma^2 I) (Cohen et al.'s
    SampleUnderNoise). ``x`` is one example without a batch dimension; draws go through ``classify`` in batches."""
    x, sigma, num_classes, batch_size = _check_common(x, sigma, num_classes, batch_size)
    num = check_int("num", num, lo=1, hi=MAX_DRAWS)
    counts = torch.zeros(num_classes, dtype=torch.long)
    left = num
    while left > 0:
        rows = min(batch_size, left)
        noise = torch.randn((rows, *x.shape), generator=generator, dtype=x.dtype).to(x.device)
        with torch.no_grad():
            labels = _labels(classify(x.unsqueeze(0) + sigma * noise), rows, num_classes)
        counts += torch.bincount(labels.cpu(), minlength=num_classes)
        left -= rows
    return counts


def predict(
    classify: Callable[[Tensor], Tensor],
    x: Tensor,
    sigma: float,
    n: int,
    alpha: float,
    num_classes: int,
    batch_size: int = 1000,
    generator: torch.Generator | None = None,
) -> int:
    """Cohen et al. 2019's PREDICT: the top class of n noisy draws when the two-sided binomial test of n_A out of
    n_A + n_B at 1/2 has p-value <= alpha (the returned class is then wrong with probability <= alpha), else
    ``ABSTAIN``."""
    a = check_real("alpha", alpha, 0.0, 0.5, lo_open=True, hi_open=True)
    counts = sample_counts(classify, x, sigma, n, num_classes, batch_size, generator)
    top = torch.topk(counts, 2)
    n_a, n_b = int(top.values[0]), int(top.values[1])
    return int(top.indices[0]) if binomtest(n_a, n_a + n_b, 0.5).pvalue <= a else ABSTAIN


@dataclass(frozen=True)
class Certificate:
    """CERTIFY's answer: ``label`` (``ABSTAIN`` = -1 when p_lower <= 1/2), the l2 ``radius`` (0 on abstain), the
    Clopper-Pearson bound ``p_lower`` and the estimation draws' count of the selected class ``count`` of ``n``."""

    label: int
    radius: float
    p_lower: float
    count: int
    n: int

    @property
    def abstained(self) -> bool:
        return self.label == ABSTAIN


def certify(
    classify: Callable[[Tensor], Tensor],
    x: Tensor,
    sigma: float,
    n0: int,
    n: int,
    alpha: float,
    num_classes: int,
    batch_size: int = 1000,
    generator: torch.Generator | None = None,
) -> Certificate:
    """Cohen et al. 2019's CERTIFY: select c_A as the top class of ``n0`` draws, count it in ``n`` fresh draws,
    p_A_lower = the one-sided (1 - alpha) Clopper-Pearson bound, radius sigma * Phi^{-1}(p_A_lower) when
    p_A_lower > 1/2, else abstain. With probability >= 1 - alpha a returned class is g(x) and g is constant on the
    l2 ball of that radius. The paper uses n0 = 100, n = 100000, alpha = 0.001."""
    a = check_real("alpha", alpha, 0.0, 0.5, lo_open=True, hi_open=True)
    check_int("n0", n0, lo=1, hi=MAX_DRAWS)
    check_int("n", n, lo=1, hi=MAX_DRAWS)
    select = sample_counts(classify, x, sigma, n0, num_classes, batch_size, generator)
    c_a = int(select.argmax())
    counts = sample_counts(classify, x, sigma, n, num_classes, batch_size, generator)
    k = int(counts[c_a])
    p_lower = clopper_pearson_lower(k, int(n), a)
    if p_lower <= 0.5:
        return Certificate(ABSTAIN, 0.0, p_lower, k, int(n))
    return Certificate(c_a, certified_radius(p_lower, sigma), p_lower, k, int(n))


# ---------------------------------------------------------------- denoised smoothing (Salman 2020, Carlini 2023)


def _log_ratio(schedule, t: float) -> float:
    return float(schedule.log_sigma(torch.tensor(t, dtype=torch.float64))) - float(
        schedule.log_alpha(torch.tensor(t, dtype=torch.float64))
    )


def _exact_time(schedule, ratio: float, label: str) -> float:
    """The time with sigma/alpha = ratio: the schedule's inverse of the log-SNR, else bisection (sigma/alpha
    increases with t)."""
    lo, hi = float(schedule.t_min), float(schedule.t_max)
    target = math.log(ratio)
    r_lo, r_hi = _log_ratio(schedule, lo), _log_ratio(schedule, hi)
    if not r_lo <= target <= r_hi:
        raise ConfigError(
            f"{label} is outside the schedule's noise range: "
            f"sigma/alpha must be in [{math.exp(r_lo):.4g}, {math.exp(r_hi):.4g}] on t in [{lo:g}, {hi:g}]"
        )
    try:
        t = float(schedule.t_from_log_snr(torch.tensor(-2.0 * target, dtype=torch.float64)))
        if math.isfinite(t) and lo <= t <= hi:
            return t
    except NotImplementedError:
        pass
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if _log_ratio(schedule, mid) < target:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def smoothing_time(schedule, sigma: float, scale: float = 1.0, times=None) -> float:
    """t* with sigma(t*) / alpha(t*) = scale * sigma (Carlini et al. 2023, Sec. 3: (1 - a_bar) / a_bar =
    sigma_eff^2), on any ``NoiseSchedule``. ``scale``: the model's data units per classifier unit (2 for images
    in [0, 1] and a model in [-1, 1]). ``times``: a 1-D set of allowed times (a DDPM table's integer steps,
    ``torch.arange(T)``), of which the one nearest the exact t* is returned (within half a grid step of it)."""
    s = check_real("sigma", sigma, 0.0, lo_open=True, accepted="a finite number > 0")
    k = check_real("scale", scale, 0.0, lo_open=True, accepted="a finite number > 0")
    if not callable(getattr(schedule, "log_alpha", None)) or not callable(getattr(schedule, "log_sigma", None)):
        raise ConfigError(f"schedule must be a condiff NoiseSchedule, got {schedule!r}")
    label = f"the smoothing sigma {sigma!r}" + ("" if k == 1.0 else f" (x scale {scale!r} = {s * k:g})")
    t = _exact_time(schedule, s * k, label)
    if times is None:
        return t
    grid = torch.as_tensor(times, dtype=torch.float64).reshape(-1)
    if grid.numel() == 0 or not bool(torch.isfinite(grid).all()):
        raise ConfigError(f"times must be a non-empty 1-D set of finite times, got {times!r}")
    return float(grid[(grid - t).abs().argmin()])


def to_forward_process(schedule, x_noisy: Tensor, t_star: float, scale: float = 1.0, shift: float = 0.0) -> Tensor:
    """x_t* = alpha(t*) (scale * (x + delta) + shift): a smoothing draw as a forward-process point of the model
    (Carlini et al. 2023, Sec. 3)."""
    a = float(schedule.alpha(torch.tensor(float(t_star), dtype=torch.float64)))
    return a * (scale * x_noisy + shift)


def one_shot_denoise(
    denoiser,
    x_noisy: Tensor,
    sigma: float,
    scale: float = 1.0,
    shift: float = 0.0,
    cond: Mapping[str, Any] | None = None,
    times=None,
) -> Tensor:
    """Denoised smoothing's denoiser (Carlini et al. 2023, Alg. 1): x0_hat = D(alpha(t*) (scale x_noisy + shift),
    t*) back in the classifier's units, (x0_hat - shift) / scale, for a batch of smoothing draws x + delta."""
    check_batch(x_noisy, "x_noisy")
    t_star = smoothing_time(denoiser.schedule, sigma, scale, times)
    x_t = to_forward_process(denoiser.schedule, x_noisy, t_star, scale, shift)
    return (denoiser(x_t, t_star, cond) - shift) / scale


def purify(
    denoiser,
    solver,
    x_noisy: Tensor,
    sigma: float,
    steps: int,
    scale: float = 1.0,
    shift: float = 0.0,
    cond: Mapping[str, Any] | None = None,
    spacing=UniformT(),
    generator: torch.Generator | None = None,
) -> Tensor:
    """One multi-step reverse run from t* to the clean time (DensePure's reverse process, Xiao et al. 2023,
    Sec. 4): ``sample`` with ``solver`` over ``make_grid(schedule, steps, spacing, t_start=t*)`` from
    x_t* = alpha(t*) (scale x_noisy + shift), returned in the classifier's units. ``generator`` draws the
    solver's noise (stochastic solvers)."""
    check_batch(x_noisy, "x_noisy")
    schedule = denoiser.schedule
    t_star = smoothing_time(schedule, sigma, scale)
    if not t_star > schedule.t_min:
        raise ConfigError(
            f"the smoothing sigma {sigma!r} puts t* = {t_star:g} at the schedule's t_min; use a larger sigma"
        )
    grid = make_grid(schedule, steps, spacing, t_start=t_star)
    x_t = to_forward_process(schedule, x_noisy, t_star, scale, shift)
    out = sample(denoiser, solver, grid, x_t, cond, noise=Gaussian(generator))
    return (out.x - shift) / scale


def densepure_votes(
    classify: Callable[[Tensor], Tensor],
    denoiser,
    solver,
    x_noisy: Tensor,
    sigma: float,
    num_classes: int,
    runs: int,
    steps: int,
    scale: float = 1.0,
    shift: float = 0.0,
    cond: Mapping[str, Any] | None = None,
    spacing=UniformT(),
    generator: torch.Generator | None = None,
) -> Tensor:
    """The base classifier's labels (runs, N) on ``runs`` (DensePure's K) reverse runs of ``purify``."""
    check_int("runs", runs, lo=1, hi=10_000, accepted="an integer K in [1, 10000]")
    num_classes = check_int("num_classes", num_classes, lo=2, hi=1_000_000)
    votes = []
    for _ in range(runs):
        x0 = purify(denoiser, solver, x_noisy, sigma, steps, scale, shift, cond, spacing, generator)
        votes.append(_labels(classify(x0), x_noisy.shape[0], num_classes))
    return torch.stack(votes)


def majority_vote(votes: Tensor, num_classes: int) -> Tensor:
    """The most frequent label per column of ``votes`` (runs, N); ties go to the lowest label."""
    counts = torch.nn.functional.one_hot(votes.long(), num_classes).sum(0)  # (N, C)
    return counts.argmax(1)


@dataclass(frozen=True)
class DenoisedClassifier:
    """f(one_shot_denoise(x + delta)): the base classifier of denoised smoothing (Carlini et al. 2023), for
    ``certify`` / ``predict`` with the same ``sigma``."""

    classifier: Callable[[Tensor], Tensor]
    denoiser: Any
    sigma: float
    scale: float = 1.0
    shift: float = 0.0
    cond: Mapping[str, Any] | None = None
    times: Any = None

    def __call__(self, x_noisy: Tensor) -> Tensor:
        return self.classifier(
            one_shot_denoise(self.denoiser, x_noisy, self.sigma, self.scale, self.shift, self.cond, self.times)
        )


@dataclass(frozen=True)
class DensePureClassifier:
    """DensePure's base classifier (Xiao et al. 2023, Alg. 1): the majority vote of ``classifier`` over ``runs``
    (K) reverse runs from t* with ``solver``; returns labels (N,) for ``certify`` / ``predict``."""

    classifier: Callable[[Tensor], Tensor]
    denoiser: Any
    solver: Any
    sigma: float
    num_classes: int
    runs: int = 10
    steps: int = 10
    scale: float = 1.0
    shift: float = 0.0
    cond: Mapping[str, Any] | None = None
    spacing: Any = UniformT()
    generator: torch.Generator | None = None

    def __call__(self, x_noisy: Tensor) -> Tensor:
        votes = densepure_votes(
            self.classifier,
            self.denoiser,
            self.solver,
            x_noisy,
            self.sigma,
            self.num_classes,
            self.runs,
            self.steps,
            self.scale,
            self.shift,
            self.cond,
            self.spacing,
            self.generator,
        )
        return majority_vote(votes, self.num_classes)
