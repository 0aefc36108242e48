"""The bar for real code (issue "real code, right numbers"), on every third-party-style case: 300
clean iterations with no warning or error, `skip_zero_grad` named at iteration 2, every sanity
check run (pass or fail, none skipped for want of a way to run it), and a clean twin beside a bug."""

from __future__ import annotations

import pytest

from loopscope.engine.checks import run_checks
from loopscope.engine.experiment import load_experiment
from loopscope.engine.stepper import Stepper
from tests.conftest import FIXTURES

CASES = {
    "GPT, tied weights, AdamW groups": str(FIXTURES / "adamw_groups_experiment.py"),
    "mnist-style CNN, F.relu": "third_party_models:mnist_style",
    "Transformer encoder": "third_party_models:transformer",
    "nanoGPT-style (logits, loss)": "third_party_models:nanogpt_style",
    "HuggingFace-style labels -> .loss": "third_party_models:hf_style",
    "RNN LM, hidden state carried": "third_party_models:stateful_lm",
    "VAE, summed loss": "third_party_models:vae",
    "accumulation": "third_party_models:accumulating",
    "accumulation, own loss": "third_party_models:nanogpt_accumulating",
    "bf16 autocast": "third_party_models:bf16_classifier",
    "fp16 with a GradScaler": "third_party_models:fp16_scaled",
}


def long_enough(target: str, iterations: int) -> Stepper:
    """The case's experiment with epochs enough for `iterations` (a short fixture repeats its data)."""
    experiment = load_experiment(target, 0)
    batches = len(experiment.train_loader)  # type: ignore[arg-type]
    experiment.epochs = max(experiment.epochs, iterations * experiment.accumulation // batches + 1)
    return Stepper(experiment)


@pytest.mark.parametrize("target", CASES.values(), ids=CASES.keys())
def test_a_correct_model_is_clean_for_300_iterations(fixture_modules, target):
    stepper = long_enough(target, 300)
    stepper.run(300)
    assert stepper.completed_iterations == 300 and stepper.halted is None
    assert [(it, f.id, f.message) for it, f in stepper.diagnostics.all_findings if f.severity != "info"] == []


@pytest.mark.parametrize("target", CASES.values(), ids=CASES.keys())
def test_skip_zero_grad_is_named_at_iteration_2_and_every_check_runs(fixture_modules, target):
    stepper = Stepper(load_experiment(target, 0), bugs=["skip_zero_grad"])
    stepper.run(3)
    stale = [it for it, f in stepper.diagnostics.all_findings if f.id == "stale_gradients"]
    assert stale and stale[0] == 2
    results = run_checks(Stepper(load_experiment(target, 0), diagnose=False))
    assert [r.id for r in results] == ["init_loss", "overfit_batch", "input_baseline", "batch_mixing"]
    assert [r for r in results if r.skipped] == []


@pytest.mark.parametrize("target", CASES.values(), ids=CASES.keys())
def test_the_clean_twin_runs_beside_a_bug(fixture_modules, target):
    stepper = Stepper(load_experiment(target, 0), twin=True)
    stepper.run(2)
    stepper.set_bug("lr_too_high", True)
    stepper.run(3)
    assert stepper.halted is None
    buggy = [e for e in stepper.history.recent() if e.stage == "loss" and e.iteration > 2]
    assert buggy and all(e.twin_loss is not None for e in buggy)
    assert buggy[0].twin_loss == buggy[0].loss  # the same state, the same batch: the same loss at first
