"""condiff: conditional diffusion as small, composable parts checked against exact oracles.

    noise schedule -> denoiser -> guidance -> solver -> (inversion / editing / tasks)
"""

__version__ = "0.1.0"

from .denoiser import Denoiser, wrap  # noqa: E402
from .errors import CondiffError, ConfigError, InputFileError, NonFiniteError  # noqa: E402
from .grids import Karras, UniformLogSNR, UniformT, make_grid  # noqa: E402
from .guidance import CFG  # noqa: E402
from .sampling import Gaussian, Recorded, StepInfo, sample  # noqa: E402
from .schedules import EDM, Flow, VPCosine, VPDiscrete, VPLinear  # noqa: E402
from .solvers import DDIM, DDPM, DPMSolverPP2M, Euler, Heun, get_solver  # noqa: E402

__all__ = ["Denoiser", "wrap", "CondiffError", "ConfigError", "InputFileError", "NonFiniteError", "Karras",
           "UniformLogSNR", "UniformT", "make_grid", "CFG", "Gaussian", "Recorded", "StepInfo", "sample",
           "EDM", "Flow", "VPCosine", "VPDiscrete", "VPLinear", "DDIM", "DDPM", "DPMSolverPP2M", "Euler",
           "Heun", "get_solver", "__version__"]
