"""Models that compute their own loss (`loss_fn=None`): nanoGPT's `forward(idx, targets)` returning
`(logits, loss)`, and a HuggingFace-style model taking `labels` and returning `{"loss", "logits"}`.
Their loss is exactly the one a hand-written loop computes, and every tool works on them."""

from __future__ import annotations

import pytest
import torch

from loopscope.engine.checks import run_checks
from loopscope.engine.experiment import load_experiment, seed_everything
from loopscope.engine.stepper import Stepper
from tests.fixtures import third_party_models

FACTORIES = ["nanogpt_style", "hf_style"]


def hand_written_losses(factory: str, iterations: int) -> list[float]:
    seed_everything(0)
    exp = getattr(third_party_models, factory)()
    losses: list[float] = []
    for batch in exp.train_loader:
        exp.optimizer.zero_grad()
        if isinstance(batch, dict):
            loss = exp.model(**batch)["loss"]  # labels stay in the batch
        else:
            x, y = batch
            _, loss = exp.model(x, y)
        loss.backward()
        exp.optimizer.step()
        losses.append(loss.item())
        if len(losses) == iterations:
            return losses
    raise AssertionError("the loader ran out")


@pytest.mark.parametrize("factory", FACTORIES)
def test_the_models_own_loss_is_bitwise_the_hand_written_loops(fixture_modules, factory):
    stepper = Stepper(load_experiment(f"third_party_models:{factory}", 0))
    stepper.run(12)
    ours = [e.loss for e in stepper.history.recent() if e.stage == "loss"]
    assert ours == hand_written_losses(factory, 12)


@pytest.mark.parametrize("factory", FACTORIES)
def test_a_clean_run_raises_nothing_and_validation_reads_the_models_loss(fixture_modules, factory):
    stepper = Stepper(load_experiment(f"third_party_models:{factory}", 0))
    stepper.run(300)
    findings = [f for _, f in stepper.diagnostics.all_findings if f.severity != "info"]
    assert findings == []
    val = stepper.history.last("validate")
    assert val is not None and 0 < val.metrics["val_loss"] < 3


@pytest.mark.parametrize("factory", FACTORIES)
def test_bugs_checks_and_the_twin_work_on_them(fixture_modules, factory):
    stepper = Stepper(load_experiment(f"third_party_models:{factory}", 0), bugs=["skip_zero_grad"])
    found = []
    while stepper.completed_iterations < 3:
        found += [(e.iteration, f.id) for e in [stepper.step_stage()] if e for f in e.diagnostics]
    assert (2, "stale_gradients") in found
    results = {r.id: r for r in run_checks(Stepper(load_experiment(f"third_party_models:{factory}", 0)))}
    assert not results["overfit_batch"].skipped and results["overfit_batch"].passed
    twin = Stepper(load_experiment(f"third_party_models:{factory}", 0), twin=True)
    twin.set_bug("skip_zero_grad", True)
    twin.run(5)
    assert all(e.twin_loss is not None for e in twin.history.recent() if e.stage == "loss")


def test_a_model_that_returns_no_loss_is_told_so_at_its_stage(fixture_modules):
    exp = load_experiment("third_party_models:nanogpt_style", 0)
    exp.model.forward = lambda idx, targets=None: torch.zeros(idx.shape[0], 3, requires_grad=True)  # no loss
    stepper = Stepper(exp)
    events = stepper.run_iteration()
    assert events[-1].stage == "loss" and "loss_fn=None" in events[-1].error.message


def test_a_vae_with_a_summed_loss_in_the_tens_of_thousands_is_no_numerical_failure(fixture_modules):
    stepper = Stepper(load_experiment("third_party_models:vae", 0))
    stepper.run(1)
    assert stepper.history.last("loss").loss > 1e3  # a sum over 128 examples x 64 pixels
    stepper.run(299)
    assert [f for _, f in stepper.diagnostics.all_findings if f.severity != "info"] == []
