"""Shared test helpers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).parent / "fixtures"

# Small models run faster and steadier on one thread, above all on a shared 2-core machine.
torch.set_num_threads(1)


@pytest.fixture
def fixtures() -> Path:
    return FIXTURES
