"""The shape of a trace record: its keys in order and the JSON type of every value, without the
numbers (whose last bits differ from one CPU to the next)."""

from __future__ import annotations

import json
from typing import Any


def shape(value: Any) -> Any:
    if isinstance(value, dict):
        return [[key, shape(item)] for key, item in value.items()]
    if isinstance(value, list):
        return ["list", shape(value[0])] if value else ["list"]
    if value is None:
        return "null"
    return type(value).__name__


def distinct_shapes(jsonl: str) -> list[str]:
    """Every distinct record shape in a JSON-lines trace, each with its stage, sorted."""
    found = set()
    for line in jsonl.splitlines():
        record = json.loads(line)
        found.add(json.dumps([record["stage"], shape(record)], separators=(",", ":")))
    return sorted(found)
