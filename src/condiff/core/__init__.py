"""The core: noise schedules, time grids, parameterization, the Denoiser, the sampling loop and safe files.
It imports torch and nothing else of condiff but ``condiff.errors``."""
