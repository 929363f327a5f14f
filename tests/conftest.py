"""Shared test setup: one thread (two training jobs may share this machine), offline hub, float64 oracles."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def gmm():
    """A 4-component, 2-class mixture in R^2 (float64)."""
    from condiff.data.gmm import GMM

    return GMM.random(dim=2, components=4, num_classes=2, seed=0, spread=1.5, var_range=(0.1, 1.0))


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)
