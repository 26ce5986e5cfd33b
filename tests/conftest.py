"""pytest setup shared by every test file: the repository on sys.path, one CPU thread, `slow`."""

import sys
from pathlib import Path

import pytest
import torch

# Lets plain `pytest` (not only `python -m pytest` from the root) import `common` and the model files.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# One thread per test process: CI machines have 2 cores, and timings stay comparable.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def one_thread():
    """...and again before every test: a training run inside a test may pick more threads (pick_threads), and
    numerics depend on the thread count, so without this a test's result would depend on the tests before it."""
    torch.set_num_threads(1)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a long check (still run in CI); deselect with -m 'not slow'")
