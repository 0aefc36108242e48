"""Read tensors without changing them: statistics, gradient and update norms, forward hooks.

Probes never draw random numbers, run extra forwards or switch modes (the trajectory contract),
and each probe moves its numbers to the host in one transfer rather than one per tensor (a second
only when some tensor holds NaN or inf, to count them).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from loopscope.engine.diagnostics.context import ForwardFlow
from loopscope.shared.events import LayerStat, TensorStat
from loopscope.shared.metrics import GradPresence

# Below this size, statistics are computed in float64 from the tensor itself: exact enough even
# for raw-scale inputs (mean 1e4, std 1) where sum-of-squares in float32 would cancel badly.
_EXACT_NUMEL = 1 << 16


def short_dtype(dtype: torch.dtype) -> str:
    """`torch.float32` -> `float32`."""
    return str(dtype).removeprefix("torch.")


def _prepared(tensor: torch.Tensor) -> torch.Tensor:
    x = tensor.detach()
    if x.is_complex():
        x = x.abs()
    if not x.is_floating_point():
        x = x.to(torch.float32)
    if x.numel() <= _EXACT_NUMEL:
        x = x.to(torch.float64)
    return x.reshape(-1)


def _moments(flat: torch.Tensor) -> list[torch.Tensor]:
    """Sum, sum of squares, min and max (mean and std derive from the first two: torch.std_mean on
    large activations was ~35x slower than sum plus vector_norm)."""
    norm = torch.linalg.vector_norm(flat)
    return [flat.sum(), norm * norm, flat.amin(), flat.amax()]


def _as_row(parts: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([p.to(torch.float64) for p in parts])


def _quick_stats(tensor: torch.Tensor) -> torch.Tensor:
    """The moments and the zero count, as float64 on the tensor's device.

    The NaN and inf counts are left out: when the sum and the norm are finite there are none, and
    counting them (isfinite, isnan and two boolean sums) took over half a probe's time on a CNN.
    """
    flat = _prepared(tensor)
    return _as_row([*_moments(flat), flat.numel() - torch.count_nonzero(flat)])


def _full_stats(tensor: torch.Tensor) -> torch.Tensor:
    """All seven numbers, NaN and inf counts included: for a tensor whose quick sum was not finite."""
    flat = _prepared(tensor)
    nan_count = torch.isnan(flat).sum()
    inf_count = flat.numel() - torch.isfinite(flat).sum() - nan_count
    return _as_row([*_moments(flat), nan_count, inf_count, flat.numel() - torch.count_nonzero(flat)])


def _read(tensors: list[torch.Tensor], stats: Callable[[torch.Tensor], torch.Tensor]) -> list[list[float]]:
    """`stats` of many tensors on one device, read in one device-to-host transfer."""
    return torch.stack([stats(t) for t in tensors]).tolist()


def tensor_stats(named: Sequence[tuple[str, torch.Tensor, str | None]]) -> list[TensorStat]:
    """Statistics for many tensors: one device-to-host transfer per device, and a second only
    for the tensors that hold NaN or inf (or overflow float32), which are then counted."""
    results: list[TensorStat | None] = [None] * len(named)
    pending: dict[torch.device, list[int]] = {}
    for index, (name, tensor, module_type) in enumerate(named):
        if tensor.numel() == 0:
            results[index] = describe(name, tensor, module_type)
        else:
            pending.setdefault(tensor.device, []).append(index)
    for indices in pending.values():
        rows = {}
        for index, (total, sum_sq, low, high, zeros) in zip(
            indices, _read([named[i][1] for i in indices], _quick_stats)
        ):
            if math.isfinite(total) and math.isfinite(sum_sq):
                rows[index] = [total, sum_sq, low, high, 0.0, 0.0, zeros]
        unsure = [i for i in indices if i not in rows]
        if unsure:
            rows.update(zip(unsure, _read([named[i][1] for i in unsure], _full_stats)))
        for index in indices:
            name, tensor, module_type = named[index]
            results[index] = _from_row(name, tensor, module_type, rows[index])
    return [r for r in results if r is not None]


def describe(name: str, tensor: torch.Tensor, module_type: str | None) -> TensorStat:
    """Name, shape, dtype and device, no statistics: what every unprobed stage reports."""
    return _described(name, tensor.shape, tensor.dtype, tensor.device, module_type)


@functools.lru_cache(maxsize=1024)
def _described(
    name: str, shape: torch.Size, dtype: torch.dtype, device: torch.device, module_type: str | None
) -> TensorStat:
    # The same few descriptions repeat every iteration: one immutable copy of each serves them all.
    return TensorStat(
        name=name, shape=tuple(shape), dtype=short_dtype(dtype), device=str(device), module_type=module_type
    )


def _from_row(name: str, tensor: torch.Tensor, module_type: str | None, row: list[float]) -> TensorStat:
    total, sum_sq, low, high, nans, infs, zeros = row
    n = tensor.numel()
    finite = nans == 0 and infs == 0
    mean = std = None
    if finite:
        mean = total / n
        variance = max(sum_sq / n - mean * mean, 0.0)
        std = math.sqrt(variance * n / (n - 1)) if n > 1 else 0.0
    return TensorStat(
        name=name,
        shape=tuple(tensor.shape),
        dtype=short_dtype(tensor.dtype),
        device=str(tensor.device),
        mean=mean,
        std=std,
        min=low,
        max=high,
        nan_count=int(nans),
        inf_count=int(infs),
        zero_fraction=zeros / n,
        module_type=module_type,
    )


def flatten_tensors(prefix: str, value: Any) -> list[tuple[str, torch.Tensor]]:
    """Every tensor inside a tensor, tuple/list or dict, named `prefix[0]`, `prefix.key`."""
    if isinstance(value, torch.Tensor):
        return [(prefix, value)]
    found: list[tuple[str, torch.Tensor]] = []
    if isinstance(value, (tuple, list)):
        for i, item in enumerate(value):
            found.extend(flatten_tensors(f"{prefix}[{i}]", item))
    elif isinstance(value, dict):
        for key, item in value.items():
            found.extend(flatten_tensors(f"{prefix}.{key}", item))
    return found


def tensor_norms(tensors: Sequence[torch.Tensor]) -> list[float]:
    """L2 norm of each tensor, read in one transfer (`_foreach_norm` batches the kernels)."""
    return _read_norms(_norm_tensors(tensors)) if tensors else []


def _norm_tensors(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    try:
        return list(torch._foreach_norm(list(tensors)))
    except (RuntimeError, TypeError):  # sparse or unusual layouts: fall back to one at a time
        return [torch.linalg.vector_norm(t.detach().to_dense().float()) for t in tensors]


def _read_norms(norms: Sequence[torch.Tensor]) -> list[float]:
    """Norms on any devices, to the host in one transfer per device."""
    by_device: dict[torch.device, list[int]] = {}
    for i, norm in enumerate(norms):
        by_device.setdefault(norm.device, []).append(i)
    values = [0.0] * len(norms)
    for indices in by_device.values():
        read = torch.stack([norms[i].to(torch.float64) for i in indices]).tolist()
        for i, value in zip(indices, read):
            values[i] = value
    return values


def global_norm(norms: Iterable[float]) -> float:
    """The norm of all gradients together, from the per-tensor norms."""
    return math.sqrt(sum(n * n for n in norms))


def grad_layers(
    named_params: Sequence[tuple[str, nn.Parameter]], scale: float = 1.0
) -> tuple[list[LayerStat], float | None, int]:
    """Per-parameter gradient norms, the global norm and how many gradients are not finite.
    Gradients still multiplied by a GradScaler's `scale` are reported divided by it: true values."""
    with_grad = [(name, p) for name, p in named_params if p.grad is not None]
    norms = dict(
        zip(
            (name for name, _ in with_grad),
            (n / scale for n in tensor_norms([p.grad for _, p in with_grad if p.grad is not None])),
        )
    )
    layers = [
        LayerStat(name=name, shape=tuple(p.shape), trainable=p.requires_grad, grad_norm=norms.get(name))
        for name, p in named_params
    ]
    finite = [n for n in norms.values() if math.isfinite(n)]
    nonfinite = len(norms) - len(finite)
    total = None if not norms else (global_norm(norms.values()) if not nonfinite else math.nan)
    return layers, total, nonfinite


def grad_presence(params: Sequence[nn.Parameter]) -> GradPresence:
    """How many gradients are None, all zero, or hold values (stale, if before backward)."""
    grads = [p.grad for p in params if p.grad is not None]
    norms = tensor_norms(grads)
    return {
        "none": len(params) - len(grads),
        "zero": sum(1 for n in norms if n == 0.0),
        "nonzero": sum(1 for n in norms if n != 0.0),
        "norm": global_norm(norms) if norms else 0.0,
    }


class UpdateMeter:
    """Update norm and update/weight ratio per parameter over one optimizer step.

    The parameters are copied, before the step, into buffers kept from one probe to the next (on
    the CPU): fresh copies each probe meant fresh memory, whose page faults cost more than the copy.
    """

    def __init__(self) -> None:
        self._buffers: list[torch.Tensor] = []

    def before_step(self, params: Sequence[torch.Tensor]) -> None:
        params = [p.detach() for p in params]
        if not params:  # everything frozen: the foreach kernels refuse an empty list
            self._buffers = []
            return
        if not self._fit(params):
            self._buffers = [torch.empty_like(p) for p in params]
        try:
            torch._foreach_copy_(self._buffers, params)
        except (RuntimeError, TypeError, AttributeError):  # unusual layouts, or a torch without it
            self._buffers = [p.clone() for p in params]

    def _fit(self, params: Sequence[torch.Tensor]) -> bool:
        return len(params) == len(self._buffers) and all(
            b.shape == p.shape and b.dtype == p.dtype and b.device == p.device and b.stride() == p.stride()
            for b, p in zip(self._buffers, params)
        )

    def layers(
        self, named_params: Sequence[tuple[str, nn.Parameter]], grad_norms: dict[str, float | None]
    ) -> list[LayerStat]:
        """After the step: one LayerStat per parameter, read in one transfer."""
        before = self._buffers
        if not before:
            return []
        weight_norms = _norm_tensors(before)
        torch._foreach_sub_(before, [p.detach() for _, p in named_params])  # the update, negated
        norms = _read_norms(weight_norms + _norm_tensors(before))
        weights, updates = norms[: len(before)], norms[len(before) :]
        if any(b.is_cuda for b in before):
            # CUDA's caching allocator reuses memory without faults, and a copy of the model kept
            # between probes would show in the screen's "memory allocated" as if the loop used it.
            self._buffers = []
        layers = []
        for (name, p), update, weight in zip(named_params, updates, weights):
            # cs231n: the update/weight ratio should be around 1e-3 per parameter tensor.
            ratio = update / weight if weight > 0 else None  # a zero tensor (a fresh bias) has no scale yet
            layers.append(
                LayerStat(
                    name=name,
                    shape=tuple(p.shape),
                    trainable=p.requires_grad,
                    grad_norm=grad_norms.get(name),
                    weight_norm=weight,
                    update_norm=update,
                    update_ratio=ratio,
                )
            )
        return layers


MAX_PROBED_MODULES = 48  # module calls kept per probed forward (a big model shows its first ones)
MAX_PROBED_TENSORS = 64


class ForwardRecorder:
    """Forward hooks on every leaf module, kept only while one forward stage is probed."""

    def __init__(self, model: nn.Module) -> None:
        self._model = model
        self._handles: list[Any] = []
        # Module outputs by call label, in call order. A module called many times in one forward
        # (an RNN cell unrolled in Python) keeps its first and its latest call (`name`, `name#N`):
        # a probe stays a few dozen tensors, a trace line a few KB.
        self._entries: dict[str, list[tuple[str, torch.Tensor, str | None]]] = {}
        self._calls: dict[str, int] = {}
        self._running: list[str] = []  # leaf modules entered and not yet returned
        # The data flow between modules, by identity: module outputs seen so far (kept alive, so
        # an id is not reused), which module's output each module was given, and for dropout the
        # zeros already in its input. Real models call activations as functions (F.relu), so the
        # order modules run in says nothing about what feeds what.
        self._produced: dict[int, tuple[str, torch.Tensor]] = {}
        self.fed_by: dict[str, str | None] = {}
        self._input_nonzeros: dict[str, tuple[torch.Tensor, int]] = {}

    def __enter__(self) -> ForwardRecorder:
        for name, module in self._model.named_modules():
            if name and not any(True for _ in module.children()):
                label = f"{name} ({type(module).__name__})"
                self._handles.append(
                    module.register_forward_pre_hook(lambda m, a, label=label: self._running.append(label))
                )
                self._handles.append(module.register_forward_hook(self._hook_for(name)))
        return self

    @property
    def outputs(self) -> list[tuple[str, torch.Tensor, str | None]]:
        return [entry for entries in self._entries.values() for entry in entries][:MAX_PROBED_TENSORS]

    def failing_module(self) -> str | None:
        """After an exception in the forward pass: the leaf module that was running, if any."""
        return self._running[-1] if self._running else None

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._produced.clear()

    def flow(self) -> ForwardFlow:
        """Which module fed which, and the zeros dropout layers were given (one host sync)."""
        zeros = {
            label: 1.0 - float(nonzero) / total for label, (nonzero, total) in self._input_nonzeros.items() if total
        }
        return ForwardFlow(dict(self.fed_by), zeros)

    def _hook_for(self, name: str):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if self._running:
                self._running.pop()
            # A module called twice in one forward (shared weights) gets `name#2`.
            count = self._calls[name] = self._calls.get(name, 0) + 1
            label = name if count == 1 else f"{name}#{count}"
            source = next((a for a in args if isinstance(a, torch.Tensor)), None)
            producer = self._produced.get(id(source)) if source is not None else None
            self.fed_by[label] = producer[0] if producer is not None and producer[1] is source else None
            if isinstance(module, nn.modules.dropout._DropoutNd) and source is not None:
                self._input_nonzeros[label] = (source.detach().count_nonzero(), source.numel())
            if count > 2:
                self._entries.pop(f"{name}#{count - 1}", None)  # the middle calls are not kept
            tensors = flatten_tensors(label, output)
            if len(self._entries) < MAX_PROBED_MODULES or count > 1:
                self._entries[label] = [(n, t.detach(), type(module).__name__) for n, t in tensors]
            for tensor_name, tensor in tensors:
                self._produced[id(tensor)] = (tensor_name, tensor)

        return hook
