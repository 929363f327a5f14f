"""The fuzz suite's hypothesis profile (reproducible: derandomized, no example database) and fixtures."""

from fuzzkit import workdir  # noqa: F401  (the module-scoped scratch directory fixture)
