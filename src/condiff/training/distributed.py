"""Data-parallel training on torch.distributed, as launched by ``torchrun`` or ``accelerate launch``: gloo on CPU,
nccl on GPU.

Li et al. 2020, "PyTorch Distributed: Experiences on Accelerating Data Parallel Training" (VLDB), Sec. 2-3: every
rank holds the same weights, computes the gradient of its own part of the global batch, an all-reduce sums the
parts, and every rank takes the same optimizer step, so the weights stay equal on all ranks. The Trainer scales each
part's loss by 1 / S (S: the global batch's number of shards) before its backward pass, so the summed gradient is
the gradient of the mean loss over the whole global batch, exactly as one process computes it (Eq. (1) of Goyal et
al. 2017, "Accurate, Large Minibatch SGD", with the per-worker losses averaged).

This module: reading the launcher's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``; the MPI names accelerate's ``--mpirun_hostfile`` sets work too), the process group, the one
gradient all-reduce per step (counted in bytes by condiff.core.comm.CommCounter), broadcasts, barriers, and the
one-line ``RankStopped`` error a rank raises when another rank of the job died (gloo and nccl report a closed
connection within a second; ``CONDIFF_DDP_TIMEOUT`` bounds a hung peer, 1800 s by default).
"""

from __future__ import annotations

import contextlib
import datetime
import math
import os
from dataclasses import dataclass

import torch

from condiff.core.comm import CommCounter
from condiff.errors import CondiffError, ConfigError, one_of

BACKENDS = ("auto", "gloo", "nccl")
TIMEOUT_ENV = "CONDIFF_DDP_TIMEOUT"
DEFAULT_TIMEOUT_S = 1800.0
# the first of each that is set: torchrun / accelerate names, then Open MPI, MPICH / Intel MPI, MVAPICH
RANK_VARS = ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "MV2_COMM_WORLD_RANK")
WORLD_VARS = ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE")
LOCAL_VARS = ("LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "MV2_COMM_WORLD_LOCAL_RANK")


class RankStopped(CondiffError):
    """A collective failed: another rank of the job died or became unreachable (or timed out)."""


@dataclass(frozen=True)
class LaunchEnv:
    """What the launcher's environment says about this process."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    timeout_s: float


def _first(environ, names) -> tuple[str, str] | None:
    for name in names:
        if environ.get(name, "") != "":
            return name, environ[name]
    return None


def _env_int(found: tuple[str, str], lo: int, hi: int | None, accepted: str) -> int:
    name, raw = found
    try:
        value = int(raw.strip())
    except ValueError:
        value = None
    if value is None or value < lo or (hi is not None and value > hi):
        raise ConfigError(f"environment variable {name}={raw!r} is not accepted; accepted: {accepted}")
    return value


def launch_env(environ=None) -> LaunchEnv | None:
    """The launch this process is part of, from ``environ`` (default: os.environ); None where no launcher set a
    world size (a plain ``condiff train``). A bad or missing value is a one-line ConfigError naming it."""
    environ = os.environ if environ is None else environ
    world = _first(environ, WORLD_VARS)
    if world is None:
        return None
    world_size = _env_int(world, 1, None, "a positive integer (the number of ranks: torchrun sets it)")
    rank_found = _first(environ, RANK_VARS)
    if rank_found is None and world_size == 1:
        rank_found = ("RANK", "0")  # a world of one: this process, whatever else is set
    if rank_found is None:
        raise ConfigError(
            f"environment variable {world[0]}={world[1]!r} is set but RANK is not; launch with torchrun or "
            f"accelerate launch (they set both), or unset {world[0]} for one process"
        )
    rank = _env_int(rank_found, 0, world_size - 1, f"an integer in [0, {world_size - 1}] ({world[0]}={world_size})")
    local = _first(environ, LOCAL_VARS)
    local_rank = _env_int(local, 0, None, "an integer >= 0") if local else 0
    raw_timeout = environ.get(TIMEOUT_ENV, "")
    timeout_s = DEFAULT_TIMEOUT_S
    if raw_timeout != "":
        try:
            timeout_s = float(raw_timeout)
        except ValueError:
            timeout_s = math.nan
        if not (math.isfinite(timeout_s) and timeout_s > 0):
            raise ConfigError(
                f"environment variable {TIMEOUT_ENV}={raw_timeout!r} is not accepted; accepted: a positive number "
                f"of seconds (default {DEFAULT_TIMEOUT_S:g})"
            )
    addr, port = environ.get("MASTER_ADDR", ""), 0
    if world_size > 1:
        if not addr.strip():
            raise ConfigError(
                "environment variable MASTER_ADDR is not set; accepted: the host name or address of rank 0 "
                "(torchrun and accelerate launch set it)"
            )
        port = _env_int(("MASTER_PORT", environ.get("MASTER_PORT", "")), 1, 65535, "a port number in [1, 65535]")
    return LaunchEnv(rank, world_size, local_rank, addr, port, timeout_s)


def resolve_backend(name: str, local_rank: int = 0) -> str:
    """'gloo' or 'nccl' for ``--ddp-backend`` ``name``: auto is nccl where this rank has its own CUDA device, gloo
    otherwise; nccl without one is refused."""
    import torch.distributed as dist

    if not isinstance(name, str) or name not in BACKENDS:
        raise one_of("--ddp-backend", name, BACKENDS)
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    has_gpu = local_rank < gpus and dist.is_nccl_available()
    if name == "auto":
        return "nccl" if has_gpu else "gloo"
    if name == "nccl" and not has_gpu:
        raise ConfigError(
            f"--ddp-backend nccl needs one CUDA device per rank on a node (local rank {local_rank}, {gpus} CUDA "
            f"device(s) here, nccl {'built' if dist.is_nccl_available() else 'not built'} into torch); accepted "
            f"here: gloo, auto"
        )
    if name == "gloo" and not dist.is_gloo_available():  # pragma: no cover - every official torch build has gloo
        raise ConfigError("--ddp-backend gloo: this torch build lacks gloo; accepted here: nccl, auto")
    return name


class DataParallel:
    """This rank's view of the job: rank, world size, backend, the device collectives run on (CPU for gloo, the
    rank's GPU for nccl) and the byte counter of every collective."""

    def __init__(self, rank: int, world_size: int, local_rank: int, backend: str, owned: bool = True):
        self.rank, self.world_size, self.local_rank, self.backend = rank, world_size, local_rank, backend
        self.device = torch.device("cuda", local_rank) if backend == "nccl" else torch.device("cpu")
        self.counter = CommCounter()
        self.owned = owned  # this object initialised the process group (and destroys it in close)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @contextlib.contextmanager
    def _collective(self, kind: str):
        try:
            yield
        except RuntimeError as e:  # torch.distributed.DistError and gloo's / nccl's plain RuntimeError
            first = (str(e).strip().splitlines() or [""])[0][:200]
            raise RankStopped(
                f"rank {self.rank} of {self.world_size}: {kind} failed, another rank of this job stopped or is "
                f"unreachable ({type(e).__name__}: {first})"
            ) from None

    def all_reduce_sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over the ranks in place (counted)."""
        import torch.distributed as dist

        buf = tensor.to(self.device)
        self.counter.add("all_reduce", buf)
        with self._collective("all_reduce"):
            dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        if buf is not tensor:
            tensor.copy_(buf)
        return tensor

    def reduce_gradients(self, params: list, scalars: torch.Tensor) -> torch.Tensor:
        """Sum the gradients of ``params`` and the float ``scalars`` (the loss, metrics) over the ranks, in one
        all-reduce per gradient dtype (one in all of condiff's recipes); returns the summed scalars. A parameter
        without a gradient on every rank keeps none (AdamW skips it, as one process does); one with a gradient on
        some ranks gets the sum of those."""
        grads = [p.grad for p in params]
        order = [i for i, g in enumerate(grads) if g is not None]
        dtype = grads[order[0]].dtype if order else torch.float32
        buckets: dict = {}
        for i, p in enumerate(params):
            g = grads[i]
            buckets.setdefault(g.dtype if g is not None else p.dtype, []).append(i)
        buckets.setdefault(dtype, [])
        flags = torch.tensor([g is not None for g in grads], dtype=dtype)
        summed = None
        for dt, idx in buckets.items():
            parts = [
                grads[i].reshape(-1) if grads[i] is not None else params[i].new_zeros(params[i].numel(), dtype=dt)
                for i in idx
            ]
            if dt == dtype:
                parts += [flags, scalars.to(dtype).reshape(-1)]
            flat = torch.cat(parts) if parts else torch.zeros(0, dtype=dt)
            self.all_reduce_sum_(flat)
            if dt == dtype:
                end = flat.numel() - scalars.numel()
                summed, flags_sum, flat = flat[end:], flat[end - flags.numel() : end], flat[: end - flags.numel()]
            offset = 0
            for i in idx:
                n = params[i].numel()
                chunk = flat[offset : offset + n].view_as(params[i])
                offset += n
                if grads[i] is not None:
                    grads[i].copy_(chunk)
                else:
                    params[i].grad = chunk.clone()
        for i, p in enumerate(params):
            if flags_sum[i] == 0:
                p.grad = None
        return summed.to(scalars.dtype)

    def broadcast_(self, tensors: list, src: int = 0):
        """Overwrite ``tensors`` with rank ``src``'s values: one broadcast per dtype (counted)."""
        import torch.distributed as dist

        groups: dict = {}
        for t in tensors:
            groups.setdefault(t.dtype, []).append(t.detach())
        for group in groups.values():
            flat = torch.cat([t.reshape(-1) for t in group]).to(self.device)
            self.counter.add("broadcast", flat)
            with self._collective("broadcast"):
                dist.broadcast(flat, src=src)
            offset = 0
            for t in group:
                t.copy_(flat[offset : offset + t.numel()].view_as(t))
                offset += t.numel()

    def broadcast_object(self, obj=None, src: int = 0):
        """Rank ``src``'s JSON-serialisable ``obj`` on every rank, sent as its UTF-8 JSON bytes (length first; no
        pickle crosses the wire), counted as those bytes."""
        import json

        import torch.distributed as dist

        data = json.dumps(obj).encode() if self.rank == src else b""
        size = torch.tensor([len(data)], dtype=torch.int64, device=self.device)
        self.counter.add("broadcast_object", size)
        with self._collective("broadcast"):
            dist.broadcast(size, src=src)
        buf = torch.zeros(int(size.item()), dtype=torch.uint8, device=self.device)
        if self.rank == src:
            buf.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        self.counter.add("broadcast_object", buf)
        with self._collective("broadcast"):
            dist.broadcast(buf, src=src)
        return json.loads(bytes(buf.cpu().tolist()).decode())

    def barrier(self):
        import torch.distributed as dist

        self.counter.add("barrier", nbytes=0)
        with self._collective("barrier"):
            if self.backend == "nccl":
                dist.barrier(device_ids=[self.local_rank])
            else:
                dist.barrier()

    def close(self):
        """Destroy the process group this object created (a clean shutdown: no warning from torch at exit)."""
        import torch.distributed as dist

        if self.owned and dist.is_initialized():
            dist.destroy_process_group()


def setup(backend: str = "auto", environ=None) -> DataParallel | None:
    """Join the job the launcher started: None for one process (no launcher, or a world of 1); else the
    DataParallel of this rank, its process group initialised (``env://``: torchrun's c10d rendezvous store, or
    MASTER_ADDR:MASTER_PORT). ``backend``: auto, gloo or nccl (checked even for one process)."""
    import torch.distributed as dist

    if not isinstance(backend, str) or backend not in BACKENDS:
        raise one_of("--ddp-backend", backend, BACKENDS)
    env = launch_env(environ)
    name = resolve_backend(backend, env.local_rank if env else 0)
    if env is None or env.world_size == 1:
        return None
    if dist.is_initialized():  # the caller (accelerate's Accelerator, a test harness) already joined the job
        if dist.get_world_size() != env.world_size or dist.get_rank() != env.rank:
            raise ConfigError(
                f"a process group of {dist.get_world_size()} ranks (this one rank {dist.get_rank()}) already exists; "
                f"the environment says {env.world_size} ranks (rank {env.rank})"
            )
        return DataParallel(env.rank, env.world_size, env.local_rank, dist.get_backend(), owned=False)
    # env:// reads MASTER_ADDR / MASTER_PORT (and torchrun's agent store); MPI launchers set the MPI names only
    os.environ.setdefault("MASTER_ADDR", env.master_addr)
    os.environ.setdefault("MASTER_PORT", str(env.master_port))
    kwargs = {}
    if name == "nccl":
        torch.cuda.set_device(env.local_rank)
        kwargs["device_id"] = torch.device("cuda", env.local_rank)
    try:
        dist.init_process_group(
            name,
            init_method="env://",
            rank=env.rank,
            world_size=env.world_size,
            timeout=datetime.timedelta(seconds=env.timeout_s),
            **kwargs,
        )
    except (RuntimeError, ValueError) as e:
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise RankStopped(
            f"rank {env.rank} of {env.world_size} could not join the job at {env.master_addr}:{env.master_port} "
            f"with {name} ({type(e).__name__}: {first})"
        ) from None
    return DataParallel(env.rank, env.world_size, env.local_rank, name)
