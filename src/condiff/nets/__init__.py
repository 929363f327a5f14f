"""Networks: diffusers' UNets built from small configs, and condiff's tiny caption encoder."""

from condiff.nets.classifier import AttributeClassifier
from condiff.nets.text_encoder import SlotTextEncoder
from condiff.nets.unets import build_unet

__all__ = ["AttributeClassifier", "SlotTextEncoder", "build_unet"]
