"""Networks: diffusers' UNets built from small configs, and condiff's tiny caption encoder."""

from .classifier import AttributeClassifier
from .text_encoder import SlotTextEncoder
from .unets import build_unet

__all__ = ["AttributeClassifier", "SlotTextEncoder", "build_unet"]
