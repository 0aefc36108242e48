"""Mixed precision in factory mode: amp="bf16" runs forward and loss under torch.autocast; amp="fp16"
adds a GradScaler (loss scaled for backward, an unscale stage before clipping, the step through
the scaler). Each is bitwise the same loop written by hand."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from loopscope.cli.trace import describe
from loopscope.engine.checks import run_checks
from loopscope.engine.experiment import Experiment, load_experiment, seed_everything
from loopscope.engine.stepper import Stepper
from tests.fixtures import third_party_models


def test_bf16_autocast_is_bitwise_the_hand_written_loop(fixture_modules):
    stepper = Stepper(load_experiment("third_party_models:bf16_classifier", 0))
    stepper.run(20)
    ours = [e.loss for e in stepper.history.recent() if e.stage == "loss"]
    seed_everything(0)
    exp = third_party_models.bf16_classifier()
    theirs: list[float] = []
    while len(theirs) < 20:  # 16 batches an epoch: into the second
        for x, y in exp.train_loader:
            exp.optimizer.zero_grad()
            with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
                out = exp.model(x)
                loss = exp.loss_fn(out, y)
            loss.backward()
            exp.optimizer.step()
            theirs.append(loss.item())
            if len(theirs) == 20:
                break
    assert ours == theirs
    forward = stepper.history.last("forward")
    assert any(t.dtype == "bfloat16" for t in forward.tensors)  # the outputs really are bfloat16


def test_a_bf16_run_is_clean_and_its_tools_work(fixture_modules):
    stepper = Stepper(load_experiment("third_party_models:bf16_classifier", 0), twin=True)
    stepper.run(300)
    assert [f for _, f in stepper.diagnostics.all_findings if f.severity != "info"] == []
    stepper.set_bug("skip_zero_grad", True)
    stepper.run(3)
    assert all(e.twin_loss is not None for e in stepper.history.recent() if e.stage == "loss" and e.iteration > 300)


def test_fp16_with_a_grad_scaler_is_bitwise_torchs_amp_recipe(fixture_modules):
    stepper = Stepper(load_experiment("third_party_models:fp16_scaled", 0))
    stepper.run(20)
    ours = [e.loss for e in stepper.history.recent() if e.stage == "loss"]
    seed_everything(0)
    exp = third_party_models.fp16_scaled()
    model, opt = exp.model, exp.optimizer
    scaler = torch.amp.GradScaler("cpu")
    theirs: list[float] = []
    while len(theirs) < 20:
        for x, y in exp.train_loader:
            opt.zero_grad()
            with torch.autocast(device_type="cpu", dtype=torch.float16):
                loss = exp.loss_fn(model(x), y)
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            scaler.step(opt)
            scaler.update()
            theirs.append(loss.item())
            if len(theirs) == 20:
                break
    assert ours == theirs  # the loss shown is the loss, not the scaled one
    assert all(torch.equal(a, b) for a, b in zip(stepper.model.parameters(), model.parameters()))
    stages = [e.stage for e in stepper.history.recent() if e.iteration == 20]
    assert stages[-3:] == ["unscale", "clip_grad", "step"]
    backward, unscale = (stepper.history.last(s) for s in ("backward", "unscale"))
    assert backward.metrics["grad_scale"] == scaler.get_scale()
    # Gradient norms are shown in true units at backward too (divided by the scale).
    assert math.isclose(backward.grad_norm, unscale.grad_norm, rel_tol=1e-6)


def test_a_clean_fp16_run_raises_nothing_and_its_tools_work(fixture_modules):
    stepper = Stepper(load_experiment("third_party_models:fp16_scaled", 0), twin=True, keep_snapshots=20)
    stepper.run(300)
    assert [f for _, f in stepper.diagnostics.all_findings if f.severity != "info"] == []
    assert stepper.rewind() and stepper.rewind_warning is None  # the scaler's state is rewound too
    # `loopscope check` runs every check on a fresh experiment: none is skipped.
    results = run_checks(Stepper(load_experiment("third_party_models:fp16_scaled", 0), diagnose=False))
    assert len(results) == 4 and not any(r.skipped for r in results), results
    first_buggy = stepper.completed_iterations + 1
    stepper.set_bug("skip_zero_grad", True)
    stepper.run(3)
    found = [(it, f.id) for it, f in stepper.diagnostics.all_findings]
    assert (first_buggy, "stale_gradients") in found  # the last clean step's gradients, never cleared
    assert all(e.twin_loss is not None for e in stepper.history.recent() if e.stage == "loss" and e.iteration > 300)


def test_clipping_before_unscale_is_named_at_the_first_iteration(fixture_modules):
    stepper = Stepper(load_experiment("third_party_models:fp16_scaled", 0), bugs=["clip_before_unscale"])
    events = stepper.run_iteration()
    assert [e.stage for e in events][-3:] == ["clip_grad", "unscale", "step"]
    clip = next(e for e in events if e.stage == "clip_grad")
    assert clip.metrics["grad_scale"] == 65536.0 and clip.metrics["norm_before"] > 1000
    assert clip.grad_norm < 1e-4  # the true gradient after the clip: 1/65536 of the limit
    assert [f.id for f in clip.diagnostics] == ["clip_before_unscale"]


def test_overflowing_steps_are_skipped_shown_and_named(fixture_modules):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=g) * 300  # fp16 activation gradients overflow at any big scale
    y = (x[:, 0] > 0).long()
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 2))
    exp = Experiment(
        model=model,
        loss_fn=nn.CrossEntropyLoss(reduction="sum"),
        optimizer=torch.optim.SGD(model.parameters(), lr=1e-4),
        train_loader=DataLoader(TensorDataset(x, y), batch_size=32),
        amp="fp16",
    )
    stepper = Stepper(exp)
    stepper.run(6)
    steps = [e for e in stepper.history.recent() if e.stage == "step"]
    assert steps[0].metrics["step_skipped"] and steps[0].metrics["grad_scale"] == 32768.0
    assert describe(steps[0]).endswith("SKIPPED by the GradScaler (inf/NaN gradients): scale 65536 -> 32768")
    found = [(it, f.id) for it, f in stepper.diagnostics.all_findings]
    assert (5, "steps_skipped") in found
    assert not any(f == "parameters_not_updated" for _, f in found)  # a skipped step is not a missing one
