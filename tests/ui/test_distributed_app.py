"""The app on `--nproc 2` (its real engine process, which starts the two ranks): a rank that
raises or dies ends the run on screen, never hangs the app; ctrl+r starts the ranks again; and
no process outlives the app."""

from __future__ import annotations

import os
import time

import pytest

from loopscope.shared.protocol import SessionSpec
from loopscope.ui.app import LoopscopeApp
from tests.conftest import FIXTURES
from tests.ui.helpers import expect_text, ready, text_of, wait_until

FAULTS = str(FIXTURES / "ddp_faults.py")


def _descendants() -> set[int]:
    """Processes under this one (the engine and its ranks, while they run), zombies not counted."""
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    fields = stat.read().rsplit(")", 1)[1].split()
                with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                    tracker = b"resource_tracker" in cmdline.read()
            except OSError:
                continue
            if fields[0] != "Z" and not tracker:
                table[int(entry)] = int(fields[1])
    found, frontier = set(), {os.getpid()}
    while frontier:
        frontier = {pid for pid, parent in table.items() if parent in frontier} - found
        found |= frontier
    return found


@pytest.fixture(autouse=True)
def nothing_left_behind():
    before = _descendants()
    yield
    deadline = time.monotonic() + 10
    while _descendants() - before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _descendants() - before == set(), "a process outlived the app"


async def _fails_and_restarts(expected_reason: str, expected_error: str, stage: str) -> None:
    app = LoopscopeApp(SessionSpec(FAULTS, "cpu", nproc=2))
    async with app.run_test(size=(120, 40)) as pilot:
        await ready(pilot)
        assert "2 ranks" in text_of(app, "#pipeline")
        engine_and_ranks = _descendants()
        assert len(engine_and_ranks) >= 3
        await pilot.press("r")
        await wait_until(pilot, lambda: app.model.state.finished, timeout=60)
        state = app.model.state
        assert state.stop_reason.startswith(expected_reason), state.stop_reason
        assert state.stop_reason.endswith("every rank was stopped")
        assert state.halted is not None and expected_error in f"{state.halted.type}: {state.halted.message}"
        assert "error" in text_of(app, "#pipeline") and f"[{stage}]" in text_of(app, "#pipeline")
        await expect_text(pilot, "#diagnostics", f"{stage} raised")  # the failed stage, as in one process
        await expect_text(pilot, "#status", f"done: {expected_reason}")
        await expect_text(pilot, "#diagnostics", "Every rank was stopped")
        # The ranks are gone; the app and its engine are still here and answer.
        deadline = time.monotonic() + 10
        while len(_descendants()) > 1 and time.monotonic() < deadline:
            await pilot.pause(0.1)
        assert len(_descendants()) == 1, "the ranks outlived the failed run"
        await pilot.press("n")
        await expect_text(pilot, "#status", "the run is over: ctrl+r starts it again")
        await pilot.press("ctrl+r")  # a fresh engine, fresh ranks
        await wait_until(
            pilot, lambda: app.model.state is not None and not app.model.state.finished and app.model.info is not None
        )
        assert app.model.state.iteration == 0 and len(_descendants()) >= 3
        await pilot.press("n")
        await wait_until(pilot, lambda: app.model.state.completed_iterations == 1)


async def test_a_rank_that_raises_ends_the_run_with_its_error_at_its_stage(monkeypatch):
    monkeypatch.delenv("LOOPSCOPE_TEST_FAULT", raising=False)
    await _fails_and_restarts(
        "rank 1 failed at forward: ValueError", "ValueError: rank 1: the batch on rank 1 holds a token", "forward"
    )


async def test_a_rank_killed_by_a_signal_is_reported_and_never_hangs_the_app(monkeypatch):
    monkeypatch.setenv("LOOPSCOPE_TEST_FAULT", "kill")  # the ranks inherit it
    await _fails_and_restarts(
        "rank 1 died (killed by SIGKILL)", "RankDied: rank 1 died (killed by SIGKILL)", "backward"
    )


async def test_the_loop_code_shows_what_ddp_adds_and_a_distributed_bug_as_a_diff_in_place():
    app = LoopscopeApp(SessionSpec("blobs", "cpu", nproc=2, bugs=("loss_divided_by_world_size",)))
    async with app.run_test(size=(140, 60)) as pilot:
        await ready(pilot)
        await expect_text(pilot, "#code", "model = DDP(model)")
        code = text_of(app, "#code")
        for line in ("sampler = DistributedSampler(train_set)", "sampler.set_epoch(epoch)"):
            assert line in code
        # The bug's diff sits at the loss line, not in a setup block above the loop.
        assert "- " in code and "loss = loss_fn(out, y) / dist.get_world_size()" in code
        assert "# setup" not in code


async def test_a_users_ddp_script_steps_on_two_ranks_together_in_the_app():
    """`loopscope run ddp_script.py --nproc 2`: the user's own DDP script, as torchrun would run it,
    moved stage by stage on both ranks; the Ranks table compares them."""
    app = LoopscopeApp(SessionSpec(str(FIXTURES / "ddp_script.py"), "cpu", nproc=2))
    async with app.run_test(size=(140, 50)) as pilot:
        await ready(pilot)
        assert "2 ranks" in text_of(app, "#pipeline")
        await pilot.press("space")
        await wait_until(pilot, lambda: app.model.state.iteration == 1)
        await pilot.press("n")
        await wait_until(pilot, lambda: app.model.state.completed_iterations == 1, timeout=60)
        await expect_text(pilot, "#ranks", "parameters equal")
        ranks = text_of(app, "#ranks")
        assert "own examples per rank" in ranks  # the script's DistributedSampler, seen in the fingerprints
        rows = [line.split() for line in ranks.splitlines() if line.split()[:1] in (["0"], ["1"])]
        assert len(rows) == 2 and all(row[3] != "-" for row in rows)  # each rank's local norm


async def test_the_app_on_node_0_moves_the_ranks_of_another_node(monkeypatch, tmp_path):
    """`run --nnodes 2`, two "nodes" on one machine: node 1's command starts its rank and no
    screen; node 0's app moves both ranks, and when it quits node 1's command ends too."""
    import subprocess
    import sys

    from loopscope.engine.distributed.launcher import free_port

    monkeypatch.setenv("LOOPSCOPE_NODE_KEY", "a secret shared by the nodes")
    endpoint = f"127.0.0.1:{free_port()}"
    node = ["--nproc", "1", "--nnodes", "2", "--rdzv-endpoint", endpoint]
    with open(tmp_path / "node1.err", "w") as err:
        node1 = subprocess.Popen(
            [sys.executable, "-m", "loopscope", "run", "blobs", *node, "--node-rank", "1"],
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    try:
        app = LoopscopeApp(SessionSpec("blobs", "cpu", nproc=1, nnodes=2, rdzv_endpoint=endpoint))
        async with app.run_test(size=(140, 50)) as pilot:
            await ready(pilot)
            assert "2 ranks" in text_of(app, "#pipeline")
            await pilot.press("n")
            await wait_until(pilot, lambda: app.model.state.completed_iterations == 1, timeout=60)
            await expect_text(pilot, "#ranks", "parameters equal")
            rows = [line.split() for line in text_of(app, "#ranks").splitlines() if line.split()[:1] in (["0"], ["1"])]
            assert [row[0] for row in rows] == ["0", "1"] and rows[0][-1] == rows[1][-1]  # one model, two nodes
        assert node1.wait(timeout=30) == 0
    finally:
        if node1.poll() is None:
            node1.kill()
            node1.wait()
    assert "rank 1 follow node 0's app" in (tmp_path / "node1.err").read_text()


async def test_batchnorm_synced_over_the_ranks_and_the_bug_that_leaves_it_per_rank():
    """A model with BatchNorm on 2 ranks: the loop converts it to SyncBatchNorm (on CPU too), so
    the ranks' statistics agree; switched on live, the bug strikes that line out and the ranks'
    statistics part at the next forward, which a finding names."""
    app = LoopscopeApp(SessionSpec(str(FIXTURES / "ddp_long.py"), "cpu", nproc=2))
    async with app.run_test(size=(140, 60)) as pilot:
        await ready(pilot)
        convert = "model = nn.SyncBatchNorm.convert_sync_batchnorm(model)"
        await expect_text(pilot, "#code", convert)
        await pilot.press("n")
        await wait_until(pilot, lambda: app.model.state.completed_iterations == 1, timeout=60)
        await expect_text(pilot, "#ranks", "BatchNorm statistics shared")
        app.toggle_bug("batchnorm_not_synced")
        await wait_until(pilot, lambda: "batchnorm_not_synced" in app.model.state.active_bugs)
        code = text_of(app, "#code").splitlines()
        assert any(line.lstrip().startswith("-") and convert in line for line in code)
        await pilot.press("n")
        await wait_until(pilot, lambda: app.model.state.completed_iterations == 2, timeout=60)
        await expect_text(pilot, "#ranks", "BatchNorm statistics per rank")
        await expect_text(pilot, "#diagnostics", "BatchNorm running statistics differ")
