"""condiff: conditional diffusion as small, composable parts checked against exact oracles.

noise schedule -> denoiser -> guidance -> solver -> (inversion / editing / tasks)
"""

__version__ = "0.1.0"

from condiff.core.denoiser import Denoiser, wrap  # noqa: E402
from condiff.core.grids import Karras, UniformLogSNR, UniformT, make_grid  # noqa: E402
from condiff.core.sampling import Gaussian, Recorded, StepInfo, sample  # noqa: E402
from condiff.core.schedules import EDM, Flow, VPCosine, VPDiscrete, VPLinear  # noqa: E402
from condiff.errors import CondiffError, ConfigError, InputFileError, NonFiniteError  # noqa: E402
from condiff.guidance import CFG  # noqa: E402
from condiff.solvers import DDIM, DDPM, DPMSolverPP2M, Euler, Heun, get_solver  # noqa: E402

__all__ = [
    "Denoiser",
    "wrap",
    "CondiffError",
    "ConfigError",
    "InputFileError",
    "NonFiniteError",
    "Karras",
    "UniformLogSNR",
    "UniformT",
    "make_grid",
    "CFG",
    "Gaussian",
    "Recorded",
    "StepInfo",
    "sample",
    "EDM",
    "Flow",
    "VPCosine",
    "VPDiscrete",
    "VPLinear",
    "DDIM",
    "DDPM",
    "DPMSolverPP2M",
    "Euler",
    "Heun",
    "get_solver",
    "__version__",
]
