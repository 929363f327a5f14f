"""Solvers: pure steps with explicit state, and the registry of their CLI names."""

from __future__ import annotations

from .base import Solver, Point, point
from .ddim import DDIM
from .ddpm import DDPM
from .dpmpp_2m import DPMSolverPP2M
from .euler import Euler
from .heun import Heun
from ..errors import one_of

SOLVERS = {
    "ddpm": DDPM,
    "ddim": DDIM,
    "euler": Euler,
    "heun": Heun,
    "dpmpp-2m": DPMSolverPP2M,
}

DESCRIPTIONS = {
    "ddpm": "DDPM ancestral sampling (stochastic, order 1; Ho et al. 2020)",
    "ddim": "DDIM, eta=0 deterministic (order 1; Song et al. 2021)",
    "euler": "Euler on the PF-ODE in Karras form (order 1)",
    "heun": "Heun on the PF-ODE, 2 evaluations a step (order 2; Karras et al. 2022)",
    "dpmpp-2m": "DPM-Solver++(2M), multistep data prediction (order 2; Lu et al. 2022)",
}


def get_solver(name: str, **kwargs) -> Solver:
    """Map a CLI name to a solver object."""
    if name not in SOLVERS:
        raise one_of("solver", name, SOLVERS)
    return SOLVERS[name](**kwargs)


__all__ = ["Solver", "Point", "point", "DDIM", "DDPM", "DPMSolverPP2M", "Euler", "Heun", "SOLVERS",
           "DESCRIPTIONS", "get_solver"]
