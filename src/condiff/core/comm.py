"""Byte counters for collective communication: every torch.distributed call condiff makes (the data-parallel
Trainer's gradient all-reduce, patch-parallel sampling's gathers and exchanges) is recorded here, so the
communication a run needs is measured at the call rather than estimated.

What is counted is the payload this rank hands to the collective: ``numel * element_size`` of each tensor it
sends (all_reduce, broadcast from the source, all_gather's own chunk, send), or receives into (recv). The bytes a
ring all-reduce then puts on the wire per rank are ``2 (N - 1) / N`` times its payload (Patarasuk and Yuan 2009,
"Bandwidth optimal all-reduce algorithms for clusters of workstations", Sec. 3); ``wire_bytes`` applies that
factor to all_reduce and counts the other kinds as their payload.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


def tensor_bytes(*tensors: torch.Tensor) -> int:
    """The bytes held by ``tensors`` (their elements, not their storage)."""
    return sum(int(t.numel()) * t.element_size() for t in tensors)


@dataclass
class CommCounter:
    """Bytes and calls per kind of collective ("all_reduce", "broadcast", "all_gather", "send", "recv", ...).

    >>> c = CommCounter()
    >>> c.add("all_reduce", torch.zeros(10))
    40
    >>> c.bytes, c.calls
    ({'all_reduce': 40}, {'all_reduce': 1})
    """

    bytes: dict = field(default_factory=dict)
    calls: dict = field(default_factory=dict)

    def add(self, kind: str, *tensors: torch.Tensor, nbytes: int | None = None) -> int:
        """Record one call of ``kind`` moving ``tensors`` (or ``nbytes`` when given); returns the bytes counted."""
        n = tensor_bytes(*tensors) if nbytes is None else int(nbytes)
        self.bytes[kind] = self.bytes.get(kind, 0) + n
        self.calls[kind] = self.calls.get(kind, 0) + 1
        return n

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes.values())

    def wire_bytes(self, world_size: int) -> float:
        """The bytes per rank on the wire: all_reduce's payload times 2 (N - 1) / N (ring), the rest as counted."""
        ring = 2 * (world_size - 1) / world_size if world_size > 1 else 0.0
        return sum(v * ring if k == "all_reduce" else v for k, v in self.bytes.items())

    def reset(self):
        self.bytes.clear()
        self.calls.clear()

    def as_dict(self) -> dict:
        return {"bytes": dict(self.bytes), "calls": dict(self.calls), "total_bytes": self.total_bytes}
