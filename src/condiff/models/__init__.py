"""Conditional model families (shapes, digits): how each builds its networks, encodes its conditions,
makes training batches, scores samples and saves/loads in diffusers format."""

from condiff.models.base import BUNDLED, LoadedModel, ModelFamily, build_model, bundled_dir, get_family, load_model

__all__ = ["LoadedModel", "ModelFamily", "load_model", "build_model", "get_family", "BUNDLED", "bundled_dir"]
