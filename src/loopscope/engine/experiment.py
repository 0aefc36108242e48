"""What an experiment is (model, data, loss, optimizer, loop options) and how one is loaded."""

from __future__ import annotations

import importlib
import importlib.util
import os
import random
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loopscope.shared.catalog import SCENARIOS
from loopscope.shared.errors import UserError, user_frame

if TYPE_CHECKING:
    import torch


@dataclass
class Experiment:
    """A training setup loopscope can step through.

    A batch from a loader is `(inputs, targets)` or a dict (see `split_batch`); inputs may be a
    tensor, a tuple (passed as `*args`) or a dict (passed as `**kwargs`).
    """

    model: torch.nn.Module
    # None: the model computes its own loss (it gets the targets too; DESIGN.md §9).
    loss_fn: Callable[..., torch.Tensor] | None
    optimizer: torch.optim.Optimizer
    train_loader: Iterable[Any]
    val_loader: Iterable[Any] | None = None
    epochs: int = 1
    name: str = "experiment"
    # "binary" | "classification" | "regression"; None lets validation infer accuracy from shapes.
    task: str | None = None
    # The careful loop's optional stages; each shows as its own stage when enabled.
    clip_grad_norm: float | None = None
    scheduler: Any = None
    scheduler_interval: str = "epoch"  # "epoch" or "iteration"
    validate_every: int | None = None  # iterations; None validates at the end of each epoch
    checkpoint: bool | str = False  # True keeps the best state in memory; a str is a file path
    early_stopping_patience: int | None = None
    # Gradients of this many micro-batches summed into one optimizer step (DESIGN.md §9): the loss
    # is divided by it, zero_grad() and step() run once per `accumulation` batches.
    accumulation: int = 1
    # "bf16": the forward pass and the loss under torch.autocast in bfloat16; "fp16": in float16,
    # with a GradScaler scaling the loss for backward and stepping the optimizer (DESIGN.md §9).
    amp: str | None = None
    notes: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        import torch

        problems = []
        if not isinstance(self.model, torch.nn.Module):
            problems.append(f"model must be a torch.nn.Module, got {type(self.model).__name__}")
        if self.loss_fn is not None and not callable(self.loss_fn):
            problems.append(f"loss_fn must be callable, got {type(self.loss_fn).__name__}")
        if isinstance(self.optimizer, (list, tuple)) and all(
            isinstance(o, torch.optim.Optimizer) for o in self.optimizer
        ):
            problems.append(
                f"{len(self.optimizer)} optimizers (a GAN, say): factory mode steps one; a loop with several "
                "optimizers needs script mode (your own training script, run as written)"
            )
        elif not isinstance(self.optimizer, torch.optim.Optimizer):
            problems.append(f"optimizer must be a torch.optim.Optimizer, got {type(self.optimizer).__name__}")
        elif steps_with_closure(self.optimizer):
            problems.append(
                f"{type(self.optimizer).__name__}.step() needs a closure that recomputes the loss: factory mode "
                "cannot step it; use script mode (your own training script, run as written)"
            )
        if not hasattr(self.train_loader, "__iter__"):
            problems.append(f"train_loader must be iterable, got {type(self.train_loader).__name__}")
        if self.val_loader is not None and not hasattr(self.val_loader, "__iter__"):
            problems.append(f"val_loader must be iterable, got {type(self.val_loader).__name__}")
        if self.clip_grad_norm is not None and not (
            isinstance(self.clip_grad_norm, (int, float)) and self.clip_grad_norm > 0
        ):
            problems.append(f"clip_grad_norm must be a number above 0, got {self.clip_grad_norm!r}")
        if self.early_stopping_patience is not None and (
            not isinstance(self.early_stopping_patience, int) or self.early_stopping_patience < 1
        ):
            problems.append(
                f"early_stopping_patience must be a whole number >= 1, got {self.early_stopping_patience!r}"
            )
        if not isinstance(self.epochs, int) or self.epochs < 1:
            problems.append(f"epochs must be a whole number >= 1, got {self.epochs!r}")
        if self.scheduler_interval not in ("epoch", "iteration"):
            problems.append(f"scheduler_interval must be 'epoch' or 'iteration', got {self.scheduler_interval!r}")
        if self.validate_every is not None and (not isinstance(self.validate_every, int) or self.validate_every < 1):
            problems.append(f"validate_every must be a whole number >= 1, got {self.validate_every!r}")
        if (self.checkpoint or self.early_stopping_patience) and self.val_loader is None:
            problems.append("checkpoint and early stopping need a val_loader (they judge by validation loss)")
        if not isinstance(self.accumulation, int) or isinstance(self.accumulation, bool) or self.accumulation < 1:
            problems.append(f"accumulation must be a whole number >= 1, got {self.accumulation!r}")
        if self.amp not in (None, "bf16", "fp16"):
            problems.append(f"amp must be None, 'bf16' or 'fp16', got {self.amp!r}")
        if self.task not in (None, "binary", "classification", "regression"):
            problems.append(f"task must be 'binary', 'classification' or 'regression', got {self.task!r}")
        if problems:
            raise UserError("invalid Experiment: " + "; ".join(problems))


def steps_with_closure(optimizer: Any) -> bool:
    """True for optimizers whose step() cannot run without a closure (LBFGS)."""
    import inspect

    closure = inspect.signature(optimizer.step).parameters.get("closure")
    return closure is not None and closure.default is inspect.Parameter.empty


def seed_everything(seed: int) -> None:
    """Seed every global RNG a training script may draw from, once, before the factory runs."""
    import numpy as np
    import torch

    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def load_experiment(target: str, seed: int) -> Experiment:
    """Seed, then build the experiment named by `target`: a scenario, a .py file or `module:factory`."""
    seed_everything(seed)  # before the user's file is imported: its module-level draws are seeded too
    factory, origin = resolve_factory(target)
    try:
        experiment = factory()
    except UserError:
        raise
    except Exception as exc:  # the user's factory failing is a user error, shown in one line
        raise UserError(f"{origin} raised {type(exc).__name__}: {exc}{_where(exc)}") from exc
    if not isinstance(experiment, Experiment):
        raise UserError(f"{origin} must return a loopscope.Experiment, got {type(experiment).__name__}")
    if experiment.name == "experiment":
        experiment.name = target
    return experiment


def resolve_factory(target: str) -> tuple[Callable[[], Any], str]:
    """Find the callable that builds the experiment; every failure is a one-line UserError."""
    if target in SCENARIOS:
        module_name, func_name = SCENARIOS[target].factory.split(":")
        return getattr(importlib.import_module(module_name), func_name), f"scenario {target!r}"
    if target.endswith(".py") or os.sep in target or Path(target).is_file():
        return _factory_from_file(Path(target), target)
    if ":" in target:
        return _factory_from_module(target)
    raise UserError(_unknown_target(target))


def check_target(target: str) -> None:
    """Reject what can be judged without importing anything: unknown names, missing files."""
    if target in SCENARIOS:
        return
    if target.endswith(".py") or os.sep in target or Path(target).is_file():
        if not Path(target).is_file():
            raise UserError(f"no such file: {target}")
        return
    if ":" in target:
        module_name, _, func_name = target.partition(":")
        if not module_name or not func_name:
            raise UserError(f"bad target {target!r}: expected package.module:factory")
        return
    raise UserError(_unknown_target(target))


def _unknown_target(target: str) -> str:
    import difflib

    known = ", ".join(SCENARIOS)
    close = difflib.get_close_matches(target, [*SCENARIOS, "run", "trace", "scenarios", "check", "bugs"], n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return (
        f"unknown target {target!r}{hint}: expected a scenario ({known}), a file.py defining "
        "experiment(), or package.module:factory"
    )


def _factory_from_file(path: Path, as_given: str) -> tuple[Callable[[], Any], str]:
    if not path.is_file():
        raise UserError(f"no such file: {as_given}")
    module_name = f"loopscope_user_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise UserError(f"cannot load {path} as Python")
    module = importlib.util.module_from_spec(spec)
    # The user's file may import its neighbours, as it would when run as a script.
    sys.path.insert(0, str(path.resolve().parent))
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except SyntaxError as exc:
        raise UserError(f"{path}:{exc.lineno}: SyntaxError: {exc.msg}") from exc
    except Exception as exc:
        raise UserError(f"importing {path} raised {type(exc).__name__}: {exc}{_where(exc)}") from exc
    factory = getattr(module, "experiment", None)
    if factory is None:
        raise UserError(f"{path} defines no experiment() function")
    if not callable(factory):
        raise UserError(f"{path}: experiment must be a function returning a loopscope.Experiment")
    return factory, f"{path}:experiment()"


def _factory_from_module(target: str) -> tuple[Callable[[], Any], str]:
    module_name, _, func_name = target.partition(":")
    if not module_name or not func_name:
        raise UserError(f"bad target {target!r}: expected package.module:factory")
    # As `python -m` does: modules in the current folder are importable.
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise UserError(f"cannot import {module_name!r}: {exc}") from exc
    except SyntaxError as exc:
        raise UserError(f"{exc.filename}:{exc.lineno}: SyntaxError: {exc.msg}") from exc
    except Exception as exc:
        raise UserError(f"importing {module_name} raised {type(exc).__name__}: {exc}{_where(exc)}") from exc
    factory = getattr(module, func_name, None)
    if factory is None or not callable(factory):
        raise UserError(f"{module_name} has no function {func_name}()")
    return factory, f"{target}()"


def _where(exc: BaseException) -> str:
    """` (file.py:12 in f)` for the innermost frame of the user's code, or nothing."""
    location = user_frame(exc)
    return f" ({location})" if location else ""
