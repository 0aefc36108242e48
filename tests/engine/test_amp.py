"""Mixed precision in factory mode: amp="bf16" runs forward and loss under torch.autocast, bitwise
as the same loop written by hand; fp16 (which needs a GradScaler) is refused in one line."""

from __future__ import annotations

import torch

from loopscope.engine.experiment import load_experiment, seed_everything
from loopscope.engine.stepper import Stepper
from loopscope.shared.errors import UserError
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


def test_fp16_is_refused_in_one_line_pointing_to_script_mode(fixture_modules):
    try:
        load_experiment("third_party_models:fp16_scaled", 0)
    except UserError as exc:
        assert "GradScaler" in str(exc) and "script mode" in str(exc)
    else:
        raise AssertionError("fp16 needs a scaler, which factory mode does not drive")
