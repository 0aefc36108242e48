"""Gradient accumulation in factory mode (DESIGN.md §9): K micro-batches, each loss divided by K,
one zero_grad() and one step() per iteration; bitwise the loop written by hand, the epoch's last
short group included. Its own bug (the loss not divided) is named; done right, nothing is."""

from __future__ import annotations

import math

import torch

from loopscope.engine.checks import run_checks
from loopscope.engine.experiment import load_experiment, seed_everything
from loopscope.engine.stepper import Stepper
from loopscope.shared.loopcode import render_loop
from loopscope.shared.vocab import Stage
from tests.fixtures import third_party_models

K = 4


def loss_events(stepper: Stepper):
    return [e for e in stepper.history.recent() if e.stage == "loss" and e.error is None]


def test_accumulation_is_bitwise_the_hand_written_loop_across_an_epoch_end(fixture_modules):
    stepper = Stepper(load_experiment("third_party_models:accumulating", 0))
    stepper.run_epoch()  # 50 micro-batches: 12 groups of 4 and one of 2, then validation
    stepper.run(3)
    ours = [e.loss for e in loss_events(stepper)]

    seed_everything(0)
    exp = third_party_models.accumulating()
    model, opt, loss_fn = exp.model, exp.optimizer, exp.loss_fn
    theirs: list[float] = []
    for epoch in range(2):
        model.train()
        batches = len(exp.train_loader)
        for i, (x, y) in enumerate(exp.train_loader):
            if i % K == 0:
                opt.zero_grad()
            loss = loss_fn(model(x), y)
            theirs.append(loss.item())
            (loss / K).backward()
            if (i + 1) % K == 0 or i + 1 == batches:
                opt.step()
            if epoch == 1 and i + 1 == 3 * K:
                break
        if epoch == 0:
            model.eval()
            with torch.no_grad():
                for x, _ in exp.val_loader:
                    model(x)
    assert ours == theirs
    assert all(torch.equal(a, b) for a, b in zip(stepper.model.parameters(), model.parameters()))
    assert stepper.completed_iterations == 13 + 3
    last_of_epoch_1 = [e.metrics["micro_batch"] for e in loss_events(stepper) if e.iteration == 13]
    assert last_of_epoch_1 == [1, 2]  # the short group still steps


def test_one_iteration_is_one_step_with_its_micro_batches_inside(fixture_modules):
    stepper = Stepper(load_experiment("third_party_models:accumulating", 0))
    events = stepper.run_iteration()
    stages = [e.stage for e in events]
    assert stages.count("load_batch") == stages.count("forward") == stages.count("backward") == K
    assert stages.count("zero_grad") == stages.count("step") == 1
    assert stages.index("zero_grad") < stages.index("forward") and stages[-1] == "step"
    losses = [e for e in events if e.stage == "loss"]
    assert [e.metrics["micro_batch"] for e in losses] == [1, 2, 3, 4]
    assert all(e.metrics["loss_divisor"] == K for e in losses)
    # The gradient grows micro-batch by micro-batch: none of it is thrown away.
    norms = [e.grad_norm for e in events if e.stage == "backward"]
    assert norms == sorted(norms)


def test_a_clean_accumulating_run_raises_nothing_and_its_tools_work(fixture_modules):
    stepper = Stepper(load_experiment("third_party_models:accumulating", 0), twin=True, keep_snapshots=20)
    stepper.run(300)
    assert [f for _, f in stepper.diagnostics.all_findings if f.severity != "info"] == []
    # Stepping back over accumulated iterations replays them exactly.
    assert stepper.rewind() and stepper.rewind()
    assert stepper.rewind_warning is None
    # `loopscope check` runs every check on a fresh experiment: none is skipped.
    results = run_checks(Stepper(load_experiment("third_party_models:accumulating", 0), diagnose=False))
    assert len(results) == 4 and not any(r.skipped for r in results), results
    stepper.set_bug("accumulation_not_divided", True)
    stepper.run(2)
    after = [e for e in loss_events(stepper) if e.iteration > 298]
    twin = [e for e in after if e.twin_loss is not None]
    assert len(after) == K + 2 and twin == after  # 299 ends an epoch: a group of 2
    assert twin[0].twin_loss == twin[0].loss  # the twin starts from the same state
    assert twin[-1].twin_loss != twin[-1].loss  # and then the bug costs something


def test_skip_zero_grad_is_still_named_at_iteration_2(fixture_modules):
    stepper = Stepper(load_experiment("third_party_models:accumulating", 0), bugs=["skip_zero_grad"])
    stepper.run(3)
    assert (2, "stale_gradients") in [(it, f.id) for it, f in stepper.diagnostics.all_findings]
    assert all(it >= 2 for it, f in stepper.diagnostics.all_findings if f.id == "stale_gradients")


def test_an_undivided_loss_is_named_and_makes_the_step_k_times_longer(fixture_modules):
    clean = Stepper(load_experiment("third_party_models:accumulating", 0))
    clean_norm = [e.grad_norm for e in clean.run_iteration() if e.stage == "backward"][-1]
    buggy = Stepper(load_experiment("third_party_models:accumulating", 0), bugs=["accumulation_not_divided"])
    buggy_events = buggy.run_iteration()  # the same batches and dropout masks: seeded alike
    buggy_norm = [e.grad_norm for e in buggy_events if e.stage == "backward"][-1]
    assert math.isclose(buggy_norm, K * clean_norm, rel_tol=1e-5)
    found = [f for e in buggy_events for f in e.diagnostics if f.id == "accumulated_loss_not_divided"]
    assert found and "accumulation_not_divided" in found[0].suspects and "4" in found[0].message


def test_a_model_computing_its_own_loss_accumulates_too(fixture_modules):
    stepper = Stepper(load_experiment("third_party_models:nanogpt_accumulating", 0))
    stepper.run(300)
    assert stepper.completed_iterations == 300
    assert [f for _, f in stepper.diagnostics.all_findings if f.severity != "info"] == []


def test_the_code_panel_shows_the_accumulating_loop():
    stages = Stepper(third_party_models.accumulating()).iteration_stages()
    lines = [line.text.strip() for line in render_loop({"accumulation": K}, stages, [])]
    assert "K = 4  # micro-batches per optimizer step" in lines
    assert lines.index("if i % K == 0:") < lines.index("optimizer.zero_grad()")
    assert lines.index("loss = loss / K") < lines.index("loss.backward()")
    assert lines.index("if (i + 1) % K == 0 or i + 1 == len(train_loader):") < lines.index("optimizer.step()")
    buggy = render_loop({"accumulation": K}, stages, ["accumulation_not_divided"])
    assert [line.text.strip() for line in buggy if line.change == "removed"] == ["loss = loss / K"]


def test_under_ddp_the_loop_code_runs_every_micro_batch_but_the_steps_under_no_sync():
    stages = [Stage.LOAD_BATCH, Stage.ZERO_GRAD, Stage.FORWARD, Stage.LOSS, Stage.BACKWARD, Stage.STEP]
    clean = [line.text.strip() for line in render_loop({"accumulation": 4, "distributed": True}, stages, [])]
    sync = clean.index("with nullcontext() if sync else model.no_sync():  # one all-reduce a step")
    # forward, loss and backward inside the block; the step outside it
    assert sync < clean.index("out = model(x)") < clean.index("loss.backward()") < clean.index("optimizer.step()")
    lines = render_loop({"accumulation": 4, "distributed": True}, stages, ["accumulation_without_no_sync"])
    changed = [(line.change, line.text.strip()) for line in lines if line.change]
    assert [text for _, text in changed] == [
        "with nullcontext() if sync else model.no_sync():  # one all-reduce a step",
        "with nullcontext():  # every micro-batch's backward all-reduces",
    ]
