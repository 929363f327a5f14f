"""Byte counters for every collective that patch parallelism issues (communication measured, not estimated).

Each counted operation adds the bytes *this rank sends*: an all-gather of a tensor of b bytes in a group of m
ranks sends (m - 1) b (every other rank must receive this rank's part, whatever the algorithm: ring or
direct), a point-to-point send of b bytes sends b, a receive sends nothing. Summing the counters of all ranks
(``CommCounter.total_over_ranks``) gives the bytes that cross the network. Bytes are kept per kind (``kv``:
attention keys/values, ``halo``: convolution boundary rows, ``gn``: GroupNorm moments, ``output``: the final
synchronous gather of the network output) and per network evaluation (``mark_step``).

(The data-parallel trainer keeps its own counter; this one belongs to the parallel package so that the layer
contract stays one-directional.)
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.distributed as dist


class CommCounter:
    """Bytes sent by this rank, per kind, in total and per network evaluation (``steps``: one dict per
    ``mark_step``)."""

    def __init__(self):
        self.bytes: dict[str, int] = defaultdict(int)
        self.ops: dict[str, int] = defaultdict(int)
        self.steps: list[dict[str, int]] = []
        self._open: dict[str, int] = defaultdict(int)

    def add(self, kind: str, nbytes: int) -> None:
        self.bytes[kind] += int(nbytes)
        self.ops[kind] += 1
        self._open[kind] += int(nbytes)

    def mark_step(self) -> None:
        """Close the current network evaluation: its bytes per kind become one entry of ``steps``."""
        self.steps.append(dict(self._open))
        self._open = defaultdict(int)

    def reset(self) -> None:
        self.__init__()

    def total(self) -> int:
        return int(sum(self.bytes.values()))

    def as_dict(self) -> dict:
        return {"bytes": dict(self.bytes), "ops": dict(self.ops), "steps": [dict(s) for s in self.steps]}

    # counted collectives ---------------------------------------------------------------------------------
    def all_gather(self, outputs: list, tensor: torch.Tensor, group=None, kind: str = "other", async_op=False):
        m = dist.get_world_size(group)
        self.add(kind, (m - 1) * tensor.numel() * tensor.element_size())
        return dist.all_gather(outputs, tensor, group=group, async_op=async_op)

    def isend(self, tensor: torch.Tensor, dst: int, tag: int, kind: str = "other"):
        self.add(kind, tensor.numel() * tensor.element_size())
        return dist.isend(tensor, dst, tag=tag)

    def irecv(self, tensor: torch.Tensor, src: int, tag: int, kind: str = "other"):
        self.ops[kind + "_recv"] += 1
        return dist.irecv(tensor, src, tag=tag)


def total_over_ranks(values: list[float], group=None) -> list[float]:
    """Element-wise sum of ``values`` over all ranks (an uncounted all-reduce in float64: bookkeeping only)."""
    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(t, group=group)
    return t.tolist()
