import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """The CLI sets torch's thread count (--threads, default OMP_NUM_THREADS): keep tests on one core, also
    after a test that runs a command with more."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    yield
    torch.set_num_threads(1)
