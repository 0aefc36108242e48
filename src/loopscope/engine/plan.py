"""Which stages a block of the loop runs, in order: a pure function of the experiment's options
and the bugs that reorder calls. The stepper schedules from it; the UI draws the pipeline from it."""

from __future__ import annotations

from loopscope.engine.experiment import Experiment
from loopscope.engine.inject import BugInjector
from loopscope.shared.vocab import Stage


def iteration_stages(experiment: Experiment, bugs: BugInjector) -> list[Stage]:
    """The stages of one training iteration, in order."""
    per_iteration_scheduler = experiment.scheduler is not None and experiment.scheduler_interval == "iteration"
    stages = [Stage.LOAD_BATCH, Stage.ZERO_GRAD, Stage.FORWARD, Stage.LOSS, Stage.BACKWARD]
    if experiment.amp == "fp16" and experiment.clip_grad_norm is not None:
        # The gradients are multiplied by the loss scale until unscale_(): clipping needs true values.
        stages += (
            [Stage.CLIP_GRAD, Stage.UNSCALE] if "clip_before_unscale" in bugs else [Stage.UNSCALE, Stage.CLIP_GRAD]
        )
    elif experiment.clip_grad_norm is not None:
        stages.append(Stage.CLIP_GRAD)
    if "step_before_backward" in bugs:
        stages = [Stage.LOAD_BATCH, Stage.FORWARD, Stage.LOSS, Stage.STEP, Stage.ZERO_GRAD, Stage.BACKWARD, *stages[5:]]
    else:
        stages.append(Stage.STEP)
    if per_iteration_scheduler:
        if "scheduler_before_step" in bugs:
            stages.insert(stages.index(Stage.STEP), Stage.SCHEDULER)
        else:
            stages.append(Stage.SCHEDULER)
    return stages


MICRO_BATCH_STAGES = (Stage.LOAD_BATCH, Stage.FORWARD, Stage.LOSS, Stage.BACKWARD)


def iteration_queue(experiment: Experiment, bugs: BugInjector) -> list[Stage]:
    """The stages one iteration runs: with gradient accumulation, the micro-batches after the
    first repeat load_batch, forward, loss and backward before the gradients are used."""
    stages = iteration_stages(experiment, bugs)
    if experiment.accumulation > 1:
        after = stages.index(Stage.BACKWARD) + 1
        stages[after:after] = list(MICRO_BATCH_STAGES) * (experiment.accumulation - 1)
    return stages


def validation_stages(experiment: Experiment) -> list[Stage]:
    stages = [Stage.VALIDATE]
    if experiment.checkpoint:
        stages.append(Stage.CHECKPOINT)
    if experiment.early_stopping_patience is not None:
        stages.append(Stage.EARLY_STOP)
    return stages


def epoch_end_stages(experiment: Experiment, bugs: BugInjector) -> list[Stage]:
    validate_now = experiment.val_loader is not None and experiment.validate_every is None
    stages = [Stage.VALIDATE] if validate_now else []
    if (
        experiment.scheduler is not None
        and experiment.scheduler_interval == "epoch"
        and "scheduler_before_step" not in bugs
    ):
        stages.append(Stage.SCHEDULER)
    if validate_now:
        stages.extend(validation_stages(experiment)[1:])
    return stages


def epoch_scheduler_first(experiment: Experiment, bugs: BugInjector) -> bool:
    """The `scheduler_before_step` bug with a per-epoch scheduler: it runs at the top of the epoch."""
    return (
        experiment.scheduler is not None
        and experiment.scheduler_interval == "epoch"
        and "scheduler_before_step" in bugs
    )
