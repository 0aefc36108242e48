"""What a batch, a model input and a model output may look like, and how each is handled."""

from __future__ import annotations

from collections.abc import Callable, Mapping
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


def map_tensors(value: Any, change: Callable[[torch.Tensor], Any]) -> Any:
    """`value` with `change` applied to every tensor inside it (tuples, lists and mappings rebuilt)."""
    if isinstance(value, torch.Tensor):
        return change(value)
    if isinstance(value, tuple):
        return tuple(map_tensors(v, change) for v in value)
    if isinstance(value, list):
        return [map_tensors(v, change) for v in value]
    if isinstance(value, Mapping):
        return {k: map_tensors(v, change) for k, v in value.items()}
    return value


def to_device(value: Any, device: torch.device) -> Any:
    """Move every tensor inside `value` to `device` (a no-op for tensors already there)."""
    return map_tensors(value, lambda tensor: tensor.to(device))


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


def shown_output(output: Any) -> torch.Tensor:
    """What to show as the output of a model that computes its own loss: its logits (as for any
    model), else its first tensor that is not the loss, else the loss itself."""
    try:
        return primary_output(output)
    except TypeError:
        pass
    values = (
        output.values() if isinstance(output, Mapping) else vars(output).values() if hasattr(output, "__dict__") else ()
    )
    shown = next((v for v in values if isinstance(v, torch.Tensor) and v.dim() > 0), None)
    return shown if shown is not None else own_loss(output)


def batch_size(targets: Any) -> int:
    """How many examples a batch holds, judged by its targets."""
    if isinstance(targets, torch.Tensor):
        return int(targets.shape[0]) if targets.dim() > 0 else 1
    if isinstance(targets, (tuple, list)):
        return len(targets)
    return 1


def batch_slice(value: Any, start: int, stop: int, size: int) -> Any:
    """Examples `start:stop` of a batch of `size` examples: every tensor inside `value` (a tensor, a
    tuple or list of them, a dict of them) is cut on dim 0, and anything else is kept whole.
    Raises ValueError where a tensor does not hold the batch on dim 0."""
    if isinstance(value, torch.Tensor):
        if value.dim() == 0 or value.shape[0] != size:
            raise ValueError(f"a tensor of shape {list(value.shape)} does not hold the {size} examples on dim 0")
        return value[start:stop]
    if isinstance(value, (tuple, list)):
        items = [batch_slice(v, start, stop, size) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)  # a namedtuple too
    if isinstance(value, Mapping):
        return {k: batch_slice(v, start, stop, size) for k, v in value.items()}
    return value


def target_key(batch: Any) -> str | None:
    """The key a dict batch keeps its targets under (None for a tuple batch)."""
    if isinstance(batch, Mapping):
        return next((k for k in TARGET_KEYS if k in batch), None)
    return None


def call_model_with_targets(model: nn.Module, inputs: Any, targets: Any, key: str | None) -> Any:
    """A model that computes its own loss gets the targets too: a dict batch whole (its `labels`
    kept, as HuggingFace models want them), otherwise as the last argument (`model(x, y)`, as
    nanoGPT's `forward(idx, targets)`)."""
    if isinstance(inputs, Mapping):
        return model(**inputs, **{key or "labels": targets})
    if isinstance(inputs, (tuple, list)):
        return model(*inputs, targets)
    if key is not None and key not in ("targets", "target", "y"):
        return model(inputs, **{key: targets})
    return model(inputs, targets)


def own_loss(output: Any) -> torch.Tensor:
    """The loss a model computed itself: `.loss`, `["loss"]`, or the first 0-d tensor of a tuple."""
    loss = getattr(output, "loss", None)
    if loss is None and isinstance(output, Mapping):
        loss = output.get("loss")
    if loss is None and isinstance(output, (tuple, list)):
        loss = next((item for item in output if isinstance(item, torch.Tensor) and item.dim() == 0), None)
    if not isinstance(loss, torch.Tensor):
        raise TypeError(
            f"the experiment has loss_fn=None, so the model must compute its own loss, but it returned "
            f"{type(output).__name__} with no loss: return `.loss`, a dict with 'loss', or (output, loss)"
        )
    return loss


def model_loss(model: nn.Module, loss_fn: Any, inputs: Any, targets: Any, key: str | None) -> tuple[Any, Any]:
    """(the model's output, the loss) for one batch, however the experiment computes its loss."""
    if loss_fn is None:
        output = call_model_with_targets(model, inputs, targets, key)
        return output, own_loss(output)
    output = call_model(model, inputs)
    return output, loss_fn(primary_output(output), targets)
