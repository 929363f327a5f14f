"""The test tree's layout: pytest imports test modules by basename (rootdir-relative, no packages), so two
test files with the same name in different folders break collection from a clean clone."""

from collections import Counter
from pathlib import Path


def test_test_module_basenames_are_unique():
    """Every tests/**/*.py basename (other than conftest.py) occurs once."""
    names = Counter(p.name for p in Path(__file__).parent.rglob("*.py") if p.name != "conftest.py")
    assert [n for n, c in names.items() if c > 1] == []
