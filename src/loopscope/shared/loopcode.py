"""The training loop as a person writes it, line by line, with active bugs shown as a diff.

Torch-free: the code panel renders this, and factory mode's trace records each stage's line of the
clean loop as its `code_line`. Each line knows the stage it belongs to, so the panel can highlight
the line of the stage just run.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from loopscope.shared.bugs import BUGS_BY_ID, ORDER_BUGS
from loopscope.shared.vocab import ITERATION_STAGES, Change, Stage


@dataclass(frozen=True)
class CodeLine:
    text: str
    stage: Stage | None = None
    change: Change = Change.SAME
    bug: str | None = None


def loop_lines(options: Mapping[str, object], iteration_stages: Sequence[Stage]) -> list[CodeLine]:
    """The clean loop for this experiment's options, in the order its stages run."""
    body: dict[Stage, list[str]] = {
        Stage.LOAD_BATCH: ["for x, y in train_loader:", "    x, y = x.to(device), y.to(device)"],
        Stage.ZERO_GRAD: ["    optimizer.zero_grad()"],
        Stage.FORWARD: ["    out = model(x)"],
        Stage.LOSS: ["    loss = loss_fn(out, y)", "    running_loss += loss.item()"],
        Stage.BACKWARD: ["    loss.backward()"],
        Stage.CLIP_GRAD: ["    clip_grad_norm_(model.parameters(), max_norm)"],
        Stage.STEP: ["    optimizer.step()"],
        Stage.SCHEDULER: ["    scheduler.step()"],
    }
    if options.get("own_loss"):  # the model computes its own loss from the targets it is given
        body[Stage.FORWARD] = ["    out = model(x, y)"]
        body[Stage.LOSS] = ["    loss = out.loss", "    running_loss += loss.item()"]
    amp = options.get("amp")
    if amp in ("bf16", "fp16"):  # forward and loss under autocast, one block
        forward, (loss, *rest) = body[Stage.FORWARD], body[Stage.LOSS]
        dtype = "torch.bfloat16" if amp == "bf16" else "torch.float16"
        body[Stage.FORWARD] = [f"    with torch.autocast(device, dtype={dtype}):", *("    " + f for f in forward)]
        body[Stage.LOSS] = ["    " + loss, *rest]
    if amp == "fp16":  # the loss scaled for backward, the step through the scaler
        body[Stage.BACKWARD] = ["    scaler.scale(loss).backward()"]
        body[Stage.UNSCALE] = ["    scaler.unscale_(optimizer)"]
        body[Stage.STEP] = ["    scaler.step(optimizer)", "    scaler.update()"]
    accumulation = options.get("accumulation") or 1
    if isinstance(accumulation, int) and accumulation > 1:
        body[Stage.LOAD_BATCH][0] = "for i, (x, y) in enumerate(train_loader):"
        body[Stage.ZERO_GRAD] = ["    if i % K == 0:", "        optimizer.zero_grad()"]
        body[Stage.LOSS].append("    loss = loss / K")
        for stage in _AFTER_ACCUMULATION:
            body[stage] = ["    " + text for text in body.get(stage, [])]
    distributed = bool(options.get("distributed"))
    if distributed and isinstance(accumulation, int) and accumulation > 1:
        # Every micro-batch but the step's runs under no_sync(): its forward and backward.
        for stage in (Stage.FORWARD, Stage.LOSS, Stage.BACKWARD):
            body[stage] = ["    " + text for text in body[stage]]
        body[Stage.FORWARD][:0] = [
            "    sync = (i + 1) % K == 0 or i + 1 == len(train_loader)",
            "    with nullcontext() if sync else model.no_sync():  # one all-reduce a step",
        ]
    lines = [CodeLine("for epoch in range(epochs):"), CodeLine("  model.train()")]
    if distributed:
        lines.insert(1, CodeLine("  sampler.set_epoch(epoch)  # a new shuffle each epoch"))
        setup = list(_DDP_SETUP)
        if options.get("sync_batchnorm"):
            setup.insert(
                1, "model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # statistics over every rank's batch"
            )
        lines[:0] = [CodeLine(text) for text in setup]
    if amp == "fp16":
        lines.insert(0, CodeLine("scaler = torch.amp.GradScaler()"))
    if isinstance(accumulation, int) and accumulation > 1:
        lines.insert(0, CodeLine(f"K = {accumulation}  # micro-batches per optimizer step"))
    step_block_open = False
    for stage in dict.fromkeys(iteration_stages):  # micro-batches repeat stages: the code has them once
        if accumulation != 1 and stage in _AFTER_ACCUMULATION and not step_block_open:
            step_block_open = True
            lines.append(CodeLine("      if (i + 1) % K == 0 or i + 1 == len(train_loader):", stage))
        for text in body.get(stage, []):
            lines.append(CodeLine("  " + text, stage))
    if options.get("validation"):
        lines += [
            CodeLine("  model.eval()", Stage.VALIDATE),
            CodeLine("  with torch.no_grad():", Stage.VALIDATE),
            CodeLine("      for x, y in val_loader:", Stage.VALIDATE),
            CodeLine(
                "          val_loss += "
                + ("model(x, y).loss" if options.get("own_loss") else "loss_fn(model(x), y)")
                + ".item() * len(y)",
                Stage.VALIDATE,
            ),
            CodeLine("  model.train()", Stage.VALIDATE),
        ]
    if options.get("scheduler") and options.get("scheduler_interval") == "epoch":
        lines.append(CodeLine("  scheduler.step()", Stage.SCHEDULER))
    if options.get("checkpoint") and distributed:  # one copy of the model to save: rank 0's
        lines.append(CodeLine("  if val_loss < best:", Stage.CHECKPOINT))
        lines.append(CodeLine("      best = val_loss", Stage.CHECKPOINT))
        lines.append(CodeLine("      if rank == 0: save(model)", Stage.CHECKPOINT))
    elif options.get("checkpoint"):
        lines.append(CodeLine("  if val_loss < best: best = val_loss; save(model)", Stage.CHECKPOINT))
    if options.get("early_stopping_patience"):
        lines.append(
            CodeLine(
                f"  if epochs_without_improvement >= {options['early_stopping_patience']}: break", Stage.EARLY_STOP
            )
        )
    return lines


# What a DDP tutorial adds before the loop (`--nproc`); torchrun's environment names the rank.
_DDP_SETUP = (
    'dist.init_process_group("gloo")  # nccl on GPUs; one process per rank',
    "model = DDP(model)  # gradients all-reduced (averaged) inside backward()",
    "sampler = DistributedSampler(train_set)  # each rank its own 1/N of the data",
    "train_loader = DataLoader(train_set, batch_size=B, sampler=sampler)",
)
CANONICAL_ORDER: tuple[Stage, ...] = ITERATION_STAGES
# With gradient accumulation these run once every K micro-batches, inside `if (i + 1) % K == 0:`.
_AFTER_ACCUMULATION = (Stage.UNSCALE, Stage.CLIP_GRAD, Stage.STEP, Stage.SCHEDULER)


LOOP_FILE = "<loopscope loop>"  # factory mode's code_line file: the loop loopscope writes


def stage_lines(options: Mapping[str, object], stages: Sequence[Stage]) -> dict[Stage, dict[str, object]]:
    """Each stage's line in the clean loop (the code panel without bugs), as a trace's code_line
    `{file, line, text}`: the stage's first statement, not the `if`/`with` that opens its block."""
    clean_order = sorted(stages, key=lambda s: CANONICAL_ORDER.index(s) if s in CANONICAL_ORDER else 99)
    found: dict[Stage, dict[str, object]] = {}
    for number, line in enumerate(loop_lines(options, [s for s in clean_order if s in CANONICAL_ORDER]), 1):
        text = line.text.strip()
        if line.stage is None or line.stage in found or text.startswith(("if ", "with ")):
            continue
        found[line.stage] = {"file": LOOP_FILE, "line": number, "text": text}
    return found


def _code(text: str) -> str:
    """The code of a line, without indentation or a trailing comment."""
    return text.split("#", 1)[0].strip()


def render_loop(options: Mapping[str, object], stages: Sequence[Stage], bugs: Sequence[str]) -> list[CodeLine]:
    """The loop that runs now, as a diff against the correct one."""
    clean_order = sorted(stages, key=lambda s: CANONICAL_ORDER.index(s) if s in CANONICAL_ORDER else 99)
    clean = loop_lines(options, [s for s in clean_order if s in CANONICAL_ORDER])
    lines = _order_diff(clean, loop_lines(options, [s for s in stages if s in CANONICAL_ORDER]), bugs)
    return with_bugs(lines, [b for b in bugs if b not in ORDER_BUGS])


def _order_diff(clean: list[CodeLine], now: list[CodeLine], bugs: Sequence[str]) -> list[CodeLine]:
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
        result += [CodeLine(line.text, line.stage, Change.REMOVED, order_bug) for line in clean[a0:a1]]
        result += [CodeLine(line.text, line.stage, Change.ADDED, order_bug) for line in now[b0:b1]]
    return result


def with_bugs(lines: list[CodeLine], bugs: Sequence[str]) -> list[CodeLine]:
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
            setup += [CodeLine(t, None, Change.REMOVED, bug_id) for t in bug.correct.splitlines()]
            setup += [CodeLine(t, None, Change.ADDED, bug_id) for t in bug.buggy.splitlines()]
            continue
        line = result[anchor]
        indent = line.text[: len(line.text) - len(line.text.lstrip())]
        buggy = [t for t in bug.buggy.splitlines() if t.strip()]
        kept = bool(buggy) and _code(buggy[0]) == wanted  # the bug only adds lines after a correct one
        added = [CodeLine(indent + t, line.stage, Change.ADDED, bug_id) for t in buggy[1 if kept else 0 :]]
        result[anchor : anchor + 1] = [
            line if kept else CodeLine(line.text, line.stage, Change.REMOVED, bug_id),
            *added,
        ]
    if setup:
        return [CodeLine("# setup"), *setup, CodeLine(""), *result]
    return result
