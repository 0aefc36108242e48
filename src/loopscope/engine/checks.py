"""Karpathy's sanity checks ("A Recipe for Training Neural Networks"), each on a copy.

Every check copies the model and optimizer, forks the random generators and runs the loop's own
code (with whatever bugs are active) on the copy, so the main run is untouched and can go on.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import torch

from loopscope.engine.batches import (
    call_model,
    call_model_with_targets,
    primary_output,
    shown_output,
    split_batch,
    target_key,
    to_device,
)
from loopscope.engine.copies import forked_rng
from loopscope.engine.losses import loss_kind
from loopscope.shared.events import CheckResult

if TYPE_CHECKING:
    from loopscope.engine.experiment import Experiment
    from loopscope.engine.inject import BugInjector
    from loopscope.shared.events import StageError, StageEvent
    from loopscope.shared.vocab import Task


class Stepper(Protocol):
    """What the checks use of the driver they check: its objects, and copies to try things on."""

    experiment: Experiment
    model: torch.nn.Module
    device: torch.device
    task: Task | None
    injector: BugInjector

    @property
    def completed_iterations(self) -> int: ...
    @property
    def finished(self) -> bool: ...
    @property
    def halted(self) -> StageError | None: ...
    def step_stage(self) -> StageEvent | None: ...
    def trial_copy(self, batches: list[Any], steps: int) -> Stepper: ...


OVERFIT_STEPS = 300
BASELINE_STEPS = 150
BASELINE_BATCHES = 8
# How much lower the real inputs' loss must end than the zeroed inputs', as a fraction of the loss
# scale (see check_input_independent). Measured (gap / scale, 150 steps): loops that ignore their
# inputs end 0 apart (zero_init, dead_relu_init) and random tokens -0.0003 (unrolled_lm); without
# learning, the untrained model's own gap is 0.011 on blobs (missing_step) and 0.027-0.037 on
# spirals (missing_step, lr_too_low: these pass); language models that learn from their inputs
# 0.02-0.08 (vocabulary 2000-5000, bigram_lm 0.053; the old 10% failed them all); every clean
# built-in scenario and fixture 0.47 or more.
BASELINE_MARGIN = 0.02


def _batches(stepper: Stepper, count: int) -> list[Any]:
    """The first `count` training batches of a fresh iterator (RNG forked: the run is untouched)."""
    batches = []
    with forked_rng(stepper.device):
        for batch in stepper.experiment.train_loader:
            inputs, targets = split_batch(batch)
            batches.append((to_device(inputs, stepper.device), to_device(targets, stepper.device)))
            if len(batches) == count:
                break
    if not batches:
        raise ValueError("the training loader yielded no batches")
    return batches


def _losses(copy_stepper: Stepper) -> list[float]:
    losses: list[float] = []
    with forked_rng(copy_stepper.device):
        while not copy_stepper.finished and copy_stepper.halted is None:
            event = copy_stepper.step_stage()
            if event is None:
                break
            if event.stage == "loss" and event.loss is not None:
                losses.append(event.loss)
    if copy_stepper.halted is not None:
        raise RuntimeError(f"{copy_stepper.halted.type}: {copy_stepper.halted.message}")
    return losses


class Reference(NamedTuple):
    """What the loss should be at initialisation, and how that number is read."""

    value: float
    what: str


def reference_loss(stepper: Stepper, batches: list[Any]) -> Reference | None:
    """The loss of a model that knows nothing yet, from the loss's kind (cs231n): -ln(1/C) for C
    classes, -ln(1/2) for binary cross-entropy, mean(y^2) (predicting 0) for squared error; None
    where there is no such number (another loss, or a model computing its own)."""
    kind = loss_kind(stepper.experiment.loss_fn)
    inputs, targets = batches[0]
    if kind in ("cross_entropy", "nll"):  # NLL of log-probabilities: the same -ln(1/C)
        model_copy = copy.deepcopy(stepper.model).eval()
        with torch.no_grad(), forked_rng(stepper.device):
            classes = primary_output(call_model(model_copy, inputs)).shape[1]
        return Reference(math.log(classes), f"-ln(1/{classes})")
    if kind in ("bce_with_logits", "bce"):
        return Reference(math.log(2), "-ln(1/2)")
    if kind == "mse" and isinstance(targets, torch.Tensor):
        return Reference(float((targets.float() ** 2).mean()), "mean(y^2), the loss of predicting 0")
    return None


def check_initial_loss(stepper: Stepper, batches: list[Any]) -> CheckResult:
    title = "loss at initialisation"
    if stepper.completed_iterations > 0:
        return CheckResult(
            "init_loss",
            title,
            True,
            f"the model has already trained {stepper.completed_iterations} iterations",
            skipped=True,
        )
    losses = _losses(stepper.trial_copy(batches[:1], 1))
    loss = losses[0]
    loss_fn = stepper.experiment.loss_fn
    reference = reference_loss(stepper, batches)
    if reference is None:
        name = "the model's own loss" if loss_fn is None else getattr(loss_fn, "__name__", type(loss_fn).__name__)
        return CheckResult("init_loss", title, True, f"loss {loss:.4g} (no reference for {name})", {"loss": loss})
    expected, what = reference
    ratio = loss / expected if expected else math.inf
    is_mse = loss_kind(loss_fn) == "mse"
    passed = math.isfinite(loss) and 0.5 <= ratio <= 1.5 if not is_mse else loss <= 2 * expected
    return CheckResult(
        "init_loss",
        title,
        passed,
        f"loss {loss:.4g} vs {expected:.4g} expected ({what}): {ratio:.2f}x",
        {"loss": loss, "expected": expected, "ratio": ratio},
    )


def check_overfit_one_batch(stepper: Stepper, batches: list[Any]) -> CheckResult:
    title = "overfit a single batch"
    losses = _losses(stepper.trial_copy(batches[:1], OVERFIT_STEPS))
    first, last = losses[0], min(losses[-10:])
    passed = math.isfinite(last) and (last <= 0.05 or last <= 0.02 * first)
    return CheckResult(
        "overfit_batch",
        title,
        passed,
        f"loss {first:.4g} -> {last:.4g} after {len(losses)} steps on one batch "
        f"({'reached' if passed else 'did not reach'} ~0)",
        {"first": first, "last": last, "steps": len(losses)},
    )


def check_input_independent(stepper: Stepper, batches: list[Any]) -> CheckResult:
    """The same short training with the real inputs and with zeroed ones: the real inputs must end
    lower by a margin of BASELINE_MARGIN times the loss scale, the smaller of the reference loss
    (-ln(1/C), ...) and the zeroed run's own loss (its absolute value: a model's own loss may be
    negative). The zeroed run's loss is the scale when there is no reference, and where it is
    below the reference: mean(y^2) overstates squared error's scale when the targets have an
    offset, which the zeroed run learns (targets 20 + signal: mean(y^2) 404, zeroed 4.7)."""
    title = "input-independent baseline"
    real = _losses(stepper.trial_copy(batches, BASELINE_STEPS))
    zeroed_batches = [(_zeros_like(x), y) for x, y in batches]
    zeroed = _losses(stepper.trial_copy(zeroed_batches, BASELINE_STEPS))
    window = min(len(batches), 10)
    real_end, zero_end = sum(real[-window:]) / window, sum(zeroed[-window:]) / window
    reference = reference_loss(stepper, batches)
    if reference is not None and reference.value < abs(zero_end):
        scale, scale_name = reference.value, reference.what.split(",")[0]
    else:
        scale, scale_name = abs(zero_end), "the zeroed loss"
    margin = BASELINE_MARGIN * scale
    gap = zero_end - real_end
    passed = math.isfinite(real_end) and gap > margin  # NaN compares False
    difference = f"{gap:.3g} lower" if gap >= 0 else f"{-gap:.3g} higher"
    return CheckResult(
        "input_baseline",
        title,
        passed,
        f"after {BASELINE_STEPS} steps: loss {real_end:.4g} with the real inputs vs {zero_end:.4g} with "
        f"zeroed inputs, {difference}; the margin is {margin:.3g} ({BASELINE_MARGIN:.0%} of {scale:.4g}, "
        f"{scale_name}): {'the inputs help' if passed else 'the inputs do not help'}",
        {"real": real_end, "zeroed": zero_end, "margin": margin, "scale": scale},
    )


def _zeros_like(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return torch.zeros_like(value)
    if isinstance(value, (tuple, list)):
        return type(value)(_zeros_like(v) for v in value)
    if isinstance(value, dict):
        # A mask says which inputs exist, not what they are: zeroing it would hide them all.
        return {k: v if "mask" in str(k) else _zeros_like(v) for k, v in value.items()}
    return value


def check_batch_mixing(stepper: Stepper, batches: list[Any]) -> CheckResult:
    title = "batch-mixing probe"
    inputs, targets = batches[0]
    try:
        mixed = batch_mixing_rows(
            stepper.model,
            inputs,
            targets,
            stepper.injector.prepare_batch,
            stepper.device,
            own_loss=stepper.experiment.loss_fn is None,
            key=_target_key(stepper.experiment.train_loader),
        )
    except NotTestable as exc:
        return CheckResult("batch_mixing", title, True, str(exc), skipped=True)
    if mixed is None:
        return CheckResult(
            "batch_mixing", title, True, "the gradient of output row 1 reaches input row 1 only", {"rows_mixed": 0}
        )
    row, others = mixed
    return CheckResult(
        "batch_mixing",
        title,
        False,
        f"the gradient of output row {row} reaches {others} other input row(s): examples are mixed across the batch",
        {"rows_mixed": others},
    )


CHECKS = (check_initial_loss, check_overfit_one_batch, check_input_independent, check_batch_mixing)


def run_checks(stepper: Stepper, on_result: Callable[[CheckResult], None] | None = None) -> list[CheckResult]:
    """All four checks on copies of the stepper's current state; `on_result` hears each as it ends
    (they take seconds each on a CNN: a screen shows them one by one)."""
    batches = _batches(stepper, BASELINE_BATCHES)
    results = []
    for check in CHECKS:
        try:
            result = check(stepper, batches)
        except Exception as exc:  # a check that cannot run says so and why; it neither passes nor fails
            name = check.__name__.removeprefix("check_")
            result = CheckResult(name, name.replace("_", " "), True, f"{type(exc).__name__}: {exc}", skipped=True)
        results.append(result)
        if on_result is not None:
            on_result(result)
    return results


# The checks try the model, the loss and the data on a few batches, each on a fresh copy: how the
# loop runs over many iterations is not what they test (measured: in the app, after a few hundred
# iterations, all four pass with skip_zero_grad on; from a fresh model the baseline check fails
# with it, as any training would, without naming it).
BLIND_SPOTS = (
    "What these checks do not test: they try the model, the loss and the data on a few batches, not "
    "the loop over many iterations. A skipped or misplaced zero_grad, a missing eval() before "
    "validation, the learning-rate schedule or the data's order across epochs may make one fail, "
    "as they would spoil any training, but the checks cannot name them: the Diagnostics panel "
    "watches the loop itself while it runs."
)


def blind_spots(results: list[CheckResult], active_bugs: tuple[str, ...]) -> str:
    """What to tell the reader after the results: what the checks cannot see, and, when every check
    passed with a bug on, that this bug is one of those things."""
    ran = [r for r in results if not r.skipped]
    if ran and active_bugs and all(r.passed for r in ran):
        on = ", ".join(active_bugs)
        which = "that bug is" if len(active_bugs) == 1 else "those bugs are"
        return f"Every check passed with {on} on: {which} out of their sight. {BLIND_SPOTS}"
    return BLIND_SPOTS


class NotTestable(Exception):
    """The batch-mixing probe cannot run on this batch or model (the reason is the message)."""


def batch_mixing_rows(
    model: torch.nn.Module,
    inputs: Any,
    targets: Any,
    prepare_batch: Callable[[Any, Any], tuple[Any, Any]],
    device: torch.device,
    *,
    own_loss: bool = False,
    key: str | None = None,
) -> tuple[int, int] | None:
    """Backprop out[i].sum() to the inputs on a copy in eval mode: rows other than i must get
    no gradient. Returns (i, how many other rows got gradient), or None when the rows are apart;
    raises NotTestable when the probe cannot tell. Every tensor of the inputs holding the batch on
    dim 0 is probed (a tuple's, a dict's). Token ids have no gradient: for them, the output of the
    embedding that reads them stands in. A model computing its own loss (`own_loss`) gets the
    targets as the loop gives them (`key`: a dict batch's), and its shown output is probed.

    `prepare_batch` is the loop's data pipeline (bugs included): it is what may mix the rows.
    The diagnostics run it too, whenever the loop's code changes."""
    size = _rows(inputs)
    if size is None:
        raise NotTestable("no input tensor holds the batch on its first dimension")
    if size < 2:
        raise NotTestable("the batch holds a single example")
    model = copy.deepcopy(model)
    model.eval()  # batch norm in training mode mixes rows legitimately
    probed: list[torch.Tensor] = []
    token_ids: list[torch.Tensor] = []

    def fresh(value: Any) -> Any:
        """The inputs with every batch tensor cloned: floating ones to take a gradient, token
        ids to be recognised (by identity) where an embedding reads them."""
        if isinstance(value, torch.Tensor):
            if value.dim() == 0 or value.shape[0] != size:
                return value
            clone = value.detach().clone()
            if clone.is_floating_point():
                probed.append(clone.requires_grad_(True))
            else:
                token_ids.append(clone)
            return clone
        if isinstance(value, (tuple, list)):
            return type(value)(fresh(v) for v in value)
        if isinstance(value, dict):
            # A mask says which inputs exist: it is not what the model reads about an example.
            return {k: v if "mask" in str(k) else fresh(v) for k, v in value.items()}
        return value

    x = fresh(inputs)
    handles = []
    if not probed:
        embeddings = [m for m in model.modules() if isinstance(m, torch.nn.Embedding)]
        if not embeddings:
            raise NotTestable("the inputs are not floating point and no embedding reads them")

        def keep(module: torch.nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
            reads_ids = bool(args) and any(args[0] is ids for ids in token_ids)
            if reads_ids and isinstance(output, torch.Tensor) and output.requires_grad:
                output.retain_grad()
                probed.append(output)

        handles = [m.register_forward_hook(keep) for m in embeddings]
    with forked_rng(device), torch.enable_grad():
        try:
            prepared, prepared_targets = prepare_batch(x, targets)
            if isinstance(prepared, torch.Tensor) and prepared is not x and not probed:
                token_ids.append(prepared)
            if own_loss:
                out = shown_output(call_model_with_targets(model, prepared, prepared_targets, key))
            else:
                out = primary_output(call_model(model, prepared))
            row = min(1, out.shape[0] - 1)
            out[row].sum().backward()
        except Exception as exc:  # the loop itself reports whatever fails here, at its stage
            raise NotTestable(f"the model raised {type(exc).__name__}") from exc
        finally:
            for handle in handles:
                handle.remove()
    grads = [p.grad for p in probed if p.grad is not None]
    if not grads:
        raise NotTestable("no gradient reached the inputs")
    per_row = sum(g.detach().reshape(g.shape[0], -1).abs().sum(dim=1) for g in grads)
    assert isinstance(per_row, torch.Tensor)
    others = int((per_row > 0).sum().item()) - int(per_row[row].item() > 0)
    return (row, others) if others > 0 else None


def _rows(inputs: Any) -> int | None:
    """The batch size the inputs' first tensor gives, if any."""
    if isinstance(inputs, torch.Tensor):
        return int(inputs.shape[0]) if inputs.dim() > 0 else None
    values = inputs.values() if isinstance(inputs, dict) else inputs if isinstance(inputs, (tuple, list)) else ()
    return next((n for v in values if (n := _rows(v)) is not None), None)


def _target_key(loader: Any) -> str | None:
    """The targets' key in the loader's dict batches (HuggingFace's "labels"), read without iterating."""
    from loopscope.engine.features import first_example

    example = first_example(loader)
    return target_key(example) if example is not None else None


def rows_mixed(*args: Any, **kwargs: Any) -> tuple[int, int] | None:
    """`batch_mixing_rows`, with None where it cannot tell (for the diagnostics: no finding)."""
    try:
        return batch_mixing_rows(*args, **kwargs)
    except NotTestable:
        return None
