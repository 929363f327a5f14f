"""Condition entries that are not keyword arguments of a diffusers network (the null condition CFG reads, a
classifier's target) never reach it, so methods that do not run CFG themselves work on diffusers models."""

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel

from condiff.interop import wrap_diffusers
from condiff.interop.denoiser import forward_keywords


def test_non_network_condition_keys_are_left_out():
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8,
        norm_num_groups=4,
        attention_head_dim=2,
    ).eval()
    den = wrap_diffusers(unet, DDPMScheduler())
    x, ehs = torch.randn(2, 3, 8, 8), torch.randn(2, 4, 8)
    with torch.no_grad():
        plain = den(x, 500.0, {"encoder_hidden_states": ehs})
        extra = den(
            x,
            500.0,
            {
                "encoder_hidden_states": ehs,
                "null": {"encoder_hidden_states": ehs * 0},
                "cg_target": torch.tensor([1, 2]),
            },
        )
    assert torch.equal(plain, extra)
    assert "encoder_hidden_states" in forward_keywords(UNet2DConditionModel)
    assert "null" not in forward_keywords(UNet2DConditionModel)
