"""Validation loss per example when the loss does not say how it folds a batch (a model's own
loss, a lambda): the reduction is measured once, on a copy, and the run is left bitwise alone."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from loopscope.engine.batches import batch_slice
from loopscope.engine.epoch_end import measure_reduction
from loopscope.engine.experiment import Experiment, load_experiment, seed_everything
from loopscope.engine.recorder import StageRecord
from loopscope.engine.stepper import Stepper
from tests.fixtures import third_party_models


def vae_with_validation() -> Experiment:
    exp = third_party_models.vae()  # forward(x, target) returns (recon, BCE + KL summed over the batch)
    x = exp.train_loader.dataset.tensors[0]
    exp.val_loader = DataLoader(TensorDataset(x[:200], x[:200]), batch_size=64)  # a short last batch of 8
    exp.epochs = 3
    return exp


def hand_written_vae(iterations: int) -> tuple[list[float], list[float]]:
    """pytorch/examples' VAE loop: train on the summed loss; test loss = summed loss / examples."""
    seed_everything(0)
    exp = vae_with_validation()
    model, losses, val_losses = exp.model, [], []
    for _epoch in range(exp.epochs):
        for x, y in exp.train_loader:
            exp.optimizer.zero_grad()
            _, loss = model(x, y)
            loss.backward()
            exp.optimizer.step()
            losses.append(loss.item())
            if len(losses) == iterations:
                return losses, val_losses
        model.eval()
        with torch.no_grad():
            total = sum(model(x, y)[1].item() for x, y in exp.val_loader)
        model.train()
        val_losses.append(total / 200)
    return losses, val_losses


def test_a_vaes_summed_loss_is_validated_per_example_and_the_run_stays_the_plain_loops():
    seed_everything(0)
    stepper = Stepper(vae_with_validation())
    stepper.run(10)  # two validations, and training after each (the VAE draws noise in forward)
    events = stepper.history.recent()
    losses = [e.loss for e in events if e.stage == "loss"]
    val_losses = [e.metrics["val_loss"] for e in events if e.stage == "validate"]
    ref_losses, ref_val = hand_written_vae(10)
    assert losses == ref_losses  # bitwise: measuring the reduction drew nothing from the run's generators
    assert val_losses == pytest.approx(ref_val, rel=1e-5)
    assert 10 < val_losses[0] < 100  # per example (64 pixels); the batch total was 64x that
    assert stepper.body.measured_reduction == (None, "sum")


def test_a_mean_reduced_own_loss_is_validated_as_before(fixture_modules):
    stepper = Stepper(load_experiment("third_party_models:hf_style", 0))  # dict batches, F.cross_entropy inside
    stepper.run(5)
    stepper.body.validate(record := StageRecord())
    model = stepper.model.eval()
    with torch.no_grad():
        total = sum(model(**batch)["loss"].item() * len(batch["labels"]) for batch in stepper.experiment.val_loader)
    model.train()
    assert record.metrics["val_loss"] == pytest.approx(total / 64, rel=1e-6)
    assert stepper.body.measured_reduction == (None, "mean")


def summed_cross_entropy(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, y, reduction="sum")


def my_cross_entropy(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, y)


@pytest.mark.parametrize(
    ("loss_fn", "reduction"),
    [
        (lambda out, y: F.cross_entropy(out, y, reduction="sum"), "sum"),
        (summed_cross_entropy, "sum"),
        (my_cross_entropy, "mean"),
    ],
)
def test_the_reduction_of_a_users_loss_function_is_measured(loss_fn, reduction):
    stepper = Stepper(load_experiment("spirals", 0))
    stepper.run(30)
    stepper.body.validate(reference := StageRecord())  # nn.CrossEntropyLoss(): the mean, stated
    stepper.experiment.loss_fn = loss_fn
    stepper.body.validate(record := StageRecord())
    assert record.metrics["val_loss"] == pytest.approx(reference.metrics["val_loss"], rel=1e-5)
    assert stepper.body.measured_reduction == (loss_fn, reduction)


def test_a_batch_that_cannot_be_cut_in_two_leaves_the_mean():
    model = nn.Linear(3, 2)
    inputs = torch.randn(6, 3)
    odd = {"x": inputs, "prior": torch.zeros(2, 3)}  # a tensor not holding the batch on dim 0
    with pytest.raises(ValueError):
        batch_slice(odd, 0, 3, 6)

    def loss_fn(out, y):
        return F.cross_entropy(out, y, reduction="sum")

    class TwoInputs(nn.Module):
        def forward(self, x, prior):
            return model(x + prior.sum())

    injector = Stepper(load_experiment("spirals", 0)).injector
    targets = torch.randint(0, 2, (6,))
    assert measure_reduction(TwoInputs(), loss_fn, injector, odd, targets, None, torch.device("cpu")) is None
    assert measure_reduction(model, loss_fn, injector, inputs, targets, None, torch.device("cpu")) == "sum"


def test_batch_slice_cuts_tensors_tuples_and_dicts_on_dim_0():
    batch = {"ids": torch.arange(8).view(4, 2), "pair": (torch.arange(4), None), "name": "x"}
    part = batch_slice(batch, 1, 3, 4)
    assert part["ids"].tolist() == [[2, 3], [4, 5]] and part["pair"][0].tolist() == [1, 2]
    assert part["pair"][1] is None and part["name"] == "x"
