"""Torch's training calls, intercepted while a script runs.

Where torch has a global hook it is used (optimizer steps); elsewhere the call is wrapped
(module calls, zero_grad, backward, clipping, schedulers, DataLoader iterators, functional losses,
torch.save). Each
interception tells a `Listener` what happened, in the script's own thread: the listener may block
there (pausing the script). Calls from any other thread (loopscope's own sanity checks on copies,
run while the script is paused) pass straight through. The wrappers read and never write: the script computes what it
computes without loopscope, bitwise. Everything is undone when the `Interception` closes.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim import optimizer as optimizer_module
from torch.optim.lr_scheduler import LRScheduler
from torch.utils.data import dataloader

# torch.nn.functional's losses: called at the top level of a script, each is a `loss` stage.
FUNCTIONAL_LOSSES = (
    "cross_entropy",
    "nll_loss",
    "binary_cross_entropy",
    "binary_cross_entropy_with_logits",
    "mse_loss",
    "l1_loss",
    "smooth_l1_loss",
    "huber_loss",
    "kl_div",
)


class Listener(Protocol):
    """What the script driver is told, in the script's thread."""

    def batch_loaded(self, loader: Any, batch: Any) -> None: ...
    def zero_grad(self, owner: Any, call: Callable[[], None]) -> None: ...
    def forward_started(self, module: nn.Module) -> None: ...
    def forward_done(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any: ...
    def loss_computed(self, name: str, output: Any, target: Any, loss: Any, loss_fn: Any = None) -> None: ...
    def backward(self, tensor: torch.Tensor, call: Callable[[], None]) -> None: ...
    def clipped(self, max_norm: float, total: Any, call_parameters: Any) -> None: ...
    def step_started(self, optimizer: torch.optim.Optimizer) -> None: ...
    def step_done(self, optimizer: torch.optim.Optimizer) -> None: ...
    def scheduler_stepped(self, scheduler: Any, call: Callable[[], None]) -> None: ...
    def scaled(self, scaler: Any, output: Any) -> None: ...
    def scaler_step(self, scaler: Any, optimizer: Any, call: Callable[[], Any]) -> Any: ...
    def unscaled(self, optimizer: Any, call: Callable[[], None]) -> None: ...
    def saved(self, obj: Any, where: Any, call: Callable[[], None]) -> None: ...
    def optimizer_created(self, optimizer: torch.optim.Optimizer) -> None: ...


class Interception:
    """Installs every interception on entry and removes it on exit. Only the outermost module call
    (the model, a loss module) is a stage: `depth` is 1 while one runs.

    Module calls are seen through `nn.Module.__call__`, not torch's global forward hooks: any global
    hook sends every submodule call of every model down torch's slow path with the hooks called
    (measured +6% on a 4-layer transformer), while a call inside the outermost one costs this
    wrapper one check (+0.7%). Nothing is stored on the user's modules, so deepcopy and pickling
    them is unaffected."""

    def __init__(self, listener: Listener) -> None:
        self.listener = listener
        self.depth = 0
        self._in_scheduler = False
        self._stack = ExitStack()
        self._script_thread = threading.get_ident()

    def _elsewhere(self) -> bool:
        """The call comes from another thread than the script's: not the script's training."""
        return threading.get_ident() != self._script_thread

    def __enter__(self) -> Interception:
        self._script_thread = threading.get_ident()
        stack = self._stack
        stack.enter_context(_patched(torch.optim.Optimizer, "zero_grad", self._zero_grad))
        stack.enter_context(_patched(nn.Module, "zero_grad", self._zero_grad))
        stack.enter_context(_patched(torch.Tensor, "backward", self._tensor_backward))
        stack.enter_context(_patched(dataloader._BaseDataLoaderIter, "__next__", self._next_batch))
        for scheduler_class in _own_steps(LRScheduler):  # ReduceLROnPlateau, SequentialLR, ... step their own way
            stack.enter_context(_patched(scheduler_class, "step", self._scheduler_step))
        for module in (torch.nn.utils, torch.nn.utils.clip_grad):
            stack.enter_context(_patched(module, "clip_grad_norm_", self._clip))
        for name in FUNCTIONAL_LOSSES:
            stack.enter_context(_patched(F, name, self._functional_loss(name)))
        stack.enter_context(_patched(torch.amp.GradScaler, "scale", self._scale))
        stack.enter_context(_patched(torch.amp.GradScaler, "step", self._scaler_step))
        stack.enter_context(_patched(torch.amp.GradScaler, "unscale_", self._unscale))
        stack.enter_context(_patched(torch, "save", self._save))
        stack.enter_context(_patched(torch.optim.Optimizer, "__init__", self._optimizer_init))
        stack.enter_context(_patched_module_call(self))
        handles = [
            optimizer_module.register_optimizer_step_pre_hook(self._step_pre),
            optimizer_module.register_optimizer_step_post_hook(self._step_post),
        ]
        for handle in handles:
            stack.callback(handle.remove)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    # ----- the interceptions ----------------------------------------------------------------
    def _zero_grad(self, original: Callable[..., Any], owner: Any, *args: Any, **kwargs: Any) -> Any:
        if self.depth or self._elsewhere():  # a model's own zero_grad of its submodules: part of the outer call
            return original(owner, *args, **kwargs)
        return _through(functools.partial(self.listener.zero_grad, owner), original, owner, *args, **kwargs)

    def _tensor_backward(self, original: Callable[..., Any], tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if self._elsewhere():
            return original(tensor, *args, **kwargs)
        self.listener.backward(tensor, lambda: original(tensor, *args, **kwargs))

    def _next_batch(self, original: Callable[..., Any], iterator: Any) -> Any:
        batch = original(iterator)  # StopIteration passes through: the epoch's end
        if not self._elsewhere():
            self.listener.batch_loaded(iterator, batch)
        return batch

    def _scheduler_step(self, original: Callable[..., Any], scheduler: Any, *args: Any, **kwargs: Any) -> Any:
        # _step_count 0: the call its own __init__ makes; a scheduler inside another (SequentialLR's):
        # part of the outer one's stage.
        if getattr(scheduler, "_step_count", None) == 0 or self._elsewhere() or self._in_scheduler:
            return original(scheduler, *args, **kwargs)
        self._in_scheduler = True
        try:
            return _through(
                functools.partial(self.listener.scheduler_stepped, scheduler), original, scheduler, *args, **kwargs
            )
        finally:
            self._in_scheduler = False

    def _clip(self, original: Callable[..., Any], parameters: Any, max_norm: float, *args: Any, **kwargs: Any) -> Any:
        if isinstance(parameters, torch.Tensor):
            parameters = [parameters]
        parameters = list(parameters)  # a generator can be read once: the call and the probe share it
        total = original(parameters, max_norm, *args, **kwargs)
        if not self.depth and not self._elsewhere():
            self.listener.clipped(max_norm, total, parameters)
        return total

    def _functional_loss(self, name: str) -> Callable[..., Any]:
        def loss(original: Callable[..., Any], output: Any, target: Any, *args: Any, **kwargs: Any) -> Any:
            value = original(output, target, *args, **kwargs)
            if (
                not self.depth and not self._elsewhere()
            ):  # inside a loss module (or a model computing its own loss) it is theirs
                # The call as a loss_fn(output, target) the sanity checks can replay (keywords kept).
                replay = None if args else functools.partial(original, **kwargs)
                self.listener.loss_computed(name, output, target, value, replay)
            return value

        return loss

    def _scale(self, original: Callable[..., Any], scaler: Any, outputs: Any) -> Any:
        scaled = original(scaler, outputs)
        if not self._elsewhere():
            self.listener.scaled(scaler, scaled)
        return scaled

    def _scaler_step(self, original: Callable[..., Any], scaler: Any, optimizer: Any, *args: Any, **kwargs: Any) -> Any:
        if self._elsewhere():
            return original(scaler, optimizer, *args, **kwargs)
        return self.listener.scaler_step(scaler, optimizer, lambda: original(scaler, optimizer, *args, **kwargs))

    def _unscale(self, original: Callable[..., Any], scaler: Any, optimizer: Any) -> Any:
        if self._elsewhere():
            return original(scaler, optimizer)
        return _through(functools.partial(self.listener.unscaled, optimizer), original, scaler, optimizer)

    def _optimizer_init(self, original: Callable[..., Any], optimizer: Any, *args: Any, **kwargs: Any) -> None:
        original(optimizer, *args, **kwargs)
        if not self._elsewhere():
            self.listener.optimizer_created(optimizer)

    def _save(self, original: Callable[..., Any], obj: Any, f: Any, *args: Any, **kwargs: Any) -> Any:
        if self.depth or self._elsewhere():
            return original(obj, f, *args, **kwargs)
        return _through(functools.partial(self.listener.saved, obj, f), original, obj, f, *args, **kwargs)

    def _module_call(self, original: Callable[..., Any], module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        """An outermost module call from the script's thread (see _patched_module_call)."""
        if self._elsewhere():
            return original(module, *args, **kwargs)
        self.listener.forward_started(module)
        self.depth = 1
        try:
            output = original(module, *args, **kwargs)
        finally:
            self.depth = 0
        if output is None:
            return output
        replaced = self.listener.forward_done(module, args, kwargs, output)
        return output if replaced is None else replaced

    def _step_pre(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if not self._elsewhere():
            self.listener.step_started(optimizer)

    def _step_post(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if not self._elsewhere():
            self.listener.step_done(optimizer)


def _own_steps(base: type) -> list[type]:
    """`base` and every subclass of it that defines its own `step`."""
    found: list[type] = [base]
    pending: list[type] = list(base.__subclasses__())
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        if "step" in cls.__dict__:
            found.append(cls)
    return found


@contextmanager
def _patched_module_call(interception: Interception) -> Iterator[None]:
    """`nn.Module.__call__` wrapped: a call inside another module's call goes straight to torch's
    own (its fast path intact); an outermost one to the interception's `_module_call`."""
    original = nn.Module.__call__
    outermost = interception._module_call

    @functools.wraps(original)
    def call(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        if interception.depth:
            return original(module, *args, **kwargs)
        return outermost(original, module, *args, **kwargs)

    nn.Module.__call__ = call  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.__call__ = original  # type: ignore[method-assign]


@contextmanager
def _patched(owner: Any, name: str, wrapper: Callable[..., Any]) -> Iterator[None]:
    """`owner.name` replaced by a function calling `wrapper(original, *args)`, restored on exit."""
    original = owner.__dict__.get(name, getattr(owner, name))

    @functools.wraps(original)
    def replacement(*args: Any, **kwargs: Any) -> Any:
        return wrapper(original, *args, **kwargs)

    setattr(owner, name, replacement)
    try:
        yield
    finally:
        setattr(owner, name, original)


def _through(
    report: Callable[[Callable[[], None]], None], original: Callable[..., Any], *args: Any, **kwargs: Any
) -> Any:
    """Let the listener make the call (it may skip it, under a bug) and return what it returned."""
    result: list[Any] = [None]

    def call() -> None:
        result[0] = original(*args, **kwargs)

    report(call)
    return result[0]
