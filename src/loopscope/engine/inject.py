"""Active bugs: what each one changes in the loop, applied from the next stage on.

A bug changes exactly what its catalog entry says and nothing else; with no bug active every
function here is the identity, so the clean trajectory is untouched. Nothing here draws from the
global random generators.
"""

from __future__ import annotations

from collections.abc import Iterable, Sized
from typing import Any, cast

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset
from torch.utils.data.distributed import DistributedSampler

from loopscope.engine.batches import split_batch
from loopscope.shared.bugs import BUGS_BY_ID, requirement_text, unknown_bug_message
from loopscope.shared.errors import UserError

LR_TOO_HIGH, LR_TOO_LOW = 100.0, 1e-3
DEAD_RELU_BIAS = -5.0
EXPLODING_INIT_SCALE = 10.0
DROPOUT_TOO_HIGH = 0.8
RAW_SCALE, RAW_OFFSET = 100.0, 50.0


class BugInjector:
    """Holds the active bug ids and applies their effects to the stepper's model and data."""

    def __init__(self, experiment: Any, applicable: list[str]) -> None:
        self.experiment = experiment
        self.applicable = applicable
        self.active: set[str] = set()
        self._ids: tuple[str, ...] = ()  # every stage event carries them: sorted once per switch
        self._saved_dropout: dict[nn.Module, float] = {}
        self._saved_activations: list[tuple[nn.Module, str, nn.Module]] = []
        self._clean_train_loader = experiment.train_loader
        self._label_weights: dict[tuple[int, ...], torch.Tensor] = {}
        self._saved_lrs: dict[str, list[float]] = {}
        self._buggy_lrs: dict[str, list[float]] = {}

    # ----- switching --------------------------------------------------------------------
    def set(self, bug_id: str, on: bool) -> bool:
        """Turn a bug on or off; returns whether anything changed."""
        if bug_id not in BUGS_BY_ID:
            raise UserError(unknown_bug_message(bug_id))
        if bug_id not in self.applicable:
            raise UserError(
                f"bug {bug_id!r} does not apply to this experiment: it needs "
                f"{requirement_text(BUGS_BY_ID[bug_id])}; the bugs that apply here: {', '.join(self.applicable)}"
            )
        if on == (bug_id in self.active):
            return False
        (self.active.add if on else self.active.discard)(bug_id)
        self._ids = tuple(sorted(self.active))
        handler = getattr(self, f"_switch_{bug_id}", None)
        if handler is not None:
            handler(on)
        return True

    def __contains__(self, bug_id: str) -> bool:
        return bug_id in self.active

    def ids(self) -> tuple[str, ...]:
        return self._ids

    def adopt(self, active: Iterable[str]) -> None:
        """These bugs on, without switching them (a copy that already carries their effects)."""
        self.active = set(active)
        self._ids = tuple(sorted(self.active))

    # ----- effects applied when a bug is switched --------------------------------------
    def _scale_lr(self, bug_id: str, factor: float, on: bool) -> None:
        """Multiply every learning rate; switching off restores the exact values if nothing else
        (a scheduler) changed them meanwhile, else divides."""
        groups = self.experiment.optimizer.param_groups
        scheduler = self.experiment.scheduler
        if on:
            self._saved_lrs[bug_id] = [group["lr"] for group in groups]
            for group in groups:
                group["lr"] = group["lr"] * factor
            self._buggy_lrs[bug_id] = [group["lr"] for group in groups]
        else:
            saved, buggy = self._saved_lrs.pop(bug_id, None), self._buggy_lrs.pop(bug_id, None)
            untouched = buggy == [group["lr"] for group in groups]
            for i, group in enumerate(groups):
                group["lr"] = saved[i] if untouched and saved else group["lr"] / factor
        if scheduler is not None and hasattr(scheduler, "base_lrs"):
            scheduler.base_lrs = [lr * factor if on else lr / factor for lr in scheduler.base_lrs]

    def _switch_lr_too_high(self, on: bool) -> None:
        self._scale_lr("lr_too_high", LR_TOO_HIGH, on)

    def _switch_lr_too_low(self, on: bool) -> None:
        self._scale_lr("lr_too_low", LR_TOO_LOW, on)

    def _hidden_layers(self) -> list[nn.Linear | nn.modules.conv._ConvNd]:
        layers = [m for m in self.experiment.model.modules() if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))]
        return layers[:-1]  # every layer but the output layer

    # Initialisation bugs act once, when switched on: turning them off cannot un-initialise.
    def _switch_dead_relu_init(self, on: bool) -> None:
        if on:
            with torch.no_grad():
                for layer in self._hidden_layers():
                    if layer.bias is not None:
                        layer.bias.fill_(DEAD_RELU_BIAS)

    def _switch_exploding_init(self, on: bool) -> None:
        if on:
            with torch.no_grad():
                for module in self.experiment.model.modules():
                    if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):
                        module.weight.mul_(EXPLODING_INIT_SCALE)

    def _switch_zero_init(self, on: bool) -> None:
        if on:
            with torch.no_grad():
                for module in self.experiment.model.modules():
                    if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):
                        module.weight.zero_()
                        if module.bias is not None:
                            module.bias.zero_()

    def _switch_missing_activation(self, on: bool) -> None:
        if on:
            for parent in self.experiment.model.modules():
                for name, child in list(parent.named_children()):
                    if isinstance(child, nn.ReLU):
                        self._saved_activations.append((parent, name, child))
                        setattr(parent, name, nn.Identity())
        else:
            for parent, name, child in self._saved_activations:
                setattr(parent, name, child)
            self._saved_activations.clear()

    def _switch_dropout_too_high(self, on: bool) -> None:
        for module in self.experiment.model.modules():
            if isinstance(module, nn.modules.dropout._DropoutNd):
                if on:
                    self._saved_dropout[module] = module.p
                    module.p = DROPOUT_TOO_HIGH
                elif module in self._saved_dropout:
                    module.p = self._saved_dropout.pop(module)

    def _switch_no_shuffle_sorted_data(self, on: bool) -> None:
        # Takes effect when the next epoch creates its iterator, as a changed DataLoader would.
        self.experiment.train_loader = sorted_loader(self._clean_train_loader) if on else self._clean_train_loader

    def _switch_batchnorm_not_synced(self, on: bool) -> None:
        # The layers --nproc converted to SyncBatchNorm: each rank's own statistics again.
        for module in self.experiment.model.modules():
            if hasattr(module, "per_rank_statistics"):
                module.per_rank_statistics = on

    def _switch_train_in_eval_mode(self, on: bool) -> None:
        if not on:
            self.experiment.model.train()

    # ----- effects applied inside the stages -------------------------------------------
    def prepare_batch(self, inputs: Any, targets: Any) -> tuple[Any, Any]:
        """The data pipeline's bugs, for training and validation batches alike."""
        if not self.active or not isinstance(inputs, torch.Tensor):
            return inputs, targets
        if "view_instead_of_permute" in self.active:
            # The batch arrives features-first; view() regroups memory instead of moving the axis.
            features_first = inputs.movedim(0, -1).contiguous()
            inputs = features_first.view(inputs.shape)
        if "unnormalized_inputs" in self.active and inputs.is_floating_point():
            inputs = inputs * RAW_SCALE + RAW_OFFSET
        if "shuffled_labels" in self.active and isinstance(targets, torch.Tensor):
            targets = self._scrambled_labels(inputs, targets)
        if "inputs_wrong_dtype" in self.active and inputs.is_floating_point():
            inputs = inputs.double()
        return inputs, targets

    def _scrambled_labels(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """A label decided by the input's values alone: fixed per example (so memorisable) but
        unrelated to the true class. Uses its own generator, never the global one."""
        flat = inputs.detach().reshape(inputs.shape[0], -1).to(torch.float64)
        key = tuple(flat.shape[1:])
        if key not in self._label_weights:
            self._label_weights[key] = torch.rand(
                flat.shape[1], generator=torch.Generator().manual_seed(99), dtype=torch.float64
            )
        code = torch.frac((flat.cpu() @ self._label_weights[key]).abs() * 997.0)
        classes = self.experiment_classes(targets)
        shift = (code * classes).floor().to(torch.int64).to(targets.device)
        if targets.is_floating_point():
            return ((targets.round().to(torch.int64) + shift.view(-1, *[1] * (targets.dim() - 1))) % 2).to(
                targets.dtype
            )
        return (targets + shift) % classes

    def experiment_classes(self, targets: torch.Tensor) -> int:
        if targets.is_floating_point():
            return 2
        model_out = [m for m in self.experiment.model.modules() if isinstance(m, nn.Linear)]
        return model_out[-1].out_features if model_out else int(targets.max().item()) + 1

    def transform_output(self, output: torch.Tensor) -> torch.Tensor:
        if "double_softmax" in self.active:
            output = output.softmax(dim=1)
        if "sigmoid_before_bce_with_logits" in self.active:
            output = torch.sigmoid(output)
        return output

    def transform_targets_for_loss(self, targets: Any) -> Any:
        if "target_shape_broadcast" in self.active and isinstance(targets, torch.Tensor) and targets.dim() == 2:
            return targets.squeeze(1)
        return targets


def sorted_loader(loader: Any) -> Any:
    """The same data in label order, never shuffled (the no_shuffle_sorted_data bug)."""
    if not isinstance(loader, DataLoader):
        return loader
    dataset = loader.dataset
    labels = []
    for i in range(len(cast(Sized, dataset))):
        _, target = split_batch(dataset[i])
        labels.append(float(torch.as_tensor(target).reshape(-1)[0]))
    order = sorted(range(len(labels)), key=lambda i: labels[i])
    ordered = Subset(dataset, order)
    sampler: DistributedSampler[Any] | None = None
    if isinstance(loader.sampler, DistributedSampler):  # --nproc: each rank its share, in order
        sampler = DistributedSampler(
            ordered,
            num_replicas=loader.sampler.num_replicas,
            rank=loader.sampler.rank,
            shuffle=False,
            drop_last=loader.sampler.drop_last,
        )
    return DataLoader(
        ordered,
        batch_size=loader.batch_size,
        shuffle=False,
        sampler=sampler,
        drop_last=loader.drop_last,
        collate_fn=loader.collate_fn,
    )
