"""The matching pairs (condiff.data.matching) against exact answers: an integer translation copies pixels bit for
bit, a canvas holding its own coordinates shows that the flow names the source point each target pixel samples,
bilinear sampling of the source along the flow reproduces the target where valid, the flow at the centre is the
translation, seeding, ranges, config errors and the flow colour coding."""

from __future__ import annotations

import math

import pytest
import torch

from condiff.data import matching as M
from condiff.errors import ConfigError


def test_an_integer_translation_copies_pixels_exactly():
    canvas = M.render_scenes(2, torch.Generator().manual_seed(0))
    params = torch.tensor([[3.0, -2.0, 1.0, 0.0], [-5.0, 4.0, 1.0, 0.0]])
    b = M.warp_pair(canvas, params)
    m, s = M.MARGIN, M.SIZE
    assert torch.equal(b.source, canvas[:, :, m : m + s, m : m + s])
    assert torch.equal(b.target[0], canvas[0, :, m - 2 : m - 2 + s, m + 3 : m + 3 + s])
    assert torch.equal(b.target[1], canvas[1, :, m + 4 : m + 4 + s, m - 5 : m - 5 + s])
    assert torch.equal(b.flow[0], torch.tensor([3.0, -2.0])[:, None, None].expand(2, s, s))
    q = M.pixel_grid(s, s)
    assert torch.equal(b.valid[0], (q[0] + 3 <= s - 1) & (q[1] - 2 >= 0))


def test_the_flow_names_the_source_point_each_target_pixel_shows():
    """A canvas whose channels are its own x and y coordinates (bilinear interpolation reproduces a linear function
    exactly): every target pixel holds the canvas coordinate it sampled, which is q + flow[q] + MARGIN."""
    g = M.pixel_grid(M.CANVAS, M.CANVAS)
    canvas = torch.stack([g[0], g[1], torch.zeros_like(g[0])])[None].expand(4, -1, -1, -1)
    params = M.random_warps(4, torch.Generator().manual_seed(1), M.WarpConfig(max_shift=6, max_rotation=30))
    b = M.warp_pair(canvas, params)
    q = M.pixel_grid(M.SIZE, M.SIZE)
    inside = b.target[:, 2] == 0  # every target pixel samples inside the canvas here
    assert bool(inside.all())
    assert torch.allclose(b.target[:, 0], q[0] + b.flow[:, 0] + M.MARGIN, atol=1e-4)
    assert torch.allclose(b.target[:, 1], q[1] + b.flow[:, 1] + M.MARGIN, atol=1e-4)


def test_sampling_the_source_along_the_flow_reproduces_the_target_where_valid():
    b = M.matching_batch(16, torch.Generator().manual_seed(2))
    q = M.pixel_grid(M.SIZE, M.SIZE)
    w = M.bilinear(b.source, q[0] + b.flow[:, 0], q[1] + b.flow[:, 1])
    assert float((w - b.target).abs().amax(1)[b.valid].max()) < 1e-5
    assert torch.equal(b.valid, M.valid_mask(b.flow))


def test_the_warp_is_the_affine_map_about_the_centre():
    params = torch.tensor([[1.5, -0.5, 1.2, 90.0]])
    flow = M.warp_flow(params).double()
    c = (M.SIZE - 1) / 2
    q = M.pixel_grid(M.SIZE, M.SIZE, torch.float64)
    # p(q) = 1.2 R(90) (q - c) + c + tau: x' = -1.2 (y - c) + c + 1.5, y' = 1.2 (x - c) + c - 0.5
    assert torch.allclose(q[0] + flow[0, 0], -1.2 * (q[1] - c) + c + 1.5, atol=1e-5)
    assert torch.allclose(q[1] + flow[0, 1], 1.2 * (q[0] - c) + c - 0.5, atol=1e-5)


def test_batches_are_seeded_and_in_range():
    a = M.matching_batch(5, torch.Generator().manual_seed(7))
    b = M.matching_batch(5, torch.Generator().manual_seed(7))
    c = M.matching_batch(5, torch.Generator().manual_seed(8))
    for f in ("source", "target", "flow", "valid", "params"):
        assert torch.equal(getattr(a, f), getattr(b, f))
    assert not torch.equal(a.source, c.source)
    assert a.source.shape == a.target.shape == (5, 3, 32, 32) and a.flow.shape == (5, 2, 32, 32)
    assert a.valid.shape == (5, 32, 32) and a.params.shape == (5, 5)
    assert a.source.min() >= -1 and a.source.max() <= 1 and a.target.min() >= -1 and a.target.max() <= 1
    cfg = M.WarpConfig()
    p = M.random_warps(2000, torch.Generator().manual_seed(0), cfg)
    assert float(p[:, :2].norm(dim=1).max()) <= cfg.max_shift + 1e-5
    assert float(p[:, 2].max()) <= cfg.max_scale + 1e-5 and float(p[:, 2].min()) >= 1 / cfg.max_scale - 1e-5
    assert float(p[:, 3].abs().max()) <= cfg.max_rotation


@pytest.mark.parametrize(
    "over,needle",
    [
        ({"max_shift": -1.0}, "data.max_shift"),
        ({"max_scale": 0.5}, "data.max_scale"),
        ({"max_rotation": 90.0}, "data.max_rotation"),
        ({"min_shapes": 4, "max_shapes": 2}, "data.max_shapes 2 must be at least"),
        ({"texture": float("nan")}, "data.texture"),
    ],
)
def test_bad_configs_are_one_line_errors(over, needle):
    with pytest.raises(ConfigError) as e:
        M.check_warp_config(M.WarpConfig(**over))
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_flow_colours():
    flow = torch.zeros(1, 2, 1, 4)
    flow[0, :, 0, 1] = torch.tensor([2.0, 0.0])  # right, full magnitude
    flow[0, :, 0, 2] = torch.tensor([-1.0, 0.0])  # left, half
    flow[0, :, 0, 3] = torch.tensor([0.0, 2.0])  # down
    rgb = M.flow_to_rgb(flow)
    assert torch.equal(rgb[0, :, 0, 0], torch.ones(3))  # no motion: white
    assert torch.allclose(rgb[0, :, 0, 1], torch.tensor([1.0, -1.0, -1.0]))  # right: red, saturated
    assert torch.allclose(rgb[0, :, 0, 2], torch.tensor([0.0, 1.0, 1.0]))  # left: cyan at half saturation
    assert torch.allclose(rgb[0, :, 0, 3], torch.tensor([0.0, 1.0, -1.0]))  # down: yellow-green
    assert rgb.min() >= -1 and rgb.max() <= 1
    assert not math.isnan(float(M.flow_to_rgb(torch.zeros(1, 2, 2, 2)).sum()))
