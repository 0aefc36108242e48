"""The `loopscope` command: thin over the engine, the UI and the shared catalog."""

from loopscope.cli.main import main

__all__ = ["main"]
