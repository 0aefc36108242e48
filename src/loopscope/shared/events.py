"""Immutable, picklable records of what one stage did (no tensors, no torch import)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, cast

from loopscope.shared.metrics import StageMetrics
from loopscope.shared.vocab import Severity, Stage


@dataclass(frozen=True, slots=True)
class TensorStat:
    """Summary of one tensor a stage touched."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    device: str
    mean: float | None = None
    std: float | None = None
    min: float | None = None
    max: float | None = None
    nan_count: int = 0
    inf_count: int = 0
    zero_fraction: float | None = None
    module_type: str | None = None  # set for forward-hook outputs, e.g. "Linear"


@dataclass(frozen=True, slots=True)
class LayerStat:
    """Gradient and update of one named parameter (names as `model.named_parameters()` gives them)."""

    name: str
    shape: tuple[int, ...]
    trainable: bool
    grad_norm: float | None = None
    weight_norm: float | None = None
    update_norm: float | None = None
    update_ratio: float | None = None


@dataclass(frozen=True, slots=True)
class Finding:
    """A diagnostic: what is seen, with numbers, who is suspected and how to fix it."""

    id: str
    severity: Severity
    message: str
    suspects: tuple[str, ...] = ()
    fix: str = ""


@dataclass(frozen=True, slots=True)
class StageError:
    """An exception raised by user code (or the loop) during one stage, explained."""

    type: str
    message: str
    location: str | None = None  # "file.py:12 in forward", the innermost frame outside loopscope/torch
    hint: str | None = None


@dataclass(frozen=True)
class CheckResult:
    """One sanity check on a copy of the model: did it pass, and the numbers that say so."""

    id: str
    title: str
    passed: bool
    message: str
    numbers: dict[str, Any] = field(default_factory=dict)
    skipped: bool = False  # not meaningful in this state (passed is then True)


@dataclass(frozen=True, slots=True)
class StageEvent:
    """Everything one stage run did. The UI and the trace writers render only these."""

    iteration: int  # global, 1-based; end-of-epoch stages carry the last finished iteration
    epoch: int  # 1-based
    stage: Stage
    bugs: tuple[str, ...] = ()
    tensors: tuple[TensorStat, ...] = ()
    loss: float | None = None
    grad_norm: float | None = None
    layers: tuple[LayerStat, ...] = ()
    metrics: StageMetrics = field(default_factory=lambda: cast(StageMetrics, {}))
    diagnostics: tuple[Finding, ...] = ()
    error: StageError | None = None
    duration_ms: float = 0.0
    device: str = "cpu"
    twin_loss: float | None = None
    code_line: int | None = None
    rank: int | None = None  # the process's rank under torch.distributed (--nproc); None in one process

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data; non-finite floats become null and are listed in `nonfinite`."""
        raw = asdict(self)
        nonfinite: list[str] = []
        clean = _replace_nonfinite(raw, "", nonfinite)
        clean["nonfinite"] = nonfinite
        return clean


def _replace_nonfinite(value: Any, path: str, found: list[str]) -> Any:
    # JSON has no NaN/Infinity; writing them bare makes the file unreadable by strict parsers.
    if isinstance(value, float) and not math.isfinite(value):
        found.append(f"{path}={'nan' if math.isnan(value) else ('inf' if value > 0 else '-inf')}")
        return None
    if isinstance(value, dict):
        return {k: _replace_nonfinite(v, f"{path}.{k}" if path else str(k), found) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_replace_nonfinite(v, f"{path}[{i}]", found) for i, v in enumerate(value)]
    return value
