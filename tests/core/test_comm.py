"""CommCounter: bytes are the elements' sizes, per kind of collective; the ring all-reduce's wire bytes."""

import torch

from condiff.core.comm import CommCounter, tensor_bytes


def test_counts_elements_not_storage_per_kind():
    c = CommCounter()
    big = torch.zeros(100, dtype=torch.float64)
    assert c.add("all_reduce", big[:10], torch.zeros(3, dtype=torch.float16)) == 10 * 8 + 3 * 2
    assert c.add("send", nbytes=7) == 7
    c.add("all_reduce", torch.zeros(1))
    assert c.bytes == {"all_reduce": 90, "send": 7} and c.calls == {"all_reduce": 2, "send": 1}
    assert c.total_bytes == 97 == tensor_bytes(big[:10], torch.zeros(3, dtype=torch.float16)) + 11
    assert c.as_dict()["total_bytes"] == 97


def test_wire_bytes_of_a_ring_all_reduce():
    c = CommCounter()
    c.add("all_reduce", nbytes=1000)
    c.add("broadcast", nbytes=10)
    assert c.wire_bytes(4) == 1000 * 2 * 3 / 4 + 10
    assert c.wire_bytes(1) == 10  # one rank sends nothing for its all-reduce
    c.reset()
    assert c.total_bytes == 0 and c.calls == {}
