"""Build diffusers UNets from plain config dicts (recipes keep them in TOML)."""

from __future__ import annotations

from diffusers import UNet2DConditionModel, UNet2DModel

from condiff.errors import one_of

UNET_CLASSES = {"UNet2DModel": UNet2DModel, "UNet2DConditionModel": UNet2DConditionModel}


def build_unet(cls_name: str, config: dict):
    if cls_name not in UNET_CLASSES:
        raise one_of("unet class", cls_name, UNET_CLASSES)
    cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}
    return UNET_CLASSES[cls_name](**cfg)
