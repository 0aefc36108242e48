"""What each process loads: the UI side never loads torch, the engine never loads Textual.

import-linter (tests/test_static_checks.py) checks the static import graph; this checks what
really loads, imports made inside functions included, in a fresh interpreter per side. The
modules are found by walking the packages, so a new module is checked without anyone listing it.
"""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import loopscope


def modules_under(*packages: str) -> list[str]:
    found = []
    for package in packages:
        found.append(package)
        module = __import__(package, fromlist=["__path__"])
        found += [info.name for info in pkgutil.walk_packages(module.__path__, prefix=f"{package}.")]
    return found


# The UI process, and the commands that answer before torch loads (`--help`, `scenarios`, errors).
TORCH_FREE = ["loopscope", "loopscope.cli.main", *modules_under("loopscope.shared", "loopscope.ui")]
TEXTUAL_FREE = modules_under("loopscope.engine", "loopscope.scenarios", "loopscope.devtools")


def loaded_by(modules: list[str]) -> set[str]:
    code = (
        f"import importlib, sys\nfor name in {modules!r}: importlib.import_module(name)\nprint(' '.join(sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(out.split())


def test_the_walk_finds_the_packages_modules():
    assert "loopscope.ui.panels.epochs" in TORCH_FREE and "loopscope.shared.protocol" in TORCH_FREE
    assert "loopscope.engine.diagnostics.structural" in TEXTUAL_FREE and "loopscope.engine.stepper" in TEXTUAL_FREE
    assert loopscope.__version__


def test_ui_side_and_shared_types_do_not_load_torch():
    loaded = loaded_by(TORCH_FREE)
    assert "textual" in loaded  # the UI modules did load: the check is not empty
    assert "torch" not in loaded and "numpy" not in loaded


def test_engine_side_does_not_load_textual():
    loaded = loaded_by(TEXTUAL_FREE)
    assert "torch" in loaded
    assert "textual" not in loaded and "rich" not in loaded
