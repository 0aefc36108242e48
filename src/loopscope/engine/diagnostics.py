"""Detectors over the event history: say what is wrong, with the numbers, and who to suspect.

Two kinds (DESIGN.md §4): structural checks read what the stepper sees directly (stale
gradients, the model's mode, the loss input, shapes, graphs kept alive); symptomatic checks judge
the history (NaN, stalled loss, update sizes, dead units, chance-level validation). Detectors
never look at which bugs are injected: they must work the same on a user's own mistakes.
"""

from __future__ import annotations

import copy
import math
import statistics
from collections import deque
from typing import TYPE_CHECKING, Any

import torch

from loopscope.engine.copies import forked_rng
from loopscope.events import Finding, StageEvent

if TYPE_CHECKING:
    from loopscope.engine.stepper import Stepper

# Thresholds, each with its source.
UPDATE_RATIO_HIGH = 1e-1  # cs231n "Neural Networks 3": ratio ~1e-3 is healthy; DeepDiagnosis flags far off
UPDATE_RATIO_LOW = 1e-5  # same sources, the low side
# A gentler low bar (10x under the healthy 1e-3) counts only together with a loss that has barely
# moved: adaptive optimizers at a tiny learning rate sit between the two.
UPDATE_RATIO_SLOW, SLOW_LOSS_FRACTION = 1e-4, 0.9
LOSS_NUMERIC_FAILURE = 1e3  # AUTOTRAINER: loss >= 1e3 or NaN is numerical failure
DEAD_RELU_FRACTION = 0.7  # DeepDiagnosis / AUTOTRAINER: >= 70% of a layer's activations <= 0
EXPLODING_RATIO = 70.0  # AUTOTRAINER: first/last layer gradient-norm ratio > 70
VANISHING_RATIO, VANISHING_FIRST_NORM = 1e-3, 1e-4  # AUTOTRAINER: ratio < 1e-3 and first-layer norm < 1e-4
INPUT_ABS_MAX, INPUT_ABS_MEAN = 20.0, 5.0  # UMLAUT: inputs outside [-1, 1] "by a wide margin"
ACTIVATION_RMS = 10.0  # AUTOTRAINER / UMLAUT: mean |layer output| >= 10
# AUTOTRAINER starts judging symptoms after 30% of training; here: after a fixed warm-up, long
# enough that a slow but healthy start (blobs with some seeds) is not called a stall.
WARMUP_ITERATIONS = 150
STALLED_FRACTION = 0.97  # the last 50 losses average at least 97% of the first 20
DIVERGING_FACTOR = 1.5  # ... or half as much again: the loss is going the wrong way
RATIO_WINDOW = 20  # steps over which the update/weight ratio's median is judged
REFIRE_AFTER = 200  # iterations before the same finding is reported again
RELU_TYPES = {"ReLU", "ReLU6"}
DROPOUT_TYPES = {"Dropout", "Dropout1d", "Dropout2d", "Dropout3d", "AlphaDropout"}
PASS_THROUGH_TYPES = {"Identity", "Dropout", "Flatten", "Unflatten"}
WEIGHT_TYPES = {"Linear", "Conv1d", "Conv2d", "Conv3d", "LazyLinear", "Bilinear"}


def _fmt(value: float | None) -> str:
    if value is None:
        return "None"
    return f"{value:.3g}"


class Diagnostics:
    """Feed it every event in order; it returns the findings each event raises."""

    def __init__(self, stepper: Stepper) -> None:
        self.stepper = stepper
        self.features = stepper.features
        self.loss_name = type(stepper.experiment.loss_fn).__name__
        self.all_findings: deque[tuple[int, Finding]] = deque(maxlen=1000)  # bounded over long runs
        self._last_fired: dict[str, int] = {}
        self._losses: deque[float] = deque(maxlen=50)
        self._first_losses: list[float] = []
        self._max_ratios: deque[float] = deque(maxlen=RATIO_WINDOW)
        self._single_class: deque[bool] = deque(maxlen=20)
        self._classes_seen: set[str] = set()
        self._zero_fraction: dict[str, deque[float]] = {}
        self._zero_grad_streak: dict[str, int] = {}
        self._unit_interval_streak = 0
        self._grad_ratio_streak = [0, 0]  # exploding, vanishing
        self._unchanged_streak = 0
        self._validations: list[dict[str, Any]] = []
        self._iteration_stages: dict[int, list[str]] = {}
        self._backward_had_grads: dict[int, bool] = {}
        self._mixing_checked_for: tuple[str, ...] | None = None

    # ----- bookkeeping -----------------------------------------------------------------
    def _fire(self, out: list[Finding], iteration: int, finding: Finding) -> None:
        last = self._last_fired.get(finding.id)
        if last is not None and iteration - last < REFIRE_AFTER:
            return
        self._last_fired[finding.id] = iteration
        self.all_findings.append((iteration, finding))
        out.append(finding)

    def observe(self, event: StageEvent) -> list[Finding]:
        out: list[Finding] = []
        it = event.iteration
        stages = self._iteration_stages.setdefault(it, [])
        stages.append(event.stage)
        self._iteration_stages.pop(it - 3, None)
        if event.error is not None:
            self._on_error(out, event)
            return out
        handler = getattr(self, f"_on_{event.stage}", None)
        if handler is not None:
            handler(out, event)
        return out

    # ----- errors ----------------------------------------------------------------------
    def _on_error(self, out: list[Finding], event: StageEvent) -> None:
        err = event.error
        text = f"{err.type}: {err.message}"
        suspects: tuple[str, ...] = ()
        if "does not require grad" in err.message:
            suspects = ("forward_under_no_grad",)
        elif "modified by an inplace operation" in err.message:
            suspects = ("step_before_backward",)
        elif "dtype" in err.message or "Double" in err.message or "scalar type" in err.message:
            suspects = ("inputs_wrong_dtype",)
        elif "same device" in err.message:
            suspects = ("inputs_wrong_dtype",)
        self._fire(out, event.iteration, Finding(
            "stage_error", "error",
            f"{event.stage} raised {text}" + (f" -- {err.hint}" if err.hint else ""),
            suspects, err.hint or "Read the message and the line it points at.",
        ))

    # ----- load_batch ------------------------------------------------------------------
    def _on_load_batch(self, out: list[Finding], event: StageEvent) -> None:
        it = event.iteration
        self._check_batch_mixing(out, it)
        for t in event.tensors:
            if not t.name.startswith("inputs") or t.mean is None or t.dtype.startswith(("int", "bool", "uint")):
                continue
            peak = max(abs(t.min), abs(t.max))
            if peak > INPUT_ABS_MAX or abs(t.mean) > INPUT_ABS_MEAN:
                self._fire(out, it, Finding(
                    "inputs_not_normalised", "warning",
                    f"{t.name} range from {_fmt(t.min)} to {_fmt(t.max)} (mean {_fmt(t.mean)}, std "
                    f"{_fmt(t.std)}): features this large make every layer's output large too.",
                    ("unnormalized_inputs",),
                    "Standardise each feature: (x - mean) / std with the training set's statistics.",
                ))
        counts = event.metrics.get("class_counts")
        if counts and event.metrics.get("batch_size", 0) >= 4:
            self._classes_seen.update(counts)
            self._single_class.append(len(counts) == 1)
            single = sum(self._single_class)
            if len(self._single_class) == self._single_class.maxlen and single >= 16 and len(self._classes_seen) > 1:
                self._fire(out, it, Finding(
                    "batches_one_class", "warning",
                    f"{single} of the last {len(self._single_class)} batches held a single class: the "
                    "data arrives grouped by label.",
                    ("no_shuffle_sorted_data",),
                    "Shuffle the training data every epoch (DataLoader(..., shuffle=True)).",
                ))

    def _check_batch_mixing(self, out: list[Finding], iteration: int) -> None:
        """Karpathy's batch-mixing probe, on a copy: out[i] must depend on input row i only.

        Run at the start and whenever the loop's code changes; forks the RNG so the run is untouched.
        """
        stepper = self.stepper
        code_version = stepper.active_bugs
        if code_version == self._mixing_checked_for:
            return
        self._mixing_checked_for = code_version
        mixed = batch_mixing_rows(stepper)
        if mixed:
            row, others = mixed
            self._fire(out, iteration, Finding(
                "batch_rows_mixed", "error",
                f"the output for example {row} changes with the inputs of {others} other example(s) in "
                "the batch: something reshapes across the batch dimension.",
                ("view_instead_of_permute",),
                "Use permute()/transpose() to reorder axes; view()/reshape() only regroup memory.",
            ))

    # ----- zero_grad / forward -----------------------------------------------------------
    def _on_forward(self, out: list[Finding], event: StageEvent) -> None:
        it, m = event.iteration, event.metrics
        if m.get("model_training") is False:
            matters = "train_eval_differs" in self.features
            self._fire(out, it, Finding(
                "training_in_eval_mode", "warning" if matters else "info",
                "the model is in eval mode during a training forward pass (model.training is False)"
                + (": dropout is off and batch norm statistics are frozen." if matters else "."),
                ("train_in_eval_mode",),
                "Call model.train() after validation.",
            ))
        if m.get("output_requires_grad") is False and any(p.requires_grad for _, p in self.stepper.named_params):
            self._fire(out, it, Finding(
                "forward_without_graph", "error",
                "the training forward pass recorded no autograd graph (the output does not require "
                "grad): backward() will have nothing to differentiate.",
                ("forward_under_no_grad",),
                "Run the training forward pass outside torch.no_grad().",
            ))
        modules = [t for t in event.tensors if t.module_type]
        self._check_dead_units(out, it, modules)
        self._check_dropout(out, it, modules)
        self._check_activation_scale(out, it, modules)
        self._check_linear_stack(out, it, modules)
        last = modules[-1] if modules else None
        if last is not None and last.module_type == "Sigmoid" and self.loss_name == "BCEWithLogitsLoss":
            self._fire(out, it, Finding(
                "sigmoid_then_bce_with_logits", "error",
                f"the model ends in a Sigmoid ({last.name}) and feeds BCEWithLogitsLoss, which applies "
                "its own sigmoid.",
                ("sigmoid_before_bce_with_logits",),
                "Remove the final Sigmoid (or use BCELoss).",
            ))
        if last is not None and last.module_type in ("Softmax", "LogSoftmax") and self.loss_name == "CrossEntropyLoss":
            self._fire(out, it, Finding(
                "softmax_then_cross_entropy", "error",
                f"the model ends in {last.module_type} ({last.name}) and feeds CrossEntropyLoss, which "
                "applies its own log-softmax.",
                ("double_softmax",),
                "Remove the final softmax; CrossEntropyLoss wants logits.",
            ))

    def _check_dead_units(self, out: list[Finding], it: int, modules: list) -> None:
        for t in modules:
            if t.module_type not in RELU_TYPES or t.zero_fraction is None:
                continue
            window = self._zero_fraction.setdefault(t.name, deque(maxlen=10))
            window.append(t.zero_fraction)
            mean = sum(window) / len(window)
            if len(window) == window.maxlen and mean >= 0.9:
                self._fire(out, it, Finding(
                    "dead_relu", "warning",
                    f"{mean:.0%} of {t.name}'s outputs were 0 over the last {len(window)} batches "
                    f"(>= {DEAD_RELU_FRACTION:.0%} means dying ReLUs): its units pass back no gradient.",
                    ("dead_relu_init", "zero_init", "lr_too_high"),
                    "Check the initialisation (biases should not be very negative) and the learning rate.",
                ))

    def _check_dropout(self, out: list[Finding], it: int, modules: list) -> None:
        previous = None
        for t in modules:
            if t.module_type in DROPOUT_TYPES and t.zero_fraction is not None and previous is not None:
                # The rate dropout itself added, net of the zeros it was given (e.g. after a ReLU).
                given = previous.zero_fraction or 0.0
                rate = (t.zero_fraction - given) / (1.0 - given) if given < 1.0 else 0.0
                if rate >= 0.6:
                    self._fire(out, it, Finding(
                        "dropout_heavy", "warning",
                        f"{t.name} zeroed {rate:.0%} of the units it was given in this batch: the "
                        "network trains on a small fraction of itself.",
                        ("dropout_too_high",),
                        "Use a dropout probability between 0.1 and 0.5.",
                    ))
            previous = t

    def _check_activation_scale(self, out: list[Finding], it: int, modules: list) -> None:
        for t in modules[:-1]:  # not the output layer: logits may legitimately be large
            if t.mean is None or t.std is None:
                continue
            rms = math.sqrt(t.mean * t.mean + t.std * t.std)
            if rms >= ACTIVATION_RMS:
                self._fire(out, it, Finding(
                    "activations_large", "warning",
                    f"{t.name} ({t.module_type}) outputs have RMS {_fmt(rms)} (mean {_fmt(t.mean)}, std "
                    f"{_fmt(t.std)}); healthy layers stay near 1.",
                    ("unnormalized_inputs", "exploding_init", "lr_too_high"),
                    "Normalise the inputs and keep the default initialisation.",
                ))
                return

    def _check_linear_stack(self, out: list[Finding], it: int, modules: list) -> None:
        previous = None
        for t in modules:
            if t.module_type in WEIGHT_TYPES:
                if previous is not None:
                    self._fire(out, it, Finding(
                        "no_activation_between_layers", "warning",
                        f"{previous} feeds {t.name} with no activation between them: two linear layers "
                        "in a row are one linear map.",
                        ("missing_activation",),
                        "Put a non-linearity (ReLU, GELU, Tanh) between the layers.",
                    ))
                    return
                previous = t.name
            elif t.module_type not in PASS_THROUGH_TYPES:
                previous = None

    # ----- loss ------------------------------------------------------------------------
    def _on_loss(self, out: list[Finding], event: StageEvent) -> None:
        it, m = event.iteration, event.metrics
        loss = event.loss
        if loss is not None and math.isfinite(loss):
            self._losses.append(loss)
            if len(self._first_losses) < 20:
                self._first_losses.append(loss)
        if loss is None or not math.isfinite(loss) or loss >= LOSS_NUMERIC_FAILURE:
            self._fire(out, it, Finding(
                "loss_not_finite", "error",
                f"the loss is {_fmt(loss) if loss is None or math.isfinite(loss) else loss} at iteration {it} "
                f"(>= {LOSS_NUMERIC_FAILURE:g} or NaN is numerical failure).",
                ("lr_too_high", "exploding_init", "unnormalized_inputs"),
                "Lower the learning rate, normalise inputs, check the initialisation.",
            ))
        if len(self._first_losses) <= 3 and loss is not None and math.isfinite(loss):
            self._check_initial_loss(out, it, event, loss)
        if m.get("loss_input") == "probabilities" and self.loss_name == "CrossEntropyLoss":
            classes = next((t.shape[1] for t in event.tensors if t.name == "output" and len(t.shape) >= 2), None)
            floor = math.log(1 + (classes - 1) / math.e) if classes else None
            self._fire(out, it, Finding(
                "loss_input_is_probabilities", "error",
                "CrossEntropyLoss received rows that already sum to 1 (probabilities, not logits)"
                + (f"; the loss can never go below ln(1 + (C-1)/e) = {floor:.2f}." if floor else "."),
                ("double_softmax",),
                "Feed raw logits to CrossEntropyLoss; it applies log-softmax itself.",
            ))
        output = next((t for t in event.tensors if t.name == "output"), None)
        if self.loss_name == "BCEWithLogitsLoss" and output is not None and output.min is not None:
            inside = 0.0 <= output.min and output.max <= 1.0
            self._unit_interval_streak = self._unit_interval_streak + 1 if inside else 0
            if self._unit_interval_streak >= 50:
                self._fire(out, it, Finding(
                    "logits_squashed", "warning",
                    f"every input to BCEWithLogitsLoss has stayed inside [0, 1] for "
                    f"{self._unit_interval_streak} iterations: they look like probabilities, not logits.",
                    ("sigmoid_before_bce_with_logits",),
                    "Feed raw scores to BCEWithLogitsLoss; it applies the sigmoid itself.",
                ))
        self._check_shapes(out, it, event)
        if m.get("running_loss_holds_graph"):
            self._fire(out, it, Finding(
                "graph_kept_across_iterations", "error",
                "running_loss is a tensor that still holds the autograd graph: every iteration's graph "
                "(and its activations) stays in memory.",
                ("loss_accumulates_graph",),
                "Accumulate numbers: running_loss += loss.item().",
            ))
        if it >= WARMUP_ITERATIONS and len(self._losses) == self._losses.maxlen and self._first_losses:
            start, recent = statistics.fmean(self._first_losses), statistics.fmean(self._losses)
            if recent >= DIVERGING_FACTOR * start:
                self._fire(out, it, Finding(
                    "loss_diverging", "warning",
                    f"the loss has grown: {start:.4g} over the first {len(self._first_losses)} iterations, "
                    f"{recent:.4g} over the last {len(self._losses)} ({recent / start:.1f}x).",
                    ("lr_too_high", "skip_zero_grad", "exploding_init", "unnormalized_inputs"),
                    "Check that gradients are cleared every iteration and lower the learning rate.",
                ))
            elif recent >= STALLED_FRACTION * start:
                self._fire(out, it, Finding(
                    "loss_stalled", "warning",
                    f"the loss has not fallen: {start:.4g} over the first {len(self._first_losses)} "
                    f"iterations, {recent:.4g} over the last {len(self._losses)}.",
                    ("lr_too_low", "missing_step", "missing_backward", "zero_grad_after_backward",
                     "dead_relu_init", "zero_init", "clip_loss_not_grad", "sigmoid_before_bce_with_logits"),
                    "Check that gradients reach the parameters and that the learning rate is not tiny.",
                ))

    def _check_initial_loss(self, out: list[Finding], it: int, event: StageEvent, loss: float) -> None:
        """cs231n / Karpathy: at initialisation the loss should be that of an uninformed guess."""
        output = next((t for t in event.tensors if t.name == "output"), None)
        targets = next((t for t in event.tensors if t.name == "targets"), None)
        expected = None
        if self.loss_name == "CrossEntropyLoss" and output is not None and len(output.shape) >= 2:
            expected, what = math.log(output.shape[1]), f"-ln(1/{output.shape[1]})"
        elif self.loss_name in ("BCEWithLogitsLoss", "BCELoss"):
            expected, what = math.log(2), "-ln(1/2)"
        elif self.loss_name == "MSELoss" and targets is not None and targets.mean is not None:
            expected = max(targets.mean ** 2 + targets.std ** 2, 1e-3)
            what = "mean(target^2), the loss of always predicting 0"
        if expected is None or loss <= 5 * expected:
            return
        self._fire(out, it, Finding(
            "initial_loss_high", "warning",
            f"the loss at iteration {it} is {loss:.4g}, {loss / expected:.0f}x the {expected:.3g} expected "
            f"at initialisation ({what}): the untrained model is confidently wrong.",
            ("exploding_init", "unnormalized_inputs", "lr_too_high"),
            "Check the initialisation scale and the input normalisation.",
        ))

    def _check_shapes(self, out: list[Finding], it: int, event: StageEvent) -> None:
        shapes = {t.name: t.shape for t in event.tensors}
        output, targets = shapes.get("output"), shapes.get("targets")
        warned = any("target size" in w.lower() for w in event.metrics.get("warnings", ()))
        elementwise = self.loss_name in ("MSELoss", "L1Loss", "SmoothL1Loss", "HuberLoss", "BCELoss",
                                         "BCEWithLogitsLoss")
        if output is None or targets is None or output == targets or not (elementwise or warned):
            return
        try:
            broadcast = tuple(torch.broadcast_shapes(output, targets))
        except RuntimeError:
            return
        if broadcast != output:
            self._fire(out, it, Finding(
                "loss_shapes_broadcast", "error",
                f"the loss compares outputs {list(output)} with targets {list(targets)}: they broadcast "
                f"to {list(broadcast)}, so every output is compared with every target.",
                ("target_shape_broadcast",),
                "Make the shapes equal (y.view(-1, 1) or out.squeeze(1)).",
            ))

    # ----- backward / step ---------------------------------------------------------------
    def _on_backward(self, out: list[Finding], event: StageEvent) -> None:
        it, m = event.iteration, event.metrics
        before = m.get("grads_before")
        if before and before["nonzero"] > 0:
            self._fire(out, it, Finding(
                "stale_gradients", "error",
                f"{before['nonzero']} gradient tensors still held values (norm {_fmt(before['norm'])}) "
                "when backward() ran, so the new gradients were added to the old ones.",
                ("skip_zero_grad",),
                "Call optimizer.zero_grad() before loss.backward() in every iteration.",
            ))
        trainable = [layer for layer in event.layers if layer.trainable]
        if trainable and all(layer.grad_norm is None for layer in trainable):
            self._fire(out, it, Finding(
                "no_gradients", "error",
                f"after backward every one of the {len(trainable)} trainable parameters has grad None.",
                ("missing_backward",),
                "Call loss.backward() before optimizer.step().",
            ))
        self._backward_had_grads[it] = any(layer.grad_norm for layer in trainable)
        self._backward_had_grads.pop(it - 3, None)
        loss = self._losses[-1] if self._losses else None
        if event.grad_norm == 0.0 and loss:
            self._fire(out, it, Finding(
                "zero_gradient_nonzero_loss", "warning",
                f"the loss is {_fmt(loss)} but every gradient is exactly 0: something between the loss "
                "and the parameters passes no gradient.",
                ("clip_loss_not_grad", "dead_relu_init", "zero_init"),
                "Clip gradients (not the loss) and check for dead units.",
            ))
        self._check_zero_weight_grads(out, it, trainable)
        self._check_gradient_ratio(out, it, trainable)

    def _check_zero_weight_grads(self, out: list[Finding], it: int, trainable: list) -> None:
        for layer in trainable:
            if len(layer.shape) < 2:
                continue
            streak = self._zero_grad_streak[layer.name] = (
                self._zero_grad_streak.get(layer.name, 0) + 1 if layer.grad_norm == 0.0 else 0
            )
            if streak >= 10:
                self._fire(out, it, Finding(
                    "weights_get_no_gradient", "warning",
                    f"{layer.name} has had exactly zero gradient for {streak} iterations: it cannot learn.",
                    ("zero_init", "dead_relu_init", "clip_loss_not_grad"),
                    "Initialise weights randomly and check the fraction of dead units.",
                ))
                return

    def _check_gradient_ratio(self, out: list[Finding], it: int, trainable: list) -> None:
        weights = [layer for layer in trainable if len(layer.shape) >= 2 and layer.grad_norm is not None]
        if len(weights) < 2:
            return
        first, last = weights[0].grad_norm, weights[-1].grad_norm
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
            self._fire(out, it, Finding(
                "exploding_gradients", "warning",
                f"the first layer's gradient ({weights[0].name}, {_fmt(first)}) is {ratio:.0f}x the last "
                f"layer's ({_fmt(last)}) for 5 iterations (> {EXPLODING_RATIO:g} is exploding).",
                ("unnormalized_inputs", "exploding_init", "lr_too_high"),
                "Normalise inputs, keep default initialisation, lower the learning rate.",
            ))
        if self._grad_ratio_streak[1] >= 5:
            self._fire(out, it, Finding(
                "vanishing_gradients", "warning",
                f"the first layer's gradient ({weights[0].name}, {_fmt(first)}) is {_fmt(ratio)} of the "
                f"last layer's for 5 iterations (< {VANISHING_RATIO:g} and < {VANISHING_FIRST_NORM:g} is vanishing).",
                ("dead_relu_init", "zero_init", "double_softmax", "sigmoid_before_bce_with_logits"),
                "Check activations for dead units and the loss input for squashing.",
            ))

    def _on_step(self, out: list[Finding], event: StageEvent) -> None:
        it, m = event.iteration, event.metrics
        stages = self._iteration_stages.get(it, [])
        if "backward" not in stages:
            self._fire(out, it, Finding(
                "step_before_backward", "warning",
                f"optimizer.step() ran before loss.backward() in iteration {it}: it used whatever "
                "gradients were left over, and changed weights the coming backward() needs.",
                ("step_before_backward",),
                "Order the calls: zero_grad(), forward, loss, backward(), step().",
            ))
        at_step = m.get("grads_at_step")
        if at_step and at_step["nonzero"] == 0 and self._backward_had_grads.get(it):
            self._fire(out, it, Finding(
                "gradients_cleared_before_step", "error",
                "backward() computed gradients, but they were gone (None or zero) when step() ran.",
                ("zero_grad_after_backward",),
                "Do not call zero_grad() between backward() and step().",
            ))
        weights = [layer for layer in event.layers if len(layer.shape) >= 2 and layer.update_ratio is not None]
        if weights:
            moved = any(layer.update_norm for layer in event.layers)
            self._unchanged_streak = 0 if moved else self._unchanged_streak + 1
            if self._unchanged_streak >= 3 and (m.get("lr") or 0) > 0:
                had_grads = bool(at_step and at_step["nonzero"])
                self._fire(out, it, Finding(
                    "parameters_not_updated", "error",
                    f"step() changed no parameter for {self._unchanged_streak} iterations (lr {_fmt(m.get('lr'))}, "
                    f"{at_step['nonzero'] if at_step else '?'} gradients with values at step).",
                    ("missing_step",) if had_grads else ("missing_backward", "zero_grad_after_backward"),
                    "Call loss.backward() then optimizer.step() every iteration.",
                ))
            ratio = max(layer.update_ratio for layer in weights)
            if math.isfinite(ratio):
                self._max_ratios.append(ratio)
            if len(self._max_ratios) >= RATIO_WINDOW:
                median = statistics.median(self._max_ratios)
                if median > UPDATE_RATIO_HIGH:
                    self._fire(out, it, Finding(
                        "update_ratio_high", "warning",
                        f"updates are {_fmt(median)} of the weights' size (median of the largest layer ratio "
                        f"over {RATIO_WINDOW} steps; healthy is about 1e-3, above {UPDATE_RATIO_HIGH:g} is too big).",
                        ("lr_too_high",),
                        "Lower the learning rate.",
                    ))
            if len(self._max_ratios) == self._max_ratios.maxlen and moved:
                median = statistics.median(self._max_ratios)
                barely_moved = (
                    it >= WARMUP_ITERATIONS and self._first_losses and len(self._losses) == self._losses.maxlen
                    and statistics.fmean(self._losses) >= SLOW_LOSS_FRACTION * statistics.fmean(self._first_losses)
                )
                if median < UPDATE_RATIO_LOW or (median < UPDATE_RATIO_SLOW and barely_moved):
                    self._fire(out, it, Finding(
                        "update_ratio_low", "warning",
                        f"updates are only {_fmt(median)} of the weights' size (largest layer, median over "
                        f"{len(self._max_ratios)} steps; healthy is about 1e-3)"
                        + (" and the loss has barely moved." if barely_moved else "."),
                        ("lr_too_low",),
                        "Raise the learning rate.",
                    ))

    def _on_scheduler(self, out: list[Finding], event: StageEvent) -> None:
        stages = self._iteration_stages.get(event.iteration, [])
        warned = any("lr_scheduler.step()" in w for w in event.metrics.get("warnings", ()))
        if warned or (self.stepper.experiment.scheduler_interval == "iteration" and "step" not in stages) or (
            "load_batch" in stages and "step" not in stages
        ):
            self._fire(out, event.iteration, Finding(
                "scheduler_before_optimizer", "warning",
                "scheduler.step() ran before optimizer.step(): the learning-rate schedule is one step "
                "early" + (" (PyTorch warned too)." if warned else "."),
                ("scheduler_before_step",),
                "Call scheduler.step() after optimizer.step().",
            ))

    # ----- validation ------------------------------------------------------------------
    def _on_validate(self, out: list[Finding], event: StageEvent) -> None:
        it, m = event.iteration, event.metrics
        self._validations.append(m)
        if m.get("model_training") and "train_eval_differs" in self.features:
            self._fire(out, it, Finding(
                "validation_in_train_mode", "warning",
                "validation ran with the model in training mode: dropout was active (and batch norm "
                "used batch statistics), so val loss is noisy and pessimistic.",
                ("validate_in_train_mode",),
                "Call model.eval() before validating.",
            ))
        if m.get("builds_graph"):
            self._fire(out, it, Finding(
                "validation_builds_graph", "warning",
                "validation outputs require grad: an autograd graph was built for every validation "
                "batch, costing memory and time for nothing.",
                ("validate_with_grad",),
                "Wrap validation in torch.no_grad().",
            ))
        if m.get("val_loader_is_train_loader"):
            self._fire(out, it, Finding(
                "validation_on_training_data", "warning",
                "validation reads the training data: val loss will track train loss and look too good.",
                ("val_is_train",),
                "Validate on held-out data.",
            ))
        self._check_chance(out, it)

    def _check_chance(self, out: list[Finding], it: int) -> None:
        accuracies = [v["val_accuracy"] for v in self._validations if v.get("val_accuracy") is not None]
        if len(accuracies) < 2:
            return
        classes = 2 if self.loss_name.startswith("BCE") else self._classes()
        if not classes:
            return
        chance = 1.0 / classes
        margin = 0.1 if classes == 2 else 0.5 * chance
        if max(accuracies[-2:]) <= chance + margin:
            trend = ""
            if self._first_losses and self._losses:
                trend = f" while train loss went {statistics.fmean(self._first_losses):.3g} -> {statistics.fmean(self._losses):.3g}"
            self._fire(out, it, Finding(
                "validation_at_chance", "warning",
                f"val accuracy is {accuracies[-1]:.1%} after {len(accuracies)} validations, about chance "
                f"({chance:.0%}){trend}: what the model learns does not carry over to new data.",
                ("shuffled_labels", "lr_too_low", "missing_step", "missing_backward", "dead_relu_init"),
                "Check that labels belong to their inputs, and that the model learns at all.",
            ))

    def _classes(self) -> int | None:
        last = [m for m in self.stepper.model.modules() if isinstance(m, torch.nn.Linear)]
        return last[-1].out_features if last else None


def batch_mixing_rows(stepper: Stepper) -> tuple[int, int] | None:
    """Backprop out[i].sum() to the inputs on a copy in eval mode: rows other than i must get
    no gradient. Returns (i, how many other rows got gradient), or None when clean/not testable."""
    inputs = stepper._current.clean_inputs
    targets = stepper._current.clean_targets
    if not isinstance(inputs, torch.Tensor) or not inputs.is_floating_point() or inputs.shape[0] < 2:
        return None
    model = copy.deepcopy(stepper.model)
    model.eval()  # batch norm in training mode mixes rows legitimately
    with forked_rng(stepper.device), torch.enable_grad():
        try:
            x = inputs.detach().clone().requires_grad_(True)
            prepared, _ = stepper.injector.prepare_batch(x, targets)
            from loopscope.engine.batches import call_model, primary_output

            out = primary_output(call_model(model, prepared))
            row = min(1, out.shape[0] - 1)
            out[row].sum().backward()
        except Exception:  # the loop itself will report whatever fails here, at its stage
            return None
    if x.grad is None:
        return None
    per_row = x.grad.detach().reshape(x.shape[0], -1).abs().sum(dim=1)
    others = int((per_row > 0).sum().item()) - int(per_row[row].item() > 0)
    return (row, others) if others > 0 else None
