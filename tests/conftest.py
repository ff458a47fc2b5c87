"""Test configuration: CI (CI=true) runs hypothesis derandomized, so that a run is repeatable;
local runs keep exploring new examples. The `torch` fixture: tests comparing against PyTorch
take it, so that they skip (never pass) where torch is not installed."""

import os

import pytest
from hypothesis import settings

settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


@pytest.fixture(scope="session")
def torch():
    """PyTorch, or a skip where it is not installed."""
    return pytest.importorskip("torch")
