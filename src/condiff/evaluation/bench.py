"""Solver benchmark: terminal error against a reference ODE solution, condiff and diffusers side by side.

A *problem* is a guided denoiser on a VP-discrete table, a batch of start points x_T at t = T - 1 and their
reference end points:

- ``gmm_problem``: a random class-conditional Gaussian mixture (condiff.data.gmm) with its exact denoiser; the
  reference is a float64 RK4 solve of the PF-ODE in lambda down to sigma/alpha = 1e-6, then the exact
  denoiser (its own error is estimated by halving the RK4 steps and reported);
- ``model_problem``: a bundled model with CFG; the reference is DPM-Solver++(2M) with 1000 steps (every
  training timestep), checked against 500 steps.

Every case runs on the same grid: diffusers' trailing timesteps for N steps, then the clean point (see
condiff.evaluation.peers). condiff solvers take ``nfe`` steps (``(nfe + 1) // 2`` for two-evaluation solvers, whose last
step into sigma = 0 is a single evaluation); diffusers' schedulers are driven through their pipeline pattern
with the eps of the same denoiser. The error of a case is the mean over the batch of the per-sample RMS
difference ``||x_end - x_ref|| / sqrt(d)``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

import torch

from condiff.core.denoiser import start_trajectory
from condiff.core.grids import make_grid
from condiff.core.sampling import Gaussian, initial_noise, sample
from condiff.core.schedules import VPDiscrete
from condiff.errors import ConfigError, NonFiniteError, one_line
from condiff.evaluation.peers import PEERS, betas_from_alphas_cumprod, run_peer, trailing_grid
from condiff.guidance import CFG
from condiff.solvers.grid_search import terminal_error

F64 = torch.float64


@dataclass
class Problem:
    name: str
    denoiser: Any  # guided Denoiser
    cond: Mapping[str, Any]
    x_T: torch.Tensor
    x_ref: torch.Tensor
    info: dict = field(default_factory=dict)
    oracle: Any = None  # the GMM of an oracle problem (for tuning EMS / DC ratios on it)
    spacing: Any = None  # None: diffusers' trailing timesteps (peers run too); else a condiff spacing object

    def grid(self, steps: int) -> torch.Tensor:
        if self.spacing is None:
            return trailing_grid(self.num_train, steps)
        return make_grid(self.schedule, steps, self.spacing)

    @property
    def peers(self) -> bool:
        """diffusers' schedulers need integer timesteps: they run on the trailing grid only."""
        return self.spacing is None

    @property
    def schedule(self) -> VPDiscrete:
        return self.denoiser.schedule

    @property
    def num_train(self) -> int:
        return int(self.schedule.alphas_cumprod.numel())

    def eps(self, x: torch.Tensor, t) -> torch.Tensor:
        """The guided eps at (x, t): (x - alpha x0_hat) / sigma."""
        t = float(t)
        a, s = (
            float(self.schedule.alpha(torch.tensor(t, dtype=F64))),
            float(self.schedule.sigma(torch.tensor(t, dtype=F64))),
        )
        return (x - a * self.denoiser(x, t, self.cond)) / s


rms_error = terminal_error  # mean over the batch of ||x - ref|| / sqrt(d)


def gmm_problem(
    dim: int = 8,
    components: int = 8,
    classes: int = 4,
    seed: int = 0,
    n: int = 512,
    cfg: float = 1.0,
    ref_steps: int = 2048,
) -> Problem:
    from condiff.data.gmm import GMM, reference_pf_ode

    sch = VPDiscrete.from_betas("linear")
    gmm = GMM.random(dim=dim, components=components, num_classes=classes, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    y = torch.randint(0, classes, (n,), generator=g)
    cond = {"y": y, "null": gmm.null_cond(n)}
    den = CFG(gmm.denoiser(sch), cfg)
    t_T = float(sch.t_max)
    x_T = initial_noise(sch, t_T, (n, dim), g, dtype=F64)
    t_end = float(sch.t_from_log_snr(torch.tensor(2 * math.log(1e6), dtype=F64)))

    def ref(steps):
        x = reference_pf_ode(den, x_T, t_T, t_end, cond, steps=steps)
        return den(x, t_end, cond)

    x_ref, x_half = ref(ref_steps), ref(ref_steps // 2)
    info = {
        "oracle": "gmm",
        "dim": dim,
        "components": components,
        "classes": classes,
        "seed": seed,
        "n": n,
        "cfg": cfg,
        "reference": f"RK4 in lambda, {ref_steps} steps, to sigma/alpha = 1e-6",
        "reference_error_estimate": rms_error(x_ref, x_half) / 15.0,
    }
    return Problem(f"gmm-d{dim}-k{components}-s{seed}", den, cond, x_T, x_ref, info, oracle=gmm)


def model_problem(
    model,
    n: int = 32,
    cfg: float = 3.0,
    seed: int = 0,
    ref_steps: int = 1000,
    progress: bool = True,
    spacing=None,
    name: str | None = None,
) -> Problem:
    """A loaded model (``.denoiser``, ``.condition``, ``.prior``, ``.family``) under CFG; ``name`` labels it
    (default: its family's name). ``spacing`` None: diffusers' trailing grid from t = T - 1 (diffusers' peers
    run too); a condiff spacing (e.g. UniformT(), the CLI default): condiff's grid from the default start,
    where the files of `condiff ems compute` and `condiff dc search` apply (peers are left out)."""
    from condiff.solvers import get_solver

    m = model
    name = m.family.name if name is None else name
    if not isinstance(m.schedule, VPDiscrete):
        raise ConfigError(
            f"bench --model needs a VP-discrete model (diffusers' schedulers), got "
            f"{type(m.schedule).__name__} for {name!r}"
        )
    g = torch.Generator().manual_seed(seed)
    raw, _ = m.family.random_conditions(n, g)
    cond = m.condition(raw)
    den = CFG(m.denoiser, cfg)
    problem = Problem(f"{name}-cfg{cfg:g}", den, cond, torch.empty(0), torch.empty(0), spacing=spacing)
    start = problem.grid(1)[0]
    problem.x_T = m.prior((n, *m.family.image_shape), float(start), g)

    with torch.no_grad():

        def ref(steps):
            return sample(
                den,
                get_solver("dpmpp-2m"),
                problem.grid(steps),
                problem.x_T,
                cond,
                progress=f"reference {steps}" if progress else False,
            ).x

        problem.x_ref, x_half = ref(ref_steps), ref(ref_steps // 2)
    problem.info = {
        "model": name,
        "n": n,
        "cfg": cfg,
        "seed": seed,
        "grid": "diffusers trailing" if spacing is None else spacing.name,
        "reference": f"dpmpp-2m, {ref_steps} steps on the same grid type (float32)",
        "reference_vs_half_steps": rms_error(problem.x_ref, x_half),
    }
    return problem


@dataclass(frozen=True)
class CondiffCase:
    """A condiff solver (any object with the Solver contract) under a label."""

    label: str
    solver: Any
    note: str = ""
    impl = "condiff"

    def steps_for_nfe(self, nfe: int) -> int:
        return nfe if self.solver.evals_per_step() == 1 else (nfe + 1) // 2

    @property
    def deterministic(self) -> bool:
        return not self.solver.stochastic

    def run(self, problem: Problem, nfe: int) -> tuple[torch.Tensor, int]:
        return self.run_on(problem, problem.grid(self.steps_for_nfe(nfe)))

    def run_on(self, problem: Problem, grid: torch.Tensor) -> tuple[torch.Tensor, int]:
        out = sample(
            problem.denoiser,
            self.solver,
            grid,
            problem.x_T.clone(),
            problem.cond,
            noise=Gaussian(torch.Generator().manual_seed(1234)),
        )
        return out.x, out.nfe


@dataclass(frozen=True)
class TunedCase(CondiffCase):
    """A condiff solver tuned per NFE budget (DC-Solver's searched ratios): ``solvers[nfe]``; ``solver`` is the
    untuned object, used for its evaluation count."""

    per_nfe: Mapping[int, Any] = field(default_factory=dict)
    missing: Mapping[int, str] = field(default_factory=dict)  # NFE -> why there is no tuned solver

    def run(self, problem: Problem, nfe: int) -> tuple[torch.Tensor, int]:
        if nfe not in self.per_nfe:
            raise ConfigError(self.missing.get(nfe, f"no tuned {self.label} for NFE {nfe}"))
        return CondiffCase(self.label, self.per_nfe[nfe]).run(problem, nfe)


def tuned_cases(problem: Problem, nfes, n_tune: int = 10, progress: bool = True) -> list:
    """DPM-Solver-v3 with EMS and DC-Solver with searched ratios, tuned on data the evaluation never sees.

    Oracle problems: EMS from the exact GMM denoiser on fresh mixture samples (condiff.solvers.ems.gmm_ems), DC ratios
    searched per NFE on ``n_tune`` fresh starts against a 1000-step UniPC reference (condiff.solvers.dc_search.search).
    Model problems: nothing here (pass --ems / --dc-ratios files to the command)."""
    if problem.oracle is None:
        return []
    from condiff.solvers import DCSolver, get_solver
    from condiff.solvers import dc_search as dc
    from condiff.solvers.ems import gmm_ems

    gmm, cfg = problem.oracle, problem.info["cfg"]
    sch = problem.schedule
    t0 = time.perf_counter()
    ems = gmm_ems(
        gmm,
        sch,
        t_start=float(sch.t_max),
        t_end=float(sch.t_min),
        scale=None if cfg == 1 else cfg,
        seed=problem.info["seed"] + 7,
    )
    problem.info["ems_seconds"] = time.perf_counter() - t0
    cases = [CondiffCase("dpm-v3+ems", get_solver("dpm-v3", ems=ems), note="EMS from the exact GMM denoiser")]
    g = torch.Generator().manual_seed(problem.info["seed"] + 11)
    n, classes = n_tune, problem.info["classes"]
    y = torch.randint(0, classes, (n,), generator=g)
    cond = {"y": y, "null": gmm.null_cond(n)}
    x_T = initial_noise(sch, float(sch.t_max), (n, gmm.dim), g, dtype=F64)
    per_nfe, t0 = {}, time.perf_counter()
    for nfe in nfes:
        grid = problem.grid(nfe)
        ref = dc.reference_trajectory(problem.denoiser, cond, x_T, [grid], steps=1000, solver=get_solver("unipc"))
        with torch.enable_grad():
            ratios = dc.search_ratios(problem.denoiser, cond, x_T, grid, reference=ref)
        per_nfe[nfe] = DCSolver(ratios)
    problem.info["dc_search_seconds"] = time.perf_counter() - t0
    cases.append(
        TunedCase(
            "dc-solver+search", DCSolver(), per_nfe=per_nfe, note=f"ratios searched on {n_tune} other starts per NFE"
        )
    )
    return cases


def file_cases(problem: Problem, model: str, nfes, cfg: float, ems_path=None, ratios_path=None) -> list:
    """dpm-v3 with an EMS file and dc-solver with a ratios file (from `condiff ems compute` / `dc search`)."""
    cases = []
    if ems_path is not None:
        from condiff.solvers import get_solver
        from condiff.solvers.ems import check_ems_fits, load_ems

        ems = check_ems_fits(load_ems(ems_path), problem.x_T.shape[1:], problem.schedule, what=repr(model))
        cases.append(CondiffCase("dpm-v3+ems", get_solver("dpm-v3", ems=ems), note=str(ems_path)))
        # statistics estimated from a few hundred images are noisy: the first-order predictor (with the
        # corrector) is the robust choice at very low NFE on the bundled models (docs/solvers.md)
        cases.append(CondiffCase("dpm-v3+ems order=1", get_solver("dpm-v3", ems=ems, order=1), note=str(ems_path)))
    if ratios_path is not None:
        from condiff.solvers import DCSolver
        from condiff.solvers.dc_search import dc_solver_for

        name = "trailing" if problem.spacing is None else problem.spacing.name
        per_nfe, missing = {}, {}
        for k in nfes:
            try:
                per_nfe[k] = dc_solver_for(ratios_path, k, cfg, name)
            except ConfigError as e:  # e.g. an NFE outside the searched range: that cell says why
                if "spacing" in str(e):
                    raise
                missing[k] = one_line(str(e))
        cases.append(TunedCase("dc-solver+ratios", DCSolver(), per_nfe=per_nfe, missing=missing, note=str(ratios_path)))
    return cases


@dataclass(frozen=True)
class GridCase(CondiffCase):
    """A condiff solver on grids searched for it (condiff.solvers.grid_search; ``grids`` is their Tabulated
    spacing), from the problem's start."""

    grids: Any = None

    def run(self, problem: Problem, nfe: int) -> tuple[torch.Tensor, int]:
        steps = self.steps_for_nfe(nfe)
        if steps not in self.grids.grids:
            have = ", ".join(str(k) for k in sorted(self.grids.grids))
            raise ConfigError(f"{self.grids.source} has no grid of {steps} steps (it has {have})")
        start = float(problem.grid(1)[0])
        if abs(self.grids.t_start - start) > 1e-9 * max(1.0, abs(start)):
            raise ConfigError(
                f"{self.grids.source} starts at t={self.grids.t_start:g}, the problem's starts at t={start:g}"
            )
        return self.run_on(problem, make_grid(problem.schedule, steps, self.grids))


def grid_cases(problem: Problem, paths, cfg: float) -> list:
    """A ``GridCase`` per grids file (`condiff grid search`): its solver on its grids, labelled 'SOLVER+grid'."""
    from condiff.solvers import get_solver
    from condiff.solvers.grid_search import check_grids_fit, load_grids

    cases = []
    for path in paths:
        where = f"--grid {str(path)!r}"
        grids = load_grids(path)
        tab = check_grids_fit(grids, problem.schedule, cfg=cfg, where=where)
        label = f"{grids.solver}+grid" + (f" ({Path(path).stem})" if len(paths) > 1 else "")
        cases.append(GridCase(label, get_solver(grids.solver), note=str(path), grids=tab))
    return cases


@dataclass(frozen=True)
class PeerCase:
    """A peer library's sampler (``peer``: its description, with a ``label``), deterministic."""

    peer: Any
    deterministic = True
    note = ""

    @property
    def label(self) -> str:
        return self.peer.label


@dataclass(frozen=True)
class DiffusersCase(PeerCase):
    """A diffusers scheduler (condiff.evaluation.peers) driven in its pipeline pattern on the trailing grid."""

    impl = "diffusers"

    def run(self, problem: Problem, nfe: int) -> tuple[torch.Tensor, int]:
        sched = self.peer.make(betas_from_alphas_cumprod(problem.schedule.alphas_cumprod).float())
        one = replace(problem, denoiser=start_trajectory(problem.denoiser))  # the denoiser of one trajectory
        return run_peer(self.peer, sched, one.eps, problem.x_T.clone(), self.peer.steps_for_nfe(nfe))


@dataclass(frozen=True)
class KDiffusionCase(PeerCase):
    """A k-diffusion sampler (condiff.evaluation.kdiffusion) on the problem's grid, as sigmas."""

    impl = "k-diffusion"

    def run(self, problem: Problem, nfe: int) -> tuple[torch.Tensor, int]:
        from condiff.evaluation.kdiffusion import run_kpeer, sigmas_of

        grid = problem.grid(self.peer.steps_for_nfe(nfe))
        one = start_trajectory(problem.denoiser)
        return run_kpeer(
            self.peer,
            problem.schedule,
            lambda x, t: one(x, t, problem.cond),
            problem.x_T.clone(),
            sigmas_of(problem.schedule, grid),
        )


def kdiffusion_cases() -> list:
    """k-diffusion's deterministic samplers, where the peer is installed (else none)."""
    import importlib.util

    if importlib.util.find_spec("k_diffusion") is None:
        return []
    from condiff.evaluation.kdiffusion import KPEERS

    return [KDiffusionCase(p) for p in KPEERS]


PEER_IMPLS = ("diffusers", "k-diffusion")


def default_cases() -> list:
    """Every registered condiff solver with its defaults, diffusers' schedulers and k-diffusion's samplers."""
    from condiff.solvers import SOLVERS, get_solver

    return (
        [CondiffCase(name, get_solver(name)) for name in SOLVERS]
        + [DiffusersCase(p) for p in PEERS]
        + kdiffusion_cases()
    )


def run_bench(problem: Problem, nfes, cases=None, progress: bool = True) -> list[dict]:
    """One row per (case, nfe): solver, impl, nfe (actual model evaluations), error, seconds."""
    cases = default_cases() if cases is None else cases
    rows = []
    jobs = [(c, k) for c in cases for k in nfes]
    it = jobs
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(jobs, desc=f"bench {problem.name}", leave=False)
    with torch.no_grad():
        for case, nfe in it:
            if case.impl in PEER_IMPLS and not problem.peers:
                continue
            t0 = time.perf_counter()
            try:
                x, used = case.run(problem, nfe)
            except (NonFiniteError, ConfigError) as e:  # one failing case must not lose the whole run
                rows.append(
                    {
                        "solver": case.label,
                        "impl": case.impl,
                        "nfe": int(nfe),
                        "nfe_budget": int(nfe),
                        "error": None,
                        "deterministic": case.deterministic,
                        "seconds": 0.0,
                        "note": one_line(str(e)),
                    }
                )
                continue
            err = rms_error(x, problem.x_ref)
            rows.append(
                {
                    "solver": case.label,
                    "impl": case.impl,
                    "nfe": int(used),
                    "nfe_budget": int(nfe),
                    "error": err if math.isfinite(err) else None,
                    "deterministic": case.deterministic,
                    "seconds": time.perf_counter() - t0,
                    **({"note": case.note} if case.note else {}),
                }
            )
    return rows


def best_ratios(rows: list[dict]) -> dict[int, dict]:
    """Per NFE budget: the best deterministic condiff row, the best of each peer (diffusers, k-diffusion) and
    ``ratio``, condiff's error over the best peer's."""
    out = {}
    for nfe in sorted({r["nfe_budget"] for r in rows}):
        best = {}
        for impl in ("condiff", *PEER_IMPLS):
            cand = [
                r
                for r in rows
                if r["nfe_budget"] == nfe
                and r["impl"] == impl
                and r["deterministic"]
                and r["error"] is not None
                and r["nfe"] <= nfe
            ]
            best[impl] = min(cand, key=lambda r: r["error"]) if cand else None
        peers = [best[i] for i in PEER_IMPLS if best[i]]
        if best["condiff"] and peers:
            peer = min(peers, key=lambda r: r["error"])
            out[nfe] = {
                "condiff": best["condiff"]["solver"],
                "condiff_error": best["condiff"]["error"],
                "peer": peer["solver"],
                "peer_impl": peer["impl"],
                "peer_error": peer["error"],
                "ratio": best["condiff"]["error"] / peer["error"],
            }
            for impl in PEER_IMPLS:
                if best[impl]:
                    out[nfe][impl] = best[impl]["solver"]
                    out[nfe][f"{impl}_error"] = best[impl]["error"]
    return out


def table(rows: list[dict]) -> str:
    """A markdown table: one row per (solver, impl), one column per NFE budget, then the best-vs-best ratios."""
    nfes = sorted({r["nfe_budget"] for r in rows})
    keys = list(dict.fromkeys((r["solver"], r["impl"]) for r in rows))
    lines = ["| solver | impl | " + " | ".join(f"NFE {k}" for k in nfes) + " |", "|---|---|" + "---:|" * len(nfes)]
    cell = {(r["solver"], r["impl"], r["nfe_budget"]): r for r in rows}
    for s, impl in keys:
        vals = []
        for k in nfes:
            r = cell.get((s, impl, k))
            if r is None:
                vals.append("")
            elif r["error"] is None:
                vals.append("nan")
            else:
                vals.append(f"{r['error']:.2e}" + ("" if r["nfe"] == k else f" ({r['nfe']})"))
        mark = "" if cell[(s, impl, nfes[0])]["deterministic"] else " (stochastic)"
        lines.append(f"| {s}{mark} | {impl} | " + " | ".join(vals) + " |")
    best = best_ratios(rows)
    if best:
        lines.append(
            "| **best condiff / best peer** | ratio | "
            + " | ".join(f"{best[k]['ratio']:.2f}" if k in best else "" for k in nfes)
            + " |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path, title: str = "") -> None:
    """Log-log error against NFE: condiff solid, diffusers dashed; stochastic solvers left out."""
    import matplotlib

    matplotlib.use("Agg")
    import io as _io

    import matplotlib.pyplot as plt

    from condiff.core.files import atomic_write_bytes

    fig, ax = plt.subplots(figsize=(8, 5.5))
    keys = list(dict.fromkeys((r["solver"], r["impl"]) for r in rows if r["deterministic"]))
    for i, (s, impl) in enumerate(keys):
        pts = sorted(
            (r["nfe"], r["error"]) for r in rows if r["solver"] == s and r["impl"] == impl and r["error"] is not None
        )
        if not pts:
            continue
        tuned = "+" in s  # tuned condiff cases (EMS, searched ratios) stand out
        ax.plot(
            *zip(*pts),
            ("-o" if impl == "condiff" else "--s"),
            ms=4 if tuned else 3,
            lw=2.6 if tuned else 1.1,
            color=("black", "crimson", "darkorange")[i % 3] if tuned else plt.cm.tab20(i % 20),
            label=f"{s} ({impl})",
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("NFE (model evaluations)")
    ax.set_ylabel("terminal RMS error vs reference")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    buf = _io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
