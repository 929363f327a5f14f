"""Solvers: pure steps with explicit state, and the registry of their CLI names."""

from __future__ import annotations

import dataclasses
import math

from condiff.errors import ConfigError, one_of
from condiff.solvers.base import Point, Solver, point
from condiff.solvers.dc_solver import DCSolver
from condiff.solvers.ddim import DDIM
from condiff.solvers.ddpm import DDPM
from condiff.solvers.dpm_v3 import DPMSolverV3
from condiff.solvers.dpmpp_2m import DPMSolverPP2M
from condiff.solvers.dpmpp_2s import DPMSolverPP2S
from condiff.solvers.dpmpp_3m import DPMSolverPP3M
from condiff.solvers.edm import EDMSDE, EDMHeun
from condiff.solvers.euler import Euler
from condiff.solvers.heun import Heun
from condiff.solvers.unipc import UniPC

SOLVERS = {
    "ddpm": DDPM,
    "ddim": DDIM,
    "euler": Euler,
    "heun": Heun,
    "dpmpp-2m": DPMSolverPP2M,
    "dpmpp-3m": DPMSolverPP3M,
    "dpmpp-2s": DPMSolverPP2S,
    "unipc": UniPC,
    "dpm-v3": DPMSolverV3,
    "edm-heun": EDMHeun,
    "edm-sde": EDMSDE,
    "dc-solver": DCSolver,
}

DESCRIPTIONS = {
    "ddpm": "DDPM ancestral sampling (stochastic, order 1; Ho et al. 2020)",
    "ddim": "DDIM, eta=0 deterministic (order 1; Song et al. 2021)",
    "euler": "Euler on the PF-ODE in Karras form (order 1)",
    "heun": "Heun on the PF-ODE, 2 evaluations a step (order 2; Karras et al. 2022)",
    "dpmpp-2m": "DPM-Solver++(2M), multistep data prediction (order 2; Lu et al. 2022)",
    "dpmpp-3m": "DPM-Solver++(3M), multistep data prediction as in diffusers (order 3 nominal; Lu et al. 2022)",
    "dpmpp-2s": "DPM-Solver++(2S), singlestep midpoint in log-SNR, 2 evaluations a step (order 2; Lu et al. 2022)",
    "unipc": "UniPC bh2, UniP-2 predictor + UniC corrector, no extra evaluation (order 3; Zhao et al. 2023); "
    "variant=bh1 is for unconditional sampling (shapes, cfg 3, 6 steps: 0.33 against bh2's 0.85)",
    "dpm-v3": "DPM-Solver-v3, order 2 + pseudo-order corrector; statistics from `condiff ems compute` (--ems), "
    "none = DPM-Solver++ (Zheng et al. 2023)",
    "edm-heun": "EDM's deterministic Heun sampler on the Karras grid, 2N-1 evaluations (order 2; Karras et al. 2022); "
    "needs 8-10 steps or more under guidance (shapes, cfg 3: 0.91 at 8, 0.00 at 5)",
    "edm-sde": "EDM's stochastic churn sampler, Heun after adding noise in [S_min, S_max] (Karras et al. 2022); "
    "needs 15-20 steps or more with the default S_churn 40 (shapes, cfg 3: 0.99 at 15, 0.35 at 10, 0.00 at 5)",
    "dc-solver": "DC-Solver: UniPC with dynamic compensation; ratios from `condiff dc search` (Zhao et al. 2024)",
}


_SIMPLE = (bool, int, float, str)


def _check_simple_options(name: str, cls, kwargs: dict) -> None:
    """A plain value (bool, number, string: what the CLI's --solver-opt gives) must match the kind of the
    field's default: true/false for flags, an integer for integers, a finite number for floats, a name for
    strings; fields holding objects (statistics, ratios, bases) cannot be set from a plain value."""
    if not dataclasses.is_dataclass(cls):
        return
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in kwargs.items():
        if key not in fields or not isinstance(value, _SIMPLE):
            continue
        default = fields[key].default
        kind = type(default)
        ok = (
            isinstance(value, bool)
            if kind is bool
            else isinstance(value, int) and not isinstance(value, bool)
            if kind is int
            else isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            if kind is float
            else isinstance(value, str)
            if kind is str
            else False
        )
        if not ok:
            want = {bool: "true or false", int: "an integer", float: "a finite number", str: "a name"}.get(
                kind, "an object (library use only)"
            )
            raise ConfigError(f"solver {name!r} option {key} must be {want}, got {value!r}")


def get_solver(name: str, **kwargs) -> Solver:
    """Map a CLI name to a solver object; unknown names and options are ConfigErrors."""
    if not isinstance(name, str) or name not in SOLVERS:
        raise one_of("solver", name, SOLVERS)
    _check_simple_options(name, SOLVERS[name], kwargs)
    try:
        return SOLVERS[name](**kwargs)
    except TypeError:
        cls = SOLVERS[name]
        fields = ", ".join(f.name for f in dataclasses.fields(cls)) if dataclasses.is_dataclass(cls) else ""
        raise ConfigError(
            f"solver {name!r} does not take the options {sorted(kwargs)}; accepted: {fields or 'none'}"
        ) from None


__all__ = [
    "Solver",
    "Point",
    "point",
    "DDIM",
    "DDPM",
    "DPMSolverPP2M",
    "DPMSolverPP2S",
    "DPMSolverPP3M",
    "Euler",
    "Heun",
    "UniPC",
    "EDMHeun",
    "EDMSDE",
    "DCSolver",
    "DPMSolverV3",
    "SOLVERS",
    "DESCRIPTIONS",
    "get_solver",
]
