"""loopscope: a debugger for the PyTorch training loop."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["Experiment", "__version__"]


def __getattr__(name: str) -> Any:
    # Lazy so that `import loopscope` (and the UI process) never pays for importing torch.
    if name == "Experiment":
        from loopscope.engine.experiment import Experiment

        return Experiment
    raise AttributeError(name)
