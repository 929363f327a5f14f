"""LinearAG (Castillo et al., AAAI 2025, arXiv 2312.12487): replace the unconditional evaluation of
the early CFG steps by an affine function of quantities the sampler has without it.

At evaluation k of a trajectory (times t_0 > t_1 > ... of a fixed grid and solver) the estimate is

    eps_u_hat(k) = b_0 + b_1 x_k + b_2 eps_c(k) + b_3 eps_c(k-1) + b_4 eps_u(k-1)

with scalar coefficients b(k) per evaluation, fitted by ordinary least squares over every entry of a set of
recorded CFG trajectories (``fit_linear_ag``). eps_u(k-1) is the unconditional prediction the sampler used at
the previous evaluation (the network's, or the previous estimate when that one was predicted too). Evaluation
0 has no history and uses (1, x, eps_c) only. The guided estimate is CFG with x0_u from eps_u_hat, so an
evaluation in ``LinearAG(..., steps=s)``'s first s costs n network rows instead of 2n. Which terms enter is a
``Regressors`` object. [UNVERIFIED: the paper's exact regressor set and which steps it replaces]

Everything is in eps space (eps = (x - alpha x0) / sigma), as in the paper. Identifiability: with a first-order
single-step solver and an unconditional model that is exactly affine in (x, eps_c), x_k is an affine function
of (eps_c(k-1), eps_u(k-1)), so the full regressor set is collinear; OLS then returns the minimum-norm solution
(same predictions, different coefficients). ``Regressors(prev_uncond=False)`` removes that term.

State, explicit. The coefficients belong to the evaluations of the fitting run: row k to the k-th evaluation
of a trajectory, at the fitted time k. ``LinearAG`` is the configuration; its ``start()`` returns a
``LinearAGTrajectory``, the Denoiser of one trajectory, which holds the evaluation counter k and the previous
evaluation's (eps_c, eps_u). ``sample`` starts its denoiser once per call
(``condiff.core.denoiser.start_trajectory``). Evaluation k < ``steps`` uses row k and must be at the fitted
time k (every entry of a per-sample t): anything else (another grid or solver, a mid-grid start) is a
ConfigError, never a silent fallback. Later evaluations run the exact CFG evaluation. Calling the
configuration itself is a ConfigError.

What the coefficients were fitted for is recorded with them: the CFG scale, the evaluation times, and (files
written by ``fit_linear_ag`` callers that give them) the model and the digest of its weights, the sampling grid,
its spacing and the solver. ``check_linear_ag_fits`` compares them with a run (condiff.core.fitted): another
model, scale or grid is a one-line ConfigError, or with ``allow_mismatch`` a warning, after which LinearAG
runs at the run's scale and uses row k at evaluation k whatever its time (``LinearAG(cfg=..., check_times=False)``).
"""

from __future__ import annotations

import json
import math
import numbers
from dataclasses import dataclass, field, fields, replace
from typing import Any, Mapping

import torch

from condiff.core import parameterization as P
from condiff.core.denoiser import Wrapper, coefficients, start_trajectory, take_rows
from condiff.core.files import load_tensors, save_tensors
from condiff.core.fitted import FittedFor, check_fitted, grid_times, mismatch, same_times
from condiff.core.sampling import sample
from condiff.errors import ConfigError, InputFileError
from condiff.guidance.cfg import contrast
from condiff.guidance.interval import branches, split_null
from condiff.guidance.schedules import check_scale

F64 = torch.float64
TERMS = ("intercept", "x", "cond", "prev_cond", "prev_uncond")
FORMAT = 1
META_KEY = "condiff_linear_ag"  # the safetensors metadata entry: what the coefficients were fitted for (JSON)


@dataclass(frozen=True)
class Regressors:
    """Which terms enter eps_u_hat: the constant, x_k, eps_c(k), eps_c(k-1), eps_u(k-1)."""

    intercept: bool = True
    x: bool = True
    cond: bool = True
    prev_cond: bool = True
    prev_uncond: bool = True

    def __post_init__(self):
        for f in fields(self):
            if not isinstance(getattr(self, f.name), bool):
                raise ConfigError(f"Regressors.{f.name} must be true or false, got {getattr(self, f.name)!r}")
        if not any(getattr(self, name) for name in TERMS):
            raise ConfigError("Regressors needs at least one term (intercept, x, cond, prev_cond, prev_uncond)")

    def mask(self) -> torch.Tensor:
        return torch.tensor([getattr(self, name) for name in TERMS])

    @classmethod
    def from_mask(cls, mask) -> "Regressors":
        return cls(**{name: bool(v) for name, v in zip(TERMS, mask)})


def features(x: torch.Tensor, eps_c: torch.Tensor, prev: tuple | None) -> list[torch.Tensor | None]:
    """The five terms in TERMS order (float64, shaped like x); the previous-step terms are None at k = 0."""
    ones = torch.ones_like(x, dtype=F64)
    pc, pu = (None, None) if prev is None else (prev[0].to(F64), prev[1].to(F64))
    return [ones, x.to(F64), eps_c.to(F64), pc, pu]


def _used(mask: torch.Tensor, terms: list) -> list[int]:
    return [j for j, t in enumerate(terms) if bool(mask[j]) and t is not None]


@dataclass(frozen=True)
class CFGRecord:
    """Recorded CFG evaluations of n trajectories: times [K] (float64) and x, eps_c, eps_u [K, n, ...]."""

    times: torch.Tensor
    x: torch.Tensor
    eps_c: torch.Tensor
    eps_u: torch.Tensor

    @staticmethod
    def cat(records: list["CFGRecord"]) -> "CFGRecord":
        first = records[0]
        for r in records[1:]:
            if r.times.shape != first.times.shape or not torch.equal(r.times, first.times):
                raise ConfigError("CFG records to join must share their evaluation times (same grid and solver)")
        return CFGRecord(
            first.times, *(torch.cat([getattr(r, k) for r in records], 1) for k in ("x", "eps_c", "eps_u"))
        )

    def previous(self, k: int):
        return None if k == 0 else (self.eps_c[k - 1], self.eps_u[k - 1])


@dataclass
class _Recorder(Wrapper):
    """CFG that records (t, x, eps_c, eps_u) at every evaluation."""

    denoiser: Any
    scale: float
    null: Mapping[str, Any] | None
    rows: list = field(default_factory=list)

    def __call__(self, x, t, cond=None):
        if isinstance(t, torch.Tensor) and t.dim() > 0:
            raise ConfigError("recording CFG trajectories for LinearAG needs one t per evaluation, got per-sample t")
        cond, null = split_null(cond, self.null, what="LinearAG recording")
        x0_c, x0_u = branches(self.denoiser, x, t, cond, null)
        a, s = coefficients(self.denoiser.schedule, t, x)
        self.rows.append(
            (float(t), x.detach().clone(), P.x0_to_eps(x, x0_c, a, s).detach(), P.x0_to_eps(x, x0_u, a, s).detach())
        )
        return contrast(x0_c, x0_u, self.scale)


def record_cfg(denoiser, solver, grid, x, cond, scale: float, null=None, noise=None):
    """Run CFG trajectories with ``sample`` and record every evaluation: (SampleOutput, CFGRecord)."""
    rec = _Recorder(denoiser, _constant_scale(scale), null)
    out = sample(rec, solver, grid, x, cond, noise)
    times = torch.tensor([r[0] for r in rec.rows], dtype=F64)
    return out, CFGRecord(times, *(torch.stack([r[j] for r in rec.rows]) for j in (1, 2, 3)))


def _constant_scale(scale) -> float:
    if callable(scale):
        raise ConfigError("LinearAG needs a constant guidance scale (a number), not a function of t")
    return check_scale(scale, "LinearAG scale")


@dataclass(frozen=True)
class LinearAGCoefficients:
    """Per-evaluation OLS coefficients: times [K] float64, coef [K, 5] (TERMS order, 0 for unused terms),
    r2 [K] (in-sample), the Regressors, and the CFG scale the trajectories were recorded with. What else they
    were fitted for (None: not recorded): the model (a name) and ``weights`` (its
    ``condiff.core.fitted.weights_digest``), the sampling ``grid`` (its steps + 1 times), its ``spacing`` and the
    ``solver``'s name; ``source`` is the file they were read from (for messages)."""

    times: torch.Tensor
    coef: torch.Tensor
    r2: torch.Tensor
    regressors: Regressors
    scale: float
    model: str | None = None
    weights: str | None = None
    grid: tuple[float, ...] | None = None
    spacing: str | None = None
    solver: str | None = None
    source: str | None = field(default=None, compare=False)

    @property
    def steps(self) -> int:
        return self.times.numel()

    def predict(self, k: int, x, eps_c, prev) -> torch.Tensor:
        """eps_u_hat at evaluation k (float64); ``prev`` = (eps_c(k-1), eps_u(k-1)) or None at k = 0."""
        terms = features(x, eps_c, prev)
        used = _used(self.regressors.mask(), terms)
        if any(self.coef[k, j] != 0 and terms[j] is None for j in range(len(TERMS))):
            raise ConfigError(f"LinearAG evaluation {k} needs the previous evaluation's predictions")
        out = torch.zeros_like(terms[0])
        for j in used:
            out = out + self.coef[k, j] * terms[j]
        return out


def fit_record(record: CFGRecord, scale: float, regressors: Regressors = Regressors()) -> LinearAGCoefficients:
    """OLS per evaluation over every entry of every trajectory (minimum-norm when collinear)."""
    K = record.times.numel()
    coef = torch.zeros(K, len(TERMS), dtype=F64)
    r2 = torch.zeros(K, dtype=F64)
    mask = regressors.mask()
    for k in range(K):
        terms = features(record.x[k], record.eps_c[k], record.previous(k))
        used = _used(mask, terms)
        if not used:
            continue
        design = torch.stack([terms[j].reshape(-1) for j in used], 1)
        target = record.eps_u[k].to(F64).reshape(-1, 1)
        sol = torch.linalg.lstsq(design, target, driver="gelsd").solution[:, 0]
        coef[k, used] = sol
        resid = target[:, 0] - design @ sol
        total = ((target - target.mean()) ** 2).sum()
        r2[k] = 1.0 - (resid**2).sum() / total if total > 0 else 1.0
    return LinearAGCoefficients(record.times.clone(), coef, r2, regressors, float(scale))


def fit_linear_ag(
    denoiser,
    solver,
    grid,
    x,
    cond,
    scale: float,
    regressors: Regressors = Regressors(),
    null=None,
    noise=None,
    batch_size: int | None = None,
    model: str | None = None,
    weights: str | None = None,
    spacing: str | None = None,
) -> LinearAGCoefficients:
    """Record CFG trajectories from the start points ``x`` (rows; in chunks of ``batch_size``) with ``solver``
    on ``grid`` and fit the LinearAG coefficients. ``cond`` holds per-row tensors (and 'null', or pass null).
    The result records the grid and the solver's name, and ``model``, ``weights`` (the digest of the model's
    weights) and ``spacing`` (the grid's spacing name) as given."""
    n = x.shape[0]
    size = n if batch_size is None else int(batch_size)
    records = []
    for start in range(0, n, size):
        index = torch.arange(start, min(start + size, n))
        sub = take_rows(dict(cond or {}), index, n)
        records.append(record_cfg(denoiser, solver, grid, x[index], sub, scale, null, noise)[1])
    coeffs = fit_record(CFGRecord.cat(records), scale, regressors)
    solver_name = getattr(solver, "name", None)
    return replace(
        coeffs,
        model=model,
        weights=weights,
        grid=grid_times(grid),
        spacing=spacing,
        solver=solver_name if isinstance(solver_name, str) else None,
    )


def fitted_for(coeffs: LinearAGCoefficients) -> FittedFor:
    """What the coefficients were fitted for: the model, its weights digest, the CFG scale and the grid."""
    steps = None if coeffs.grid is None else len(coeffs.grid) - 1
    return FittedFor(coeffs.model, coeffs.weights, float(coeffs.scale), steps, coeffs.spacing, coeffs.grid)


def check_linear_ag_fits(
    coeffs: LinearAGCoefficients,
    cfg: float | None = None,
    grid=None,
    weights: str | None = None,
    model: str | None = None,
    where: str | None = None,
    allow_mismatch: bool = False,
) -> LinearAGCoefficients:
    """Check the coefficients against what a run gives: its CFG scale ``cfg``, its sampling ``grid`` and the
    digest of its model's ``weights`` (``model`` names it). Another model, scale or grid is ``check_fitted``'s
    one-line ConfigError naming ``where`` (default: the file they were read from), or with ``allow_mismatch``
    a FitWarning. For coefficients that do not record their grid, the fitted evaluation times must be the
    first times of ``grid`` (a one-evaluation-per-step solver on the same grid)."""
    if where is None:
        where = "the LinearAG coefficients" + ("" if coeffs.source is None else f" {coeffs.source!r}")
    fitted = fitted_for(coeffs)
    times = grid_times(grid)
    check_fitted(where, fitted, FittedFor(model, weights, cfg, times=times), allow_mismatch)
    if times is None or fitted.times is not None and not same_times(fitted.times, times):
        return coeffs  # no grid, or another grid: refused or warned about above
    evals = times[:-1]
    k = coeffs.steps
    if k > len(evals) or not same_times(tuple(coeffs.times.tolist()), evals[:k]):
        mismatch(
            where,
            f"{k} evaluations from t={float(coeffs.times[0]):g} (one per step of its grid, in order)",
            f"a grid of {len(evals)} steps from t={times[0]:g}",
            allow_mismatch,
        )
    return coeffs


def predict_record(coeffs: LinearAGCoefficients, record: CFGRecord, steps: int | None = None):
    """Teacher-forced eps_u_hat for the first ``steps`` evaluations of a record (the recorded history as the
    previous terms) and the R^2 of each: (predictions [steps, n, ...], r2 [steps])."""
    steps = record.times.numel() if steps is None else steps
    preds, r2 = [], torch.zeros(steps, dtype=F64)
    for k in range(steps):
        p = coeffs.predict(k, record.x[k], record.eps_c[k], record.previous(k))
        y = record.eps_u[k].to(F64)
        r2[k] = 1.0 - ((y - p) ** 2).sum() / ((y - y.mean()) ** 2).sum()
        preds.append(p)
    return torch.stack(preds), r2


def save_linear_ag(coeffs: LinearAGCoefficients, path):
    """Write the coefficients as a safetensors file (atomically), with what they were fitted for as JSON
    metadata (``META_KEY``)."""
    fitted = {**fitted_for(coeffs).to_json(), "solver": coeffs.solver}
    return save_tensors(
        path,
        {
            "times": coeffs.times,
            "coef": coeffs.coef,
            "r2": coeffs.r2,
            "regressors": coeffs.regressors.mask().to(torch.uint8),
            "scale": torch.tensor([coeffs.scale], dtype=F64),
            "format": torch.tensor([FORMAT], dtype=torch.int64),
        },
        {META_KEY: json.dumps(fitted)},
    )


def load_linear_ag(path) -> LinearAGCoefficients:
    """Read coefficients written by ``save_linear_ag``; anything else is an InputFileError."""
    data = load_tensors(path)
    need = {"times", "coef", "r2", "regressors", "scale", "format"}
    if not need <= set(data):
        raise InputFileError(
            f"{str(path)!r} is not a LinearAG coefficient file (missing {', '.join(sorted(need - set(data)))})"
        )
    times, coef = data["times"], data["coef"]
    K, P = times.numel(), len(TERMS)
    ok = (
        data["format"].numel() == 1
        and int(data["format"][0]) == FORMAT
        and times.dim() == 1
        and tuple(coef.shape) == (K, P)
        and data["r2"].numel() == K
        and data["regressors"].numel() == P
        and data["scale"].numel() == 1
        and bool(torch.isfinite(coef).all())
        and bool((times[1:] <= times[:-1]).all())
    )
    if not ok:
        raise InputFileError(
            f"{str(path)!r} holds malformed LinearAG coefficients (format {FORMAT}: times [K] "
            f"non-increasing, coef [K, {P}] finite, r2 [K], regressors [{P}], scale [1])"
        )
    scale = float(data["scale"][0])
    if not math.isfinite(scale):
        raise InputFileError(f"{str(path)!r} holds a non-finite LinearAG scale")
    meta = _read_meta(path)  # None: written before the coefficients recorded what they were fitted for
    fitted = FittedFor() if meta is None else FittedFor.from_json(meta, repr(str(path)))
    solver = None if meta is None else meta.get("solver")
    if solver is not None and not isinstance(solver, str):
        raise InputFileError(f"{str(path)!r}: its fitted-for solver is malformed, got {solver!r}")
    return LinearAGCoefficients(
        data["times"].to(F64),
        data["coef"].to(F64),
        data["r2"].to(F64),
        Regressors.from_mask(data["regressors"]),
        scale,
        fitted.model,
        fitted.weights,
        fitted.times,
        fitted.spacing,
        solver,
        str(path),
    )


def _read_meta(path):
    """The JSON under META_KEY in a (valid) safetensors file's metadata, or None."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(META_KEY)
        return None if raw is None else json.loads(raw)
    except Exception as e:  # noqa: BLE001 - safetensors and json raise several types
        raise InputFileError(f"{str(path)!r}: cannot read its LinearAG metadata ({type(e).__name__})") from None


@dataclass
class LinearAG(Wrapper):
    """CFG at the fitted scale whose first ``steps`` evaluations (default: the first half) predict the
    unconditional branch from ``coefficients`` instead of evaluating it (module docstring). A configuration:
    ``start()`` gives the Denoiser of one trajectory (``sample`` calls it)."""

    denoiser: Any
    coefficients: LinearAGCoefficients
    steps: int | None = None
    null: Mapping[str, Any] | None = None
    cfg: float | None = None  # the CFG scale (None: the fitted one)
    check_times: bool = True  # refuse an evaluation away from its fitted time (False: use row k regardless)

    def __post_init__(self):
        if self.cfg is not None:
            _constant_scale(self.cfg)
        if not isinstance(self.check_times, bool):
            raise ConfigError(f"LinearAG check_times must be true or false, got {self.check_times!r}")
        K = self.coefficients.steps
        if self.steps is None:
            self.steps = K // 2
        s = self.steps
        if not isinstance(s, numbers.Integral) or isinstance(s, bool) or not 0 <= s <= K:
            raise ConfigError(f"LinearAG steps must be an integer in [0, {K}] (the fitted evaluations), got {s!r}")

    @property
    def scale(self) -> float:
        return self.coefficients.scale if self.cfg is None else float(self.cfg)

    def check_time(self, k: int, t) -> None:
        """Evaluation k must be at the fitted time k (every entry of a per-sample t); ConfigError otherwise."""
        fitted = float(self.coefficients.times[k])
        tt = torch.as_tensor(t, dtype=F64)
        if not bool(((tt - fitted).abs() <= 1e-12 * max(1.0, abs(fitted))).all()):
            got = float(tt) if tt.dim() == 0 else tt.tolist()
            raise ConfigError(
                f"LinearAG evaluation {k} of this trajectory is at t={got!r}, but its coefficients were "
                f"fitted at t={fitted!r}: sample from the start of the grid, with the solver they "
                f"were fitted on (or fewer LinearAG steps)"
            )

    def start(self, memo: dict | None = None) -> "LinearAGTrajectory":
        """The Denoiser of one new trajectory (evaluation 0, no history), over the started inner denoiser."""
        return LinearAGTrajectory(self, start_trajectory(self.denoiser, memo))

    def __call__(self, x, t, cond=None):
        raise ConfigError(
            "LinearAG keeps per-trajectory state: run it with sample(), or call .start() for the "
            "denoiser of one trajectory"
        )


@dataclass
class LinearAGTrajectory(Wrapper):
    """One trajectory of LinearAG: ``config`` (the LinearAG), the started inner ``denoiser``, the index ``k`` of
    the next evaluation and ``prev``, (eps_c, eps_u) of the previous one (None before the first).
    ``start()`` begins a new trajectory."""

    config: LinearAG
    denoiser: Any
    k: int = 0
    prev: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)

    def start(self, memo: dict | None = None) -> "LinearAGTrajectory":
        return self.config.start(memo)

    def __call__(self, x, t, cond=None):
        c, k, prev = self.config, self.k, self.prev
        cond, null = split_null(cond, c.null, what="LinearAG")
        if prev is not None and prev[0].shape[0] != x.shape[0]:
            raise ConfigError(f"LinearAG trajectory of batch {prev[0].shape[0]} got x with batch {x.shape[0]}")
        a, s = coefficients(self.denoiser.schedule, t, x)
        if k < c.steps:
            if c.check_times:
                c.check_time(k, t)
            x0_c = self.denoiser(x, t, cond)
            eps_c = P.x0_to_eps(x, x0_c, a, s)
            eps_u = c.coefficients.predict(k, x, eps_c, prev).to(x.dtype)
            x0_u = P.eps_to_x0(x, eps_u, a, s)
        else:
            x0_c, x0_u = branches(self.denoiser, x, t, cond, null)
            eps_c, eps_u = P.x0_to_eps(x, x0_c, a, s), P.x0_to_eps(x, x0_u, a, s)
        self.k, self.prev = k + 1, (eps_c, eps_u)
        return contrast(x0_c, x0_u, c.scale)
