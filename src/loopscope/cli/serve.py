"""`loopscope serve`: textual-serve's web server, stopped promptly by any signal a server gets.

textual-serve stops on SIGINT and SIGTERM only, waits for every page's app to wind down (8-18 s
measured, silently) and ignores SIGHUP. Here each of them ends the server within
`STOP_SECONDS`, with a line. The apps it started do not depend on that: each one ends when its
input (the server's pipe) closes, so they go even when the server is killed with SIGKILL.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys

from aiohttp import web
from textual_serve.server import Server

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
STOP_SECONDS = 1.5  # a graceful stop gets this long, then the process ends regardless


class LoopscopeServer(Server):
    def serve(self, debug: bool = False) -> None:
        self.debug = debug
        self.initialize_logging()
        loop = asyncio.new_event_loop()
        for signum in STOP_SIGNALS:
            loop.add_signal_handler(signum, self._stop, signum)
        web.run_app(
            self._make_app(),
            host=self.host,
            port=self.port,
            handle_signals=False,
            loop=loop,
            print=lambda *args: None,
            shutdown_timeout=STOP_SECONDS,
        )

    def _stop(self, signum: int) -> None:
        print(f"loopscope: {signal.Signals(signum).name}, stopping the server", file=sys.stderr, flush=True)
        # The pages' apps end on their own once their input closes, so nothing is lost by not
        # waiting for them; the timer is for an aiohttp shutdown that would take longer.
        asyncio.get_running_loop().call_later(STOP_SECONDS, os._exit, 0)
        self.request_exit()


def serve(command: str, port: int) -> None:
    print(f"loopscope: serving on http://127.0.0.1:{port} (ctrl+c stops)", flush=True)
    # Loopback only: a lecture laptop should not expose a Python process to the room's network.
    # `exec`: the shell textual-serve starts becomes the app, so the app's parent is the server.
    LoopscopeServer(f"exec {command}", host="127.0.0.1", port=port, title="loopscope").serve()
