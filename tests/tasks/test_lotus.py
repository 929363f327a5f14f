"""Lotus (condiff.tasks.lotus): the zero-initialised widening equals the pretrained network on its old channels, the
prediction is exactly one network evaluation at t = T from x_T = sigma_T z, the x0 loss and the detail preserver's
layout are exact, and the scores are exact on small examples."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel, UNet2DModel
from torch import nn

from condiff.core.denoiser import X0, wrap
from condiff.core.schedules import VPDiscrete
from condiff.errors import ConfigError
from condiff.tasks.lotus import (
    depth_errors,
    detail_loss,
    detail_preserver,
    lotus_loss,
    mask_iou,
    single_step,
    widen_conv,
    widen_unet,
)

SCHEDULE = VPDiscrete.from_betas("squaredcos_cap_v2", 1000)


def tiny_cond_unet(in_channels=4, out_channels=4):
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=in_channels,
        out_channels=out_channels,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        cross_attention_dim=8,
        attention_head_dim=4,
        norm_num_groups=4,
    ).eval()


def test_widen_conv_keeps_the_old_outputs_and_zeroes_the_new_ones():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 3, padding=1)
    wide = widen_conv(conv, 7, 9)
    x = torch.randn(2, 3, 6, 6)
    extra = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        out = wide(torch.cat([x, extra], 1))
        assert torch.equal(out[:, :5], conv(x))
        assert torch.equal(out[:, 5:], torch.zeros_like(out[:, 5:]))
        assert torch.equal(wide.weight[:5, :3], conv.weight) and torch.equal(wide.bias[:5], conv.bias)
    assert torch.equal(wide.weight[:, 3:], torch.zeros(9, 4, 3, 3))


@pytest.mark.parametrize("bad", [2, 4.0, True])
def test_widen_conv_refuses_narrowing_and_non_integers(bad):
    with pytest.raises(ConfigError, match="in_channels must be an integer >= 3"):
        widen_conv(nn.Conv2d(3, 5, 3), bad)


def test_widened_unet_equals_the_pretrained_net_on_the_old_channels():
    """Whatever the new input channels hold, the widened UNet's old outputs are the pretrained UNet's on the old
    inputs (conv_in's new weights are zero) and its new outputs are 0 (conv_out's new weights and biases are)."""
    unet = tiny_cond_unet()
    wide = widen_unet(unet, 10, 6)
    assert (wide.config.in_channels, wide.config.out_channels) == (10, 6) and unet.config.in_channels == 4
    g = torch.Generator().manual_seed(1)
    x, extra = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 6, 8, 8, generator=g)
    ctx, t = torch.randn(3, 2, 8, generator=g), torch.tensor([0.0, 500.0, 999.0])
    with torch.no_grad():
        old = unet(x, t, encoder_hidden_states=ctx).sample
        new = wide(torch.cat([x, extra], 1), t, encoder_hidden_states=ctx).sample
    assert torch.equal(new[:, :4], old)
    assert torch.equal(new[:, 4:], torch.zeros_like(new[:, 4:]))


def test_widened_unet_with_a_time_condition_ignores_it_at_the_start():
    unet = tiny_cond_unet()
    wide = widen_unet(unet, 6, 6, time_cond_proj_dim=8)
    assert wide.config.time_cond_proj_dim == 8 and torch.equal(wide.time_embedding.cond_proj.weight, torch.zeros(8, 8))
    g = torch.Generator().manual_seed(2)
    x, ctx, t = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 2, 8, generator=g), torch.tensor([3.0, 700.0])
    with torch.no_grad():
        old = unet(x, t, encoder_hidden_states=ctx).sample
        h = torch.cat([x, torch.randn(2, 2, 8, 8)], 1)
        new = wide(h, t, encoder_hidden_states=ctx, timestep_cond=torch.randn(2, 8)).sample
    assert torch.equal(new[:, :4], old) and not new[:, 4:].any()
    with pytest.raises(ConfigError, match="already has"):
        widen_unet(wide, 8, time_cond_proj_dim=8)


def test_widen_unet_takes_a_plain_unet_too():
    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 8),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    )
    wide = widen_unet(unet, 3)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([10.0, 20.0])
    with torch.no_grad():
        assert torch.allclose(wide(torch.cat([x, torch.randn(2, 2, 8, 8)], 1), t).sample, unet(x, t).sample, atol=1e-6)


class Counting(nn.Module):
    """A network that records its inputs and returns a fixed function of them."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(0.5))
        self.calls = []

    def forward(self, x, t_in, cond):
        self.calls.append((x.clone(), t_in.clone()))
        return self.w * x + cond["image"]


def lotus_denoiser(net):
    return wrap(net, SCHEDULE, X0(), call=lambda n, x, t_in, cond: n(x, t_in, cond), channels=3)


def test_single_step_is_exactly_one_network_evaluation_at_T():
    net = Counting()
    image = torch.randn(4, 3, 8, 8)
    out = single_step(lotus_denoiser(net), {"image": image}, (4, 3, 8, 8), torch.Generator().manual_seed(3))
    assert out.nfe == 1 and len(net.calls) == 1 and out.t == 999.0
    x, t_in = net.calls[0]
    sigma = float(SCHEDULE.sigma(torch.tensor(999.0, dtype=torch.float64)))
    z = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    assert torch.equal(x, sigma * z) and torch.equal(t_in, torch.full((4,), 999.0))
    with torch.no_grad():
        assert torch.equal(out.x0, 0.5 * sigma * z + image)  # x0-prediction: the output is the map


def test_single_step_refuses_a_bad_shape():
    with pytest.raises(ConfigError, match="single_step shape"):
        single_step(lotus_denoiser(Counting()), {}, (4,))


def test_lotus_loss_is_the_x0_mse_at_T():
    net = Counting()
    target, image = torch.randn(3, 3, 4, 4), torch.randn(3, 3, 4, 4)
    per = lotus_loss(lotus_denoiser(net), target, {"image": image}, torch.Generator().manual_seed(4))
    a, s = (float(f(torch.tensor(999.0, dtype=torch.float64))) for f in (SCHEDULE.alpha, SCHEDULE.sigma))
    eps = torch.randn(3, 3, 4, 4, generator=torch.Generator().manual_seed(4))
    x_T = a * target + s * eps
    want = (0.5 * x_T + image - target).pow(2).flatten(1).mean(1)
    assert torch.allclose(per, want, rtol=1e-6) and len(net.calls) == 1
    assert torch.equal(net.calls[0][1], torch.full((3,), 999.0))


def test_detail_preserver_splits_the_batch_in_half():
    image, ann = torch.randn(5, 3, 2, 2), torch.randn(5, 3, 2, 2)
    task = torch.tensor([1, 0, 1, 0, 1])
    lay = detail_preserver(image, ann, task, recon=2)
    assert lay.split == 3 and lay.switch.tolist() == [1, 0, 1, 2, 2]
    assert torch.equal(lay.target[:3], ann[:3]) and torch.equal(lay.target[3:], image[3:])
    loss, metrics = detail_loss(torch.tensor([1.0, 2.0, 3.0, 10.0, 20.0]), lay.split)
    assert float(loss) == 2.0 + 15.0 and metrics == {"annotation": 2.0, "reconstruction": 15.0}
    with pytest.raises(ConfigError, match="one task per row"):
        detail_preserver(image, ann, task[:2], 2)


def test_mask_iou_and_depth_errors_on_small_examples():
    a = torch.zeros(2, 2, 2, dtype=torch.bool)
    b = a.clone()
    a[0, 0, :] = True  # 2 pixels
    b[0, 0, 0] = True  # 1 of them
    assert mask_iou(a, b).tolist() == [0.5, 1.0]  # the second pair: both empty
    true = torch.tensor([[[0.5, 0.25], [0.0, 0.0]]])
    pred = torch.tensor([[[0.5, 0.5], [0.1, 0.0]]])
    mask = true > 0
    e = depth_errors(pred, true, mask)
    assert e["abs_rel"] == pytest.approx((0 + 1.0) / 2)
    assert e["rmse"] == pytest.approx((0.25**2 / 2) ** 0.5)
    assert e["rmse_all"] == pytest.approx(((0.25**2 + 0.1**2) / 4) ** 0.5)
    assert e["within_0.05"] == 0.5
    with pytest.raises(ConfigError, match="object pixel"):
        depth_errors(pred, true, torch.zeros_like(mask))
