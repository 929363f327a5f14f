"""Condition entries that are not keyword arguments of a diffusers network (the null condition CFG reads, a
classifier's target) never reach it, so methods that do not run CFG themselves work on diffusers models."""

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel

from condiff.interop import wrap_diffusers
from condiff.interop.denoiser import forward_keywords
from condiff.interop.tiny import tiny_unet


def test_non_network_condition_keys_are_left_out():
    unet = tiny_unet(in_channels=3, cross_attention_dim=8).eval()
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
