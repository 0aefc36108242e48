"""The static checks, run as tests so the README's one test command runs them too: ruff (lint and
format), mypy over the whole package, and import-linter's contracts (pyproject.toml) that keep
the two processes apart: shared types free of torch and Textual, the engine free of the UI, the
UI free of torch, and no import cycles."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def run(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)


@pytest.mark.parametrize("command", [("ruff", "check"), ("ruff", "format", "--check")], ids=["lint", "format"])
def test_ruff(command):
    result = run(str(BIN / command[0]), *command[1:], "src", "tests")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


def test_mypy_passes_on_the_whole_package():
    result = run(str(BIN / "mypy"))
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


def test_import_contracts_hold():
    result = run(str(BIN / "lint-imports"))
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout
