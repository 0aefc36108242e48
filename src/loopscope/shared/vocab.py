"""The words both processes use: stage ids, step kinds, tasks, severities (torch-free).

Each is a `StrEnum`: a member *is* its string, so events pickle small, JSON writes the plain id,
and code that compares with a string literal keeps working while new code names the member.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Literal


class Stage(StrEnum):
    """One stage of the training loop (DESIGN.md §2); the ids are a contract with traces and demos."""

    LOAD_BATCH = "load_batch"
    ZERO_GRAD = "zero_grad"
    FORWARD = "forward"
    LOSS = "loss"
    BACKWARD = "backward"
    UNSCALE = "unscale"
    CLIP_GRAD = "clip_grad"
    STEP = "step"
    SCHEDULER = "scheduler"
    VALIDATE = "validate"
    CHECKPOINT = "checkpoint"
    EARLY_STOP = "early_stop"


class StepKind(StrEnum):
    """How far one press of a stepping key runs."""

    STAGE = "stage"
    ITERATION = "iteration"
    EPOCH = "epoch"


class Task(StrEnum):
    """What the model predicts; decides accuracy and the initial-loss reference."""

    BINARY = "binary"
    CLASSIFICATION = "classification"
    REGRESSION = "regression"


Severity = Literal["info", "warning", "error"]


class Change(StrEnum):
    """How a line of the loop code differs from the correct loop."""

    SAME = ""
    REMOVED = "removed"
    ADDED = "added"


class PictureKind(StrEnum):
    BOUNDARY = "boundary"  # predicted class over a 2-D input plane
    CURVE = "curve"  # prediction over a 1-D input


# One loop iteration, in order. Optional stages appear only when the experiment enables them.
CORE_STAGES: tuple[Stage, ...] = (
    Stage.LOAD_BATCH,
    Stage.ZERO_GRAD,
    Stage.FORWARD,
    Stage.LOSS,
    Stage.BACKWARD,
    Stage.STEP,
)
ITERATION_STAGES: tuple[Stage, ...] = (
    Stage.LOAD_BATCH,
    Stage.ZERO_GRAD,
    Stage.FORWARD,
    Stage.LOSS,
    Stage.BACKWARD,
    Stage.UNSCALE,
    Stage.CLIP_GRAD,
    Stage.STEP,
    Stage.SCHEDULER,
)
EPOCH_END_STAGES: tuple[Stage, ...] = (Stage.VALIDATE, Stage.SCHEDULER, Stage.CHECKPOINT, Stage.EARLY_STOP)
ALL_STAGES: tuple[Stage, ...] = (*ITERATION_STAGES, Stage.VALIDATE, Stage.CHECKPOINT, Stage.EARLY_STOP)

STAGE_DESCRIPTIONS: dict[Stage, str] = {
    Stage.LOAD_BATCH: "take the next batch from the training loader and move it to the device",
    Stage.ZERO_GRAD: "clear the gradients left over from the previous iteration",
    Stage.FORWARD: "run the model on the inputs to get its outputs",
    Stage.LOSS: "compare the outputs with the targets: one number to make smaller",
    Stage.BACKWARD: "backpropagate: compute the gradient of the loss for every parameter",
    Stage.UNSCALE: "divide the gradients by the loss scale (fp16): true values, ready to clip",
    Stage.CLIP_GRAD: "scale the gradients down if their global norm is above a limit",
    Stage.STEP: "let the optimizer move every parameter against its gradient",
    Stage.SCHEDULER: "let the learning-rate scheduler change the learning rate",
    Stage.VALIDATE: "measure loss and accuracy on held-out data (eval mode, no gradients)",
    Stage.CHECKPOINT: "keep a copy of the model if this is the best validation loss so far",
    Stage.EARLY_STOP: "stop training when validation loss has not improved for a while",
}
