"""The engine never imports Textual; the torch-free modules never import torch.

Checked in a fresh interpreter each, since a static import graph cannot see imports made
inside functions.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

TORCH_FREE = ["loopscope", "loopscope.shared.catalog", "loopscope.shared.bugs", "loopscope.shared.events", "loopscope.shared.history", "loopscope.cli.trace",
              "loopscope.cli", "loopscope.shared.errors"]
TEXTUAL_FREE = ["loopscope.engine.stepper", "loopscope.engine.probes", "loopscope.engine.diagnostics",
                "loopscope.engine.checks", "loopscope.engine.inject", "loopscope.engine.experiment",
                "loopscope.scenarios.blobs", "loopscope.scenarios.digits"]


def imported_after(module: str) -> set[str]:
    code = f"import sys, {module}; print(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(out.split())


@pytest.mark.parametrize("module", TORCH_FREE)
def test_torch_free_modules_do_not_import_torch(module):
    assert "torch" not in imported_after(module)


@pytest.mark.parametrize("module", TEXTUAL_FREE)
def test_engine_does_not_import_textual(module):
    loaded = imported_after(module)
    assert "textual" not in loaded and "rich" not in loaded
