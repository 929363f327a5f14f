"""Networks: diffusers' UNets built from small configs, and condiff's tiny caption encoder."""

from .text_encoder import SlotTextEncoder
from .unets import build_unet

__all__ = ["SlotTextEncoder", "build_unet"]
