"""Symptomatic detectors: what the numbers say over time.

NaN or huge losses, a loss that stalls or grows, update sizes far from 1e-3, gradients that
vanish or explode, dead units, raw inputs, batches of one class, validation at chance. Each keeps
the little history it needs and waits for enough of it before judging.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from typing import Any

from loopscope.engine.diagnostics.context import DiagnosticContext
from loopscope.engine.diagnostics.findings import (
    ACTIVATION_RMS,
    CHANCE_MIN_ITERATIONS,
    CONVERGED_FRACTION,
    DEAD_RELU_FRACTION,
    DIVERGING_FACTOR,
    DROPOUT_TYPES,
    EXPLODING_RATIO,
    FITTING_FRACTION,
    INPUT_ABS_MAX,
    INPUT_ABS_MEAN,
    LOSS_NUMERIC_FAILURE,
    RATIO_WINDOW,
    RELU_TYPES,
    ROUNDOFF,
    SKIPPED_STEPS_STREAK,
    SLOW_LOSS_FRACTION,
    STALLED_FRACTION,
    UNIT_INTERVAL_ITERATIONS,
    UPDATE_RATIO_HIGH,
    UPDATE_RATIO_LOW,
    UPDATE_RATIO_SLOW,
    VANISHING_FIRST_NORM,
    VANISHING_RATIO,
    WARMUP_ITERATIONS,
    FindingLog,
    fmt,
)
from loopscope.shared.events import Finding, LayerStat, StageEvent, TensorStat
from loopscope.shared.vocab import Task


class SymptomChecks:
    def __init__(self, context: DiagnosticContext, log: FindingLog) -> None:
        self.context = context
        self.fire, self.due = log.fire, log.due
        self.losses: deque[float] = deque(maxlen=50)
        self.first_losses: list[float] = []
        # loss_trend runs every iteration: the window's sums are kept as losses come and go,
        # re-added exactly (fsum) once per window so rounding never builds up (see loss_trend).
        self._losses_sum = 0.0
        # Bounds every partial sum since the last exact one, so the kept sum's rounding error too.
        self._losses_bound = 0.0
        self._since_exact = 0
        self._start: tuple[int, float] | None = None  # (first losses counted, their mean)
        self._max_ratios: deque[float] = deque(maxlen=RATIO_WINDOW)
        self._single_class: deque[bool] = deque(maxlen=20)
        self._classes_seen: set[str] = set()
        self._zero_fraction: dict[str, deque[float]] = {}
        self._zero_grad_streak: dict[str, int] = {}
        self._inside_since: int | None = None  # the first iteration of a run of outputs inside [0, 1]
        self._inside_seen = 0  # how many of them were looked at
        self._grad_ratio_streak = [0, 0]  # exploding, vanishing
        self._unchanged_streak = 0
        self._skipped_streak = 0
        self._last_skipped = -1  # the iteration of the last skipped step
        self._validations: list[dict[str, Any]] = []

    # ----- load_batch ------------------------------------------------------------------
    def input_scale(self, event: StageEvent) -> None:
        for t in event.tensors:
            if not t.name.startswith("inputs") or t.mean is None or t.dtype.startswith(("int", "bool", "uint")):
                continue
            assert t.min is not None and t.max is not None
            peak = max(abs(t.min), abs(t.max))
            if peak > INPUT_ABS_MAX or abs(t.mean) > INPUT_ABS_MEAN:
                self.fire(
                    event.iteration,
                    Finding(
                        "inputs_not_normalised",
                        "warning",
                        f"{t.name} range from {fmt(t.min)} to {fmt(t.max)} (mean {fmt(t.mean)}, std "
                        f"{fmt(t.std)}): features this large make every layer's output large too.",
                        ("unnormalized_inputs",),
                        "Standardise each feature: (x - mean) / std with the training set's statistics.",
                    ),
                )

    def batch_classes(self, event: StageEvent) -> None:
        counts = event.metrics.get("class_counts")
        if not counts or event.metrics.get("batch_size", 0) < 4:
            return
        self._classes_seen.update(counts)
        self._single_class.append(len(counts) == 1)
        single = sum(self._single_class)
        if len(self._single_class) == self._single_class.maxlen and single >= 16 and len(self._classes_seen) > 1:
            self.fire(
                event.iteration,
                Finding(
                    "batches_one_class",
                    "warning",
                    f"{single} of the last {len(self._single_class)} batches held a single class: the "
                    "data arrives grouped by label.",
                    ("no_shuffle_sorted_data",),
                    "Shuffle the training data every epoch (DataLoader(..., shuffle=True)).",
                ),
            )

    # ----- forward ---------------------------------------------------------------------
    def dead_units(self, it: int, modules: list[TensorStat]) -> None:
        for t in modules:
            if t.module_type not in RELU_TYPES or t.zero_fraction is None:
                continue
            window = self._zero_fraction.setdefault(t.name, deque(maxlen=10))
            window.append(t.zero_fraction)
            mean = sum(window) / len(window)
            if len(window) == window.maxlen and mean >= 0.9:
                self.fire(
                    it,
                    Finding(
                        "dead_relu",
                        "warning",
                        f"{mean:.0%} of {t.name}'s outputs were 0 over the last {len(window)} batches "
                        f"(>= {DEAD_RELU_FRACTION:.0%} means dying ReLUs): its units pass back no gradient.",
                        ("dead_relu_init", "zero_init", "lr_too_high"),
                        "Check the initialisation (biases should not be very negative) and the learning rate.",
                    ),
                )

    def dropout_rate(self, it: int, modules: list[TensorStat]) -> None:
        input_zeros = self.context.forward_flow().input_zeros
        previous = None
        for t in modules:
            if t.module_type in DROPOUT_TYPES and t.zero_fraction is not None and previous is not None:
                # The rate dropout itself added, net of the zeros it was given (after a ReLU, a module
                # or a function): measured on its input tensor.
                given = input_zeros.get(t.name, previous.zero_fraction or 0.0)
                rate = (t.zero_fraction - given) / (1.0 - given) if given < 1.0 else 0.0
                if rate >= 0.6:
                    self.fire(
                        it,
                        Finding(
                            "dropout_heavy",
                            "warning",
                            f"{t.name} zeroed {rate:.0%} of the units it was given in this batch: the "
                            "network trains on a small fraction of itself.",
                            ("dropout_too_high",),
                            "Use a dropout probability between 0.1 and 0.5.",
                        ),
                    )
            previous = t

    def activation_scale(self, it: int, modules: list[TensorStat]) -> None:
        for t in modules[:-1]:  # not the output layer: logits may legitimately be large
            if t.mean is None or t.std is None:
                continue
            rms = math.sqrt(t.mean * t.mean + t.std * t.std)
            # A model fitting its data grows its features as it grows confident (a converged MNIST
            # net's penultimate layer reached RMS 10): large then is no fault of inputs or init.
            if rms >= ACTIVATION_RMS and not self._loss_fell_to(FITTING_FRACTION):
                self.fire(
                    it,
                    Finding(
                        "activations_large",
                        "warning",
                        f"{t.name} ({t.module_type}) outputs have RMS {fmt(rms)} (mean {fmt(t.mean)}, std "
                        f"{fmt(t.std)}); healthy layers stay near 1.",
                        ("unnormalized_inputs", "exploding_init", "lr_too_high"),
                        "Normalise the inputs and keep the default initialisation.",
                    ),
                )
                return

    def _remember(self, loss: float) -> None:
        losses = self.losses
        if len(losses) == losses.maxlen:
            self._losses_sum -= losses[0]
        losses.append(loss)
        self._since_exact += 1
        if self._since_exact >= len(losses):
            self._losses_sum, self._losses_bound = math.fsum(losses), math.fsum(map(abs, losses))
            self._since_exact = 0
        else:
            self._losses_sum += loss
            self._losses_bound += abs(loss)

    def _loss_fell_to(self, fraction: float) -> bool:
        """Whether the latest ten losses average at most `fraction` of the first ones."""
        latest = list(self.losses)[-10:]
        return bool(
            self.first_losses and latest and statistics.fmean(latest) <= fraction * statistics.fmean(self.first_losses)
        )

    # ----- loss ------------------------------------------------------------------------
    def loss_value(self, event: StageEvent) -> None:
        it, loss = event.iteration, event.loss
        if loss is not None and math.isfinite(loss):
            self._remember(loss)
            if len(self.first_losses) < 20:
                self.first_losses.append(loss)
        # Judged against the run's own start: a summed loss (a VAE's, say) starts in the tens of
        # thousands and is healthy there; 1000 times where it started is a failure whatever the scale.
        limit = LOSS_NUMERIC_FAILURE * max(1.0, self.first_losses[0] if self.first_losses else 1.0)
        if loss is None or not math.isfinite(loss) or loss >= limit:
            self.fire(
                it,
                Finding(
                    "loss_not_finite",
                    "error",
                    f"the loss is {fmt(loss) if loss is None or math.isfinite(loss) else loss} at iteration {it} "
                    f"(>= {limit:g}, 1000 times its start, or NaN is numerical failure).",
                    ("lr_too_high", "exploding_init", "unnormalized_inputs"),
                    "Lower the learning rate, normalise inputs, check the initialisation.",
                ),
            )
        if len(self.first_losses) <= 3 and loss is not None and math.isfinite(loss):
            self._initial_loss(event, loss)

    def _initial_loss(self, event: StageEvent, loss: float) -> None:
        """cs231n / Karpathy: at initialisation the loss should be that of an uninformed guess."""
        output = next((t for t in event.tensors if t.name == "output"), None)
        targets = next((t for t in event.tensors if t.name == "targets"), None)
        expected = None
        kind = self.context.loss_kind
        # Log-probabilities (NLL) of an uninformed guess cost -ln(1/C) as cross-entropy does.
        if kind in ("cross_entropy", "nll") and output is not None and len(output.shape) >= 2:
            expected, what = math.log(output.shape[1]), f"-ln(1/{output.shape[1]})"
        elif kind in ("bce_with_logits", "bce"):
            expected, what = math.log(2), "-ln(1/2)"
        elif kind == "mse" and targets is not None and targets.mean is not None:
            assert targets.std is not None
            expected = max(targets.mean**2 + targets.std**2, 1e-3)
            what = "mean(target^2), the loss of always predicting 0"
        if expected is None or loss <= 5 * expected:
            return
        self.fire(
            event.iteration,
            Finding(
                "initial_loss_high",
                "warning",
                f"the loss at iteration {event.iteration} is {loss:.4g}, {loss / expected:.0f}x the {expected:.3g} "
                f"expected at initialisation ({what}): the untrained model is confidently wrong.",
                ("exploding_init", "unnormalized_inputs", "lr_too_high"),
                "Check the initialisation scale and the input normalisation.",
            ),
        )

    def logits_squashed(self, event: StageEvent) -> None:
        if self.context.loss_kind != "bce_with_logits":  # first: this runs for every loss
            return
        output = next((t for t in event.tensors if t.name == "output"), None)
        if output is None or output.min is None:
            return
        assert output.max is not None
        inside = output.min >= 0.0 and output.max <= 1.0
        # Judged over iterations, not observations: running, only some iterations are looked at.
        if not inside:
            self._inside_since, self._inside_seen = None, 0
            return
        if self._inside_since is None:
            self._inside_since = event.iteration
        self._inside_seen += 1
        span = event.iteration - self._inside_since + 1
        if span >= UNIT_INTERVAL_ITERATIONS and self._inside_seen >= 3:
            self.fire(
                event.iteration,
                Finding(
                    "logits_squashed",
                    "warning",
                    f"every input to BCEWithLogitsLoss has stayed inside [0, 1] for {span} iterations "
                    f"({self._inside_seen} looked at): they look like probabilities, not logits.",
                    ("sigmoid_before_bce_with_logits",),
                    "Feed raw scores to BCEWithLogitsLoss; it applies the sigmoid itself.",
                ),
            )

    def loss_trend(self, event: StageEvent) -> None:
        it = event.iteration
        if it < WARMUP_ITERATIONS or len(self.losses) != self.losses.maxlen or not self.first_losses:
            return
        first = len(self.first_losses)
        if self._start is None or self._start[0] != first:
            self._start = first, math.fsum(self.first_losses) / first  # fmean's own arithmetic
        start = self._start[1]
        count = len(self.losses)
        # The exact mean (fsum) and the findings' text cost ~2 us: a third of a run's bookkeeping
        # per iteration (issue 17). The kept sum is off from the exact one by at most ~100
        # roundings (under 1e-13 of the sizes summed), so where it lies clear of the limits, or
        # the finding it could raise was just reported, the exact verdict is known to change nothing.
        approx, margin = self._losses_sum / count, 1e-9 * self._losses_bound / count
        diverging, stalled = DIVERGING_FACTOR * start, STALLED_FRACTION * start
        may_diverge = approx + margin >= diverging and self.due("loss_diverging", it)
        may_stall = approx + margin >= stalled and approx - margin < diverging and self.due("loss_stalled", it)
        if not may_diverge and not may_stall and math.isfinite(approx):
            return
        recent = math.fsum(self.losses) / count
        if recent >= DIVERGING_FACTOR * start:
            self.fire(
                it,
                Finding(
                    "loss_diverging",
                    "warning",
                    f"the loss has grown: {start:.4g} over the first {len(self.first_losses)} iterations, "
                    f"{recent:.4g} over the last {len(self.losses)} ({recent / start:.1f}x).",
                    ("lr_too_high", "skip_zero_grad", "exploding_init", "unnormalized_inputs"),
                    "Check that gradients are cleared every iteration and lower the learning rate.",
                ),
            )
        elif recent >= STALLED_FRACTION * start:
            self.fire(
                it,
                Finding(
                    "loss_stalled",
                    "warning",
                    f"the loss has not fallen: {start:.4g} over the first {len(self.first_losses)} "
                    f"iterations, {recent:.4g} over the last {len(self.losses)}.",
                    (
                        "lr_too_low",
                        "missing_step",
                        "missing_backward",
                        "zero_grad_after_backward",
                        "dead_relu_init",
                        "zero_init",
                        "clip_loss_not_grad",
                        "sigmoid_before_bce_with_logits",
                    ),
                    "Check that gradients reach the parameters and that the learning rate is not tiny.",
                ),
            )

    # ----- backward --------------------------------------------------------------------
    def zero_gradient(self, event: StageEvent) -> None:
        loss = self.losses[-1] if self.losses else None
        if event.grad_norm == 0.0 and loss:
            self.fire(
                event.iteration,
                Finding(
                    "zero_gradient_nonzero_loss",
                    "warning",
                    f"the loss is {fmt(loss)} but every gradient is exactly 0: something between the loss "
                    "and the parameters passes no gradient.",
                    ("clip_loss_not_grad", "dead_relu_init", "zero_init"),
                    "Clip gradients (not the loss) and check for dead units.",
                ),
            )

    def zero_weight_grads(self, it: int, trainable: list[LayerStat]) -> None:
        for layer in trainable:
            if len(layer.shape) < 2:
                continue
            streak = self._zero_grad_streak[layer.name] = (
                self._zero_grad_streak.get(layer.name, 0) + 1 if layer.grad_norm == 0.0 else 0
            )
            if streak >= 10:
                self.fire(
                    it,
                    Finding(
                        "weights_get_no_gradient",
                        "warning",
                        f"{layer.name} has had exactly zero gradient for {streak} iterations: it cannot learn.",
                        ("zero_init", "dead_relu_init", "clip_loss_not_grad"),
                        "Initialise weights randomly and check the fraction of dead units.",
                    ),
                )
                return

    def gradient_ratio(self, it: int, trainable: list[LayerStat]) -> None:
        weights = [layer for layer in trainable if len(layer.shape) >= 2 and layer.grad_norm is not None]
        if len(weights) < 2:
            return
        first, last = weights[0].grad_norm, weights[-1].grad_norm
        assert first is not None and last is not None
        if not (math.isfinite(first) and math.isfinite(last)) or last == 0:
            return
        ratio = first / last
        exploding = ratio > EXPLODING_RATIO
        vanishing = ratio < VANISHING_RATIO and first < VANISHING_FIRST_NORM
        self._grad_ratio_streak = [
            self._grad_ratio_streak[0] + 1 if exploding else 0,
            self._grad_ratio_streak[1] + 1 if vanishing else 0,
        ]
        if self._grad_ratio_streak[0] >= 5:
            self.fire(
                it,
                Finding(
                    "exploding_gradients",
                    "warning",
                    f"the first layer's gradient ({weights[0].name}, {fmt(first)}) is {ratio:.0f}x the last "
                    f"layer's ({fmt(last)}) for 5 iterations (> {EXPLODING_RATIO:g} is exploding).",
                    ("unnormalized_inputs", "exploding_init", "lr_too_high"),
                    "Normalise inputs, keep default initialisation, lower the learning rate.",
                ),
            )
        if self._grad_ratio_streak[1] >= 5:
            self.fire(
                it,
                Finding(
                    "vanishing_gradients",
                    "warning",
                    f"the first layer's gradient ({weights[0].name}, {fmt(first)}) is {fmt(ratio)} of the "
                    f"last layer's for 5 iterations (< {VANISHING_RATIO:g} and < {VANISHING_FIRST_NORM:g} is vanishing).",
                    ("dead_relu_init", "zero_init", "double_softmax", "sigmoid_before_bce_with_logits"),
                    "Check activations for dead units and the loss input for squashing.",
                ),
            )

    # ----- step ------------------------------------------------------------------------
    def updates(self, event: StageEvent) -> None:
        it, m = event.iteration, event.metrics
        if self.skipped_steps(event):
            return
        weights = [layer for layer in event.layers if len(layer.shape) >= 2 and layer.update_ratio is not None]
        if not weights:
            return
        at_step = m.get("grads_at_step")
        lr = m.get("lr") or 0.0
        moved = any(layer.update_norm for layer in event.layers)
        # A step that changes nothing because its gradients are too small to move float32 weights
        # (a converged run) is not a step that did not run.
        could_move = any(
            layer.grad_norm and layer.weight_norm is not None and lr * layer.grad_norm > ROUNDOFF * layer.weight_norm
            for layer in event.layers
        )
        self._unchanged_streak = 0 if moved or not could_move else self._unchanged_streak + 1
        if self._unchanged_streak >= 3 and lr > 0:
            had_grads = bool(at_step and at_step["nonzero"])
            self.fire(
                it,
                Finding(
                    "parameters_not_updated",
                    "error",
                    f"step() changed no parameter for {self._unchanged_streak} iterations (lr {fmt(m.get('lr'))}, "
                    f"{at_step['nonzero'] if at_step else '?'} gradients with values at step).",
                    ("missing_step",) if had_grads else ("missing_backward", "zero_grad_after_backward"),
                    "Call loss.backward() then optimizer.step() every iteration.",
                ),
            )
        # Only layers that got a gradient say how big the learning rate makes a step: a layer whose
        # units all died (say, from a learning rate far too high) moves by 0 whatever the rate.
        judged = [layer.update_ratio for layer in weights if layer.grad_norm and layer.update_ratio is not None]
        ratio = max(judged) if judged else math.nan
        if math.isfinite(ratio):
            self._max_ratios.append(ratio)
        if len(self._max_ratios) >= RATIO_WINDOW:
            median = statistics.median(self._max_ratios)
            if median > UPDATE_RATIO_HIGH:
                self.fire(
                    it,
                    Finding(
                        "update_ratio_high",
                        "warning",
                        f"updates are {fmt(median)} of the weights' size (median of the largest layer ratio "
                        f"over {RATIO_WINDOW} steps; healthy is about 1e-3, above {UPDATE_RATIO_HIGH:g} is too big).",
                        ("lr_too_high",),
                        "Lower the learning rate.",
                    ),
                )
        if len(self._max_ratios) == self._max_ratios.maxlen and moved:
            median = statistics.median(self._max_ratios)
            barely_moved = bool(
                it >= WARMUP_ITERATIONS
                and self.first_losses
                and len(self.losses) == self.losses.maxlen
                and statistics.fmean(self.losses) >= SLOW_LOSS_FRACTION * statistics.fmean(self.first_losses)
            )
            # A run that has converged takes tiny steps because its gradients are tiny: that is not
            # a learning rate too low (a noise-free fit was told to raise it).
            converged = self._loss_fell_to(CONVERGED_FRACTION)
            if not converged and (median < UPDATE_RATIO_LOW or (median < UPDATE_RATIO_SLOW and barely_moved)):
                self.fire(
                    it,
                    Finding(
                        "update_ratio_low",
                        "warning",
                        f"updates are only {fmt(median)} of the weights' size (largest layer, median over "
                        f"{len(self._max_ratios)} steps; healthy is about 1e-3)"
                        + (" and the loss has barely moved." if barely_moved else "."),
                        ("lr_too_low",),
                        "Raise the learning rate.",
                    ),
                )

    def skipped_steps(self, event: StageEvent) -> bool:
        """fp16: a GradScaler skips a step whose gradients overflowed and halves its scale; a few
        skips while it finds its scale are normal, a run of them is not. True if this one skipped."""
        if not event.metrics.get("step_skipped"):
            self._skipped_streak = 0
            return False
        # In a row means in consecutive iterations: running, the steps between are not all seen.
        consecutive = event.iteration == self._last_skipped + 1
        self._skipped_streak = self._skipped_streak + 1 if consecutive else 1
        self._last_skipped = event.iteration
        if self._skipped_streak >= SKIPPED_STEPS_STREAK:
            self.fire(
                event.iteration,
                Finding(
                    "steps_skipped",
                    "warning",
                    f"the GradScaler skipped optimizer.step() {self._skipped_streak} times in a row: the gradients "
                    f"hold inf or NaN even at loss scale {fmt(event.metrics.get('grad_scale'))}.",
                    ("lr_too_high", "exploding_init", "unnormalized_inputs"),
                    "Lower the learning rate, normalise inputs, check the initialisation.",
                ),
            )
        return True

    # ----- validation ------------------------------------------------------------------
    def chance_accuracy(self, event: StageEvent) -> None:
        self._validations.append(dict(event.metrics))
        accuracies = [v["val_accuracy"] for v in self._validations if v.get("val_accuracy") is not None]
        if len(accuracies) < 2 or event.iteration < CHANCE_MIN_ITERATIONS:
            return
        # One output column is a binary model: chance is 50%, not 100%.
        binary = self.context.loss_kind.startswith("bce") or self.context.task == Task.BINARY
        classes = 2 if binary or self.context.classes == 1 else self.context.classes
        if not classes:
            return
        chance = 1.0 / classes
        margin = 0.1 if classes == 2 else 0.5 * chance
        if max(accuracies[-2:]) <= chance + margin:
            trend = ""
            if self.first_losses and self.losses:
                trend = (
                    f" while train loss went {statistics.fmean(self.first_losses):.3g} -> "
                    f"{statistics.fmean(self.losses):.3g}"
                )
            self.fire(
                event.iteration,
                Finding(
                    "validation_at_chance",
                    "warning",
                    f"val accuracy is {accuracies[-1]:.1%} after {len(accuracies)} validations, about chance "
                    f"({chance:.0%}){trend}: what the model learns does not carry over to new data.",
                    ("shuffled_labels", "lr_too_low", "missing_step", "missing_backward", "dead_relu_init"),
                    "Check that labels belong to their inputs, and that the model learns at all.",
                ),
            )
