"""The README's two set-up-and-go commands exist, and CI runs the test one verbatim."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Set up and go", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", section)


def test_readme_has_exactly_two_setup_commands_and_ci_runs_the_test_one():
    install_and_launch, install_and_test = readme_commands()
    assert install_and_launch.endswith("loopscope") and "torch==2.13.0" in install_and_launch
    # The last step runs the whole suite: pytest on the default test paths, no file or -k picked.
    last_step = install_and_test.rsplit("&&", 1)[1].split()
    assert last_step[:3] == [".venv/bin/python", "-m", "pytest"]
    assert all(arg.startswith("-") or arg in ("auto", "loadfile") for arg in last_step[3:])
    assert install_and_test in (ROOT / ".ci" / "run").read_text().splitlines()
