"""Guidance: Denoiser -> Denoiser objects that nest (e.g. ``CFG(D, 3.0)``)."""

from .cfg import CFG, contrast, batch_cond, split_batch

__all__ = ["CFG", "contrast", "batch_cond", "split_batch"]
