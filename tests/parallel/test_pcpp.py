"""PCPP (partial window p, neighbour point-to-point exchange) against DistriFusion on gloo ranks: the window's
token range, the exact bytes sent per step (counted), PCPP's bytes <= 40% of DistriFusion's on 4 ranks, and for
n = 2 with p >= 1 PCPP gives DistriFusion's result exactly."""

from __future__ import annotations

import pytest
import torch
from parallelkit import results

from condiff.parallel.pcpp import neighbour_needs, window


def test_window_token_range():
    # [max(0, (i - p) L), min((i + 1 + p) L, n L)), truncated to integers
    assert window(0, 64, 4, 0.3) == (0, 83)
    assert window(1, 64, 4, 0.3) == (44, 147)
    assert window(3, 64, 4, 0.3) == (172, 256)
    assert window(1, 64, 2, 1.0) == (0, 128)
    assert neighbour_needs(1, 64, 4, 0.3) == (20, 19)
    assert neighbour_needs(0, 64, 4, 0.3) == (0, 19)
    assert neighbour_needs(1, 64, 4, 2.5) == (64, 64)  # at most a whole patch from each neighbour


def test_pcpp_equals_distrifusion_for_two_ranks_and_full_window():
    res = results(2)
    assert torch.equal(res["out/pcpp/1.0"], res["out/distrifusion/0.3"])
    assert not torch.equal(res["out/pcpp/0.3"], res["out/distrifusion/0.3"])  # p < 1 is a different attention


@pytest.mark.parametrize("world", [2, 4])
def test_counted_kv_bytes_match_the_formula(world):
    res = results(world)
    band = res["kv_band_bytes"]
    b = res["bytes"]
    assert b["distrifusion/0.3"]["kv"] == world * (world - 1) * band  # all-gather: every band to every rank
    assert b["pcpp/1.0"]["kv"] == 2 * (world - 1) * band  # whole patches, neighbours only
    assert b["pcpp/0.3"]["kv"] == res["pcpp_kv_expected"][0.3]  # only the window's tokens
    assert b["pcpp/1.0"]["gn"] == b["distrifusion/0.3"]["gn"]


def test_pcpp_sends_at_most_40_percent_of_distrifusion_on_four_ranks():
    b = results(4)["bytes"]
    total = {k: sum(v.values()) for k, v in b.items()}
    assert total["pcpp/0.3"] <= 0.4 * total["distrifusion/0.3"]
