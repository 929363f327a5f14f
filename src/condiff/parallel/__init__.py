"""Patch-parallel sampling of one image across ranks: DistriFusion and PCPP on torch.distributed."""

from condiff.parallel.comm import CommCounter
from condiff.parallel.denoiser import ParallelDenoiser, patch_parallel
from condiff.parallel.patch import METHODS, MODES, PatchConfig, PatchEngine

__all__ = ["CommCounter", "METHODS", "MODES", "ParallelDenoiser", "PatchConfig", "PatchEngine", "patch_parallel"]
