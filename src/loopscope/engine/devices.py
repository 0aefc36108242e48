"""Turn `--device` into a torch.device, or a clear error when that device is not here."""

from __future__ import annotations

import re

import torch

from loopscope.shared.errors import UserError

DEVICE_CHOICES = "auto|cpu|cuda|cuda:N|mps"


def resolve_device(spec: str) -> torch.device:
    """auto: CUDA if available, else MPS, else CPU. Asking for a missing device is a UserError."""
    spec = spec.strip().lower()
    mps = getattr(torch.backends, "mps", None)
    mps_ok = bool(mps and mps.is_available())
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if mps_ok else torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    match = re.fullmatch(r"cuda(?::(\d+))?", spec)
    if match:
        if not torch.cuda.is_available():
            raise UserError(
                f"--device {spec}: CUDA is not available here (torch {torch.__version__}, "
                f"built {'with' if torch.version.cuda else 'without'} CUDA); use --device cpu or auto"
            )
        index = int(match.group(1) or 0)
        if index >= torch.cuda.device_count():
            raise UserError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) here (cuda:0..)")
        return torch.device("cuda", index)
    if spec == "mps":
        if not mps_ok:
            raise UserError("--device mps: Apple's MPS backend is not available here; use --device cpu or auto")
        return torch.device("mps")
    raise UserError(f"--device {spec!r}: expected one of {DEVICE_CHOICES}")
