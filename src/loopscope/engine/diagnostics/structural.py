"""Structural detectors: what one event shows directly about the loop's code.

Stale gradients before backward, the model's mode, the loss input, shapes, graphs kept alive,
calls out of order. Each judges the event in hand (and the stages run so far in its iteration);
none needs a history of numbers.
"""

from __future__ import annotations

import math

import torch

from loopscope.engine.diagnostics.context import DiagnosticContext
from loopscope.engine.diagnostics.findings import PASS_THROUGH_TYPES, WEIGHT_TYPES, FindingLog, fmt
from loopscope.shared.events import Finding, StageEvent, TensorStat
from loopscope.shared.vocab import Stage


class StructuralChecks:
    def __init__(self, context: DiagnosticContext, log: FindingLog) -> None:
        self.context = context
        self.fire = log.fire
        self.iteration_stages: dict[int, list[str]] = {}  # the stages each recent iteration ran, in order
        self.backward_had_grads: dict[int, bool] = {}
        self._mixing_checked_for: tuple[str, ...] | None = None

    def note_stage(self, event: StageEvent) -> None:
        it = event.iteration
        self.iteration_stages.setdefault(it, []).append(event.stage)
        self.iteration_stages.pop(it - 3, None)

    # ----- errors ----------------------------------------------------------------------
    def stage_error(self, event: StageEvent) -> None:
        err = event.error
        assert err is not None
        text = f"{err.type}: {err.message}"
        suspects: tuple[str, ...] = ()
        if "does not require grad" in err.message:
            suspects = ("forward_under_no_grad",)
        elif "modified by an inplace operation" in err.message:
            suspects = ("step_before_backward",)
        elif (
            "dtype" in err.message
            or "Double" in err.message
            or "scalar type" in err.message
            or "same device" in err.message
        ):
            suspects = ("inputs_wrong_dtype",)
        self.fire(
            event.iteration,
            Finding(
                "stage_error",
                "error",
                f"{event.stage} raised {text}" + (f" -- {err.hint}" if err.hint else ""),
                suspects,
                err.hint or "Read the message and the line it points at.",
            ),
        )

    # ----- load_batch ------------------------------------------------------------------
    def batch_mixing(self, event: StageEvent) -> None:
        """Karpathy's batch-mixing probe: out[i] must depend on input row i only. Run at the start
        and whenever the loop's code (the bugs on) changes."""
        code_version = event.bugs
        if code_version == self._mixing_checked_for:
            return
        self._mixing_checked_for = code_version
        mixed = self.context.batch_mixing()
        if mixed:
            row, others = mixed
            self.fire(
                event.iteration,
                Finding(
                    "batch_rows_mixed",
                    "error",
                    f"the output for example {row} changes with the inputs of {others} other example(s) in "
                    "the batch: something reshapes across the batch dimension.",
                    ("view_instead_of_permute",),
                    "Use permute()/transpose() to reorder axes; view()/reshape() only regroup memory.",
                ),
            )

    # ----- forward ---------------------------------------------------------------------
    def forward_mode(self, event: StageEvent) -> None:
        it, m = event.iteration, event.metrics
        if m.get("model_training") is False:
            matters = "train_eval_differs" in self.context.features
            self.fire(
                it,
                Finding(
                    "training_in_eval_mode",
                    "warning" if matters else "info",
                    "the model is in eval mode during a training forward pass (model.training is False)"
                    + (": dropout is off and batch norm statistics are frozen." if matters else "."),
                    ("train_in_eval_mode",),
                    "Call model.train() after validation.",
                ),
            )
        if m.get("output_requires_grad") is False and self.context.has_trainable_params():
            self.fire(
                it,
                Finding(
                    "forward_without_graph",
                    "error",
                    "the training forward pass recorded no autograd graph (the output does not require "
                    "grad): backward() will have nothing to differentiate.",
                    ("forward_under_no_grad",),
                    "Run the training forward pass outside torch.no_grad().",
                ),
            )

    def linear_stack(self, it: int, modules: list[TensorStat]) -> None:
        """A weight layer given another's output, through nothing but pass-through modules. Followed
        by tensor identity: a function call between them (F.relu, attention) breaks the chain."""
        fed_by = self.context.forward_flow().fed_by
        kinds = {t.name: t.module_type for t in modules}
        for t in modules:
            if t.module_type not in WEIGHT_TYPES:
                continue
            source, seen = fed_by.get(t.name), {t.name}
            while source is not None and source not in seen and kinds.get(source) in PASS_THROUGH_TYPES:
                seen.add(source)
                source = fed_by.get(source)
            if source is not None and kinds.get(source) in WEIGHT_TYPES:
                self.fire(
                    it,
                    Finding(
                        "no_activation_between_layers",
                        "warning",
                        f"{source} feeds {t.name} with no activation between them: two linear layers "
                        "in a row are one linear map.",
                        ("missing_activation",),
                        "Put a non-linearity (ReLU, GELU, Tanh) between the layers.",
                    ),
                )
                return

    def output_squashed_twice(self, it: int, modules: list[TensorStat]) -> None:
        last = modules[-1] if modules else None
        kind = self.context.loss_kind
        if last is not None and last.module_type == "Sigmoid" and kind == "bce_with_logits":
            self.fire(
                it,
                Finding(
                    "sigmoid_then_bce_with_logits",
                    "error",
                    f"the model ends in a Sigmoid ({last.name}) and feeds BCEWithLogitsLoss, which applies "
                    "its own sigmoid.",
                    ("sigmoid_before_bce_with_logits",),
                    "Remove the final Sigmoid (or use BCELoss).",
                ),
            )
        if last is not None and last.module_type in ("Softmax", "LogSoftmax") and kind == "cross_entropy":
            self.fire(
                it,
                Finding(
                    "softmax_then_cross_entropy",
                    "error",
                    f"the model ends in {last.module_type} ({last.name}) and feeds CrossEntropyLoss, which "
                    "applies its own log-softmax.",
                    ("double_softmax",),
                    "Remove the final softmax; CrossEntropyLoss wants logits.",
                ),
            )

    # ----- loss ------------------------------------------------------------------------
    def loss_input(self, event: StageEvent) -> None:
        if event.metrics.get("loss_input") != "probabilities" or self.context.loss_kind != "cross_entropy":
            return
        classes = next((t.shape[1] for t in event.tensors if t.name == "output" and len(t.shape) >= 2), None)
        floor = math.log(1 + (classes - 1) / math.e) if classes else None
        self.fire(
            event.iteration,
            Finding(
                "loss_input_is_probabilities",
                "error",
                "CrossEntropyLoss received rows that already sum to 1 (probabilities, not logits)"
                + (f"; the loss can never go below ln(1 + (C-1)/e) = {floor:.2f}." if floor else "."),
                ("double_softmax",),
                "Feed raw logits to CrossEntropyLoss; it applies log-softmax itself.",
            ),
        )

    def loss_shapes(self, event: StageEvent) -> None:
        if not event.tensors:  # a quiet iteration's loss: nothing to compare (runs every iteration)
            return
        shapes = {t.name: t.shape for t in event.tensors}
        output, targets = shapes.get("output"), shapes.get("targets")
        warned = any("target size" in w.lower() for w in event.metrics.get("warnings", ()))
        elementwise = self.context.loss_kind in ("mse", "l1", "smooth_l1", "huber", "bce", "bce_with_logits")
        if output is None or targets is None or output == targets or not (elementwise or warned):
            return
        try:
            broadcast = tuple(torch.broadcast_shapes(output, targets))
        except RuntimeError:
            return
        if broadcast != output:
            self.fire(
                event.iteration,
                Finding(
                    "loss_shapes_broadcast",
                    "error",
                    f"the loss compares outputs {list(output)} with targets {list(targets)}: they broadcast "
                    f"to {list(broadcast)}, so every output is compared with every target.",
                    ("target_shape_broadcast",),
                    "Make the shapes equal (y.view(-1, 1) or out.squeeze(1)).",
                ),
            )

    def graph_kept(self, event: StageEvent) -> None:
        if event.metrics.get("running_loss_holds_graph"):
            self.fire(
                event.iteration,
                Finding(
                    "graph_kept_across_iterations",
                    "error",
                    "running_loss is a tensor that still holds the autograd graph: every iteration's graph "
                    "(and its activations) stays in memory.",
                    ("loss_accumulates_graph",),
                    "Accumulate numbers: running_loss += loss.item().",
                ),
            )

    def loss_divided(self, event: StageEvent) -> None:
        """Gradient accumulation: each micro-batch's loss must be divided by their number; under
        DDP, by nothing more (its all-reduce averages over the ranks)."""
        m = event.metrics
        count = m.get("micro_batches")
        world, divisor = m.get("world_size"), m.get("loss_divisor")
        if world and world > 1 and divisor and divisor >= world * (count or 1):
            self.fire(
                event.iteration,
                Finding(
                    "loss_divided_by_ranks",
                    "error",
                    f"backward() gets the loss divided by {divisor}"
                    + (f" ({count} micro-batches x {world} ranks)" if count and count > 1 else " (the number of ranks)")
                    + f", but DDP's all-reduce already averages the {world} ranks' gradients: each step is "
                    f"1/{world} of the mean loss's, as if the learning rate were {world}x lower.",
                    ("loss_divided_by_world_size",),
                    "Do not divide the loss by the world size: DDP's averaging is that division.",
                ),
            )
        if count and count > 1 and divisor == 1:
            self.fire(
                event.iteration,
                Finding(
                    "accumulated_loss_not_divided",
                    "error",
                    f"backward() gets each of the {count} accumulated micro-batches' full loss "
                    f"({fmt(event.loss)} here): the step follows the sum of {count} gradients, {count}x their "
                    "mean, as if the learning rate were {count}x higher.".replace("{count}", str(count)),
                    ("accumulation_not_divided",),
                    f"Divide the loss by {count} before loss.backward().",
                ),
            )

    def replay_exactness(self, event: StageEvent) -> None:
        message = self.context.replay_differs(event)
        if message:
            self.fire(
                event.iteration,
                Finding(
                    "rewind_inexact",
                    "warning",
                    message + ".",
                    (),
                    "Keep state that carries between batches out of the model, or reset it at the start "
                    "of each batch (hidden = None), so stepping back can restore it.",
                ),
            )

    # ----- backward / step ---------------------------------------------------------------
    def gradients_at_backward(self, event: StageEvent) -> None:
        it, m = event.iteration, event.metrics
        before = m.get("grads_before")
        # Under gradient accumulation the micro-batches after the first add to .grad on purpose.
        if before and before["nonzero"] > 0 and m.get("micro_batch", 1) == 1:
            self.fire(
                it,
                Finding(
                    "stale_gradients",
                    "error",
                    f"{before['nonzero']} gradient tensors still held values (norm {fmt(before['norm'])}) "
                    "when backward() ran, so the new gradients were added to the old ones.",
                    ("skip_zero_grad",),
                    "Call optimizer.zero_grad() before loss.backward() in every iteration.",
                ),
            )
        trainable = [layer for layer in event.layers if layer.trainable]
        if trainable and all(layer.grad_norm is None for layer in trainable):
            self.fire(
                it,
                Finding(
                    "no_gradients",
                    "error",
                    f"after backward every one of the {len(trainable)} trainable parameters has grad None.",
                    ("missing_backward",),
                    "Call loss.backward() before optimizer.step().",
                ),
            )
        self.backward_had_grads[it] = any(layer.grad_norm for layer in trainable)
        self.backward_had_grads.pop(it - 3, None)

    def step_order(self, event: StageEvent) -> None:
        it, m = event.iteration, event.metrics
        if Stage.BACKWARD not in self.iteration_stages.get(it, []):
            self.fire(
                it,
                Finding(
                    "step_before_backward",
                    "warning",
                    f"optimizer.step() ran before loss.backward() in iteration {it}: it used whatever "
                    "gradients were left over, and changed weights the coming backward() needs.",
                    ("step_before_backward",),
                    "Order the calls: zero_grad(), forward, loss, backward(), step().",
                ),
            )
        stale = m.get("stale_grads")
        if stale:  # script mode judges at the step: any order of calls is right if this holds
            self.fire(
                it,
                Finding(
                    "stale_gradients",
                    "error",
                    f"step() ran on {stale['nonzero']} gradient tensors (norm {fmt(stale['norm'])}) that no "
                    "zero_grad() cleared since this optimizer's last step: old gradients were added to the new.",
                    ("skip_zero_grad",),
                    "Call optimizer.zero_grad() once per iteration, before loss.backward() (or after step()).",
                ),
            )
        at_step = m.get("grads_at_step")
        if at_step and at_step["nonzero"] == 0 and self.backward_had_grads.get(it):
            self.fire(
                it,
                Finding(
                    "gradients_cleared_before_step",
                    "error",
                    "backward() computed gradients, but they were gone (None or zero) when step() ran.",
                    ("zero_grad_after_backward",),
                    "Do not call zero_grad() between backward() and step().",
                ),
            )

    def clip_scaled(self, event: StageEvent) -> None:
        """fp16: clip_grad_norm_ must see the gradients after scaler.unscale_()."""
        m = event.metrics
        scale = m.get("grad_scale")
        if not scale or scale == 1.0:
            return
        measured, max_norm = m.get("norm_before"), m.get("max_norm")
        shrunk = f", shrank them {fmt(measured / max_norm)}x" if measured and max_norm and measured > max_norm else ""
        self.fire(
            event.iteration,
            Finding(
                "clip_before_unscale",
                "error",
                f"clip_grad_norm_ ran on gradients still multiplied by the loss scale {scale:g}: it measured a "
                f"norm of {fmt(measured)} against max_norm {fmt(max_norm)}{shrunk}, and unscale_() then divides "
                f"them by {scale:g} again: the optimizer gets gradients {scale:g}x smaller than the clip meant.",
                ("clip_before_unscale",),
                "Call scaler.unscale_(optimizer) before clip_grad_norm_.",
            ),
        )

    def scheduler_order(self, event: StageEvent) -> None:
        stages = self.iteration_stages.get(event.iteration, [])
        warned = any("lr_scheduler.step()" in w for w in event.metrics.get("warnings", ()))
        if (
            warned
            or (self.context.scheduler_interval == "iteration" and Stage.STEP not in stages)
            or (Stage.LOAD_BATCH in stages and Stage.STEP not in stages)
        ):
            self.fire(
                event.iteration,
                Finding(
                    "scheduler_before_optimizer",
                    "warning",
                    "scheduler.step() ran before optimizer.step(): the learning-rate schedule is one step "
                    "early" + (" (PyTorch warned too)." if warned else "."),
                    ("scheduler_before_step",),
                    "Call scheduler.step() after optimizer.step().",
                ),
            )

    # ----- validation ------------------------------------------------------------------
    def validation_setup(self, event: StageEvent) -> None:
        it, m = event.iteration, event.metrics
        if m.get("model_training") and "train_eval_differs" in self.context.features:
            self.fire(
                it,
                Finding(
                    "validation_in_train_mode",
                    "warning",
                    "validation ran with the model in training mode: dropout was active (and batch norm "
                    "used batch statistics), so val loss is noisy and pessimistic.",
                    ("validate_in_train_mode",),
                    "Call model.eval() before validating.",
                ),
            )
        if m.get("builds_graph"):
            self.fire(
                it,
                Finding(
                    "validation_builds_graph",
                    "warning",
                    "validation outputs require grad: an autograd graph was built for every validation "
                    "batch, costing memory and time for nothing.",
                    ("validate_with_grad",),
                    "Wrap validation in torch.no_grad().",
                ),
            )
        if m.get("val_loader_is_train_loader"):
            self.fire(
                it,
                Finding(
                    "validation_on_training_data",
                    "warning",
                    "validation reads the training data: val loss will track train loss and look too good.",
                    ("val_is_train",),
                    "Validate on held-out data.",
                ),
            )
