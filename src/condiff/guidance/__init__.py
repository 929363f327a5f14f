"""Guidance: Denoiser -> Denoiser objects that nest (e.g. ``CFG(D, 3.0)``)."""

from .cfg import CFG, contrast, batch_cond, split_batch
from .thresholding import DynamicThresholding, dynamic_threshold
from .pag import PAG
from .classifier import ClassifierGuidance
from .elucd import EluCD

__all__ = ["CFG", "contrast", "batch_cond", "split_batch", "DynamicThresholding", "dynamic_threshold"]
__all__ += ["PAG", "ClassifierGuidance", "EluCD"]
