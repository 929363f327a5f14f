"""Time grids searched on a model: the interior times of an N-step grid that minimise a solver's terminal error
against a many-step reference, on starts the evaluation never sees.

Sabour, Fidler & Kreis 2024 ("Align Your Steps: Optimizing Sampling Schedules in Diffusion Models", ICML) show
that a schedule optimised per model and solver beats hand-made spacings at low NFE. Their objective is a bound
on the KL divergence between the true and the discretised SDE; the objective here is the quantity condiff's
solver benchmark reports (as Xue et al. 2024, "Accelerating Diffusion Sampling with Optimized Time Steps",
CVPR, fit the steps to a reference trajectory): the mean over a batch of starts x_T of the per-sample RMS
distance ``||x_0(grid) - x_0^ref|| / sqrt(d)`` between the solver's end point on the grid and a reference end
point from the same x_T (a many-step deterministic solve, ``reference_end``).

Parametrisation. The grid starts at ``t_start`` (fixed: the starts live there) and ends at the clean point
(sigma = 0). Its ``steps - 1`` interior noisy points are placed in log-SNR lambda by ``steps`` positive
increments ``w = softmax(z)`` of the span from lambda(t_start) to lambda(t_min):

    lambda_k = lambda(t_start) + (lambda(t_min) - lambda(t_start)) (w_1 + ... + w_k),   k = 1 .. steps - 1

so every z gives a strictly descending grid inside the schedule's range (the last increment is the span left
unvisited before the jump to the clean point). The search is Nelder-Mead (scipy.optimize.minimize) on z from
the increments of an initial grid (diffusers' trailing grid by default), at most ``max_evals`` solves of the
batch (40 per step by default); the best grid seen is kept, so the result is never worse than the start on the
fitting batch.

Grids file (JSON, written atomically, loaded strictly): per step count the times (clean point included), the
fitting error before and after, and what they belong to (``FittedFor``: the model's weights digest, the CFG
scale; the solver searched with). ``tabulated`` turns it into the ``condiff.core.grids.Tabulated`` spacing that
``make_grid`` (and ``--grid FILE``) reads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np
import torch

from condiff.core.files import atomic_write_json, load_json
from condiff.core.fitted import FittedFor, check_fitted
from condiff.core.grids import MAX_STEPS, Tabulated, Trailing, make_grid
from condiff.core.sampling import sample
from condiff.errors import ConfigError, InputFileError, NonFiniteError, check_int, is_real

F64 = torch.float64
FORMAT = "condiff.solvers.grid_search-grids"
VERSION = 1
EVALS_PER_STEP = 40


def terminal_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Mean over the batch of the per-sample RMS difference ``||x - ref|| / sqrt(d)``."""
    d = (x.to(F64) - ref.to(F64)).flatten(1)
    return float((d.norm(dim=1) / math.sqrt(d.shape[1])).mean())


def _span(schedule, t_start: float) -> tuple[float, float]:
    return float(schedule.log_snr(torch.tensor(t_start, dtype=F64))), float(
        schedule.log_snr(torch.tensor(schedule.t_min, dtype=F64))
    )


def grid_of(schedule, z, t_start: float) -> torch.Tensor:
    """The grid (``len(z)`` steps, float64, clean point last) whose lambda increments are ``softmax(z)``."""
    z = np.asarray(z, dtype=np.float64)
    w = np.exp(z - z.max())
    w = w / w.sum()
    lam0, lam1 = _span(schedule, t_start)
    lam = lam0 + (lam1 - lam0) * np.cumsum(w)[:-1]
    inner = schedule.t_from_log_snr(torch.tensor(lam, dtype=F64)).reshape(-1)
    ends = [torch.tensor([t_start], dtype=F64), inner, torch.tensor([schedule.t_clean], dtype=F64)]
    return torch.cat(ends)


def increments_of(schedule, grid) -> np.ndarray:
    """The z whose ``grid_of`` is ``grid`` (a grid from t_start down to the clean point)."""
    g = torch.as_tensor(grid, dtype=F64)
    lam0, lam1 = _span(schedule, float(g[0]))
    lam = schedule.log_snr(g[1:-1]).numpy() if g.numel() > 2 else np.zeros(0)
    inc = np.diff(np.concatenate([[lam0], np.minimum(lam, lam1), [lam1]])) / (lam1 - lam0)
    return np.log(np.maximum(inc, 1e-12))


def trailing_times(schedule, t_start: float, steps: int) -> torch.Tensor:
    """The ``Trailing`` grid of ``steps`` steps from ``t_start``, clean point included (from t = 999 on a 1000-step
    table: 999, 799, ..., 199, then t_clean = -1: diffusers' trailing timesteps)."""
    steps = check_int("steps", steps, 1, MAX_STEPS)
    return make_grid(schedule, steps, Trailing(), t_start=t_start)


def reference_end(denoiser, cond, x_T: torch.Tensor, grid, solver, progress: bool | str = False) -> torch.Tensor:
    """The end point of ``solver`` over the fine ``grid`` from ``x_T`` (no gradients)."""
    with torch.no_grad():
        return sample(denoiser, solver, grid, x_T.clone(), cond, progress=progress).x


@dataclass(frozen=True)
class SearchedGrid:
    """One searched grid: ``times`` (steps + 1 points, clean point last), the fitting error of the initial grid
    and of this one, and how many solves the search made."""

    times: tuple[float, ...]
    initial_error: float
    error: float
    evaluations: int

    @property
    def steps(self) -> int:
        return len(self.times) - 1


def search_grid(
    denoiser,
    cond,
    x_T: torch.Tensor,
    x_ref: torch.Tensor,
    solver,
    initial,
    max_evals: int | None = None,
    progress: Callable[[int, int, float], None] | None = None,
) -> SearchedGrid:
    """Nelder-Mead on the lambda increments of ``initial`` (a grid from x_T's time to the clean point) to minimise
    ``solver``'s terminal error against ``x_ref`` on the batch ``x_T``. ``progress(evals, max_evals, best)``
    after every solve."""
    from scipy.optimize import minimize

    initial = torch.as_tensor(initial, dtype=F64)
    steps = initial.numel() - 1
    check_int("steps", steps, 1, MAX_STEPS)
    max_evals = EVALS_PER_STEP * steps if max_evals is None else check_int("max_evals", max_evals, 1, 10**6)
    sch = denoiser.schedule
    t_start = float(initial[0])
    best = {"error": math.inf, "grid": initial, "evals": 0}

    def error(grid: torch.Tensor) -> float:
        try:
            with torch.no_grad():
                x = sample(denoiser, solver, grid, x_T.clone(), cond).x
            e = terminal_error(x, x_ref)
        except NonFiniteError:  # a trial grid on which the solver diverges: the worst possible, not a stop
            e = math.inf
        e = e if math.isfinite(e) else math.inf
        best["evals"] += 1
        if e < best["error"]:
            best["error"], best["grid"] = e, grid
        if progress is not None:
            progress(best["evals"], max_evals, best["error"])
        return e

    first = error(initial)
    if steps > 1 and max_evals > 1:
        minimize(
            lambda z: error(grid_of(sch, z, t_start)),
            increments_of(sch, initial),
            method="Nelder-Mead",
            options={"maxfev": max_evals - 1, "xatol": 1e-4, "fatol": 1e-7},
        )
    times = tuple(float(v) for v in best["grid"])
    return SearchedGrid(times, first, best["error"], best["evals"])


# ---- grids files ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SearchedGrids:
    """The contents of a grids file: ``grids[steps]``, the solver searched with, what they were fitted for
    (model name and weights digest, CFG) and how (``search``: starts, seed, reference)."""

    grids: Mapping[int, SearchedGrid]
    solver: str
    fitted: FittedFor = field(default_factory=FittedFor)
    search: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "version": VERSION,
            "solver": self.solver,
            "fitted_for": self.fitted.to_json(),
            "search": dict(self.search),
            "grids": [
                {
                    "steps": g.steps,
                    "times": list(g.times),
                    "initial_error": g.initial_error,
                    "error": g.error,
                    "evaluations": g.evaluations,
                }
                for _, g in sorted(self.grids.items())
            ],
        }

    def tabulated(self, source: str = "the grids file") -> Tabulated:
        """The spacing that ``make_grid`` reads: each grid's noisy points (the clean point is make_grid's)."""
        return Tabulated({k: g.times[:-1] for k, g in self.grids.items()}, source)


def save_grids(path, grids: SearchedGrids):
    return atomic_write_json(path, grids.to_json())


def _bad(path, msg: str) -> InputFileError:
    return InputFileError(f"{str(path)!r} is not a valid grids file (condiff grid search): {msg}")


def _parse_grid(entry, path, k: int) -> SearchedGrid:
    if not isinstance(entry, dict):
        raise _bad(path, f"grids[{k}] must be an object")
    steps, times = entry.get("steps"), entry.get("times")
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
        raise _bad(path, f"grids[{k}].steps must be an integer in [1, {MAX_STEPS}], got {steps!r}")
    if not isinstance(times, list) or len(times) != steps + 1 or not all(is_real(v) for v in times):
        raise _bad(path, f"grids[{k}].times must be a list of {steps + 1} finite numbers")
    if not all(a > b for a, b in zip(times, times[1:])):
        raise _bad(path, f"grids[{k}].times must be strictly descending")
    nums = {}
    for key in ("initial_error", "error"):
        v = entry.get(key)
        if v is not None and not (is_real(v) or v == math.inf):
            raise _bad(path, f"grids[{k}].{key} must be a number, got {v!r}")
        nums[key] = math.nan if v is None else float(v)
    evals = entry.get("evaluations", 0)
    if isinstance(evals, bool) or not isinstance(evals, int) or evals < 0:
        raise _bad(path, f"grids[{k}].evaluations must be a non-negative integer, got {evals!r}")
    return SearchedGrid(tuple(float(v) for v in times), nums["initial_error"], nums["error"], evals)


def parse_grids(obj, path="<grids>") -> SearchedGrids:
    """Validate the JSON value of a grids file (InputFileError naming the first problem)."""
    if not isinstance(obj, dict):
        raise _bad(path, f"expected a JSON object, got {type(obj).__name__}")
    if obj.get("format") != FORMAT:
        raise _bad(path, f"format must be {FORMAT!r}, got {obj.get('format')!r}")
    if obj.get("version") != VERSION:
        raise _bad(path, f"version {obj.get('version')!r} is not supported (this condiff reads {VERSION})")
    unknown = set(obj) - {"format", "version", "solver", "fitted_for", "search", "grids"}
    if unknown:
        raise _bad(path, f"unknown keys {sorted(unknown)}")
    if not isinstance(obj.get("solver"), str):
        raise _bad(path, "solver must be a solver name")
    search = obj.get("search", {})
    if not isinstance(search, dict):
        raise _bad(path, "search must be an object")
    entries = obj.get("grids")
    if not isinstance(entries, list) or not entries:
        raise _bad(path, "grids must be a non-empty list")
    grids: dict[int, SearchedGrid] = {}
    for k, entry in enumerate(entries):
        g = _parse_grid(entry, path, k)
        if g.steps in grids:
            raise _bad(path, f"two grids of {g.steps} steps")
        grids[g.steps] = g
    starts = {g.times[0] for g in grids.values()}
    if max(starts) - min(starts) > 1e-9 * max(1.0, max(starts)):
        raise _bad(path, f"its grids must share their first time, got {sorted(starts)}")
    fitted = FittedFor.from_json(obj.get("fitted_for", {}), f"{str(path)!r}")
    return SearchedGrids(grids, obj["solver"], fitted, search)


def load_grids(path) -> SearchedGrids:
    """Read and validate a grids file (InputFileError with one line on any problem)."""
    return parse_grids(load_json(path), path)


def check_grids_fit(
    grids: SearchedGrids,
    schedule,
    weights: str | None = None,
    cfg: float | None = None,
    model: str | None = None,
    where: str = "the grids file",
    allow_mismatch: bool = False,
) -> Tabulated:
    """The file's grids as a spacing, checked: every time within ``schedule``'s range (else a ConfigError), and
    for what is given, the model's weights and the CFG scale they were searched with (``check_fitted``)."""
    lo, hi = min(schedule.t_clean, schedule.t_min), schedule.t_max
    for g in grids.grids.values():
        if not (lo - 1e-9 <= g.times[-1] and g.times[0] <= hi + 1e-9 * max(1.0, abs(hi))):
            raise ConfigError(
                f"{where} holds times from {g.times[0]:g} to {g.times[-1]:g}, outside this model's schedule "
                f"[{lo:g}, {hi:g}]"
            )
    fitted = FittedFor(grids.fitted.model, grids.fitted.weights, grids.fitted.cfg)
    check_fitted(where, fitted, FittedFor(model, weights, cfg), allow_mismatch, made="searched", redo="search it")
    return grids.tabulated(where)
