"""Sanity checks (`c`) in script mode: on copies of the model, optimizer and loss the script showed,
fed the batches it trained on, while it waits at a stage; where they cannot run, one line says why."""

from __future__ import annotations

import pytest

from loopscope.engine.checks import run_checks
from loopscope.engine.script.driver import ScriptDriver
from loopscope.shared.errors import UserError
from tests.conftest import FIXTURES

SCRIPTS = FIXTURES / "scripts"


def paused_after_first_loss(script: str, *args: str) -> ScriptDriver:
    driver = ScriptDriver(SCRIPTS / script, list(args))
    while (event := driver.step_stage()) is not None and event.stage != "loss":
        pass
    return driver


@pytest.mark.parametrize(
    "script", ["tutorial_loop.py", "nanogpt_style.py", "hf_style.py", "mnist_functions.py", "fp16_scaler.py"]
)
def test_all_four_checks_run_on_a_paused_script_and_leave_it_as_it_was(script):
    reference = ScriptDriver(SCRIPTS / script, [])  # the same script, never checked (one at a time:
    try:  # a process runs one script under loopscope)
        reference.run(3)
    finally:
        reference.close()
    driver = paused_after_first_loss(script)
    try:
        results = run_checks(driver.check_subject())
        assert [r.id for r in results] == ["init_loss", "overfit_batch", "input_baseline", "batch_mixing"]
        assert [(r.id, r.message) for r in results if r.skipped] == []
        # The checks worked on copies: the script goes on to compute what it computes unchecked.
        driver.run(3)
    finally:
        driver.close()
    losses = [[e.loss for e in d.history.recent() if e.stage == "loss"] for d in (driver, reference)]
    assert losses[0] == losses[1] and len(losses[0]) >= 3


@pytest.mark.parametrize(
    ("script", "amp"), [("nanogpt_style.py", "bf16"), ("fp16_scaler.py", "fp16"), ("tutorial_loop.py", None)]
)
def test_the_checks_compute_under_the_autocast_the_script_trains_under(script, amp):
    driver = paused_after_first_loss(script)
    try:
        assert driver.check_subject().experiment.amp == amp
    finally:
        driver.close()


def test_the_initial_loss_check_says_when_the_script_has_already_trained():
    driver = paused_after_first_loss("tutorial_loop.py")
    try:
        driver.run(2)
        results = {r.id: r for r in run_checks(driver.check_subject())}
        assert results["init_loss"].skipped and "already trained" in results["init_loss"].message
        assert not results["overfit_batch"].skipped
    finally:
        driver.close()


@pytest.mark.parametrize(
    ("script", "reason"),
    [
        ("gan.py", "it trains 2 models with 2 optimizers"),
        ("lbfgs_closure.py", "LBFGS.step() needs a closure"),
    ],
)
def test_where_the_checks_cannot_run_one_line_says_why(script, reason):
    driver = paused_after_first_loss(script)
    try:
        driver.run(1)
        with pytest.raises(UserError, match="the sanity checks cannot run on this script: ") as raised:
            driver.check_subject()
        assert reason in str(raised.value) and "\n" not in str(raised.value)
    finally:
        driver.close()


def test_before_its_first_loss_the_script_has_nothing_to_check():
    driver = ScriptDriver(SCRIPTS / "tutorial_loop.py", [])
    try:
        driver.step_stage()  # the first batch
        with pytest.raises(UserError, match="step past its first loss"):
            driver.check_subject()
    finally:
        driver.close()
