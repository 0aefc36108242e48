"""Detectors over the event history: say what is wrong, with the numbers, and who to suspect.

Two kinds (DESIGN.md §4): structural checks read what one event shows directly (`structural`);
symptomatic checks judge the history (`symptomatic`). Detectors never look at which bugs are
injected: they must work the same on a user's own mistakes. They know the run only through a
`DiagnosticContext`, so any driver can feed them.
"""

from __future__ import annotations

from loopscope.engine.diagnostics.context import DiagnosticContext
from loopscope.engine.diagnostics.findings import FindingLog
from loopscope.engine.diagnostics.structural import StructuralChecks
from loopscope.engine.diagnostics.symptomatic import SymptomChecks
from loopscope.shared.events import Finding, StageEvent
from loopscope.shared.vocab import Stage

__all__ = ["DiagnosticContext", "Diagnostics"]


class Diagnostics:
    """Feed it every event in order; it returns the findings each event raises."""

    def __init__(self, context: DiagnosticContext) -> None:
        self.log = FindingLog()
        self.structure = StructuralChecks(context, self.log)
        self.symptoms = SymptomChecks(context, self.log)

    @property
    def all_findings(self):
        return self.log.all_findings

    def observe(self, event: StageEvent) -> list[Finding]:
        self.log.raised = []
        self.structure.note_stage(event)
        if event.error is not None:
            self.structure.stage_error(event)
            return self.log.raised
        structure, symptoms, it = self.structure, self.symptoms, event.iteration
        # The order of the checks is the order findings appear in an event: keep it. The loss comes
        # first: running, every iteration's loss is judged, the other stages only when probed.
        match event.stage:
            case Stage.LOSS:
                symptoms.loss_value(event)
                structure.loss_input(event)
                symptoms.logits_squashed(event)
                structure.loss_shapes(event)
                structure.graph_kept(event)
                structure.loss_divided(event)
                symptoms.loss_trend(event)
                structure.replay_exactness(event)
            case Stage.LOAD_BATCH:
                structure.batch_mixing(event)
                symptoms.input_scale(event)
                symptoms.batch_classes(event)
            case Stage.FORWARD:
                structure.forward_mode(event)
                modules = [t for t in event.tensors if t.module_type]
                symptoms.dead_units(it, modules)
                symptoms.dropout_rate(it, modules)
                symptoms.activation_scale(it, modules)
                structure.linear_stack(it, modules)
                structure.output_squashed_twice(it, modules)
            case Stage.BACKWARD:
                structure.gradients_at_backward(event)
                trainable = [layer for layer in event.layers if layer.trainable]
                symptoms.zero_gradient(event)
                symptoms.zero_weight_grads(it, trainable)
                symptoms.gradient_ratio(it, trainable)
            case Stage.CLIP_GRAD:
                structure.clip_scaled(event)
            case Stage.STEP:
                structure.step_order(event)
                symptoms.updates(event)
            case Stage.SCHEDULER:
                structure.scheduler_order(event)
            case Stage.VALIDATE:
                structure.validation_setup(event)
                symptoms.chance_accuracy(event)
        return self.log.raised
