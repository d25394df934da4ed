import pytest


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Many small problems: one intra-op thread (``one_thread`` in tests/conftest.py)."""
