"""The Diffusion Classifier: zero-shot classification with a conditional diffusion model (Li et al., "Your
Diffusion Model is Secretly a Zero-Shot Classifier", ICCV 2023).

The paper puts the ELBO, with its time weights dropped, into Bayes' rule (its Sec. 3):

    p(c_i | x) = exp{-E_{t,eps} ||eps - eps_theta(x_t, c_i)||^2} / sum_j exp{-E_{t,eps} ||eps - eps_theta(x_t, c_j)||^2}

so with a uniform prior over the candidates c the classifier picks the condition under which the model denoises
the image best, estimating the expectation by Monte Carlo (its Algorithm 1):

    err_c = (1/n) sum_i l(eps_i, eps_theta(x_{t_i}, t_i, c)),   x_{t_i} = alpha(t_i) x_0 + sigma(t_i) eps_i,
    c_hat = argmin_c err_c,

where l is the per-image mean over channels and pixels of the squared (l2), absolute (l1) or Huber error. Every
candidate is scored on the SAME set of (t_i, eps_i) pairs (paired comparisons: the noise terms that do not depend
on c cancel in err_c - err_c', which lowers the variance of the decision a lot). The times are stratified, not
random: a grid of n_max evenly spaced times (a VP-discrete schedule's integer steps T/n_max/2 + k T/n_max, the
paper's grid; a continuous schedule's unit time (k + 1/2)/n_max over [t_min, t_max]), one fresh eps per time.

Adaptive pruning (the paper's adaptive evaluation, Sec. 3): ``stages`` (n_1 < n_2 < ...) and ``keep``
(k_1 >= k_2 >= ...). Stage i evaluates the candidates still alive on pairs until n_i pairs in total have been
evaluated, reusing the earlier errors, and keeps the k_i with the lowest mean error. The pairs of a stage are the
centred stride-(n_max/n_i) subset of the grid (the paper's rule); where that subset does not contain the earlier
stages' pairs, the earlier pairs are kept and topped up with evenly spaced pairs of the stride subset, so stage i
has exactly n_i pairs and every stage's pairs contain the previous ones (with (20, 100) on a 100-pair grid both
rules are the same). Once one candidate is left nothing more is evaluated. One stage ``stages=(n,)``,
``keep=(1,)`` is full evaluation.

The denoiser is any conditional Denoiser (``condiff.core`` protocol: D(x_t, t, cond) -> x0_hat); its output is
turned into eps_hat with ``condiff.core.parameterization.x0_to_eps``. The candidates are a list of cond mappings
with one row each (class labels, encoded captions, ...), which the caller builds; they are concatenated once
(``condiff.guidance.cfg.batch_cond``) and every forward runs many (image, candidate, pair) rows at once.
Network evaluations (rows through the network) are counted per image.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch

from condiff.core.denoiser import check_batch, coefficients, describe, take_rows
from condiff.core.parameterization import x0_to_eps
from condiff.errors import ConfigError, check_int, check_real, is_real, one_of
from condiff.guidance.cfg import batch_cond

Tensor = torch.Tensor
ERRORS = ("l2", "l1", "huber")
MAX_PAIRS = 10_000
MAX_BATCH = 1 << 20


def _int_tuple(what: str, value, lo: int, hi: int) -> tuple[int, ...]:
    """A non-empty sequence of integers in [lo, hi] as a tuple, else a one-line ConfigError naming it."""
    ok = not isinstance(value, (str, bytes)) and isinstance(value, Sequence) and len(value) > 0
    ok = ok and all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and lo <= v <= hi for v in value)
    if not ok:
        shown = list(value) if isinstance(value, (tuple, list)) else value
        raise ConfigError(f"{what} must be a non-empty sequence of integers in [{lo}, {hi}], got {shown!r}")
    return tuple(int(v) for v in value)


def _check_t_range(t_range) -> tuple[float, float]:
    ok = isinstance(t_range, Sequence) and not isinstance(t_range, str) and len(t_range) == 2
    ok = ok and all(is_real(v) for v in t_range) and 0 <= t_range[0] < t_range[1] <= 1
    if not ok:
        raise ConfigError(f"t_range must be (lo, hi) with 0 <= lo < hi <= 1 (unit time), got {t_range!r}")
    return float(t_range[0]), float(t_range[1])


@dataclass(frozen=True)
class ClassifierConfig:
    """How to score the candidates.

    ``stages`` / ``keep``: adaptive pruning (module docstring); default: full evaluation on 100 pairs.
    ``pairs``: the grid size n_max (default: the last stage); a larger grid lets a pruned run use a subset of the
    pairs of a full run. ``error``: l2, l1 or huber (``huber_delta``, torch's default 1). ``t_range``: the part
    of the schedule's time range the grid spans, in unit time (0 = t_min, 1 = t_max). ``batch_size``: rows per
    network forward (bounds memory)."""

    stages: tuple[int, ...] = (100,)
    keep: tuple[int, ...] = (1,)
    error: str = "l2"
    pairs: int | None = None
    t_range: tuple[float, float] = (0.0, 1.0)
    huber_delta: float = 1.0
    batch_size: int = 256

    def __post_init__(self):
        stages = _int_tuple("stages", self.stages, 1, MAX_PAIRS)
        keep = _int_tuple("keep", self.keep, 1, MAX_PAIRS)
        if any(b <= a for a, b in zip(stages, stages[1:])):
            raise ConfigError(f"stages must be strictly increasing numbers of pairs, got {list(stages)}")
        if len(keep) != len(stages):
            raise ConfigError(f"keep must give one count per stage ({len(stages)}), got {list(keep)}")
        if any(b > a for a, b in zip(keep, keep[1:])):
            raise ConfigError(f"keep must be non-increasing candidate counts, got {list(keep)}")
        if self.pairs is not None:
            check_int(
                "pairs",
                self.pairs,
                stages[-1],
                MAX_PAIRS,
                f"an integer in [{stages[-1]}, {MAX_PAIRS}] (at least the last stage)",
            )
        if not isinstance(self.error, str) or self.error not in ERRORS:
            raise one_of("error", self.error, ERRORS)
        t_range = _check_t_range(self.t_range)
        check_real("huber_delta", self.huber_delta, 0, math.inf, lo_open=True, hi_open=True)
        check_int("batch_size", self.batch_size, 1, MAX_BATCH)
        object.__setattr__(self, "stages", stages)
        object.__setattr__(self, "keep", keep)
        object.__setattr__(self, "t_range", t_range)

    @property
    def grid_size(self) -> int:
        return self.stages[-1] if self.pairs is None else int(self.pairs)

    @classmethod
    def full(cls, pairs: int = 100, **options) -> "ClassifierConfig":
        """Every candidate on every one of ``pairs`` pairs."""
        return cls(stages=(pairs,), keep=(1,), **options)


# ---- the pairs ------------------------------------------------------------------------------------------------


def stratified_times(schedule, n: int, t_range: tuple[float, float] = (0.0, 1.0)) -> Tensor:
    """The n stratified times (float64, increasing): unit times u_k = lo + (k + 1/2)(hi - lo)/n. A VP-discrete
    schedule (one with ``num_steps`` T) gets the integer steps floor(u_k T), which is the paper's grid
    T/n/2 + k T/n when n divides T; any other schedule gets t_min + u_k (t_max - t_min)."""
    n = check_int("pairs", n, 1, MAX_PAIRS)
    lo, hi = _check_t_range(t_range)
    u = lo + (torch.arange(n, dtype=torch.float64) + 0.5) * (hi - lo) / n
    steps = getattr(schedule, "num_steps", None)
    if isinstance(steps, int) and steps > 0:
        return torch.floor(u * steps).clamp(0, steps - 1)
    return float(schedule.t_min) + u * (float(schedule.t_max) - float(schedule.t_min))


def _spread(items: list[int], n: int) -> list[int]:
    """n evenly spaced items of a sorted list: the items at floor((k + 1/2) len / n)."""
    m = len(items)
    return [items[int((k + 0.5) * m / n)] for k in range(n)]


def stage_pairs(grid: int, stages: Sequence[int]) -> list[Tensor]:
    """The grid indices each stage adds (the module docstring's rule): after stage i exactly stages[i] pairs have
    been taken, each stage's set containing the previous one's."""
    grid = check_int("pairs", grid, 1, MAX_PAIRS)
    stages = _int_tuple("stages", stages, 1, grid)
    if any(b <= a for a, b in zip(stages, stages[1:])):
        raise ConfigError(f"stages must be strictly increasing numbers of pairs, got {list(stages)}")
    chosen: set[int] = set()
    out = []
    for n in stages:
        stride = _spread(list(range(grid)), n)  # the centred stride-(grid/n) subset
        new = [j for j in stride if j not in chosen]
        need = n - len(chosen)
        if len(new) > need:  # the stride subset does not contain the earlier pairs: top up evenly
            new = _spread(new, need)
        chosen.update(new)
        out.append(torch.tensor(sorted(new), dtype=torch.long))
    return out


def draw_noise(x0: Tensor, pairs: int, generator: torch.Generator | None = None, candidates: int | None = None):
    """Standard normal noise, one eps per (image, pair) shaped (B, pairs, *x0.shape[1:]) (paired: shared by every
    candidate), or with ``candidates`` one per (image, candidate, pair) (B, C, pairs, ...) (unpaired)."""
    lead = (x0.shape[0], pairs) if candidates is None else (x0.shape[0], candidates, pairs)
    noise = torch.randn((*lead, *x0.shape[1:]), generator=generator, dtype=x0.dtype)  # on the CPU: the same everywhere
    return noise.to(x0.device)


# ---- the errors -------------------------------------------------------------------------------------------------


def per_sample_error(eps: Tensor, eps_hat: Tensor, error: str = "l2", huber_delta: float = 1.0) -> Tensor:
    """l(eps, eps_hat): the mean over every dimension but the first of the squared, absolute or Huber error
    (Huber: d^2/2 where |d| <= delta, else delta (|d| - delta/2)), in float64."""
    d = (eps_hat.double() - eps.double()).flatten(1)
    if error == "l2":
        e = d * d
    elif error == "l1":
        e = d.abs()
    elif error == "huber":
        a = d.abs()
        e = torch.where(a <= huber_delta, 0.5 * d * d, huber_delta * (a - 0.5 * huber_delta))
    else:
        raise one_of("error", error, ERRORS)
    return e.mean(1)


def candidate_conds(conds) -> dict:
    """The candidates' cond mappings (one row each) concatenated into one mapping with a row per candidate."""
    if isinstance(conds, (str, bytes, Mapping)) or not isinstance(conds, Sequence):
        raise ConfigError(f"candidates must be a list of cond mappings (one per candidate), got {describe(conds)}")
    if len(conds) < 2:
        raise ConfigError(f"the classifier needs at least 2 candidate conditions, got {len(conds)}")
    for i, c in enumerate(conds):
        if not isinstance(c, Mapping):
            raise ConfigError(f"candidate {i} must be a cond mapping (e.g. {{'y': tensor([3])}}), got {describe(c)}")
    return batch_cond(list(conds), 1, [f"candidate {i}" for i in range(len(conds))])


def _row_errors(denoiser, x0, cond, n_cand, times, noise, rows, config: ClassifierConfig) -> Tensor:
    """Errors of the rows (image b, candidate c, pair j) given as three index tensors, in forwards of
    ``config.batch_size`` rows. ``noise`` is (B, n, ...) (paired) or (B, C, n, ...) (unpaired)."""
    b_all, c_all, j_all = rows
    out = torch.empty(b_all.numel(), dtype=torch.float64)
    paired = noise.dim() == x0.dim() + 1
    times = times.to(x0.device)
    a_grid, s_grid = coefficients(denoiser.schedule, times, x0)  # once per grid time: (n, 1, ...)
    for start in range(0, b_all.numel(), config.batch_size):
        sl = slice(start, start + config.batch_size)
        b, c, j = b_all[sl], c_all[sl], j_all[sl]
        eps = noise[b, j] if paired else noise[b, c, j]
        t, a, s = times[j], a_grid[j], s_grid[j]
        x_t = a * x0[b] + s * eps
        x0_hat = denoiser(x_t, t, take_rows(cond, c, n_cand))
        out[sl] = per_sample_error(eps, x0_to_eps(x_t, x0_hat, a, s), config.error, config.huber_delta).cpu()
    return out


def _check_inputs(denoiser, x0, conds) -> tuple[Tensor, dict]:
    x0 = check_batch(x0, "x0")
    if x0.shape[0] == 0 or not bool(torch.isfinite(x0).all()):
        raise ConfigError(f"x0 must hold at least one image and only finite values, got {describe(x0)}")
    if getattr(denoiser, "schedule", None) is None or not callable(denoiser):
        raise ConfigError(f"denoiser must be a Denoiser (callable, with a .schedule), got {type(denoiser).__name__}")
    return x0, candidate_conds(conds)


def _check_noise(noise, shape: tuple[int, ...], x0) -> Tensor:
    if not isinstance(noise, Tensor) or tuple(noise.shape) != shape or not noise.is_floating_point():
        raise ConfigError(f"noise must be a floating tensor of shape {shape}, got {describe(noise)}")
    return noise.to(device=x0.device, dtype=x0.dtype)


def pair_errors(denoiser, x0: Tensor, conds, times: Tensor, noise: Tensor, config: ClassifierConfig | None = None):
    """Every candidate's error on every pair: (B, C, n) float64. ``noise`` is (B, n, ...) for paired pairs (the
    classifier's design) or (B, C, n, ...) for one noise per candidate (unpaired; for comparison)."""
    config = ClassifierConfig() if config is None else config
    x0, cond = _check_inputs(denoiser, x0, conds)
    times = torch.as_tensor(times, dtype=torch.float64).reshape(-1)
    B, C, n = x0.shape[0], len(conds), times.numel()
    paired = isinstance(noise, Tensor) and noise.dim() == x0.dim() + 1
    noise = _check_noise(noise, (B, n, *x0.shape[1:]) if paired else (B, C, n, *x0.shape[1:]), x0)
    grid = torch.meshgrid(torch.arange(B), torch.arange(C), torch.arange(n), indexing="ij")
    rows = tuple(g.reshape(-1).to(x0.device) for g in grid)
    with torch.no_grad():
        return _row_errors(denoiser, x0, cond, C, times, noise, rows, config).reshape(B, C, n)


# ---- the classifier --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Classification:
    """What the classifier measured. ``errors`` (B, C, n) float64: each evaluated (image, candidate, pair)'s error,
    NaN where pruning skipped it; ``scores`` (B, C): the mean over each candidate's evaluated pairs; ``evaluated``
    (B, C): how many pairs each candidate got; ``ranking`` (B, C): candidate indices best first (the candidates that
    survived more stages first, then by score); ``prediction`` (B,) = ranking[:, 0]; ``nfe`` (B,): network
    evaluations per image; ``times`` (n,): the grid."""

    errors: Tensor
    scores: Tensor
    evaluated: Tensor
    ranking: Tensor
    prediction: Tensor
    nfe: Tensor
    times: Tensor

    @property
    def total_nfe(self) -> int:
        return int(self.nfe.sum())


def _run_stages(evaluate: Callable, B: int, C: int, n: int, stages, keep) -> tuple[Tensor, Tensor, Tensor]:
    """The pruning loop over (B, C, n) errors; ``evaluate(b, c, j)`` gives the errors of those rows. Returns
    (errors with NaN where not evaluated, evaluated pair counts, nfe per image)."""
    errors = torch.full((B, C, n), math.nan, dtype=torch.float64)
    alive = torch.ones(B, C, dtype=torch.bool)
    nfe = torch.zeros(B, dtype=torch.long)
    for new, k in zip(stage_pairs(n, stages), keep):
        busy = alive & (alive.sum(1, keepdim=True) > 1)  # an image with one candidate left is decided
        b, c = busy.nonzero(as_tuple=True)
        if b.numel():
            bb = b[:, None].expand(-1, new.numel()).reshape(-1)
            cc = c[:, None].expand(-1, new.numel()).reshape(-1)
            jj = new[None, :].expand(b.numel(), -1).reshape(-1)
            errors[bb, cc, jj] = evaluate(bb, cc, jj)
            nfe += torch.bincount(bb, minlength=B)
        scores = torch.where(alive, errors.nanmean(-1), math.inf)
        order = torch.sort(scores, dim=1, stable=True).indices
        best = torch.zeros_like(alive)
        best.scatter_(1, order[:, :k], True)
        alive = alive & best
    return errors, (~errors.isnan()).sum(-1), nfe


def _result(errors: Tensor, evaluated: Tensor, nfe: Tensor, times: Tensor) -> Classification:
    scores = errors.nanmean(-1)
    by_score = torch.sort(scores, dim=1, stable=True).indices
    by_depth = torch.sort(-evaluated.gather(1, by_score), dim=1, stable=True).indices
    ranking = by_score.gather(1, by_depth)
    return Classification(errors, scores, evaluated, ranking, ranking[:, 0].clone(), nfe, times)


def classify(
    denoiser,
    x0: Tensor,
    conds,
    config: ClassifierConfig | None = None,
    generator: torch.Generator | None = None,
    noise: Tensor | None = None,
) -> Classification:
    """Classify each image of ``x0`` (B, ...) among the candidate conditions ``conds`` (a list of cond mappings,
    one row each). The pairs' noise is drawn from ``generator`` (B, n, ...) unless ``noise`` gives it; each image
    has its own noise, shared by all candidates. Runs without gradients."""
    config = ClassifierConfig() if config is None else config
    if not isinstance(config, ClassifierConfig):
        raise ConfigError(f"config must be a ClassifierConfig, got {type(config).__name__}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ConfigError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    x0, cond = _check_inputs(denoiser, x0, conds)
    B, C, n = x0.shape[0], len(conds), config.grid_size
    times = stratified_times(denoiser.schedule, n, config.t_range)
    shape = (B, n, *x0.shape[1:])
    noise = draw_noise(x0, n, generator) if noise is None else _check_noise(noise, shape, x0)
    dev = x0.device

    def evaluate(b, c, j):
        return _row_errors(denoiser, x0, cond, C, times, noise, (b.to(dev), c.to(dev), j.to(dev)), config)

    with torch.no_grad():
        errors, evaluated, nfe = _run_stages(evaluate, B, C, n, config.stages, config.keep)
    return _result(errors, evaluated, nfe, times)


def prune(full: Classification, config: ClassifierConfig) -> Classification:
    """What ``classify`` with ``config`` decides, read from a full evaluation on the same pairs (``full.errors``
    complete, on a grid of ``config.grid_size`` pairs) instead of running the network again: the same stages,
    the same decisions, the network evaluations it would have made."""
    errors = full.errors
    if errors.dim() != 3 or errors.shape[2] != config.grid_size or bool(errors.isnan().any()):
        raise ConfigError(
            f"prune needs a full evaluation on {config.grid_size} pairs (errors (B, C, {config.grid_size}) without "
            f"NaN), got errors of shape {tuple(errors.shape)}"
        )
    B, C, n = errors.shape
    out, evaluated, nfe = _run_stages(lambda b, c, j: errors[b, c, j], B, C, n, config.stages, config.keep)
    return _result(out, evaluated, nfe, full.times)


def describe_config(config: ClassifierConfig) -> dict[str, Any]:
    """The config as plain JSON values."""
    return {
        "stages": list(config.stages),
        "keep": list(config.keep),
        "pairs": config.grid_size,
        "error": config.error,
        "t_range": list(config.t_range),
        "huber_delta": config.huber_delta,
    }
