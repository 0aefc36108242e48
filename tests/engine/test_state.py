"""LoopState: every counter saves and loads whole, so rewind needs no list of fields to remember."""

from __future__ import annotations

import dataclasses
import math

from loopscope.engine.experiment import load_experiment
from loopscope.engine.state import LoopState
from loopscope.engine.stepper import Stepper
from loopscope.shared.vocab import Stage


def test_state_dict_holds_every_field_but_the_live_ones():
    state = LoopState()
    saved = state.state_dict()
    persistent = {f.name for f in dataclasses.fields(LoopState) if not f.metadata.get("live")}
    assert set(saved) == persistent
    assert {"train_iter", "prefetched"}.isdisjoint(saved)


def test_load_state_dict_brings_back_every_counter_and_clears_live_objects():
    state = LoopState(
        epoch=3,
        iteration=41,
        completed_iterations=40,
        batches_this_epoch=7,
        best_val_loss=0.25,
        validations_without_improvement=2,
        last_val_loss=0.3,
        running_loss=1.5,
    )
    state.train_iter = iter([1, 2, 3])  # an open loader: its position is saved
    saved = state.state_dict()
    other = LoopState()
    other.queue.extend([Stage.LOSS, Stage.BACKWARD])
    other.prefetched = (0.0, None, None)
    other.load_state_dict(saved)
    restored = {name: getattr(other, name) for name in saved}
    assert {**restored, "queue": list(other.queue)} == saved
    assert (other.epoch, other.iteration, other.completed_iterations, other.batches_this_epoch) == (3, 41, 40, 7)
    assert other.train_iter is None and other.prefetched is None and not other.queue


def test_a_closed_loader_saves_the_start_of_the_next_epoch():
    state = LoopState(batches_this_epoch=12, epoch_rng=("old epoch",))
    saved = state.state_dict()  # no iterator open: the next epoch makes a fresh one
    assert saved["batches_this_epoch"] == 0 and saved["epoch_rng"] is None


def test_running_loss_is_saved_as_a_number():
    import torch

    state = LoopState(running_loss=torch.tensor(2.5, requires_grad=True) * 2)
    assert state.state_dict()["running_loss"] == 5.0


def test_stepper_state_round_trip_restores_counters_after_validation():
    stepper = Stepper(load_experiment("spirals", 0))
    stepper.run_epoch()  # validation, checkpoint and early-stop counters have moved
    saved = stepper.state_dict()
    loop_before = dict(saved["loop"])
    assert math.isfinite(loop_before["best_val_loss"]) and loop_before["last_val_loss"] is not None
    import copy

    frozen = copy.deepcopy(saved)
    stepper.run_epoch()
    assert stepper.state.state_dict() != loop_before
    stepper.load_state_dict(frozen)
    assert stepper.state.state_dict() == loop_before
