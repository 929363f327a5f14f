"""DiffMatch's pieces against exact answers: the correlation volume's soft-argmax recovers an integer translation of a
textured image, the local cost reads the global one, the EPE of the true flow is 0, the untrained denoiser returns
the initial flow, and the shapes of everything."""

from __future__ import annotations

import pytest
import torch

from condiff.core.schedules import VPCosine
from condiff.data import matching as M
from condiff.errors import ConfigError
from condiff.solvers import DDIM
from condiff.tasks import diffmatch as D


def _shifted_pair(dx: int, dy: int, seed: int = 0):
    """A random-noise canvas; the source is its centre window, the target the window moved by (dx, dy), so
    target pixel q shows source pixel q + (dx, dy) exactly."""
    canvas = torch.rand(1, 3, M.CANVAS, M.CANVAS, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    m, s = M.MARGIN, M.SIZE
    return canvas[:, :, m : m + s, m : m + s], canvas[:, :, m + dy : m + dy + s, m + dx : m + dx + s]


@pytest.mark.parametrize("dx,dy", [(3, -2), (0, 0), (-5, 4)])
def test_soft_argmax_of_the_correlation_volume_recovers_an_integer_translation(dx, dy):
    source, target = _shifted_pair(dx, dy)
    r = 2
    cost = D.global_cost(D.patch_features(target, r), D.patch_features(source, r))
    # a pixel's patch and its exact copy correlate exactly 1 (NCC); no other patch of random noise comes close
    flow = D.soft_argmax_flow(cost, temperature=1e-3)
    # the pixels whose patch, and the patch of their match, lie wholly inside both images
    q = D.pixel_coords(1, 32, 32)[0]
    inner = (q >= r).all(0) & (q <= 31 - r).all(0)
    inner &= (q[0] + dx >= r) & (q[0] + dx <= 31 - r) & (q[1] + dy >= r) & (q[1] + dy <= 31 - r)
    assert int(inner.sum()) > 300
    err = (flow[0] - torch.tensor([dx, dy], dtype=torch.float32)[:, None, None]).abs()
    assert float(err[:, inner].max()) < 1e-3
    got = flow[0][:, inner].round()
    assert torch.equal(got, torch.tensor([dx, dy], dtype=torch.float32)[:, None].expand_as(got))
    idx = q[1, inner].long() * 32 + q[0, inner].long()
    best = cost[0].flatten(1)[idx].max(1)
    assert torch.allclose(best.values, torch.ones_like(best.values), atol=1e-5)


def test_the_local_cost_reads_the_global_cost_at_the_flow_plus_each_displacement():
    source, target = _shifted_pair(2, 1, seed=3)
    cost = D.global_cost(D.patch_features(target, 1), D.patch_features(source, 1))
    flow = torch.zeros(1, 2, 32, 32)
    flow[:, 0], flow[:, 1] = 2, 1  # integer: bilinear sampling reads single entries
    local = D.local_cost(cost, flow, radius=2)
    assert local.shape == (1, 25, 32, 32)
    for k, (ddy, ddx) in enumerate((a, b) for a in range(-2, 3) for b in range(-2, 3)):
        for y, x in [(5, 5), (10, 20), (29, 3)]:
            sy, sx = y + 1 + ddy, x + 2 + ddx
            want = cost[0, y * 32 + x, sy, sx] if 0 <= sy < 32 and 0 <= sx < 32 else torch.tensor(0.0)
            assert torch.allclose(local[0, k, y, x], want, atol=1e-6), (k, y, x)
    assert torch.allclose(local[0, 12, 5:25, 5:25], torch.ones(20, 20), atol=1e-5)  # the centre: the exact match


def test_end_point_error_of_the_true_flow_is_zero_and_of_a_3_4_offset_is_5():
    b = M.matching_batch(4, torch.Generator().manual_seed(1))
    assert torch.equal(D.end_point_error(b.flow, b.flow, b.valid), torch.zeros(4, dtype=torch.float64))
    off = b.flow + torch.tensor([3.0, 4.0])[None, :, None, None]
    assert torch.allclose(D.end_point_error(off, b.flow, b.valid), torch.full((4,), 5.0, dtype=torch.float64))
    assert torch.allclose(D.end_point_error(off, b.flow), torch.full((4,), 5.0, dtype=torch.float64))
    with pytest.raises(ConfigError, match="must both be"):
        D.end_point_error(b.flow[:, :1], b.flow)


def test_shapes_and_the_untrained_denoiser_returns_the_initial_flow():
    b = M.matching_batch(3, torch.Generator().manual_seed(2))
    cond = D.matching_condition(b.source, b.target, feature_radius=1, temperature=0.05, local_radius=2)
    assert cond.init_flow.shape == (3, 2, 32, 32) and cond.local_cost.shape == (3, 25, 32, 32)
    assert cond.target.shape == cond.warped_source.shape == (3, 3, 32, 32)
    c = cond.tensor(4.0)
    assert c.shape == (3, D.cond_channels(2), 32, 32) and torch.equal(c[:, :2], cond.init_flow / 4.0)
    assert D.patch_features(b.source, 1).shape == (3, 27, 32, 32)
    assert D.global_cost(D.patch_features(b.target, 1), D.patch_features(b.source, 1)).shape == (3, 1024, 32, 32)

    torch.manual_seed(0)
    net = D.FlowDenoiserNet(D.cond_channels(2), channels=8, time_dim=8)
    schedule = VPCosine()
    den = D.flow_denoiser(net, schedule)
    x = torch.randn(3, 2, 32, 32)
    with torch.no_grad():
        assert torch.equal(den(x, 0.5, {D.COND_KEY: c}), c[:, :2])  # the last convolution starts at zero
        flow = D.sample_flow(den, DDIM(), c, 4.0, steps=3, generator=torch.Generator().manual_seed(0), hypotheses=2)
        again = D.sample_flow(den, DDIM(), c, 4.0, steps=3, generator=torch.Generator().manual_seed(0), hypotheses=2)
        reg = D.regress_flow(net, schedule, c, 4.0)
        from_init = D.sample_flow(den, DDIM(), c, 4.0, steps=2, t_start=0.5)
    assert flow.shape == reg.shape == from_init.shape == (3, 2, 32, 32)
    assert torch.equal(flow, again)
    assert torch.allclose(flow, cond.init_flow, atol=1e-5) and torch.allclose(reg, cond.init_flow, atol=1e-5)
    loss = D.diffmatch_loss(net, schedule, b.flow, c, torch.Generator().manual_seed(0), 4.0)
    loss.backward()
    assert loss.dim() == 0 and torch.isfinite(loss) and net.out.weight.grad.abs().sum() > 0


def test_bad_inputs_are_one_line_config_errors():
    x = torch.zeros(1, 3, 8, 8)
    for fn, args, needle in [
        (D.patch_features, (x[0],), "(B, C, H, W)"),
        (D.patch_features, (x, 9), "radius"),
        (D.global_cost, (x, torch.zeros(1, 3, 8, 9)), "one shape"),
        (D.soft_argmax_flow, (torch.zeros(1, 64, 8, 8), 0.0), "temperature"),
        (D.matching_condition, (x, torch.zeros(1, 3, 8, 9)), "one shape"),
    ]:
        with pytest.raises(ConfigError) as e:
            fn(*args)
        assert needle in str(e.value) and "\n" not in str(e.value)


def test_the_generators_flow_maps_target_pixels_onto_the_source_points_they_show():
    """Warping the source by the true flow (the task's grid_sample warp) reproduces the target wherever the flow is
    valid: the generator's and the task's conventions agree."""
    b = M.matching_batch(8, torch.Generator().manual_seed(4))
    warped = D.warp(b.source, b.flow)
    diff = (warped - b.target).abs().amax(1)
    assert float(diff[b.valid].max()) < 1e-4
    assert float(b.valid.float().mean()) > 0.5
