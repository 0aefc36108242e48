"""Shared test helpers."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).parent / "fixtures"

# Small models run faster and steadier on one thread, above all on a shared 2-core machine.
torch.set_num_threads(1)


@pytest.fixture
def fixtures() -> Path:
    return FIXTURES


@pytest.fixture
def fixture_modules(monkeypatch):
    """tests/fixtures importable by module name ("faulty_experiments:nan_loss"), imported afresh
    by each test."""
    monkeypatch.syspath_prepend(str(FIXTURES))
    yield
    for name, module in list(sys.modules.items()):
        if Path(getattr(module, "__file__", None) or "/").parent == FIXTURES:
            del sys.modules[name]
