"""Patch parallelism (DistriFusion) on 2 and 4 gloo ranks against the single process (float64): full_sync and
a warm-up covering every step give the single-process sample to 1e-6; the halo exchange gives the full
convolution; the GroupNorm moments across bands give torch's GroupNorm; with a time-independent network every
asynchronous mode gives the single-process sample (stale == fresh), and with a time-dependent one the
asynchronous modes do deviate (the test would notice a mode that silently synchronised)."""

from __future__ import annotations

import pytest
import torch
from parallelkit import results
from torch import nn

from condiff.errors import ConfigError
from condiff.parallel import MODES, PatchConfig, PatchEngine
from condiff.parallel.patch import corrected_moments, halo_rows

EXACT = 1e-6  # acceptance bound (float64; the runs reach ~1e-14)
ASYNC = ("sync_gn", "corrected_async_gn", "stale_gn", "no_sync")


@pytest.mark.parametrize("world", [2, 4])
def test_full_sync_equals_single_process(world):
    res = results(world)
    for method in ("distrifusion", "pcpp"):
        for split in (False, True):
            assert res[f"full_sync/{method}/split={split}"] < EXACT
        assert res[f"warmup_all/{method}"] < EXACT


@pytest.mark.parametrize("world", [2, 4])
def test_full_sync_shapes_unet_equals_the_whole_network(world):
    res = results(world)
    assert res["unet/bands/split=False"] == world and res["unet/bands/split=True"] == world // 2
    assert res["unet/full_sync/split=False"] < EXACT and res["unet/full_sync/split=True"] < EXACT


@pytest.mark.parametrize("world", [2, 4])
def test_time_independent_network_makes_async_modes_exact(world):
    res = results(world)
    for method in ("distrifusion", "pcpp"):
        for mode in ASYNC:
            assert res[f"time_free/{method}/{mode}"] < EXACT, (method, mode)
            assert res[f"time_dep/{method}/{mode}"] > 1e-4, (method, mode)  # stale buffers are really used


@pytest.mark.parametrize("world", [2, 4])
def test_halo_exchange_equals_full_convolution(world):
    res = results(world)
    halo = {k: v for k, v in res.items() if k.startswith("halo/")}
    assert len(halo) == 10
    assert max(halo.values()) < 1e-12


@pytest.mark.parametrize("world", [2, 4])
def test_groupnorm_across_bands_equals_groupnorm(world):
    res = results(world)
    for mode in ("full_sync", "corrected_async_gn", "stale_gn"):
        assert res[f"gn/{mode}"] < 1e-12


@pytest.mark.parametrize("world", [2, 4])
def test_cfg_batch_split_across_two_groups(world):
    res = results(world)
    assert res["cfg/groups/split=True"] == 2 and res["cfg/groups/split=False"] == 1
    assert res["cfg/split=True"] < EXACT and res["cfg/split=False"] < EXACT


def test_layers_it_cannot_split_are_refused():
    refusals = results(2)["refusals"]
    assert all(r is not None and "patch parallelism does not handle" in r for r in refusals), refusals
    assert [r.split()[5] for r in refusals] == ["AvgPool2d", "Upsample", "Conv2d"]


def test_corrected_moments_identity():
    g = torch.Generator().manual_seed(0)
    stale = [torch.randn(2, 4, 2, generator=g, dtype=torch.float64) for _ in range(4)]
    for r in range(4):  # fresh == stale: the exact mean of the ranks' moments
        assert torch.equal(corrected_moments(stale, stale[r], r), torch.stack(stale).mean(0))
    fresh = stale[1] + 0.25  # a change of the own moments is carried over whole (extrapolated to all bands)
    assert torch.allclose(corrected_moments(stale, fresh, 1), torch.stack(stale).mean(0) + 0.25, atol=1e-15)


@pytest.mark.parametrize(
    "k,s,p,d,rows,row0,want",
    [
        (3, 1, 1, 1, 4, 4, (1, 1)),
        (3, 2, 1, 1, 4, 4, (1, 0)),
        (5, 1, 2, 1, 4, 8, (2, 2)),
        (3, 1, 2, 2, 4, 0, (2, 2)),
        (1, 1, 0, 1, 4, 4, (0, 0)),
        (4, 2, 1, 1, 4, 4, (1, 1)),
    ],
)
def test_halo_rows(k, s, p, d, rows, row0, want):
    conv = nn.Conv2d(1, 1, k, stride=s, padding=p, dilation=d)
    assert halo_rows(conv, rows, row0, 16) == want
    # the padded band convolved without row padding has exactly the band's output rows
    top, bottom = want
    assert (rows + top + bottom - d * (k - 1) - 1) // s + 1 == rows // s


def test_halo_rows_refuses_bands_that_do_not_split():
    with pytest.raises(ConfigError, match="split with the bands"):
        halo_rows(nn.Conv2d(1, 1, 3, stride=2, padding=1), 3, 3, 12)


def test_config_refusals():
    with pytest.raises(ConfigError, match="parallel mode"):
        PatchConfig(mode="async")
    with pytest.raises(ConfigError, match="parallel method"):
        PatchConfig(method="ring")
    with pytest.raises(ConfigError, match="warmup_steps"):
        PatchConfig(warmup_steps=-1)
    assert set(MODES) == {"full_sync", "sync_gn", "corrected_async_gn", "stale_gn", "no_sync"}


def test_single_process_engine_is_the_network():
    net = nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), nn.GroupNorm(1, 2))
    x = torch.randn(1, 2, 8, 8)
    eng = PatchEngine(PatchConfig())
    with torch.no_grad(), eng.attach(net):
        y = net(x)
    assert torch.equal(y, net(x)) and eng.calls == 1 and eng.counter.total() == 0
