"""Which mode a target runs in (DESIGN.md §8): a `.py` file with a top-level `experiment` is a
factory; any other `.py` file is a script."""

from __future__ import annotations

import ast
from pathlib import Path


def is_script(target: str, forced: bool = False) -> bool:
    """True when `target` is a Python file to run as written (or `--script` forces it)."""
    path = Path(target)
    if path.suffix != ".py" or not path.is_file():
        return False
    if forced:
        return True
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    except (SyntaxError, UnicodeDecodeError, OSError):
        return False  # the factory loader reports what is wrong with the file
    return not any(_defines_experiment(node) for node in tree.body)


def _defines_experiment(node: ast.stmt) -> bool:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        return node.name == "experiment"
    if isinstance(node, ast.Assign):
        return any(isinstance(t, ast.Name) and t.id == "experiment" for t in node.targets)
    if isinstance(node, ast.ImportFrom):
        return any((alias.asname or alias.name) == "experiment" for alias in node.names)
    return False
