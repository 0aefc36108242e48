"""Copies of the model with its optimizer, for the sanity checks and the clean twin: they work for
AdamW with parameter groups and tied weights, and the run they were copied from is untouched."""

from __future__ import annotations

import torch

from loopscope.engine.checks import run_checks
from loopscope.engine.copies import copy_model_and_optimizer
from loopscope.engine.experiment import load_experiment
from loopscope.engine.stepper import Stepper
from loopscope.shared.errors import UserError

GPT_LIKE = "adamw_groups_experiment.py"


def test_the_copy_keeps_groups_settings_state_and_tied_weights(fixtures):
    experiment = load_experiment(str(fixtures / GPT_LIKE), 0)
    stepper = Stepper(experiment)
    stepper.run(3)  # AdamW has state now
    model, optimizer = copy_model_and_optimizer(stepper.model, experiment.optimizer)
    assert type(optimizer) is torch.optim.AdamW
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]
    copied = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert copied == {id(p) for p in model.parameters()}  # steps the copy's parameters, every one
    assert copied.isdisjoint(id(p) for p in stepper.model.parameters())
    assert model.head.weight is model.wte.weight  # the tie survives
    original_state = experiment.optimizer.state_dict()["state"]
    assert optimizer.state_dict()["state"].keys() == original_state.keys()


def test_sanity_checks_all_run_on_adamw_with_groups(fixtures):
    stepper = Stepper(load_experiment(str(fixtures / GPT_LIKE), 0), diagnose=False)
    before = {n: p.detach().clone() for n, p in stepper.model.named_parameters()}
    results = run_checks(stepper)
    assert [r.id for r in results] == ["init_loss", "overfit_batch", "input_baseline", "batch_mixing"]
    assert [r.message for r in results if r.skipped] == []  # each one ran: pass or fail
    assert all(torch.equal(p, before[n]) for n, p in stepper.model.named_parameters())  # untouched


def test_the_twin_trains_beside_a_bug_on_adamw_with_groups(fixtures):
    stepper = Stepper(load_experiment(str(fixtures / GPT_LIKE), 0), twin=True)
    stepper.run(2)
    stepper.set_bug("skip_zero_grad", True)
    stepper.run(20)
    twin_losses = [e.twin_loss for e in stepper.history.recent() if e.stage == "loss" and e.iteration > 2]
    losses = [e.loss for e in stepper.history.recent() if e.stage == "loss" and e.iteration > 2]
    assert len(twin_losses) == 20 and all(t is not None for t in twin_losses)
    assert twin_losses[0] == losses[0]  # the same batch, the same weights at the switch
    assert twin_losses[-1] != losses[-1]  # then the bug makes the difference


class Unpicklable(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)
        self.handle = (x for x in range(3))  # a generator cannot be deep-copied


def test_a_model_that_cannot_be_copied_is_one_line():
    model = Unpicklable()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    try:
        copy_model_and_optimizer(model, optimizer)
    except UserError as exc:
        assert "cannot copy the model and optimizer" in str(exc) and "\n" not in str(exc)
    else:
        raise AssertionError("a generator attribute should not deep-copy")


def test_the_batch_mixing_probe_reads_token_models_through_their_embedding(fixtures):
    from loopscope.engine.checks import NotTestable, batch_mixing_rows

    stepper = Stepper(load_experiment(str(fixtures / GPT_LIKE), 0))
    tokens, targets = next(iter(stepper.experiment.train_loader))
    same = stepper.injector.prepare_batch
    assert batch_mixing_rows(stepper.model, tokens, targets, same, stepper.device) is None  # rows apart

    class Mixer(torch.nn.Module):  # averages over the batch: rows mix
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, idx: torch.Tensor) -> torch.Tensor:
            logits = self.inner(idx)
            return logits + logits.mean(dim=0, keepdim=True)

    _, others = batch_mixing_rows(Mixer(stepper.model), tokens, targets, same, stepper.device)
    assert others == tokens.shape[0] - 1
    try:
        batch_mixing_rows(torch.nn.Linear(2, 2), tokens.float()[:1, :2], None, same, stepper.device)
    except NotTestable as exc:
        assert "single example" in str(exc)
    else:
        raise AssertionError("one example cannot show mixing")
