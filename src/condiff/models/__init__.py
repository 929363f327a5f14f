"""Conditional model families (shapes, digits): how each builds its networks, encodes its conditions,
makes training batches, scores samples and saves/loads in diffusers format."""

from .base import LoadedModel, ModelFamily, load_model, FAMILIES, BUNDLED, bundled_dir

__all__ = ["LoadedModel", "ModelFamily", "load_model", "FAMILIES", "BUNDLED", "bundled_dir"]
