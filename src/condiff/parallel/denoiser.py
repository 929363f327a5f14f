"""The patch-parallel network behind the Denoiser protocol, so that every condiff solver and guidance method
runs on it unchanged (DistriFusion, Li et al. CVPR 2024, sec. 4.2; PCPP: condiff.parallel.pcpp).

``ParallelDenoiser(denoiser, engine, root)`` calls ``denoiser`` with ``engine.attach(root)`` installed: the
network ``root`` (the one that receives the latent, e.g. a diffusers UNet2DConditionModel inside a condiff
model) runs on this rank's band and returns the full output gathered from all ranks, so every rank takes the
same solver step. Starting a trajectory (``condiff.core.denoiser.start_trajectory``, which ``sample`` calls)
resets the stale buffers and the warm-up count. Every rank must run the same calls in the same order with the
same inputs (same seed), as torch.distributed requires.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from condiff.core.denoiser import Wrapper
from condiff.parallel.patch import PatchConfig, PatchEngine


@dataclass
class ParallelDenoiser(Wrapper):
    denoiser: Any
    engine: PatchEngine
    root: nn.Module

    def start(self, memo: dict | None = None):
        self.engine.reset()
        return super().start(memo)

    def __call__(self, x, t, cond=None):
        with self.engine.attach(self.root):
            return self.denoiser(x, t, cond)


def patch_parallel(denoiser, root: nn.Module, config: PatchConfig | None = None, engine: PatchEngine | None = None):
    """``denoiser`` evaluated patch-parallel over the ranks of the default process group (world size 1: the
    network runs whole, nothing is exchanged)."""
    return ParallelDenoiser(denoiser, engine or PatchEngine(config or PatchConfig()), root)
