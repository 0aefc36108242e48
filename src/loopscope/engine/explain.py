"""Turn an exception from a stage into a StageError a student can act on."""

from __future__ import annotations

import re

from loopscope.shared.errors import user_frame
from loopscope.shared.events import StageError

# (pattern in the message, plain explanation). First match wins.
_HINTS: tuple[tuple[str, str], ...] = (
    (
        r"mat1 and mat2 shapes cannot be multiplied \((\d+)x(\d+) and (\d+)x(\d+)\)",
        "a Linear layer got inputs with {1} features but expects {2}: the input's last "
        "dimension and the layer's in_features must match",
    ),
    (
        r"Expected all tensors to be on the same device|type \(torch\.cuda\.|type \(torch\.mps"
        r"|not on the expected device",
        "tensors on different devices met: move the batch to the model's device with x.to(device)",
    ),
    (
        r"same dtype|Input type \(\w+\) and (?:weight|bias) type \(\w+\) should be the same"
        r"|expected scalar type|found dtype .* but expected",
        "the tensors in this operation have different dtypes (often float64 inputs against "
        "float32 weights): convert the inputs with x.float()",
    ),
    (
        r"does not require grad and does not have a grad_fn",
        "the loss has no autograd graph: the forward ran under torch.no_grad(), or every "
        "parameter is frozen, so backward has nothing to differentiate",
    ),
    (
        r"grad can be implicitly created only for (?:scalar|real scalar) outputs",
        "the loss is not a single number: reduce it (e.g. .mean()) before calling backward",
    ),
    (
        r"Target size \((.*)\) must be the same as input size \((.*)\)",
        "the targets' shape {0} differs from the outputs' shape {1}: reshape one to match",
    ),
    (
        r"Expected input batch_size \((\d+)\) to match target batch_size \((\d+)\)",
        "the model returned {0} rows but there are {1} targets: the batch dimension got mixed up",
    ),
    (
        r"modified by an inplace operation",
        "a tensor the backward pass needs was changed in place after the forward pass (for "
        "example by optimizer.step() running before loss.backward())",
    ),
    (
        r"Trying to backward through the graph a second time",
        "this graph was already used by a backward pass: something keeps the loss (or a tensor "
        "computed from it) across iterations",
    ),
    (
        r"Attempted (\w+) but _scale is None",
        "the GradScaler has not scaled a loss yet, so it cannot {0}: scaler.scale(loss).backward() "
        "must run before scaler.unscale_() and scaler.step() (a missing or misplaced backward)",
    ),
    (
        r"unscale_\(\) has already been called on this optimizer since the last update",
        "scaler.unscale_(optimizer) ran twice without scaler.update() between: every iteration "
        "needs scaler.step(optimizer) and scaler.update() after unscaling",
    ),
    (
        r"CUDA out of memory|out of memory",
        "the device ran out of memory: use smaller batches or a smaller model",
    ),
    (
        r"Given groups=\d+, weight of size (.*), expected input(.*) to have (\d+) channels",
        "a convolution expected {2} input channels: check the input's shape (N, C, H, W)",
    ),
)


class LoopError(Exception):
    """A problem the loop itself found (an empty loader, say): its message is the explanation."""


# When no message pattern matches: what failing at this stage usually means.
_STAGE_HINTS = {
    "load_batch": "the data loader raised while producing this batch (your Dataset's __getitem__, "
    "its transform, or the collate function)",
    "forward": "the model raised during its forward pass",
    "loss": "the loss function raised: check the shapes and dtypes of outputs and targets",
    "validate": "validation raised: the validation data or the model's eval-mode path failed",
}


def explain(exc: BaseException, module: str | None = None, stage: str | None = None) -> StageError:
    """Type, message, the innermost frame of user code, and a plain hint when one is known."""
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    hint = None
    for pattern, text in _HINTS:
        match = re.search(pattern, str(exc))
        if match:
            hint = text.format(*match.groups())
            break
    if hint is None and stage is not None and not isinstance(exc, LoopError):
        hint = _STAGE_HINTS.get(stage)
    location = user_frame(exc)
    if module is not None:
        # Built-in layers have no user frame; the module that raised is the useful pointer.
        location = f"{location}, in module {module}" if location else f"in module {module}"
    return StageError(type=type(exc).__name__, message=message[:500], location=location, hint=hint)
