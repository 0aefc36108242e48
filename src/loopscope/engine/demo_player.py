"""`loopscope demo --verify`: a demo played headless, each claim judged on what the loop did.

The steps run as the app runs them at a watchable speed (every iteration probed), and a
`StepMeter` is fed the same events the screen gets, so the numbers printed here are the numbers
the narration shows.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from loopscope.engine.devices import resolve_device
from loopscope.engine.experiment import load_experiment
from loopscope.engine.stepper import Stepper
from loopscope.shared.claims import Claim, Measure, StepMeter, named_finding
from loopscope.shared.claims import number as shown
from loopscope.shared.demo import Demo, DemoStep
from loopscope.shared.events import StageEvent


@dataclass(frozen=True)
class StepResult:
    number: int  # 1-based, as the narration counts
    step: DemoStep
    measures: tuple[Measure, ...]  # one per quantity the step shows, its claims' first
    error: str | None = None  # the loop raised during the step

    @property
    def failed_claims(self) -> list[str]:
        """Each claim that did not hold, with what happened instead."""
        if self.error is not None:
            return [f"{claim} (the loop raised {self.error})" for claim in self.step.expect]
        return [
            f"{claim} (it {_outcome(claim, measure)})"
            for claim, measure in zip(self.step.expect, self.measures)
            if not measure.holds(claim)
        ]

    def line(self) -> str:
        step = self.step
        head = f"step {self.number} ({step.action}{'' if step.argument is None else f' {step.argument}'})"
        if self.error is not None:
            return f"{head}: the loop raised {self.error}"
        said = f" claims {'; '.join(map(str, step.expect))}:" if step.expect else ":"
        seen = "; ".join(measure.describe() for measure in self.measures) or "nothing to show"
        if not step.expect:
            return f"{head}{said} {seen}"
        failed = self.failed_claims
        return f"{head}{said} {seen}  " + (f"FAILS: {'; '.join(failed)}" if failed else "ok")


def _outcome(claim: Claim, measure: Measure) -> str:
    if named_finding(claim.quantity) is not None:
        return "was not named"
    if measure.after is None:
        return "could not be measured"
    if claim.bound is not None:
        return f"ends at {shown(measure.quantity, measure.after)}"
    return measure.direction() or "could not be measured"


def play(demo: Demo, seed: int, device: str = "cpu") -> Iterator[StepResult]:
    """Every step of `demo` on `seed`, as it finishes, with what it revealed and whether its claim held."""
    meter = StepMeter()

    def observe(event: StageEvent) -> None:
        meter.add_events((event,))

    stepper = Stepper(
        load_experiment(demo.target, seed),
        resolve_device(device),
        bugs=demo.bugs,
        twin=demo.twin,
        on_event=observe,
    )
    for number, step in enumerate(demo.steps, 1):
        start = stepper.completed_iterations
        _carry_out(stepper, step)
        error = None if stepper.halted is None else f"{stepper.halted.type}: {stepper.halted.message}"
        end = stepper.completed_iterations
        yield StepResult(number, step, tuple(meter.measure(q, start, end) for q in step.shows), error)
        if stepper.halted is not None:
            stepper.resume()  # as stepping on in the app does


def _carry_out(stepper: Stepper, step: DemoStep) -> None:
    match step.action:
        case "stage":
            stepper.step_stage()
        case "iteration":
            stepper.run_iteration()
        case "epoch":
            stepper.run_epoch()
        case "run":
            assert isinstance(step.argument, int)
            stepper.run(step.argument)
        case "bug on" | "bug off":
            stepper.set_bug(str(step.argument), step.action == "bug on")
        case "twin on" | "twin off":
            stepper.set_twin(step.action == "twin on")
