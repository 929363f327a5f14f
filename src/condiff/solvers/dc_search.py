"""DC-Solver's ratio search, cascade polynomial regression and ratios files (Zhao, Wang, Zhou & Lu 2024,
"DC-Solver", ECCV: the compensation-ratio search and the cascade polynomial regression and the official code
wl-zhao/DC-Solver; the paper's equation numbers could not be checked here, so the
objectives are written out). The solver itself is condiff.solvers.dc_solver.

Ratio search (greedy, one step at a time, on a small batch of starts x_T with their conditions). For step i
(after a warm-up of 2 steps whose ratios stay 1), with the ratios of steps < i already fixed, minimise over
the scalar rho_i

    || UniC( UniP(x_i; m_i(rho_i)) ) - x_ref(t_{i+1}) ||^2 / numel

by AdamW (lr 0.1, 20 iterations, torch's default weight decay 0.01, start rho = 1, as the official code; the
value after the last update is kept). The closure runs the compensated predictor and the next corrector, whose
model evaluation is differentiated through (torch.autograd.grad with respect to rho only, so a network's
parameters collect no gradients). No corrector follows the last step. ``bounded=True`` optimises p in
rho = 1 + 0.5 tanh(p), the official option.

Reference x_ref: a deterministic many-step sampler (DDIM, 200 steps by default, as the paper) from the same
x_T with the same denoiser (CFG included). Its grid is the ``steps``-point grid of the given spacing *refined
with every point of the coarse grids*, so x_ref is read at t_{i+1} exactly rather than at "the reference time
closest to t_{i+1} from above" (``Reference.at`` still falls back to that rule for a reference built
otherwise). One reference serves every NFE of a search, since all coarse grids share their start.

Cascade polynomial regression (CPR), with step = i + 1 (1-based, as the official code) and u = step / NFE:

    rho(step) = sum_{j<=3} c_j u^j,   c_j = sum_{m<=2} a_jm (CFG/12)^m,   a_jm = sum_{n<=2} theta_jmn (NFE/50)^n

36 parameters theta[j][m][n] (j, m, n are powers; the official .npy lists m and n highest power first), fitted
by linear least squares on the searched ratios of steps >= 3; steps 1 and 2 are fixed at 1. With fewer than 3
distinct CFG (or NFE) values in the table the CFG (NFE) degree drops to (distinct values - 1), and further until
the searched points determine the coefficients (``fit_cpr``); unused coefficients are 0, so a one-CFG table
predicts the same ratios for every CFG.

Ratios file (JSON, written atomically, loaded strictly): the searched ratios per (nfe, cfg), the CPR fit, and
what they belong to (base solver, interpolation axis, dc_order, grid spacing, model and the digest of its
weights, ``model_weights``). ``ratios_for`` returns the searched ratios of an (nfe, cfg) when present, else the
CPR prediction; ``dc_solver_for`` checks the spacing and (given) the weights against the run
(``check_ratios_fit``, condiff.core.fitted).

Why lambda is the default interpolation axis, measured on the GMM oracle: docs/solvers.md (DC-Solver's axis).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from condiff.core.denoiser import start_trajectory
from condiff.core.files import atomic_write_json, load_json
from condiff.core.fitted import FittedFor, check_fitted
from condiff.core.grids import MAX_STEPS, SPACINGS, UniformT, make_grid
from condiff.core.sampling import CountingDenoiser, sample
from condiff.errors import ConfigError, InputFileError, check_int, is_real
from condiff.solvers.base import begin
from condiff.solvers.dc_solver import AXES, BASES, MAX_DC_ORDER, DCSolver, LambdaAxis, absorb, advance, has_corrector
from condiff.solvers.ddim import DDIM
from condiff.solvers.unipc import UniPC

F64 = torch.float64
WARMUP = 2  # the first two steps keep ratio 1 (official code and CPR)
FORMAT = "condiff.solvers.dc_search-ratios"
VERSION = 1
CPR_SHAPE = (4, 3, 3)  # powers of u, CFG/12, NFE/50
CPR_SCALES = (12.0, 50.0)


# ---- reference trajectory ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reference:
    """States of a many-step reference trajectory: ``times`` (M,) descending, ``states`` (M, *x.shape)."""

    times: torch.Tensor
    states: torch.Tensor

    def at(self, t: float) -> torch.Tensor:
        """The state at ``t`` if it is a reference time, else at the reference time closest to t from above."""
        tol = 1e-9 * max(1.0, abs(float(t)))
        above = torch.nonzero(self.times >= float(t) - tol)
        if above.numel() == 0:
            raise ConfigError(f"the reference trajectory starts at t={float(self.times[0]):.6g}, after t={t:.6g}")
        return self.states[int(above[-1])]


def _as_grid(grid) -> torch.Tensor:
    g = torch.as_tensor(grid, dtype=F64)
    if g.dim() != 1 or g.numel() < 2 or not bool(torch.all(g[1:] < g[:-1])):
        raise ConfigError("grid must be a 1-D, strictly descending tensor with at least 2 points")
    return g


def fine_grid(schedule, grids: Sequence[torch.Tensor], steps: int = 200, spacing=UniformT()) -> torch.Tensor:
    """The ``steps``-step grid of ``spacing`` between the coarse grids' ends, refined with every coarse point.
    All coarse grids must start at the same time (the starts x_T live there)."""
    grids = [_as_grid(g) for g in grids]
    start = float(grids[0][0])
    if any(abs(float(g[0]) - start) > 1e-9 * max(1.0, abs(start)) for g in grids):
        raise ConfigError(
            f"the grids of a ratio search must share their start time, got {sorted({float(g[0]) for g in grids})}"
        )
    clean = schedule.t_clean
    coarse = torch.unique(torch.cat(grids))
    noisy = coarse[coarse > clean]
    final_zero = bool((coarse == clean).any())
    if float(noisy.min()) >= start:  # a single step: nothing to refine
        return torch.sort(coarse, descending=True).values
    base = make_grid(schedule, steps, spacing, t_start=start, t_end=float(noisy.min()), final_zero=final_zero)
    tol = 1e-9 * torch.clamp(coarse.abs(), min=1.0)
    near = (base[:, None] - coarse[None, :]).abs() <= tol[None, :]
    pts = torch.cat([base[~near.any(1)], coarse])
    return torch.sort(pts, descending=True).values


def reference_trajectory(
    denoiser,
    cond,
    x_T: torch.Tensor,
    grids,
    steps: int = 200,
    spacing=UniformT(),
    solver=DDIM(),
    progress: bool | str = False,
) -> Reference:
    """Run ``solver`` (deterministic DDIM by default) from x_T over ``fine_grid(grids, steps, spacing)`` and keep
    the states at the coarse grid points (no gradients). ``progress``: a bar (its label) as in ``sample``."""
    if isinstance(grids, torch.Tensor) and grids.dim() == 1:
        grids = [grids]
    fine = fine_grid(denoiser.schedule, grids, steps, spacing)
    keep = torch.unique(torch.cat([_as_grid(g) for g in grids]))
    times, states = [float(fine[0])], [x_T.detach().clone()]

    def record(info):
        if bool((torch.abs(keep - info.t_next) <= 1e-9 * max(1.0, abs(info.t_next))).any()):
            times.append(info.t_next)
            states.append(info.x.detach().clone())

    with torch.no_grad():
        sample(denoiser, solver, fine, x_T.detach(), cond, callbacks=[record], progress=progress)
    return Reference(torch.tensor(times, dtype=F64), torch.stack(states))


# ---- ratio search -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SearchResult:
    """Searched ratios (one per step) and the final-state MSE to the reference of the base solver (all ratios
    1) and of DC with these ratios, on the search starts."""

    ratios: tuple[float, ...]
    mse_base: float
    mse_dc: float


def search_ratios(
    denoiser,
    cond,
    x_T: torch.Tensor,
    grid,
    base=UniPC(),
    reference: Reference | None = None,
    iters: int = 20,
    lr: float = 0.1,
    bounded: bool = False,
    progress: Callable[[int, int, float], None] | None = None,
    dc_order: int = 2,
    axis=LambdaAxis(),
    ref_steps: int = 200,
    spacing=UniformT(),
) -> tuple[float, ...]:
    """Greedy per-step search of DC ratios on the starts ``x_T`` (a batch) with condition ``cond``.

    ``reference`` defaults to ``reference_trajectory(denoiser, cond, x_T, grid, ref_steps, spacing)``.
    ``progress(i, steps, rho)`` is called after every step. Returns one ratio per step of ``grid``."""
    grid = _as_grid(grid)
    check_int("iters", iters, 1, 100_000)
    if not isinstance(lr, numbers.Real) or isinstance(lr, bool) or not 0 < lr < math.inf:
        raise ConfigError(f"lr must be a positive number, got {lr!r}")
    solver = DCSolver(None, dc_order, base, axis)
    if reference is None:
        reference = reference_trajectory(denoiser, cond, x_T, grid, ref_steps, spacing)
    sch = denoiser.schedule
    D = CountingDenoiser(start_trajectory(denoiser), cond)
    steps = grid.numel() - 1
    state = solver.init_state(grid)
    x = x_T.detach()
    ratios: list[float] = []
    for i in range(steps):
        t, tn = float(grid[i]), float(grid[i + 1])
        with torch.no_grad():
            p, q, m = begin(D, x, t, tn)
            x_c, nodes = absorb(solver, sch, x, p, m, state)
        rho = 1.0
        if i >= WARMUP and len(nodes[1]) >= 2:
            target = reference.at(tn).to(x)
            corrector = has_corrector(solver) and i + 1 < steps and q.sigma > 0
            rho = _search_one(solver, D, x_c, p, q, nodes, state, target, corrector, iters, lr, bounded)
        with torch.no_grad():
            x, state = advance(solver, sch, x_c, p, q, nodes, state, rho)
        ratios.append(rho)
        if progress is not None:
            progress(i, steps, rho)
    return tuple(ratios)


def _search_one(solver, D, x_c, p, q, nodes, state, target, corrector: bool, iters, lr, bounded) -> float:
    """AdamW on the scalar ratio of one step (the search objective in the module docstring)."""
    sch = D.schedule
    param = torch.nn.Parameter(torch.zeros((), dtype=F64) if bounded else torch.ones((), dtype=F64))
    opt = torch.optim.AdamW([param], lr=lr)

    def value():
        return 1.0 + 0.5 * torch.tanh(param) if bounded else param

    for _ in range(iters):
        with torch.enable_grad():
            x_next, st = advance(solver, sch, x_c, p, q, nodes, state, value())
            if corrector:
                x_next = solver.halves(sch).correct(x_next, q, D(x_next, q.t), st.base)
            loss = torch.mean((x_next - target) ** 2)
            (g,) = torch.autograd.grad(loss, param)
        opt.zero_grad()
        param.grad = g.detach()
        opt.step()
    return float(value().detach())


def final_mse(denoiser, cond, x_T, grid, solver, reference: Reference) -> float:
    """Mean squared difference of ``solver``'s final state from the reference's final state."""
    with torch.no_grad():
        out = sample(denoiser, solver, grid, x_T, cond).x
    return float(torch.mean((out - reference.at(float(grid[-1])).to(out)) ** 2))


def search(
    denoiser,
    cond,
    x_T,
    grid,
    base=UniPC(),
    reference: Reference | None = None,
    iters: int = 20,
    lr: float = 0.1,
    bounded: bool = False,
    progress=None,
    dc_order: int = 2,
    axis=LambdaAxis(),
    ref_steps: int = 200,
    spacing=UniformT(),
) -> SearchResult:
    """``search_ratios`` plus the final-state MSE to the reference of the base solver and of DC (the quick
    entry point for the GMM benchmark: give the exact CFG denoiser, its cond, a batch of x_T and the grid)."""
    grid = _as_grid(grid)
    if reference is None:
        reference = reference_trajectory(denoiser, cond, x_T, grid, ref_steps, spacing)
    ratios = search_ratios(denoiser, cond, x_T, grid, base, reference, iters, lr, bounded, progress, dc_order, axis)
    mse_base = final_mse(denoiser, cond, x_T, grid, DCSolver(None, dc_order, base, axis), reference)
    mse_dc = final_mse(denoiser, cond, x_T, grid, DCSolver(ratios, dc_order, base, axis), reference)
    return SearchResult(ratios, mse_base, mse_dc)


# ---- cascade polynomial regression ------------------------------------------------------------------------


@dataclass(frozen=True)
class CPR:
    """theta[j][m][n] multiplies u^j (CFG/12)^m (NFE/50)^n; ``degrees`` = the (u, CFG, NFE) degrees fitted."""

    theta: tuple  # nested 4 x 3 x 3 tuples of floats
    degrees: tuple[int, int, int] = (3, 2, 2)

    def tensor(self) -> torch.Tensor:
        return torch.tensor(self.theta, dtype=F64)


def cpr_features(nfe, cfg, step) -> torch.Tensor:
    """The 36 monomials u^j (CFG/12)^m (NFE/50)^n (j, m, n order) for each (nfe, cfg, step): shape (..., 36)."""
    nfe, cfg, step = (torch.as_tensor(v, dtype=F64) for v in (nfe, cfg, step))
    u, c, n = step / nfe, cfg / CPR_SCALES[0], nfe / CPR_SCALES[1]
    pu = torch.stack([u**j for j in range(CPR_SHAPE[0])], -1)
    pc = torch.stack([c**m for m in range(CPR_SHAPE[1])], -1)
    pn = torch.stack([n**k for k in range(CPR_SHAPE[2])], -1)
    return (pu[..., :, None, None] * pc[..., None, :, None] * pn[..., None, None, :]).flatten(-3)


def _table_rows(table: Mapping) -> tuple[list, list, list, list]:
    nfes, cfgs, steps, ys = [], [], [], []
    for key, ratios in table.items():
        nfe, cfg = key
        check_int("CPR table NFE", nfe, 1, MAX_STEPS)
        if not isinstance(cfg, numbers.Real) or isinstance(cfg, bool) or not math.isfinite(cfg):
            raise ConfigError(f"CPR table CFG must be a finite number, got {cfg!r}")
        ratios = list(ratios)
        if len(ratios) != nfe:
            raise ConfigError(f"CPR table entry (nfe={nfe}, cfg={cfg}) has {len(ratios)} ratios, expected {nfe}")
        for i in range(WARMUP, nfe):
            nfes.append(float(nfe)), cfgs.append(float(cfg)), steps.append(float(i + 1)), ys.append(float(ratios[i]))
    return nfes, cfgs, steps, ys


def fit_cpr(table: Mapping[tuple[int, float], Sequence[float]]) -> CPR:
    """Least-squares CPR fit on searched ratios ``{(nfe, cfg): ratios}`` (steps >= 3 enter the fit).

    The CFG and NFE degrees start at min(2, distinct values - 1) and the u degree at min(3, distinct steps - 1);
    when the points still do not determine those coefficients (e.g. NFE 5 has only 3 searched steps, too few for
    a cubic in u of its own), the largest lower degrees that are determined are used (most coefficients first,
    then the highest u, NFE, CFG degree). The unused coefficients are 0."""
    if not table:
        raise ConfigError("CPR needs at least one (nfe, cfg) entry of searched ratios")
    nfes, cfgs, steps, ys = _table_rows(table)
    if not ys:
        raise ConfigError(f"CPR needs searched ratios of steps >= {WARMUP + 1}; the table has none")
    top = (min(3, len(set(steps)) - 1), min(2, len(set(cfgs)) - 1), min(2, len(set(nfes)) - 1))
    X_all = cpr_features(nfes, cfgs, steps)
    y = torch.tensor(ys, dtype=F64)
    candidates = sorted(
        ((du, dc, dn) for du in range(top[0] + 1) for dc in range(top[1] + 1) for dn in range(top[2] + 1)),
        key=lambda d: ((d[0] + 1) * (d[1] + 1) * (d[2] + 1), d[0], d[2], d[1]),
        reverse=True,
    )
    for deg in candidates:
        active = torch.zeros(CPR_SHAPE, dtype=torch.bool)
        active[: deg[0] + 1, : deg[1] + 1, : deg[2] + 1] = True
        active = active.flatten()
        cols = int(active.sum())
        X = X_all[:, active]
        scale = X.abs().amax(0).clamp(min=1e-300)  # column scaling keeps the problem well conditioned
        Xs = X / scale
        if len(ys) < cols or int(torch.linalg.matrix_rank(Xs)) < cols:
            continue
        sol = torch.linalg.lstsq(Xs, y[:, None], driver="gelsd").solution[:, 0] / scale
        theta = torch.zeros(active.numel(), dtype=F64)
        theta[active] = sol
        return CPR(_nested(theta.reshape(CPR_SHAPE).tolist()), deg)
    raise ConfigError("the searched ratios do not determine even a constant CPR")  # pragma: no cover


def _nested(v):
    return tuple(_nested(e) for e in v) if isinstance(v, list) else float(v)


def predict_cpr(cpr: CPR, nfe: int, cfg: float, steps: int | None = None) -> tuple[float, ...]:
    """Ratios for ``steps`` steps (default ``nfe``) at (nfe, cfg): 1 for steps 1-2, the polynomial after."""
    nfe = check_int("nfe", nfe, 1, MAX_STEPS)
    steps = nfe if steps is None else check_int("steps", steps, 1, MAX_STEPS)
    if not isinstance(cfg, numbers.Real) or isinstance(cfg, bool) or not math.isfinite(cfg):
        raise ConfigError(f"cfg must be a finite number, got {cfg!r}")
    theta = cpr.tensor().flatten()
    out = []
    for i in range(steps):
        out.append(1.0 if i < WARMUP else float(cpr_features(nfe, cfg, i + 1) @ theta))
    return tuple(out)


# ---- ratios files -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DCRatios:
    """The contents of a ratios file. ``entries`` maps (nfe, cfg) to searched ratios; ``cpr`` may be None."""

    entries: Mapping[tuple[int, float], tuple[float, ...]]
    cpr: CPR | None = None
    base: str = "unipc"
    axis: str = "lambda"
    dc_order: int = 2
    spacing: str = "uniform-t"
    model: str | None = None
    search: Mapping[str, Any] = field(default_factory=dict)
    metrics: Mapping[tuple[int, float], Mapping[str, float]] = field(default_factory=dict)
    weights: str | None = None  # condiff.core.fitted.weights_digest of the model searched on (None: not recorded)

    def to_json(self) -> dict:
        entries = []
        for (nfe, cfg), ratios in sorted(self.entries.items()):
            e = {"nfe": int(nfe), "cfg": float(cfg), "ratios": [float(r) for r in ratios]}
            e.update({k: float(v) for k, v in self.metrics.get((nfe, cfg), {}).items()})
            entries.append(e)
        return {
            "format": FORMAT,
            "version": VERSION,
            "base": self.base,
            "axis": self.axis,
            "dc_order": self.dc_order,
            "spacing": self.spacing,
            "model": self.model,
            "model_weights": self.weights,
            "search": dict(self.search),
            "entries": entries,
            "cpr": None
            if self.cpr is None
            else {"degrees": list(self.cpr.degrees), "theta": [[list(r) for r in m] for m in self.cpr.theta]},
        }


def save_ratios(path, ratios: DCRatios) -> Path:
    return atomic_write_json(path, ratios.to_json())


ENTRY_METRICS = ("mse_base", "mse_dc")


def _bad(path, msg: str) -> InputFileError:
    return InputFileError(f"{str(path)!r} is not a valid DC ratios file: {msg}")


def parse_ratios(obj, path="<ratios>") -> DCRatios:
    """Validate the JSON value of a ratios file (InputFileError naming the first problem)."""
    if not isinstance(obj, dict):
        raise _bad(path, f"expected a JSON object, got {type(obj).__name__}")
    required = {"format", "version", "base", "axis", "dc_order", "spacing", "entries", "cpr"}
    optional = {"model", "model_weights", "search"}
    missing, unknown = required - set(obj), set(obj) - required - optional
    if missing:
        raise _bad(path, f"missing key {sorted(missing)[0]!r}")
    if unknown:
        raise _bad(path, f"unknown key {sorted(unknown)[0]!r}")
    if obj["format"] != FORMAT or obj["version"] != VERSION:
        raise _bad(
            path, f"format must be {FORMAT!r} version {VERSION}, got {obj['format']!r} version {obj['version']!r}"
        )
    for key, accepted in (("base", BASES), ("axis", AXES), ("spacing", SPACINGS)):
        if not isinstance(obj[key], str) or obj[key] not in accepted:
            raise _bad(path, f"{key} must be one of {', '.join(accepted)}, got {obj[key]!r}")
    dc_order = obj["dc_order"]
    if isinstance(dc_order, bool) or not isinstance(dc_order, int) or not 1 <= dc_order <= MAX_DC_ORDER:
        raise _bad(path, f"dc_order must be an integer in [1, {MAX_DC_ORDER}], got {dc_order!r}")
    model = obj.get("model")
    if model is not None and not isinstance(model, str):
        raise _bad(path, f"model must be a string or null, got {model!r}")
    weights = obj.get("model_weights")
    if weights is not None and not isinstance(weights, str):
        raise _bad(path, f"model_weights must be a digest string or null, got {weights!r}")
    search_meta = obj.get("search", {})
    if not isinstance(search_meta, dict):
        raise _bad(path, f"search must be an object, got {type(search_meta).__name__}")
    if not isinstance(obj["entries"], list):
        raise _bad(path, f"entries must be a list, got {type(obj['entries']).__name__}")
    entries, metrics = {}, {}
    for k, e in enumerate(obj["entries"]):
        where = f"entries[{k}]"
        if not isinstance(e, dict):
            raise _bad(path, f"{where} must be an object")
        extra = set(e) - {"nfe", "cfg", "ratios"} - set(ENTRY_METRICS)
        if extra or not {"nfe", "cfg", "ratios"} <= set(e):
            raise _bad(
                path,
                f"{where} must have nfe, cfg, ratios (and optionally {', '.join(ENTRY_METRICS)}); got keys {sorted(e)}",
            )
        nfe, cfg, ratios = e["nfe"], e["cfg"], e["ratios"]
        if isinstance(nfe, bool) or not isinstance(nfe, int) or not 1 <= nfe <= MAX_STEPS:
            raise _bad(path, f"{where}.nfe must be an integer in [1, {MAX_STEPS}], got {nfe!r}")
        if not is_real(cfg):
            raise _bad(path, f"{where}.cfg must be a finite number, got {cfg!r}")
        if not isinstance(ratios, list) or len(ratios) != nfe or not all(is_real(r) for r in ratios):
            raise _bad(path, f"{where}.ratios must be a list of {nfe} finite numbers")
        if ratios[0] != 1:
            raise _bad(path, f"{where}.ratios[0] must be 1, got {ratios[0]!r}")
        for name in ENTRY_METRICS:
            if name in e and not is_real(e[name]):
                raise _bad(path, f"{where}.{name} must be a finite number, got {e[name]!r}")
        key = (nfe, float(cfg))
        if key in entries:
            raise _bad(path, f"{where} repeats nfe {nfe}, cfg {cfg}")
        entries[key] = tuple(float(r) for r in ratios)
        metrics[key] = {name: float(e[name]) for name in ENTRY_METRICS if name in e}
    cpr = None
    if obj["cpr"] is not None:
        c = obj["cpr"]
        if not isinstance(c, dict) or set(c) != {"degrees", "theta"}:
            raise _bad(path, "cpr must be null or an object with keys degrees and theta")
        deg = c["degrees"]
        if (
            not isinstance(deg, list)
            or len(deg) != 3
            or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < s for d, s in zip(deg, CPR_SHAPE))
        ):
            raise _bad(path, f"cpr.degrees must be 3 integers within (0..3, 0..2, 0..2), got {deg!r}")
        th = c["theta"]
        ok = (
            isinstance(th, list)
            and len(th) == CPR_SHAPE[0]
            and all(
                isinstance(a, list)
                and len(a) == CPR_SHAPE[1]
                and all(isinstance(b, list) and len(b) == CPR_SHAPE[2] and all(is_real(v) for v in b) for b in a)
                for a in th
            )
        )
        if not ok:
            raise _bad(path, "cpr.theta must be a 4 x 3 x 3 nested list of finite numbers")
        cpr = CPR(_nested(th), tuple(deg))
    return DCRatios(
        entries, cpr, obj["base"], obj["axis"], dc_order, obj["spacing"], model, search_meta, metrics, weights
    )


def load_ratios(path) -> DCRatios:
    """Read and validate a ratios file (InputFileError with one line on any problem)."""
    return parse_ratios(load_json(path), path)


def _as_ratios(file_or_obj) -> DCRatios:
    if isinstance(file_or_obj, DCRatios):
        return file_or_obj
    if isinstance(file_or_obj, (str, Path)):
        return load_ratios(file_or_obj)
    raise ConfigError(f"expected a ratios file path or DCRatios, got {type(file_or_obj).__name__}")


def ratios_for(file_or_obj, nfe: int, cfg: float) -> tuple[float, ...]:
    """The searched ratios of (nfe, cfg) when the file has them, else the CPR prediction."""
    r = _as_ratios(file_or_obj)
    nfe = check_int("nfe", nfe, 1, MAX_STEPS)
    if not isinstance(cfg, numbers.Real) or isinstance(cfg, bool) or not math.isfinite(cfg):
        raise ConfigError(f"cfg must be a finite number, got {cfg!r}")
    for (n, c), ratios in r.entries.items():
        if n == nfe and math.isclose(c, float(cfg), rel_tol=1e-12, abs_tol=1e-12):
            return ratios
    if r.cpr is None:
        have = ", ".join(f"(nfe {n}, cfg {c:g})" for n, c in sorted(r.entries)) or "none"
        raise ConfigError(
            f"the DC ratios have no entry for nfe {nfe}, cfg {cfg:g} and no CPR fit to predict one; searched: {have}"
        )
    nfes = [n for n, _ in r.entries] or [nfe]
    cfgs = [c for _, c in r.entries] or [float(cfg)]
    if not (min(nfes) <= nfe <= max(nfes) and min(cfgs) - 1e-12 <= float(cfg) <= max(cfgs) + 1e-12):
        # a cubic-in-u, quadratic-in-NFE/CFG fit is an interpolant: outside its data it extrapolates wildly
        raise ConfigError(
            f"no DC ratios for nfe {nfe}, cfg {cfg:g}: the CPR fit only interpolates within the "
            f"searched nfe {min(nfes)}..{max(nfes)} and cfg {min(cfgs):g}..{max(cfgs):g}; "
            f"search it: condiff dc search --nfe {nfe} --cfg {cfg:g} ..."
        )
    return predict_cpr(r.cpr, nfe, float(cfg))


def check_ratios_fit(
    file_or_obj,
    weights: str | None = None,
    spacing: str | None = None,
    model: str | None = None,
    where: str = "the DC ratios file",
    allow_mismatch: bool = False,
) -> DCRatios:
    """The ratios, checked for what is given: searched on other weights (``weights``: the run's
    ``condiff.core.fitted.weights_digest``; ``model`` names it) or another grid spacing is ``check_fitted``'s
    one-line ConfigError naming ``where`` (a FitWarning with ``allow_mismatch``; a file that records no weights:
    a FitWarning that it cannot be checked). NFE and CFG are checked per lookup (``ratios_for``)."""
    r = _as_ratios(file_or_obj)
    fitted = FittedFor(r.model, r.weights, spacing=r.spacing)
    check_fitted(where, fitted, FittedFor(model, weights, spacing=spacing), allow_mismatch)
    return r


def dc_solver_for(
    file_or_obj,
    nfe: int,
    cfg: float,
    spacing: str | None = None,
    *,
    weights: str | None = None,
    model: str | None = None,
    where: str = "the DC ratios file",
    allow_mismatch: bool = False,
) -> DCSolver:
    """The DCSolver a ratios file describes (its base, axis and dc_order) with the ratios for (nfe, cfg).
    ``spacing``: the grid spacing name the sampler will use, and ``weights``: the digest of the model's weights;
    each, when given, must be what the ratios were searched on (``check_ratios_fit``)."""
    r = check_ratios_fit(file_or_obj, weights, spacing, model, where, allow_mismatch)
    return DCSolver(ratios_for(r, nfe, cfg), r.dc_order, BASES[r.base], AXES[r.axis])
