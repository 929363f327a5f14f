import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")  # torch's threads, and the CLI's default --threads

import torch  # noqa: E402

torch.set_num_threads(1)

# ---- shared oracle fixtures (GMM tests, solver and guidance suites) ---------------------------------------

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def gmm():
    """A 4-component, 2-class mixture in R^2 (float64), moderately separated."""
    from condiff.data.gmm import GMM

    return GMM.random(dim=2, components=4, num_classes=2, seed=0, spread=1.5, var_range=(0.1, 1.0))
