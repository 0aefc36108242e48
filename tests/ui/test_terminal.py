"""The real thing: `loopscope` in a real terminal (tmux), and the UI process free of torch."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

LOOPSCOPE = str(Path(sys.executable).parent / "loopscope")


def tmux(*args: str) -> str:
    return subprocess.run(["tmux", *args], capture_output=True, text=True, check=True).stdout


def wait_for_pane(session: str, text: str, timeout: float = 60.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        screen = tmux("capture-pane", "-p", "-t", session)
        if text in screen:
            return screen
        time.sleep(0.2)
    raise AssertionError(f"{text!r} never appeared; the pane shows:\n{screen}")


@pytest.fixture
def tmux_session():
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed")
    name = f"loopscope-test-{os.getpid()}"
    subprocess.run(["tmux", "kill-session", "-t", name], capture_output=True)
    for _ in range(10):
        started = subprocess.run(
            ["tmux", "new-session", "-d", "-s", name, "-x", "120", "-y", "40", "bash --norc --noprofile"],
            capture_output=True,
            text=True,
        )
        if started.returncode == 0:
            break
        time.sleep(0.5)  # the server whose last session was just killed may still be exiting
    else:
        raise AssertionError(f"tmux new-session failed: {started.stderr}")
    yield name
    subprocess.run(["tmux", "kill-session", "-t", name], capture_output=True)


def test_loopscope_in_tmux_steps_and_quits_cleanly(tmux_session):
    tmux("send-keys", "-t", tmux_session, f"PS1='READY$ ' {LOOPSCOPE} spirals; echo EXIT=$?", "Enter")
    wait_for_pane(tmux_session, "iter 0")
    tmux("send-keys", "-t", tmux_session, "n")
    screen = wait_for_pane(tmux_session, "iter 1")
    assert "Loop code" in screen and "[step]" in screen
    assert "0.weight" in screen  # the gradients panel
    tmux("send-keys", "-t", tmux_session, "r")
    wait_for_pane(tmux_session, "running")
    tmux("send-keys", "-t", tmux_session, "q")
    screen = wait_for_pane(tmux_session, "EXIT=0")
    # The terminal is restored: the app's panels are gone and the shell prints normally.
    assert "Loop code" not in screen


def test_a_bad_target_is_one_line_before_the_app_opens(tmux_session):
    tmux("send-keys", "-t", tmux_session, f"{LOOPSCOPE} run nosuch.py; echo EXIT=$?", "Enter")
    screen = wait_for_pane(tmux_session, "EXIT=2")
    assert "loopscope: error: no such file: nosuch.py" in screen


UI_PROCESS = """
import asyncio, sys
from loopscope.shared.protocol import SessionSpec
from loopscope.ui.app import LoopscopeApp

async def main():
    app = LoopscopeApp(SessionSpec("blobs"))
    async with app.run_test(size=(120, 40)) as pilot:
        while app.model.info is None:
            await pilot.pause(0.05)
        await pilot.press("n")
        while app.model.state.completed_iterations < 1:
            await pilot.pause(0.05)
    print("torch" in sys.modules, app.model.state.completed_iterations)

if __name__ == "__main__":
    asyncio.run(main())
"""


def test_the_ui_process_never_imports_torch(tmp_path):
    script = tmp_path / "ui_process.py"
    script.write_text(UI_PROCESS)
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert result.stdout.split() == ["False", "1"], result.stderr[-2000:]


def _processes() -> dict[int, tuple[int, str, str]]:
    """{pid: (parent pid, start time, command line)} of the running processes (a zombie has ended)."""
    table = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # what follows "pid (name)"
            cmdline = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue  # it ended while we looked
        if fields[0] != "Z":
            table[int(stat.parent.name)] = (int(fields[1]), fields[19], cmdline)
    return table


def _descendants(pid: int, table: dict[int, tuple[int, str, str]]) -> set[int]:
    children = {child for child, (parent, _, _) in table.items() if parent == pid}
    return children.union(*(_descendants(child, table) for child in children))


def _app_and_engines(session: str) -> tuple[int, dict[int, str]]:
    """The app the pane's shell started, and the engines in its process tree as {pid: start time} (a
    pid used again later has another start time). Only this app's: another test's or another run's
    engines elsewhere on the machine are none of this test's business."""
    shell = int(tmux("display", "-p", "-t", session, "#{pane_pid}"))
    table = _processes()
    apps = [pid for pid, (parent, _, cmdline) in table.items() if parent == shell and LOOPSCOPE in cmdline]
    assert len(apps) == 1, f"not one app under the pane's shell: {apps}"
    engines = {pid: table[pid][1] for pid in _descendants(apps[0], table) if "multiprocessing.spawn" in table[pid][2]}
    return apps[0], engines


def _still_running(processes: dict[int, str], timeout: float = 10.0) -> dict[int, str]:
    """Those of `processes` (pid: start time) still running after up to `timeout` seconds to end."""
    deadline = time.monotonic() + timeout
    while True:
        table = _processes()
        running = {pid: start for pid, start in processes.items() if pid in table and table[pid][1] == start}
        if not running or time.monotonic() > deadline:
            return running
        time.sleep(0.2)


def test_sigterm_quits_the_app_and_restores_the_terminal(tmux_session):
    tmux("send-keys", "-t", tmux_session, f"{LOOPSCOPE} blobs --seed 7; echo EXIT=$?", "Enter")
    wait_for_pane(tmux_session, "iter 0")
    tmux("send-keys", "-t", tmux_session, "r")
    wait_for_pane(tmux_session, "running")
    app, engines = _app_and_engines(tmux_session)
    assert engines, "the app's engine process was not found"
    os.kill(app, signal.SIGTERM)  # this app only: not any process on the machine named alike
    screen = wait_for_pane(tmux_session, "EXIT=0")
    assert "Loop code" not in screen  # the app's screen is gone: the terminal is back to the shell
    assert not _still_running(engines)  # and the app's engine process went with it


def test_a_script_in_tmux_walks_its_own_lines_and_survives_its_error(tmux_session):
    scripts = Path(__file__).resolve().parents[1] / "fixtures" / "scripts"
    tmux("send-keys", "-t", tmux_session, f"{LOOPSCOPE} run {scripts / 'nanogpt_style.py'}; echo EXIT=$?", "Enter")
    screen = wait_for_pane(tmux_session, "iter 0")
    for _ in range(3):  # forward, loss, backward: the script's own lines, marked in turn
        tmux("send-keys", "-t", tmux_session, "space")
    deadline = time.monotonic() + 60
    while not any(row.startswith("│>") and "scaler.scale(loss).backward()" in row for row in screen.splitlines()):
        assert time.monotonic() < deadline, screen
        time.sleep(0.2)
        screen = tmux("capture-pane", "-p", "-t", tmux_session)
    tmux("send-keys", "-t", tmux_session, "r")
    screen = wait_for_pane(tmux_session, "the script finished")
    assert "iter 12" in screen and "iter 11: loss" in screen  # the Output panel shows the script's prints
    assert any("\u2800" < ch <= "\u28ff" for ch in screen)  # the loss plot drew its braille line
    tmux("send-keys", "-t", tmux_session, "q")
    wait_for_pane(tmux_session, "EXIT=0")
    tmux("send-keys", "-t", tmux_session, "clear", "Enter")
    bug = f"{LOOPSCOPE} run {scripts / 'nanogpt_style.py'} --bug skip_zero_grad; echo EXIT=$?"
    tmux("send-keys", "-t", tmux_session, bug, "Enter")
    wait_for_pane(tmux_session, "iter 0")
    for _ in range(2):  # two iterations: the second step adds to the first one's gradients
        tmux("send-keys", "-t", tmux_session, "n")
        time.sleep(0.5)
    screen = wait_for_pane(tmux_session, "suspects: skip_zero_grad")
    assert "x it 2: step() ran on" in screen
    tmux("send-keys", "-t", tmux_session, "q")
    wait_for_pane(tmux_session, "EXIT=0")
    tmux("send-keys", "-t", tmux_session, "clear", "Enter")
    tmux("send-keys", "-t", tmux_session, f"{LOOPSCOPE} run {scripts / 'raises_at_5.py'}; echo EXIT=$?", "Enter")
    wait_for_pane(tmux_session, "iter 0")
    tmux("send-keys", "-t", tmux_session, "r")
    screen = wait_for_pane(tmux_session, "The script stopped here")
    assert "RuntimeError: mat1" in screen and "raises_at_5.py:11" in screen
    assert any(row.startswith("│>") and "model(x)" in row for row in screen.splitlines())  # its line marked
    tmux("send-keys", "-t", tmux_session, "n")  # the app is still up and answers
    time.sleep(1)
    tmux("send-keys", "-t", tmux_session, "q")
    wait_for_pane(tmux_session, "EXIT=0")


def test_at_80x24_a_finding_is_on_screen_without_a_key(tmux_session):
    """At 80x24 the Loop code fills the screen and the Diagnostics panel is far below it; the
    header still counts the findings by severity, one line names the most serious, `d` brings the
    panel up, and the footer keeps `q quit`."""
    tmux("resize-window", "-t", tmux_session, "-x", "80", "-y", "24")
    tmux("send-keys", "-t", tmux_session, f"{LOOPSCOPE} blobs --bug skip_zero_grad; echo EXIT=$?", "Enter")
    wait_for_pane(tmux_session, "iter 0")
    tmux("send-keys", "-t", tmux_session, "r")
    screen = wait_for_pane(tmux_session, " x it ")
    assert "x 1 error" in screen.splitlines()[0]
    lines = screen.splitlines()
    assert lines[2].startswith("╭─ Loop code")  # counters, then the stages folded to one line: two rows
    assert len(lines) == 24 and max(len(line) for line in lines) <= 80
    finding = next(line for line in lines if line.startswith(" x it "))
    assert "gradient tensors still held values" in finding and finding.endswith("d: diagnostics"), finding
    assert "q quit" in lines[-1]
    assert "Diagnostics" not in screen
    tmux("send-keys", "-t", tmux_session, "d")
    # The panel's border can be painted a frame before its rows: wait for the row itself.
    screen = wait_for_pane(tmux_session, "fix: Call optimizer.zero_grad()")
    assert "Diagnostics" in screen
    tmux("send-keys", "-t", tmux_session, "q")
    wait_for_pane(tmux_session, "EXIT=0")


def _ranks_rows(screen: str) -> dict[int, list[str]]:
    """The Ranks table's rows, by rank: [batch, loss, local, reduced, comm, params]."""
    rows = {}
    for line in screen.splitlines():
        cells = line.split("│")
        panel = cells[-2] if len(cells) >= 3 else ""
        fields = panel.split()[:7]  # past them, maybe a scrollbar's glyph
        if len(fields) == 7 and fields[0].isdigit() and len(fields[1]) in (1, 8):
            rows[int(fields[0])] = fields[1:]
    return rows


def test_nproc_2_in_tmux_walks_both_ranks_through_the_stages(tmux_session):
    """`loopscope run spirals --nproc 2`: space moves both ranks; at backward the Ranks table has
    each rank's own examples and local gradient norm, one all-reduced norm, one all-reduce each;
    after step the parameter checksums agree; q leaves no rank process behind."""
    tmux("send-keys", "-t", tmux_session, f"{LOOPSCOPE} run spirals --nproc 2; echo EXIT=$?", "Enter")
    screen = wait_for_pane(tmux_session, "2 ranks")
    assert "iter 0" in screen
    _, processes = _app_and_engines(tmux_session)
    assert len(processes) >= 3, "the engine and its two ranks were not found"
    for _ in range(5):  # load_batch, zero_grad, forward, loss, backward
        tmux("send-keys", "-t", tmux_session, "space")
        time.sleep(0.3)
    screen = wait_for_pane(tmux_session, "[backward]")
    deadline = time.monotonic() + 30
    while "1x" not in screen or len(_ranks_rows(screen)) < 2:
        assert time.monotonic() < deadline, screen
        time.sleep(0.2)
        screen = tmux("capture-pane", "-p", "-t", tmux_session)
    rows = _ranks_rows(screen)
    assert set(rows) == {0, 1}, screen
    (batch0, _, local0, reduced0, comm0, _), (batch1, _, local1, reduced1, comm1, _) = rows[0], rows[1]
    assert batch0 != batch1  # the DistributedSampler gave each rank its own examples
    assert local0 != local1 and reduced0 == reduced1  # different gradients, one all-reduced norm
    assert comm0.startswith("1x") and comm1.startswith("1x")
    assert "own examples per rank" in screen
    for _ in range(2):  # clip_grad, step
        tmux("send-keys", "-t", tmux_session, "space")
        time.sleep(0.3)
    screen = wait_for_pane(tmux_session, "parameters equal")
    rows = _ranks_rows(screen)
    assert rows[0][5] == rows[1][5] != "-"  # after step: the same parameters on both ranks
    tmux("send-keys", "-t", tmux_session, "q")
    wait_for_pane(tmux_session, "EXIT=0")
    assert not _still_running(processes)
