"""What the detectors share: their thresholds (each with its public source) and the log that
keeps a finding from repeating every iteration."""

from __future__ import annotations

from collections import deque

from loopscope.shared.events import Finding

# Thresholds, each with its source.
UPDATE_RATIO_HIGH = 1e-1  # cs231n "Neural Networks 3": ratio ~1e-3 is healthy; DeepDiagnosis flags far off
UPDATE_RATIO_LOW = 1e-5  # same sources, the low side
# A gentler low bar (10x under the healthy 1e-3) counts only together with a loss that has barely
# moved: adaptive optimizers at a tiny learning rate sit between the two.
UPDATE_RATIO_SLOW, SLOW_LOSS_FRACTION = 1e-4, 0.9
# AUTOTRAINER: loss >= 1e3 or NaN is numerical failure; here 1e3 times the run's first loss (when that
# is above 1), so a loss summed over examples is not called a failure for its scale alone.
LOSS_NUMERIC_FAILURE = 1e3
DEAD_RELU_FRACTION = 0.7  # DeepDiagnosis / AUTOTRAINER: >= 70% of a layer's activations <= 0
EXPLODING_RATIO = 70.0  # AUTOTRAINER: first/last layer gradient-norm ratio > 70
VANISHING_RATIO, VANISHING_FIRST_NORM = 1e-3, 1e-4  # AUTOTRAINER: ratio < 1e-3 and first-layer norm < 1e-4
INPUT_ABS_MAX, INPUT_ABS_MEAN = 20.0, 5.0  # UMLAUT: inputs outside [-1, 1] "by a wide margin"
ACTIVATION_RMS = 10.0  # AUTOTRAINER / UMLAUT: mean |layer output| >= 10
# AUTOTRAINER starts judging symptoms after 30% of training; here: after a fixed warm-up, long
# enough that a slow but healthy start (blobs with some seeds) is not called a stall.
WARMUP_ITERATIONS = 150
# Validation accuracy is judged from this many iterations on: before them an untrained model is at
# chance by right (a small dataset split over ranks validates after a handful of steps).
CHANCE_MIN_ITERATIONS = 30
STALLED_FRACTION = 0.97  # the last 50 losses average at least 97% of the first 20
DIVERGING_FACTOR = 1.5  # ... or half as much again: the loss is going the wrong way
RATIO_WINDOW = 20  # steps over which the update/weight ratio's median is judged
# float32 keeps about 7 digits: an update under 1e-7 of a weight's size may round away entirely.
ROUNDOFF = 1e-7
CONVERGED_FRACTION = 0.01  # the recent losses average 1% of the first ones or less: the run converged
FITTING_FRACTION = 0.1  # the recent losses average a tenth of the first ones or less: the model is fitting
UNIT_INTERVAL_ITERATIONS = 50  # BCEWithLogitsLoss inputs inside [0, 1] this long: probabilities, not logits
SKIPPED_STEPS_STREAK = 5  # fp16: a GradScaler finding its scale skips one or two steps, not five in a row
REFIRE_AFTER = 200  # iterations before the same finding is reported again
RELU_TYPES = {"ReLU", "ReLU6"}
DROPOUT_TYPES = {"Dropout", "Dropout1d", "Dropout2d", "Dropout3d", "AlphaDropout"}
PASS_THROUGH_TYPES = {"Identity", "Dropout", "Flatten", "Unflatten"}
WEIGHT_TYPES = {"Linear", "Conv1d", "Conv2d", "Conv3d", "LazyLinear", "Bilinear"}


def fmt(value: float | None) -> str:
    if value is None:
        return "None"
    return f"{value:.3g}"


class FindingLog:
    """Every finding raised (the last 1000), each id at most once per `REFIRE_AFTER` iterations."""

    def __init__(self) -> None:
        self.all_findings: deque[tuple[int, Finding]] = deque(maxlen=1000)  # bounded over long runs
        self.raised: list[Finding] = []  # by the event being judged now
        self._last_fired: dict[str, int] = {}

    def due(self, finding_id: str, iteration: int) -> bool:
        """Whether a finding with this id raised at `iteration` would be reported (see fire)."""
        last = self._last_fired.get(finding_id)
        return last is None or iteration - last >= REFIRE_AFTER

    def fire(self, iteration: int, finding: Finding) -> None:
        last = self._last_fired.get(finding.id)
        if last is not None and iteration - last < REFIRE_AFTER:
            return
        self._last_fired[finding.id] = iteration
        self.all_findings.append((iteration, finding))
        self.raised.append(finding)
