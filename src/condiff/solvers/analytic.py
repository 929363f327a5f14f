"""The Gaussian closed form of the PF-ODE and the analytic skip ("teleportation").

Papers: Wang & Vastola 2023, "Diffusion models generate images like painters: an analytical theory of
outline first, details later" (the PF-ODE of Gaussian data in closed form); Wang & Vastola, TMLR 2024, "The
unreasonable effectiveness of Gaussian score approximation for diffusion models and its applications"
(analytic teleportation: replace the first, high-noise part of sampling by that closed form).
Equations as in(a) (the papers' own equation numbers are not checked here).

Gaussian data N(mu, Sigma), Sigma = U diag(l) U^T, under x_t = alpha_t x_0 + sigma_t eps (any schedule: VP,
EDM/VE, flow) has Gaussian marginals N(alpha_t mu, C_t), C_t = alpha_t^2 Sigma + sigma_t^2 I, all diagonal in
U. The PF-ODE drift for Gaussian marginals is m' + 1/2 C' C^{-1} (x - m), so the flow from time s to time t is

    x_t = alpha_t mu + U diag( sqrt((alpha_t^2 l_k + sigma_t^2) / (alpha_s^2 l_k + sigma_s^2)) ) U^T (x_s - alpha_s mu)
        = alpha_t mu + C_t^{1/2} C_s^{-1/2} (x_s - alpha_s mu).                                       (14a)

``GaussianFit`` keeps mu, the top-r eigenpairs (U_r, l) and one isotropic variance ``iso`` for the other d - r
directions, Sigma = U_r diag(l) U_r^T + iso (I - U_r U_r^T) (probabilistic PCA; Tipping & Bishop 1999: the
maximum-likelihood iso is the mean of the discarded eigenvalues). The remainder then flows with the single
factor sqrt((alpha_t^2 iso + sigma_t^2)/(alpha_s^2 iso + sigma_s^2)). For images this costs d x r, not d x d,
and where the skip stops (sigma^2 >> the discarded l_k) it hardly matters: on shapes (d = 3072) rank 256
moves the teleported x from sigma/alpha 20 to 7 by 1.5e-4 RMS (8e-4 max) against the full-rank fit.

The skip (``AnalyticSkip``). From x_T at the grid's start, jump with (14a) to a skip time and let any solver
take the rest. The amount is either ``sigma`` (the sigma/alpha where the solver takes over) or ``fraction``
(the share of the step budget to skip: the skip time is the grid interpolated linearly in the step index at
position fraction * steps, so 25% of a 10-step grid stops half-way between grid points 2 and 3).
What the solver then runs on:
- ``same_nfe=True`` (the default, and what the CLI does): a fresh grid of the SAME number of steps and the
  same spacing from the skip time to the original end: same total NFE, denser steps where the network is
  needed. ``--steps N --analytic-skip 25%`` costs N network evaluations.
- ``same_nfe=False``: the original grid's points below the skip time (the skip time first): NFE saved =
  the whole steps skipped (``SkipPlan.steps``). 25% of 8 steps = 6 steps run, 2 saved.
The skip itself costs no network evaluation.

The fit. ``model_fit(model)`` fits mu and Sigma once per model from the family's own training data
(``family.training_batch``, 4096 images by default, rank 256 + isotropic remainder), unconditionally, as the
papers do, and caches it as safetensors under $CONDIFF_CACHE (default ~/.cache/condiff)/analytic, keyed by
the model's weights digest (``condiff.core.fitted.weights_digest``) and the fit settings, written atomically
and checked on load; an invalid cache file is refused (``load_fit``) and refit with a warning (``model_fit``).
One unconditional Gaussian serves every condition and guidance scale (shapes captions may leave any attribute
out, so per-condition fits do not exist in general): the guided flow over the skipped span is replaced by the
unconditional one, and the solver's remaining steps must bring the condition in. That is what limits the
skip under guidance.

How much to skip: DEFAULT_SKIP is 5% of the step budget; docs/solvers.md holds the measured trade-off
(benchmarks/analytic_skip.py).
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from condiff.core.fitted import weights_digest
from condiff.errors import ConfigError, InputFileError, OutputFileError, is_real, one_line

Tensor = torch.Tensor
F64 = torch.float64
FORMAT = "condiff-analytic-fit/1"
DEFAULT_FIT_N = 4096
DEFAULT_FIT_RANK = 256
DEFAULT_SKIP = "5%"  # the recommended --analytic-skip: benchmarks/analytic_skip.py, docs/analytic_skip.png


# ---- the Gaussian fit and its flow ----------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class GaussianFit:
    """N(mean, U diag(evals) U^T + iso (I - U U^T)) in R^d, float64. ``evecs`` is (d, r) orthonormal,
    ``evals`` (r,) non-increasing; with r = d the isotropic part is empty (``iso`` unused)."""

    mean: Tensor
    evecs: Tensor
    evals: Tensor
    iso: float = 0.0
    n: int = 0  # number of samples it was fitted on (0: given moments)

    def __post_init__(self):
        mean, evecs, evals = (torch.as_tensor(v, dtype=F64) for v in (self.mean, self.evecs, self.evals))
        d = mean.numel()
        if mean.dim() != 1 or evecs.dim() != 2 or evecs.shape[0] != d or evals.shape != (evecs.shape[1],):
            raise ConfigError(
                f"GaussianFit shapes disagree: mean {tuple(mean.shape)}, evecs "
                f"{tuple(evecs.shape)}, evals {tuple(evals.shape)}"
            )
        if not (math.isfinite(self.iso) and self.iso >= 0) or not bool((evals >= 0).all()):
            raise ConfigError(
                f"GaussianFit variances must be finite and non-negative, got iso {self.iso!r}, "
                f"smallest eigenvalue {float(evals.min()) if evals.numel() else 'none'}"
            )
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "evecs", evecs)
        object.__setattr__(self, "evals", evals)
        object.__setattr__(self, "iso", float(self.iso))

    @property
    def dim(self) -> int:
        return self.mean.numel()

    @property
    def rank(self) -> int:
        return self.evals.numel()

    @classmethod
    def from_moments(cls, mean, cov, rank: int | None = None) -> "GaussianFit":
        """The fit of known moments (d,), (d, d): full rank by default, or top-``rank`` + isotropic."""
        cov = torch.as_tensor(cov, dtype=F64)
        lam, u = torch.linalg.eigh(0.5 * (cov + cov.T))
        return _truncate(torch.as_tensor(mean, dtype=F64), lam.flip(0).clamp(min=0.0), u.flip(1), rank, 0)

    def cov(self) -> Tensor:
        """The dense (d, d) covariance (for small d and tests)."""
        u = self.evecs
        rest = torch.eye(self.dim, dtype=F64) - u @ u.T
        return (u * self.evals) @ u.T + self.iso * rest

    def flow(self, schedule, x: Tensor, t_from: float, t_to: float) -> Tensor:
        """The exact PF-ODE map (14a) of this Gaussian from ``t_from`` to ``t_to`` (either direction), for x
        of shape (B, *) with prod(*) = d. Computed in float64, returned in x's dtype."""
        shape, dtype = x.shape, x.dtype
        flat = x.reshape(shape[0], -1).to(F64)
        if flat.shape[1] != self.dim:
            raise ConfigError(f"the Gaussian fit is {self.dim}-dimensional but x has shape {tuple(shape)}")
        a0, s0 = _alpha_sigma(schedule, t_from)
        a1, s1 = _alpha_sigma(schedule, t_to)
        y = flat - a0 * self.mean
        z = y @ self.evecs
        scale = torch.sqrt((a1 * a1 * self.evals + s1 * s1) / (a0 * a0 * self.evals + s0 * s0))
        out = a1 * self.mean + (z * scale) @ self.evecs.T
        if self.rank < self.dim:
            iso_scale = math.sqrt((a1 * a1 * self.iso + s1 * s1) / (a0 * a0 * self.iso + s0 * s0))
            out = out + iso_scale * (y - z @ self.evecs.T)
        return out.reshape(shape).to(dtype)

    def denoise(self, schedule, x: Tensor, t: float) -> Tensor:
        """E[x_0 | x_t = x] under this Gaussian: mu + Sigma (Sigma + rho^2 I)^{-1} (x / alpha - mu), rho =
        sigma/alpha (the 'outline first' filter of Wang & Vastola 2023). float64 inside, x's dtype out."""
        shape, dtype = x.shape, x.dtype
        a, s = _alpha_sigma(schedule, t)
        rho2 = (s / a) ** 2
        y = x.reshape(shape[0], -1).to(F64) / a - self.mean
        z = y @ self.evecs
        out = self.mean + (z * (self.evals / (self.evals + rho2))) @ self.evecs.T
        if self.rank < self.dim:
            out = out + self.iso / (self.iso + rho2) * (y - z @ self.evecs.T)
        return out.reshape(shape).to(dtype)


def _alpha_sigma(schedule, t) -> tuple[float, float]:
    tt = torch.as_tensor(float(t), dtype=F64)
    return float(schedule.alpha(tt)), float(schedule.sigma(tt))


def _check_rank(rank, d: int) -> int:
    if rank is None:
        return d
    if not isinstance(rank, numbers.Integral) or isinstance(rank, bool) or not 1 <= rank <= d:
        raise ConfigError(f"rank must be None (full) or an integer in [1, {d}], got {rank!r}")
    return int(rank)


def _truncate(mean: Tensor, lam: Tensor, u: Tensor, rank, n: int, trace: float | None = None) -> GaussianFit:
    """Keep the top ``rank`` of the descending eigenpairs (lam, u); the other variance (``trace`` minus the
    kept eigenvalues, ``trace`` = lam.sum() by default) becomes one isotropic variance."""
    d = mean.numel()
    r = _check_rank(rank, d)
    trace = float(lam.sum()) if trace is None else trace
    kept = lam[:r]
    iso = max(trace - float(kept.sum()), 0.0) / (d - r) if r < d else 0.0
    return GaussianFit(mean, u[:, :r].contiguous(), kept.contiguous(), iso, n)


def fit_gaussian(x: Tensor, rank: int | None = None) -> GaussianFit:
    """Fit N(mu, Sigma) to samples x (n, *) (flattened to (n, d)) in float64: the sample mean, the unbiased
    sample covariance, its top ``rank`` eigenpairs (all d when None) and, for rank < d, the mean of the other
    eigenvalues as the isotropic variance (the PPCA maximum-likelihood estimate)."""
    x = torch.as_tensor(x)
    if x.dim() < 2 or x.shape[0] < 2 or x[0].numel() < 1:
        raise ConfigError(f"fit_gaussian needs at least 2 samples of shape (n, *), got {tuple(x.shape)}")
    flat = x.reshape(x.shape[0], -1).to(F64)
    if not bool(torch.isfinite(flat).all()):
        raise ConfigError("fit_gaussian: the samples contain NaN or inf")
    n, d = flat.shape
    r = _check_rank(rank, d)
    mean = flat.mean(0)
    centred = flat - mean
    trace = float((centred * centred).sum()) / (n - 1)
    if n < d:  # the covariance has rank <= n - 1: the SVD of the data is cheaper and exact
        _, s, vh = torch.linalg.svd(centred, full_matrices=False)
        lam, u = s * s / (n - 1), vh.T
        if r > u.shape[1]:  # ask for more directions than the data spans: add zero-variance ones
            lam = torch.cat([lam, torch.zeros(d - lam.numel(), dtype=F64)])
            u = torch.cat([u, _complement(u)], 1)
    else:
        lam, u = torch.linalg.eigh(centred.T @ centred / (n - 1))
        lam, u = lam.flip(0), u.flip(1)
    return _truncate(mean, lam.clamp(min=0.0), u, r, n, trace)


def _complement(u: Tensor) -> Tensor:
    """An orthonormal basis (d, d - m) of the complement of the orthonormal columns of u (d, m)."""
    d, m = u.shape
    q, _ = torch.linalg.qr(
        torch.cat([u, torch.randn(d, d - m, dtype=F64, generator=torch.Generator().manual_seed(0))], 1)
    )
    return q[:, m:]


# ---- the skip -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SkipPlan:
    """Where the skip goes: from ``t_from`` (the grid's start) to ``t_skip``, then ``grid`` for the solver.
    ``steps`` is how many steps of the original grid the skipped span covers (may be fractional)."""

    t_from: float
    t_skip: float
    grid: Tensor = field(compare=False)
    steps: float

    def teleport(self, fit: GaussianFit, schedule, x: Tensor) -> Tensor:
        """x at t_from -> x at t_skip by the Gaussian flow (14a); 0 network evaluations."""
        return fit.flow(schedule, x, self.t_from, self.t_skip)


ACCEPTED = "a positive sigma/alpha number such as 2.5, or a share of the step budget such as 25% (in (0%, 100%))"


@dataclass(frozen=True)
class AnalyticSkip:
    """Skip the start of sampling with the Gaussian flow (module docstring). Give exactly one of ``sigma``
    (sigma/alpha where the solver takes over) or ``fraction`` (share of the step budget, in (0, 1)).
    ``fit``: the Gaussian to use; None lets ``condiff.evaluation.evaluate.generate`` use ``model_fit(model)``."""

    sigma: float | None = None
    fraction: float | None = None
    same_nfe: bool = True
    fit: GaussianFit | None = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        if (self.sigma is None) == (self.fraction is None):
            raise ConfigError(
                f"AnalyticSkip takes exactly one of sigma or fraction, got sigma={self.sigma!r}, "
                f"fraction={self.fraction!r}"
            )
        if self.sigma is not None and not (is_real(self.sigma) and self.sigma > 0):
            raise ConfigError(f"analytic skip sigma must be a finite positive sigma/alpha, got {self.sigma!r}")
        if self.fraction is not None and not (is_real(self.fraction) and 0 < self.fraction < 1):
            raise ConfigError(f"analytic skip fraction must be a number in (0, 1), got {self.fraction!r}")
        if not isinstance(self.same_nfe, bool):
            raise ConfigError(f"analytic skip same_nfe must be True or False, got {self.same_nfe!r}")

    @classmethod
    def parse(cls, text: str, name: str = "analytic skip") -> "AnalyticSkip":
        """'2.5' -> AnalyticSkip(sigma=2.5); '25%' -> AnalyticSkip(fraction=0.25). Anything else is a
        one-line ConfigError naming the value and the accepted forms."""
        raw = str(text).strip()
        pct = raw.endswith("%")
        try:
            value = float(raw[:-1] if pct else raw)
        except ValueError:
            value = math.nan
        if pct and math.isfinite(value) and 0 < value < 100:
            return cls(fraction=value / 100.0)
        if not pct and math.isfinite(value) and value > 0:
            return cls(sigma=value)
        raise ConfigError(f"{name} {str(text)!r} is not a skip amount; accepted: {ACCEPTED}")

    def describe(self) -> str:
        """The CLI form: '25%' or '2.5'."""
        return f"{self.fraction * 100:g}%" if self.fraction is not None else f"{self.sigma:g}"

    def plan(self, schedule, grid: Tensor, spacing=None, name: str = "analytic skip") -> SkipPlan:
        """The skip time and the solver's grid for a descending ``grid`` (from ``make_grid``). ``spacing``
        (default UniformT) spaces the new grid in ``same_nfe`` mode. Refuses a skip that reaches the grid's
        start or its last noisy point, naming the value and the accepted range."""
        from condiff.core.grids import UniformT, make_grid

        grid = torch.as_tensor(grid, dtype=F64)
        final_zero = float(grid[-1]) == float(schedule.t_clean)
        noisy = grid[:-1] if final_zero else grid
        n_steps = grid.numel() - 1
        if noisy.numel() < 2:
            raise ConfigError(
                f"{name} {self.describe()} needs a grid with at least 2 noisy points (2 steps or "
                f"more), got {n_steps} step(s)"
            )
        t_from, t_end = float(noisy[0]), float(noisy[-1])
        rho = lambda t: float(schedule.sigma_over_alpha(torch.tensor(t, dtype=F64)))  # noqa: E731
        lo, hi = rho(t_end), rho(t_from)
        limit = 100.0 * (noisy.numel() - 1) / n_steps
        accepted = (
            f"accepted: a sigma/alpha in ({lo:.4g}, {hi:.4g}), or a share of the step budget below "
            f"{limit:g}% for {n_steps} step(s)"
        )
        if self.fraction is not None:
            pos = self.fraction * n_steps
            if not pos < noisy.numel() - 1:
                raise ConfigError(
                    f"{name} {self.describe()} of {n_steps} step(s) reaches the grid's last noisy point; {accepted}"
                )
            i = int(math.floor(pos))
            w = pos - i
            t_skip = float(noisy[i]) * (1 - w) + float(noisy[i + 1]) * w
        else:
            if not lo < self.sigma < hi:
                where = (
                    "at or above sigma/alpha at the grid's start"
                    if self.sigma >= hi
                    else "at or below the grid's last noisy sigma/alpha"
                )
                raise ConfigError(f"{name} {self.describe()} is {where}; {accepted}")
            t_skip = float(schedule.t_from_log_snr(torch.tensor(-2.0 * math.log(self.sigma), dtype=F64)))
            t_skip = min(max(t_skip, t_end), t_from)
        if not t_end < t_skip < t_from:  # round-off at the ends
            raise ConfigError(
                f"{name} {self.describe()} leaves no span to skip or no noisy step on this grid; {accepted}"
            )
        below = grid[grid < t_skip]
        skipped = _steps_covered(grid, t_skip)
        if self.same_nfe:
            new = make_grid(
                schedule, n_steps, spacing or UniformT(), t_start=t_skip, t_end=t_end, final_zero=final_zero
            )
            new[0] = t_skip
        else:
            new = torch.cat([torch.tensor([t_skip], dtype=F64), below])
        return SkipPlan(t_from, t_skip, new, skipped)

    def prepare(self, model, grid: Tensor, spacing=None) -> "PreparedSkip":
        """The plan on ``grid`` bound to the model's schedule and Gaussian fit (``self.fit``, or
        ``model_fit(model)``: cached, fitted on first use). Refuses models whose noise is not Gaussian
        (PFGM++ with finite D: the closed form (14a) is for Gaussian perturbations)."""
        from condiff.solvers.pfgmpp import GaussianNoise

        noise = getattr(model, "noise", None)
        if noise is not None and not isinstance(noise, GaussianNoise):
            raise ConfigError(
                f"the analytic skip needs a Gaussian-noise model; this one uses "
                f"{type(noise).__name__} (the closed form is for x_t = alpha x_0 + sigma eps)"
            )
        plan = self.plan(model.schedule, grid, spacing)
        fit = self.fit if self.fit is not None else model_fit(model)
        return PreparedSkip(plan, fit, model.schedule)


@dataclass(frozen=True, eq=False)
class PreparedSkip:
    """A SkipPlan with its Gaussian fit and schedule: ``teleport(x)`` and the solver's ``grid``."""

    plan: SkipPlan
    fit: GaussianFit
    schedule: object

    @property
    def grid(self) -> Tensor:
        return self.plan.grid

    def teleport(self, x: Tensor) -> Tensor:
        return self.plan.teleport(self.fit, self.schedule, x)


def _steps_covered(grid: Tensor, t_skip: float) -> float:
    """How many steps of ``grid`` lie above t_skip, counting the step that contains it fractionally (in t)."""
    i = int((grid >= t_skip).sum()) - 1
    hi, lo = float(grid[i]), float(grid[i + 1])
    return i + (hi - t_skip) / (hi - lo)


# ---- the per-model fit and its cache ------------------------------------------------------------------


def cache_dir() -> Path:
    """$CONDIFF_CACHE, or ~/.cache/condiff."""
    root = os.environ.get("CONDIFF_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "condiff"


def fit_key(model, n: int, rank: int | None, seed: int) -> str:
    spec = {
        "format": FORMAT,
        "family": model.family.name,
        "weights": weights_digest(model.module),
        "n": n,
        "rank": rank,
        "seed": seed,
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def fit_path(
    model, n: int = DEFAULT_FIT_N, rank: int | None = DEFAULT_FIT_RANK, seed: int = 0, directory=None
) -> tuple[Path, str]:
    key = fit_key(model, n, rank, seed)
    root = Path(directory) if directory is not None else cache_dir()
    return root / "analytic" / f"{model.family.name}-{key[:24]}.safetensors", key


def save_fit(path, fit: GaussianFit, key: str = "") -> Path:
    """Write a fit as safetensors (atomically), with the format and its cache key in the metadata."""
    from condiff.core.files import save_tensors

    tensors = {"mean": fit.mean, "evecs": fit.evecs, "evals": fit.evals, "iso": torch.tensor([fit.iso], dtype=F64)}
    return save_tensors(path, tensors, {"format": FORMAT, "key": key, "n": str(fit.n)})


def load_fit(path, key: str | None = None, dim: int | None = None) -> GaussianFit:
    """Read and check a fit written by ``save_fit``: the format and (if given) the key and dimension, the
    shapes, finite non-negative non-increasing variances and orthonormal eigenvectors. Anything else is an
    InputFileError naming the file and what is wrong."""
    from safetensors import safe_open

    from condiff.core.files import load_tensors

    path = Path(path)
    where = f"analytic fit cache {str(path)!r}"
    tensors = load_tensors(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # noqa: BLE001 - safetensors raises several types
        raise InputFileError(f"{where} is unreadable ({type(e).__name__})") from None

    def bad(why: str):
        return InputFileError(f"{where} is invalid: {why}")

    if meta.get("format") != FORMAT:
        raise bad(f"format {meta.get('format')!r}, expected {FORMAT!r}")
    if key is not None and meta.get("key") != key:
        raise bad("it belongs to other weights or fit settings (key mismatch)")
    missing = sorted({"mean", "evecs", "evals", "iso"} - set(tensors))
    if missing:
        raise bad(f"missing tensor(s) {', '.join(missing)}")
    mean, u, lam, iso = (tensors[k].to(F64) for k in ("mean", "evecs", "evals", "iso"))
    d = mean.numel()
    if mean.dim() != 1 or u.dim() != 2 or u.shape[0] != d or lam.shape != (u.shape[1],) or iso.shape != (1,):
        raise bad(
            f"shapes mean {tuple(mean.shape)}, evecs {tuple(u.shape)}, evals {tuple(lam.shape)}, "
            f"iso {tuple(iso.shape)} disagree"
        )
    if dim is not None and d != dim:
        raise bad(f"dimension {d}, expected {dim}")
    if not all(bool(torch.isfinite(t).all()) for t in (mean, u, lam, iso)):
        raise bad("non-finite values")
    if bool((lam < 0).any()) or float(iso) < 0 or bool((lam[1:] > lam[:-1]).any()):
        raise bad("variances must be non-negative and eigenvalues non-increasing")
    if float((u.T @ u - torch.eye(u.shape[1], dtype=F64)).abs().max()) > 1e-6:
        raise bad("eigenvectors are not orthonormal")
    try:
        n = int(meta.get("n", "0"))
    except ValueError:
        raise bad(f"n {meta.get('n')!r} is not an integer") from None
    return GaussianFit(mean, u, lam, float(iso), n)


def fit_model_data(
    model, n: int = DEFAULT_FIT_N, rank: int | None = DEFAULT_FIT_RANK, seed: int = 0, batch: int = 256
) -> GaussianFit:
    """Fit the Gaussian to ``n`` images from ``model.data_batch`` (unconditional; the digits
    family repeats its 1347 training images across epochs as the trainer does)."""
    if not isinstance(n, numbers.Integral) or isinstance(n, bool) or n < 2:
        raise ConfigError(f"the analytic fit needs an integer number of samples >= 2, got {n!r}")
    g = torch.Generator().manual_seed(seed)
    xs, have, step = [], 0, 0
    while have < n:
        x0 = model.data_batch(step, min(batch, n - have), g, seed)
        xs.append(x0)
        have += x0.shape[0]
        step += 1
    return fit_gaussian(torch.cat(xs)[:n], rank)


def model_fit(
    model,
    n: int = DEFAULT_FIT_N,
    rank: int | None = DEFAULT_FIT_RANK,
    seed: int = 0,
    directory=None,
    refit: bool = False,
) -> GaussianFit:
    """The Gaussian fit of a model's training data, from the cache when a valid entry exists (keyed by the
    weights digest and n, rank, seed); otherwise fitted (seconds) and cached. An invalid cache file is
    refit with a warning that names it and the reason."""
    path, key = fit_path(model, n, rank, seed, directory)
    dim = math.prod(model.family.image_shape)
    if path.exists() and not refit:
        try:
            return load_fit(path, key, dim)
        except InputFileError as e:
            warnings.warn(f"{e}; refitting", stacklevel=2)
    fit = fit_model_data(model, n, rank, seed)
    try:
        save_fit(path, fit, key)
    except (OSError, OutputFileError) as e:  # the cache is an optimisation: sampling goes on without it
        warnings.warn(
            f"could not cache the Gaussian fit at {path} ({one_line(str(e))}); set CONDIFF_CACHE to a "
            f"writable directory to keep it",
            stacklevel=2,
        )
    return fit
