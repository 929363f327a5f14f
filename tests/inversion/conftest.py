"""Fixtures of the inversion tests: ``toy``, the toy conditional eps-MLP of spec sec. 0 (see invkit.py)."""

import pytest
import torch
from invkit import Toy


@pytest.fixture(scope="session")
def toy():
    """``toy(dtype, x_gain=1.0)`` -> the toy model (float32 or float64), built once per setting."""
    cache = {}

    def make(dtype=torch.float32, x_gain: float = 1.0) -> Toy:
        if (dtype, x_gain) not in cache:
            cache[dtype, x_gain] = Toy(dtype, x_gain)
        return cache[dtype, x_gain]

    return make
