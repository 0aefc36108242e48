"""The training loop as a person writes it, line by line, with active bugs shown as a diff.

Torch-free: the code panel renders this. Each line knows the stage it belongs to, so the panel
can highlight the line of the stage just run.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from loopscope.shared.bugs import BUGS_BY_ID, ORDER_BUGS


@dataclass(frozen=True)
class CodeLine:
    text: str
    stage: str | None = None
    change: str = ""  # "" | "removed" | "added"
    bug: str | None = None


def loop_lines(options: dict[str, object], iteration_stages: tuple[str, ...] | list[str]) -> list[CodeLine]:
    """The clean loop for this experiment's options, in the order its stages run."""
    body: dict[str, list[str]] = {
        "load_batch": ["for x, y in train_loader:", "    x, y = x.to(device), y.to(device)"],
        "zero_grad": ["    optimizer.zero_grad()"],
        "forward": ["    out = model(x)"],
        "loss": ["    loss = loss_fn(out, y)", "    running_loss += loss.item()"],
        "backward": ["    loss.backward()"],
        "clip_grad": ["    clip_grad_norm_(model.parameters(), max_norm)"],
        "step": ["    optimizer.step()"],
        "scheduler": ["    scheduler.step()"],
    }
    lines = [CodeLine("for epoch in range(epochs):"), CodeLine("  model.train()")]
    for stage in iteration_stages:
        for text in body.get(stage, []):
            lines.append(CodeLine("  " + text, stage))
    if options.get("validation"):
        lines += [
            CodeLine("  model.eval()", "validate"),
            CodeLine("  with torch.no_grad():", "validate"),
            CodeLine("      for x, y in val_loader:", "validate"),
            CodeLine("          val_loss += loss_fn(model(x), y).item() * len(y)", "validate"),
            CodeLine("  model.train()", "validate"),
        ]
    if options.get("scheduler") and options.get("scheduler_interval") == "epoch":
        lines.append(CodeLine("  scheduler.step()", "scheduler"))
    if options.get("checkpoint"):
        lines.append(CodeLine("  if val_loss < best: best = val_loss; save(model)", "checkpoint"))
    if options.get("early_stopping_patience"):
        lines.append(CodeLine(f"  if epochs_without_improvement >= {options['early_stopping_patience']}: break",
                              "early_stop"))
    return lines


CANONICAL_ORDER = ("load_batch", "zero_grad", "forward", "loss", "backward", "clip_grad", "step", "scheduler")


def _code(text: str) -> str:
    """The code of a line, without indentation or a trailing comment."""
    return text.split("#", 1)[0].strip()


def render_loop(options: dict[str, object], stages: tuple[str, ...] | list[str], bugs: tuple[str, ...] | list[str]) -> list[CodeLine]:
    """The loop that runs now, as a diff against the correct one."""
    clean_order = sorted(stages, key=lambda s: CANONICAL_ORDER.index(s) if s in CANONICAL_ORDER else 99)
    clean = loop_lines(options, [s for s in clean_order if s in CANONICAL_ORDER])
    lines = _order_diff(clean, loop_lines(options, [s for s in stages if s in CANONICAL_ORDER]), bugs)
    return with_bugs(lines, [b for b in bugs if b not in ORDER_BUGS])


def _order_diff(clean: list[CodeLine], now: list[CodeLine], bugs) -> list[CodeLine]:
    """A moved call: struck out where it belongs, added where it now runs."""
    if [line.text for line in clean] == [line.text for line in now]:
        return clean
    order_bug = next((b for b in bugs if b in ORDER_BUGS), None)
    result: list[CodeLine] = []
    matcher = difflib.SequenceMatcher(a=[line.text for line in clean], b=[line.text for line in now], autojunk=False)
    for op, a0, a1, b0, b1 in matcher.get_opcodes():
        if op == "equal":
            result += now[b0:b1]
            continue
        result += [CodeLine(line.text, line.stage, "removed", order_bug) for line in clean[a0:a1]]
        result += [CodeLine(line.text, line.stage, "added", order_bug) for line in now[b0:b1]]
    return result


def with_bugs(lines: list[CodeLine], bugs: tuple[str, ...] | list[str]) -> list[CodeLine]:
    """The loop with each active bug's diff: the correct line struck out, the buggy one added.

    A bug whose correct line is not in the loop (initialisation, the optimizer, the DataLoader)
    shows its diff in a setup block above the loop.
    """
    result = list(lines)
    setup: list[CodeLine] = []
    for bug_id in bugs:
        bug = BUGS_BY_ID[bug_id]
        wanted = _code(bug.correct.splitlines()[-1]) if bug.correct.strip() else ""
        candidates = [i for i, line in enumerate(result) if not line.change and _code(line.text) == wanted]
        # Prefer the line in the bug's own stage (there are two model.train() calls, say).
        anchor = next((i for i in candidates if result[i].stage == bug.stage), candidates[0] if candidates else None)
        if anchor is None:
            setup += [CodeLine(t, None, "removed", bug_id) for t in bug.correct.splitlines()]
            setup += [CodeLine(t, None, "added", bug_id) for t in bug.buggy.splitlines()]
            continue
        line = result[anchor]
        indent = line.text[: len(line.text) - len(line.text.lstrip())]
        added = [CodeLine(indent + t, line.stage, "added", bug_id) for t in bug.buggy.splitlines() if t.strip()]
        result[anchor: anchor + 1] = [CodeLine(line.text, line.stage, "removed", bug_id)] + added
    if setup:
        return [CodeLine("# setup")] + setup + [CodeLine("")] + result
    return result
