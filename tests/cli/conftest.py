import pytest


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """The CLI sets torch's thread count from CONDIFF_THREADS (default 2): keep tests on one core."""
    monkeypatch.setenv("CONDIFF_THREADS", "1")
