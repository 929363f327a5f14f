"""Measured order of convergence of condiff's deterministic solvers on the exact GMM oracle.

Protocol (specs/sampling_guidance.md sec. 0.3): a fixed batch of start points x_T ~ p_T, a grid uniform in
log-SNR from sigma/alpha = 80 down to sigma/alpha = 1e-2 (no final jump to sigma = 0), float64, the exact GMM
denoiser on a VP schedule, and err(NFE) = mean ||x_end - x_ref|| against an RK4 reference solution of the
PF-ODE (its own error is estimated by step halving and reported). The slope of log err against log NFE is
-order. Prints a table and writes outputs/solver_order.json.

    OMP_NUM_THREADS=1 python benchmarks/solver_order.py
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from condiff.data.gmm import GMM, reference_pf_ode
from condiff.grids import UniformLogSNR, make_grid
from condiff.sampling import sample
from condiff.schedules import VPLinear
from condiff.solvers import get_solver

THEORY = {"euler": 1, "ddim": 1, "heun": 2, "dpmpp-2m": 2}
NFES = {"euler": (8, 16, 32, 64, 128), "ddim": (8, 16, 32, 64, 128), "heun": (8, 16, 32, 64, 128),
        "dpmpp-2m": (8, 16, 32, 64, 128)}


def setup(batch: int = 256, seed: int = 0, ref_steps: int = 1024):
    """The problem: GMM, denoiser, time range, start points, the reference end points and their
    step-halving error estimate (mean ||ref(n) - ref(n/2)|| / 15, RK4)."""
    gmm = GMM.random(dim=2, components=4, num_classes=2, seed=seed)
    sch = VPLinear()
    den = gmm.denoiser(sch)
    t_start, t_end = sch.t_for_sigma_ratio(80.0), sch.t_for_sigma_ratio(1e-2)
    g = torch.Generator().manual_seed(seed + 1)
    x0, _ = gmm.sample(batch, g)
    x_start = sch.alpha(t_start) * x0 + sch.sigma(t_start) * torch.randn(x0.shape, generator=g, dtype=x0.dtype)
    ref = reference_pf_ode(den, x_start, t_start, t_end, steps=ref_steps)
    half = reference_pf_ode(den, x_start, t_start, t_end, steps=ref_steps // 2)
    ref_err = float((ref - half).norm(dim=1).mean()) / 15.0
    return {"denoiser": den, "t_start": t_start, "t_end": t_end, "x_start": x_start, "ref": ref,
            "ref_err": ref_err}


def terminal_error(problem, solver, nfe: int) -> float:
    steps = nfe // solver.evals_per_step()
    den = problem["denoiser"]
    grid = make_grid(den.schedule, steps, UniformLogSNR(), problem["t_start"], problem["t_end"], final_zero=False)
    out = sample(den, solver, grid, problem["x_start"].clone())
    assert out.nfe == nfe
    return float((out.x - problem["ref"]).norm(dim=1).mean())


def slope(nfes, errs) -> float:
    """Least-squares slope of log err against log NFE."""
    lx = torch.log(torch.tensor(nfes, dtype=torch.float64))
    ly = torch.log(torch.tensor(errs, dtype=torch.float64))
    lx = lx - lx.mean()
    return float((lx * (ly - ly.mean())).sum() / (lx * lx).sum())


def measure(problem, names=tuple(THEORY)) -> dict:
    rows = {}
    for name in names:
        solver = get_solver(name)
        errs = [terminal_error(problem, solver, n) for n in NFES[name]]
        rows[name] = {"nfe": list(NFES[name]), "err": errs, "slope": slope(NFES[name], errs),
                      "theory": -THEORY[name]}
    return rows


def main():
    torch.set_num_threads(1)
    problem = setup()
    rows = measure(problem)
    print(f"reference RK4 error estimate (mean norm): {problem['ref_err']:.2e}")
    print(f"{'solver':10s} {'slope':>7s} {'theory':>6s}  " + "  ".join(f"err@{n:<4d}" for n in NFES['euler']))
    for name, r in rows.items():
        print(f"{name:10s} {r['slope']:7.3f} {r['theory']:6d}  " + "  ".join(f"{e:.2e}" for e in r["err"]))
    out = Path("outputs/solver_order.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"reference_error": problem["ref_err"], "solvers": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
