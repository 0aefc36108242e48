"""What a batch, a model input and a model output may look like, and how each is handled."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

TARGET_KEYS = ("targets", "target", "labels", "label", "y")
INPUT_KEYS = ("inputs", "input", "x")


def split_batch(batch: Any) -> tuple[Any, Any]:
    """`(inputs, targets)` from a 2-tuple/list or a dict with a target key.

    In a dict, the inputs are the value under `inputs`/`input`/`x` if that is the only other key,
    else every other key, passed to the model as keyword arguments.
    """
    if isinstance(batch, Mapping):
        target_key = next((k for k in TARGET_KEYS if k in batch), None)
        if target_key is None:
            raise TypeError(
                f"a dict batch needs a targets key (one of {', '.join(TARGET_KEYS)}); "
                f"this one has {', '.join(map(str, batch)) or 'no keys'}"
            )
        rest = {k: v for k, v in batch.items() if k != target_key}
        if len(rest) == 1 and next(iter(rest)) in INPUT_KEYS:
            return next(iter(rest.values())), batch[target_key]
        return rest, batch[target_key]
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    size = f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else ""
    raise TypeError(
        f"a batch must be (inputs, targets) or a dict with a 'targets' key, got {type(batch).__name__}{size}"
    )


def to_device(value: Any, device: torch.device) -> Any:
    """Move every tensor inside `value` to `device` (a no-op for tensors already there)."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(to_device(v, device) for v in value)
    if isinstance(value, list):
        return [to_device(v, device) for v in value]
    if isinstance(value, Mapping):
        return {k: to_device(v, device) for k, v in value.items()}
    return value


def call_model(model: nn.Module, inputs: Any) -> Any:
    """Tensor -> `model(x)`, tuple -> `model(*x)`, dict -> `model(**x)`."""
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    if isinstance(inputs, Mapping):
        return model(**inputs)
    return model(inputs)


def primary_output(output: Any) -> torch.Tensor:
    """The tensor the loss sees: the output itself, a tuple's first item, or a dict's `logits`."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output:
        return primary_output(output[0])
    if isinstance(output, Mapping):
        if "logits" in output:
            return output["logits"]
        raise TypeError(f"a dict model output needs a 'logits' key; it has {', '.join(map(str, output))}")
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    raise TypeError(f"the model returned {type(output).__name__}; expected a tensor, a tuple or a dict with 'logits'")


def batch_size(targets: Any) -> int:
    """How many examples a batch holds, judged by its targets."""
    if isinstance(targets, torch.Tensor):
        return int(targets.shape[0]) if targets.dim() > 0 else 1
    if isinstance(targets, (tuple, list)):
        return len(targets)
    return 1
