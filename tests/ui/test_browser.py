"""`loopscope serve` for the projector: the app live in a real (headless) Chromium."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

CHROMIUM = "/usr/bin/chromium"
# As this machine needs them: no sandbox as root, and no background calls to the outside world.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server():
    if not os.path.exists(CHROMIUM) or shutil.which("chromium") is None:
        pytest.skip("Debian's chromium is not installed")
    pytest.importorskip("playwright.sync_api")
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "loopscope", "serve", "blobs", "--port", str(port)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(url, timeout=1).read()
            break
        except OSError:
            if time.monotonic() > deadline or process.poll() is not None:
                process.kill()
                raise AssertionError(f"the server did not start: {process.stdout.read()!r}")
            time.sleep(0.2)
    yield url
    os.killpg(process.pid, signal.SIGTERM)  # the server and the app sessions it started
    process.wait(10)


def test_the_app_is_live_in_the_browser_and_keys_step_the_loop(server, tmp_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        # The terminal is drawn on a canvas; what the app sends over the page's websocket is the text.
        received: list[str] = []
        page.on("websocket", lambda ws: ws.on(
            "framereceived", lambda f: received.append(f if isinstance(f, str) else f.decode("utf-8", "replace"))))
        page.goto(server)

        def wait_for(text: str, seconds: float = 60) -> bool:
            for _ in range(int(seconds * 4)):
                if text in "".join(received):
                    return True
                page.wait_for_timeout(250)
            return False

        assert wait_for("iter 0"), "the pipeline bar never reached the page"
        assert wait_for("Loop code")
        page.mouse.click(700, 450)  # focus the terminal
        page.keyboard.press("n")
        assert wait_for("upd/w"), "pressing n in the page did not step the loop"
        page.screenshot(path=str(tmp_path / "browser.png"))
        assert (tmp_path / "browser.png").stat().st_size > 10_000
        browser.close()


def test_serve_rejects_a_bad_target_before_starting(capsys):
    from loopscope.cli import main

    assert main(["serve", "nosuch.py"]) == 2
    assert "no such file: nosuch.py" in capsys.readouterr().err
