"""`loopscope serve` for the projector: the app live in a real (headless) Chromium."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import urllib.request
import zlib

import pytest

from loopscope.engine.distributed.launcher import free_port

CHROMIUM = "/usr/bin/chromium"
# As this machine needs them: no sandbox as root, and no background calls to the outside world.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def need_chromium():
    """Playwright's sync API, or the test is skipped where Debian's chromium or playwright is missing."""
    if not os.path.exists(CHROMIUM) or shutil.which("chromium") is None:
        pytest.skip("Debian's chromium is not installed")
    return pytest.importorskip("playwright.sync_api")


def start_server(target: str) -> tuple[subprocess.Popen, str]:
    """`loopscope serve TARGET` in a session of its own, so that every process it starts can be
    found (and, whatever happens, killed) by that session's id; returns it with its URL."""
    need_chromium()
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "loopscope", "serve", target, "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(url, timeout=1).read()
            return process, url
        except OSError as exc:
            if time.monotonic() > deadline or process.poll() is not None:
                process.kill()
                raise AssertionError(f"the server did not start: {process.stdout.read()!r}") from exc
            time.sleep(0.2)


def processes_in_session(session: int) -> list[str]:
    """The live (not zombie) processes of a session, as `pid command` lines, from /proc."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                command = cmdline.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # gone while we looked
            continue
        state, session_id = fields[0], int(fields[3])
        if session_id == session and state != "Z":
            found.append(f"{entry} {command}")
    return found


def kill_session(session: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(session, signal.SIGKILL)  # what a test started goes, whatever the test found


@pytest.fixture
def server():
    process, url = start_server("blobs")
    yield url
    kill_session(process.pid)
    process.wait(10)


# The terminal draws on a canvas (no text in the DOM), and textual-serve's client keeps its xterm.js
# Terminal to itself: catch it as the client stores it (`this.terminal = new Terminal(...)`). That
# assignment finds this setter on Object.prototype, which makes `terminal` the object's own property.
CATCH_THE_TERMINAL = """
Object.defineProperty(Object.prototype, "terminal", {
  configurable: true,
  set(value) {
    Object.defineProperty(this, "terminal", {value, writable: true, configurable: true, enumerable: true});
    if (value && value.buffer && !window.caughtTerminal) window.caughtTerminal = value;
  },
});
"""
# The rows the terminal shows, as text (null until the terminal exists).
SCREEN_TEXT = """() => {
  const terminal = window.caughtTerminal;
  if (!terminal) return null;
  const buffer = terminal.buffer.active, rows = [];
  for (let y = 0; y < terminal.rows; y++) rows.push(buffer.getLine(buffer.viewportY + y).translateToString(true));
  return rows.join("\\n");
}"""
# Where the terminal's character cells lie on the page, in CSS pixels (a screenshot's pixels at scale 1).
CELL_GEOMETRY = """() => {
  const terminal = window.caughtTerminal;
  const box = terminal.element.querySelector(".xterm-screen").getBoundingClientRect();
  return {left: box.left, top: box.top, width: box.width / terminal.cols, height: box.height / terminal.rows,
          cols: terminal.cols};
}"""
VIEWPORT = {"width": 1400, "height": 900}


@pytest.fixture(scope="module")
def browser():
    sync_api = need_chromium()
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def wait_for_screen(page, *texts: str, seconds: float = 60) -> str:
    """The terminal's screen once it shows every one of `texts` (a frame arrives in pieces)."""
    for _ in range(int(seconds * 4)):
        screen = page.evaluate(SCREEN_TEXT) or ""
        if all(text in screen for text in texts):
            return screen
        page.wait_for_timeout(250)
    raise AssertionError(f"the page never showed {texts!r}; it shows:\n{screen}")


def read_png(data: bytes) -> list[list[tuple[int, int, int]]]:
    """The rows of RGB pixels of an 8-bit, non-interlaced PNG (as Chromium writes them): zlib and the
    five row filters, no imaging library needed."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, compressed = 8, b""
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        body = data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            width, height, depth, colour_type, _, _, interlace = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            compressed += body
        pos += 12 + length
    assert depth == 8 and colour_type in (2, 6) and interlace == 0, (depth, colour_type, interlace)
    bpp = 3 if colour_type == 2 else 4  # RGB or RGBA
    raw, stride = zlib.decompress(compressed), 1 + width * bpp
    rows, prior = [], bytearray(width * bpp)
    for y in range(height):
        kind, line = raw[y * stride], bytearray(raw[y * stride + 1 : (y + 1) * stride])
        if kind == 2:  # Up: the most common, done at once
            line = bytearray((a + b) & 255 for a, b in zip(line, prior))
        elif kind:
            for x in range(len(line)):
                left = line[x - bpp] if x >= bpp else 0
                up, up_left = prior[x], prior[x - bpp] if x >= bpp else 0
                if kind == 1:  # Sub
                    line[x] = (line[x] + left) & 255
                elif kind == 3:  # Average
                    line[x] = (line[x] + (left + up) // 2) & 255
                else:  # Paeth: whichever neighbour is nearest to left + up - up_left, in that order on ties
                    guess = left + up - up_left
                    nearest = min(
                        (abs(guess - left), left),
                        (abs(guess - up), up),
                        (abs(guess - up_left), up_left),
                        key=lambda pair: pair[0],
                    )
                    line[x] = (line[x] + nearest[1]) & 255
        rows.append([tuple(line[i : i + 3]) for i in range(0, len(line), bpp)])
        prior = line
    return rows


def assert_the_picture_shows_the_text(png: bytes, screen: str, cell: dict) -> None:
    """The screenshot draws the terminal's text where the terminal holds it: inside a 1-pixel margin
    (clear of its neighbours' smoothing), a cell holding a character shows a glyph on its background
    (two colours or more) and a blank cell one colour. A page that draws anything else fails."""
    rows = read_png(png)
    assert (len(rows[0]), len(rows)) == (VIEWPORT["width"], VIEWPORT["height"])
    assert len({pixel for row in rows for pixel in row}) > 100  # text in several colours, smoothed
    glyphs, blanks = [], []
    for y, line in enumerate(screen.splitlines()):
        top, bottom = round(cell["top"] + y * cell["height"]) + 1, round(cell["top"] + (y + 1) * cell["height"]) - 1
        for x, char in enumerate(line.ljust(cell["cols"])):
            left, right = round(cell["left"] + x * cell["width"]) + 1, round(cell["left"] + (x + 1) * cell["width"]) - 1
            colours = {pixel for row in rows[top:bottom] for pixel in row[left:right]}
            (blanks if char == " " else glyphs).append(len(colours))
    assert len(glyphs) > 1000  # the app's panels, not an empty screen
    drawn = sum(n > 1 for n in glyphs) / len(glyphs)
    plain = sum(n == 1 for n in blanks) / len(blanks)
    assert drawn > 0.95 and plain > 0.95, f"{drawn:.0%} of the characters drawn, {plain:.0%} of the blanks plain"


def test_the_app_is_live_in_the_browser_and_keys_step_the_loop(browser, server, tmp_path):
    page = browser.new_page(viewport=VIEWPORT)
    page.add_init_script(CATCH_THE_TERMINAL)
    page.goto(server)
    screen = wait_for_screen(page, "iter 0")  # the pipeline bar
    assert "Loop code" in screen and "Bugs (enter: on/off)" in screen
    page.mouse.click(700, 450)  # focus the terminal
    page.keyboard.press("n")
    # Pressing n in the page stepped the loop: the counter moved and the gradients are shown.
    screen = wait_for_screen(page, "iter 1", "upd/w")
    # And the page draws it: the terminal's text is not only held, it is on the screen. The
    # screenshot is of text that stayed the same while it was taken.
    for _ in range(10):
        page.screenshot(path=str(tmp_path / "browser.png"))
        if page.evaluate(SCREEN_TEXT) == screen:
            break
        screen = page.evaluate(SCREEN_TEXT)
    cell = page.evaluate(CELL_GEOMETRY)
    page.close()
    assert_the_picture_shows_the_text((tmp_path / "browser.png").read_bytes(), screen, cell)


def test_serve_rejects_a_bad_target_before_starting(capsys):
    from loopscope.cli import main

    assert main(["serve", "nosuch.py"]) == 2
    assert "no such file: nosuch.py" in capsys.readouterr().err


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGKILL], ids=lambda s: s.name)
def test_a_stopped_server_leaves_no_process_behind(browser, signum):
    """Two pages: one runs the digits CNN (an engine busy training, a screen redrawn all the time),
    the other waits at iteration 0 (an app that writes nothing, an engine that waits). The server
    gets `signum`; every process it started is gone 5 s later, and on SIGTERM the server itself
    stops within 2 s and says so."""
    process, url = start_server("digits")
    try:
        running, waiting = browser.new_page(viewport=VIEWPORT), browser.new_page(viewport=VIEWPORT)
        for page in (running, waiting):  # both apps and engines start at once
            page.add_init_script(CATCH_THE_TERMINAL)
            page.goto(url)
        for page in (running, waiting):
            wait_for_screen(page, "iter 0")
        running.mouse.click(700, 450)
        running.keyboard.press("r")
        wait_for_screen(running, "running")
        started = processes_in_session(process.pid)
        assert len(started) >= 5, started  # the server, and each page's app and engine

        os.kill(process.pid, signum)
        sent = time.monotonic()
        output, _ = process.communicate(timeout=10)
        stopped_after = time.monotonic() - sent
        while processes_in_session(process.pid) and time.monotonic() - sent < 5:
            time.sleep(0.1)
        left = processes_in_session(process.pid)
        running.close()
        waiting.close()
    finally:
        kill_session(process.pid)
        process.wait(10)
    assert left == [], f"still running 5 s after {signum.name}: {left}"
    if signum == signal.SIGTERM:
        assert stopped_after < 2.0, f"the server took {stopped_after:.1f} s to stop"
        assert b"SIGTERM, stopping the server" in output, output
