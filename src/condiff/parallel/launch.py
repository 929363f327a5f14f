"""Process groups for patch-parallel sampling: ``from_env`` under torchrun (RANK, WORLD_SIZE, MASTER_ADDR,
MASTER_PORT set by the launcher), ``spawn`` for n local CPU ranks on gloo (the CPU emulation of sec. 15 of the
sampling spec: torch.multiprocessing and a file:// store)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from condiff.errors import ConfigError


def launched() -> bool:
    """Whether this process was started by torchrun (or another launcher that sets WORLD_SIZE and RANK)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def from_env(backend: str | None = None) -> tuple[int, int]:
    """Join the launcher's process group (gloo on CPU, nccl when CUDA is there) and return (rank, world size);
    outside a launcher (rank 0 of 1) nothing is initialised."""
    if not launched():
        return 0, 1
    if not dist.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size()


def _entry(rank: int, world: int, store: str, fn, args):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    finally:
        dist.barrier()
        dist.destroy_process_group()


def spawn(fn, world: int, *args, start_method: str = "fork") -> None:
    """Run ``fn(rank, world, *args)`` on ``world`` local processes joined in a gloo group. ``fork`` (the
    default where the platform has it) reuses the parent's imports, which makes a rank start in well under a
    second; ``spawn`` starts fresh interpreters (``fn`` must then be a module-level function)."""
    if start_method not in mp.get_all_start_methods():
        start_method = "spawn"
    if world < 1:
        raise ConfigError(f"world size must be at least 1, got {world}")
    with tempfile.TemporaryDirectory() as tmp:
        store = str(Path(tmp) / "store")
        mp.start_processes(_entry, args=(world, store, fn, args), nprocs=world, join=True, start_method=start_method)
