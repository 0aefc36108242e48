"""Rewind: step back, replay, and get exactly the same values (dropout, Adam, scheduler and all)."""

from __future__ import annotations

import torch

from loopscope.engine.experiment import load_experiment
from loopscope.engine.rewind import copy_into
from loopscope.engine.stepper import Stepper


def losses_of(stepper: Stepper, first: int) -> list[float]:
    return [e.loss for e in stepper.history.recent() if e.stage == "loss" and e.iteration >= first]


def test_rewind_and_replay_is_bitwise_with_dropout_across_an_epoch_boundary():
    stepper = Stepper(load_experiment("spirals", 0), keep_snapshots=200)  # 23 iterations an epoch
    stepper.run(30)
    first_time = losses_of(stepper, 19)
    params = {n: p.detach().clone() for n, p in stepper.model.named_parameters()}
    for _ in range(12):
        assert stepper.rewind()
    assert stepper.completed_iterations == 18 and stepper.epoch == 1
    stepper.run(12)
    assert losses_of(stepper, 19) == first_time
    for name, p in stepper.model.named_parameters():
        assert torch.equal(p, params[name]), name


def test_rewind_mid_iteration_returns_to_its_start():
    stepper = Stepper(load_experiment("blobs", 0), keep_snapshots=10)
    stepper.run(3)
    stepper.step_stage()
    stepper.step_stage()
    assert stepper.rewind()
    assert stepper.completed_iterations == 3 and stepper.at_boundary and stepper.next_stage() == "load_batch"


def test_beyond_the_window_rewind_says_no():
    stepper = Stepper(load_experiment("blobs", 0), keep_snapshots=3)
    stepper.run(10)
    assert stepper.rewind() and stepper.rewind() and stepper.rewind()
    assert not stepper.rewind()
    assert stepper.completed_iterations == 7


def test_rewind_undoes_a_bug_switched_on_later():
    stepper = Stepper(load_experiment("blobs", 0), keep_snapshots=10)
    stepper.run(5)
    clean = Stepper(load_experiment("blobs", 0))
    clean.run(8)
    stepper.set_bug("lr_too_high", True)  # switched on before iteration 6 begins
    stepper.run(3)
    for _ in range(3):
        stepper.rewind()
    assert stepper.active_bugs == ("lr_too_high",)  # back at the start of iteration 6: it was on
    stepper.rewind()
    assert stepper.active_bugs == () and stepper.completed_iterations == 4
    stepper.run(4)
    assert losses_of(stepper, 5) == losses_of(clean, 5)


def test_sparse_snapshots_replay_to_the_exact_boundary():
    stepper = Stepper(load_experiment("spirals", 1), keep_snapshots=50)
    stepper.rewinder.BUDGET = 1e-9  # as if snapshots were very costly: few are taken
    stepper.run(40)
    assert len(stepper.rewinder.snapshots) < 40
    first_time = losses_of(stepper, 31)
    params = {n: p.detach().clone() for n, p in stepper.model.named_parameters()}
    for _ in range(10):
        assert stepper.rewind()
    assert stepper.completed_iterations == 30
    stepper.run(10)
    assert losses_of(stepper, 31) == first_time
    assert all(torch.equal(p, params[n]) for n, p in stepper.model.named_parameters())


def test_rewind_between_snapshots_restores_the_bugs_of_that_boundary():
    stepper = Stepper(load_experiment("blobs", 0), keep_snapshots=10)
    stepper.rewinder.BUDGET = 1e-9  # snapshots far apart: stepping back replays from an older one
    stepper.run(5)
    stepper.set_bug("lr_too_high", True)  # on when iteration 6 began
    stepper.run(3)
    assert all(s.completed_iterations != 5 for s in stepper.rewinder.snapshots)
    for _ in range(3):
        assert stepper.rewind()
    assert stepper.completed_iterations == 5 and stepper.active_bugs == ("lr_too_high",)


def test_a_replay_from_before_the_window_switches_the_bugs_as_they_were_switched():
    # The oldest snapshot kept can lie before the window; the replay from it passes boundaries
    # where a bug was switched on, and must switch it there again (they were forgotten before).
    stepper = Stepper(load_experiment("blobs", 0), keep_snapshots=10)
    stepper.rewinder.BUDGET = 1e-9  # snapshots far apart: the one kept is at the start
    stepper.run(5)
    stepper.set_bug("lr_too_high", True)
    stepper.run(15)
    assert stepper.rewinder.snapshots[0].completed_iterations < 5
    first_time = losses_of(stepper, 11)
    for _ in range(10):
        assert stepper.rewind()
    assert stepper.completed_iterations == 10
    stepper.run(10)
    assert losses_of(stepper, 11) == first_time
    log = stepper.rewinder.bug_log  # bounded: from the oldest snapshot on, in order
    assert list(log) == list(
        range(stepper.rewinder.snapshots[0].completed_iterations, 20)
    )  # 20: logged as the next iteration starts


def test_snapshots_reuse_the_memory_of_those_that_leave_the_window_and_stay_exact():
    stepper = Stepper(load_experiment("spirals", 0), keep_snapshots=4)
    stepper.rewinder.BUDGET = 1e9  # as if snapshots were free: one at every boundary
    stepper.run(3)
    oldest = stepper.rewinder.snapshots[0]
    old_memory = {t.data_ptr() for t in oldest.state["model"].values()}
    stepper.run(27)  # the window has turned over several times
    assert all(s is not oldest for s in stepper.rewinder.snapshots)
    newest_memory = {t.data_ptr() for s in stepper.rewinder.snapshots for t in s.state["model"].values()}
    assert old_memory & newest_memory  # the dropped copy's memory holds a newer one
    first_time = losses_of(stepper, 27)
    params = {n: p.detach().clone() for n, p in stepper.model.named_parameters()}
    for _ in range(4):
        assert stepper.rewind()
    stepper.run(4)
    assert losses_of(stepper, 27) == first_time
    assert all(torch.equal(p, params[n]) for n, p in stepper.model.named_parameters())


def test_copy_into_reuses_matching_tensors_and_copies_the_rest():
    source = {"w": torch.ones(3), "b": torch.zeros(2), "step": 4, "groups": [{"lr": 0.1, "params": [0, 1]}]}
    old = {"w": torch.full((3,), 9.0), "b": torch.zeros(5), "groups": [{"lr": 0.5}]}
    kept_w = old["w"]
    copied = copy_into(source, old)
    assert copied["w"] is kept_w and torch.equal(kept_w, torch.ones(3))  # same memory, new values
    assert copied["b"] is not old["b"] and copied["b"].shape == (2,)  # another shape: a fresh copy
    assert copied["b"].data_ptr() != source["b"].data_ptr()  # never the source's own tensor
    assert copied["step"] == 4 and copied["groups"] == [{"lr": 0.1, "params": [0, 1]}]
    assert copied["groups"][0] is not source["groups"][0]


def test_the_slower_iteration_after_a_snapshot_counts_as_its_cost():
    # The copy pushes the model out of the CPU caches, so the next iteration runs slower: spacing
    # snapshots by the copy time alone let them cost ~1.7% of a run instead of 1%.
    stepper = Stepper(load_experiment("blobs", 0), keep_snapshots=1000)
    rewinder = stepper.rewinder
    now = [0.0]
    rewinder.clock = lambda: now[0]
    block, aftermath = 0.010, 0.020  # each iteration after a snapshot: 20 ms slower
    slower = False
    for _ in range(100):  # no wait between boundaries: a run
        seconds = block + (aftermath if slower else 0.0)
        now[0] += seconds
        before = len(rewinder.snapshots)
        rewinder.take(stepper, seconds)
        stepper.state.completed_iterations += 1
        slower = len(rewinder.snapshots) > before
    # Copying this tiny model takes microseconds: counted alone, every boundary got a snapshot.
    # Counting the aftermath, one costs 20 ms: at 1% of 10 ms iterations, one every 200 or so
    # (counting the copy alone, one at every boundary).
    assert len(rewinder.snapshots) <= 4 and rewinder.interval >= 40  # the estimate is smoothed


def _spacing_after(rewinder, seconds_per_iteration: float, snapshot_cost: float) -> int:
    rewinder._training, rewinder._cost = seconds_per_iteration, snapshot_cost
    return rewinder.interval


def test_snapshot_spacing_keeps_a_step_back_replay_short_at_up_to_one_percent_of_the_run():
    rewinder = Stepper(load_experiment("blobs", 0)).rewinder
    # Cheap snapshots: a quarter percent of the run, a replay under a quarter second.
    assert _spacing_after(rewinder, 0.001, 0.0005) == 200  # 200 ms of replay at most
    # Costly ones on a slow model: 0.25% would mean replaying 800 x 10 ms = 8 s on a step back;
    # they come closer, but never past 1% of the run (200 x 10 ms).
    assert _spacing_after(rewinder, 0.010, 0.020) == 200
    # A middle case: 0.25% would be 80 x 10 ms; the quarter second wins (25), costing 0.8%.
    assert _spacing_after(rewinder, 0.010, 0.002) == 25


def test_rewind_gives_the_iteration_it_is_back_at_with_statistics():
    stepper = Stepper(load_experiment("blobs", 0), keep_snapshots=50)
    stepper.run(4)  # stepped with full statistics
    recorded = [e for e in stepper.history.recent() if e.iteration == 3]
    assert stepper.rewind() and stepper.completed_iterations == 3
    assert list(stepper.rewound_events) == recorded  # as first seen, not run again

    stepper.probe = False  # as a run records most iterations
    stepper.rewinder.BUDGET = 1e-9  # snapshots far apart: stepping back replays
    stepper.run(20)
    loss_first_time = next(e.loss for e in stepper.history.recent() if e.iteration == 22 and e.stage == "loss")
    assert stepper.rewind() and stepper.completed_iterations == 22
    shown = {e.stage: e for e in stepper.rewound_events}
    assert set(shown) == set(stepper.iteration_stages()) and all(e.iteration == 22 for e in shown.values())
    assert shown["loss"].loss == loss_first_time  # the replay's numbers, bitwise
    assert shown["backward"].layers and shown["forward"].tensors[0].mean is not None  # and its statistics
    assert stepper.probe is False


def test_a_replay_that_cannot_give_the_same_numbers_says_so(fixture_modules):
    stepper = Stepper(load_experiment("third_party_models:stateful_lm", 0), keep_snapshots=50)
    stepper.rewinder.BUDGET = 1e-9  # snapshots far apart: stepping back replays
    stepper.run(8)
    assert stepper.rewind()
    assert stepper.rewind_warning is not None and "cannot restore" in stepper.rewind_warning
    stepper.run(1)  # the iteration run again differs too: a finding at its loss stage
    found = [f.id for e in stepper.history.recent() if e.stage == "loss" for f in e.diagnostics]
    assert "rewind_inexact" in found


def test_an_exact_replay_says_nothing():
    stepper = Stepper(load_experiment("spirals", 0), keep_snapshots=50)
    stepper.rewinder.BUDGET = 1e-9
    stepper.run(8)
    assert stepper.rewind() and stepper.rewind_warning is None
    stepper.run(3)
    assert not [f for e in stepper.history.recent() for f in e.diagnostics if f.id == "rewind_inexact"]


def run_quietly(stepper: Stepper, until: int) -> None:
    """Unprobed whole iterations, as the app runs them (the fast path where no bug is on)."""
    stepper.quiet, stepper.probe = True, False
    with stepper.recording_warnings():
        while stepper.completed_iterations < until:
            stepper.run_iteration()
    stepper.catch_up()


def test_a_fast_run_passes_boundaries_without_the_rewinder_and_stepping_back_across_them_is_exact():
    stepper = Stepper(load_experiment("blobs", 0), keep_snapshots=40)
    stepper.rewinder.BUDGET = 1e-9  # snapshots far apart: a step back replays across many boundaries
    takes: list[int] = []
    take = stepper.rewinder.take
    stepper.rewinder.take = lambda s, seconds, gap=None: (takes.append(s.completed_iterations), take(s, seconds, gap))
    run_quietly(stepper, 5)
    stepper.set_bug("lr_too_high", True)
    run_quietly(stepper, 10)  # iterations 6-10 with the bug on: not the fast path
    stepper.set_bug("lr_too_high", False)
    run_quietly(stepper, 30)  # the fast path again
    first_time = losses_of(stepper, 1)
    assert len(takes) < 20, "the fast path should pass most boundaries without the rewinder"
    for _ in range(20):
        assert stepper.rewind()
    # Back at 10: the bugs are those iteration 11 began with, as a snapshot there would hold.
    assert stepper.completed_iterations == 10 and stepper.active_bugs == ()
    assert stepper.rewinder.mismatch is None
    assert stepper.rewind() and stepper.rewind()  # at 8, the bug was on
    assert stepper.active_bugs == ("lr_too_high",)
    run_quietly(stepper, 10)
    stepper.set_bug("lr_too_high", False)
    run_quietly(stepper, 30)
    assert losses_of(stepper, 1) == first_time
