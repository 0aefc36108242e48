"""Turn an exception from a stage into a StageError a student can act on."""

from __future__ import annotations

import re
import traceback
from pathlib import Path

from loopscope.events import StageError

_LIBRARY_DIRS = tuple(
    str(Path(p).resolve())
    for p in (
        __import__("torch").__file__.rsplit("/", 1)[0],
        str(Path(__file__).resolve().parent.parent),
    )
)

# (pattern in the message, plain explanation). First match wins.
_HINTS: tuple[tuple[str, str], ...] = (
    (
        r"mat1 and mat2 shapes cannot be multiplied \((\d+)x(\d+) and (\d+)x(\d+)\)",
        "a Linear layer got inputs with {1} features but expects {2}: the input's last "
        "dimension and the layer's in_features must match",
    ),
    (
        r"expected (?:m1 and m2|mat1 and mat2|both vectors|scalar type|input and weight).*(?:same dtype|Double|Float|Half)"
        r"|Input type \(.*\) and weight type \(.*\) should be the same|found dtype .* but expected",
        "the tensors in this operation have different dtypes (often float64 inputs against "
        "float32 weights): convert the inputs with x.float()",
    ),
    (
        r"Expected all tensors to be on the same device|Input type \(.*cuda.*\) and weight type",
        "tensors on different devices met: move the batch to the model's device with x.to(device)",
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
        r"Trying to backward through the graph a second time",
        "this graph was already used by a backward pass: something keeps the loss (or a tensor "
        "computed from it) across iterations",
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


def explain(exc: BaseException) -> StageError:
    """Type, message, the innermost frame of user code, and a plain hint when one is known."""
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    hint = None
    for pattern, text in _HINTS:
        match = re.search(pattern, str(exc))
        if match:
            hint = text.format(*match.groups())
            break
    return StageError(type=type(exc).__name__, message=message[:500], location=_user_location(exc), hint=hint)


def _user_location(exc: BaseException) -> str | None:
    """The innermost frame outside torch and loopscope: where the user's code was."""
    for frame in reversed(traceback.extract_tb(exc.__traceback__)):
        path = str(Path(frame.filename).resolve())
        if not path.startswith(_LIBRARY_DIRS):
            return f"{Path(frame.filename).name}:{frame.lineno} in {frame.name}"
    return None
