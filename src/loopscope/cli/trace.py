"""Write StageEvents as JSON lines or as a human-readable table (torch-free)."""

from __future__ import annotations

import json
from typing import TextIO

from loopscope.shared.events import StageEvent, TensorStat
from loopscope.shared.loopcode import LOOP_FILE

TABLE_HEADER = f"{'iter':>6} {'epoch':>5}  {'stage':<11} {'ms':>7}  what happened"


def event_json(event: StageEvent) -> str:
    """One line of valid JSON (NaN/Inf written as null and listed under `nonfinite`)."""
    return json.dumps(event.to_dict(), allow_nan=False, separators=(",", ":"))


def _num(value: float | None, digits: int = 4) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}g}"


def _shape(stat: TensorStat) -> str:
    return "[" + ",".join(map(str, stat.shape)) + "]"


def _tensor(stat: TensorStat) -> str:
    text = f"{stat.name} {_shape(stat)} {stat.dtype} {stat.device}"
    if stat.mean is not None:
        text += f" mean {_num(stat.mean, 3)} std {_num(stat.std, 3)}"
    if stat.nan_count or stat.inf_count:
        text += f" ({stat.nan_count} NaN, {stat.inf_count} Inf)"
    return text


def describe(event: StageEvent) -> str:
    """What the stage did, in one line."""
    m = event.metrics
    text = _describe(event)
    if "micro_batch" in m:  # gradient accumulation: which micro-batch of the step (of how many, if known)
        of = f"/{m['micro_batches']}" if "micro_batches" in m else ""
        text = f"[micro-batch {m['micro_batch']}{of}] " + text
    line = event.code_line
    if isinstance(line, dict) and "file" in line and line["file"] != LOOP_FILE:  # a script's own line
        text += f"  [{line['file']}:{line['line']}]"
    return text


def _describe(event: StageEvent) -> str:
    m = event.metrics
    if event.error is not None:
        err = event.error
        text = f"ERROR {err.type}: {err.message}"
        if err.location:
            text += f" [{err.location}]"
        if err.hint:
            text += f" -- {err.hint}"
        return text
    stage = event.stage
    if stage == "load_batch":
        text = " | ".join(_tensor(t) for t in event.tensors)
        if "class_counts" in m:
            text += "  classes " + " ".join(f"{k}:{v}" for k, v in m["class_counts"].items())
        return text
    if stage == "zero_grad":
        if "grads_before" not in m:
            return "optimizer.zero_grad()"
        before, after = m["grads_before"], m["grads_after"]
        return (
            f"grads before: {before['nonzero']} with values (norm {_num(before['norm'])}), "
            f"{before['none']} None -> after: {after['nonzero']} with values, {after['none']} None"
        )
    if stage == "forward":
        output = next((t for t in event.tensors if t.name == "output"), None)
        modules = sum(1 for t in event.tensors if t.module_type)
        text = (_tensor(output) if output else "") + (f"  ({modules} module outputs)" if modules else "")
        if "batchnorm_checksum" in m:  # DDP: equal on every rank when BatchNorm syncs its statistics
            text += f"  batchnorm stats crc {m['batchnorm_checksum']}"
        return text
    if stage == "loss":
        shapes = " vs ".join(f"{t.name} {_shape(t)}" for t in event.tensors if t.name in ("output", "targets"))
        kind = ", rows sum to 1: probabilities, not logits" if m.get("loss_input") == "probabilities" else ""
        divided = f", divided by {m['loss_divisor']} for backward" if m.get("loss_divisor", 1) > 1 else ""
        return f"loss {_num(event.loss)}  ({shapes}{kind}{divided})"
    if stage == "backward":
        if event.grad_norm is None and not event.layers:
            return "loss.backward()"
        scaled = f" (loss scaled x{m['grad_scale']:g}; norms shown unscaled)" if m.get("grad_scale") else ""
        tensors = sum(1 for layer in event.layers if layer.grad_norm is not None)
        if "local_grad_norm" in m:  # DDP: this rank's own, then the average of every rank's
            return (
                f"grad norm {_num(m['local_grad_norm'])} on this rank -> {_num(event.grad_norm)} "
                f"all-reduced, over {tensors} tensors{scaled}  "
                f"({m.get('all_reduces', 0)} all-reduce{'' if m.get('all_reduces') == 1 else 's'}, "
                f"{_num(m.get('comm_ms'), 2)} ms)"
            )
        held = "  (not all-reduced: under no_sync(), summed on this rank)" if m.get("all_reduces") == 0 else ""
        return f"grad norm {_num(event.grad_norm)} over {tensors} tensors{scaled}{held}"
    if stage == "unscale":
        found = "  inf/NaN found: the scaler will skip this step" if m.get("found_inf") else ""
        return f"scaler.unscale_(optimizer): grad norm {_num(event.grad_norm)}{found}"
    if stage == "clip_grad":
        return f"norm {_num(m.get('norm_before'))} -> {_num(event.grad_norm)} (max {m.get('max_norm')}, clipped: {m.get('clipped')})"
    if stage == "step":
        text = f"lr {_num(m.get('lr'), 6)}"
        if m.get("step_skipped"):
            text += f"  SKIPPED by the GradScaler (inf/NaN gradients): scale {m.get('grad_scale_before'):g} -> {m.get('grad_scale'):g}"
        if "max_update_ratio" in m and not m.get("step_skipped"):
            text += f"  max update/weight {_num(m['max_update_ratio'])}"
        if "param_checksum" in m:  # DDP: equal on every rank while they train one model
            text += f"  parameters crc {m['param_checksum']}"
        return text
    if stage == "scheduler":
        return f"lr {_num(m.get('lr_before'), 6)} -> {_num(m.get('lr'), 6)}"
    if stage == "validate":
        text = f"val loss {_num(m.get('val_loss'))}"
        if m.get("val_accuracy") is not None:
            text += f"  val accuracy {m['val_accuracy']:.1%}"
        return text + f"  ({m.get('val_examples')} examples)"
    if stage == "checkpoint":
        if "best_val_loss" not in m:  # a script's torch.save: what it wrote, not why
            return f"saved {m.get('saved_tensors', 0)} tensors to {m.get('path', 'a file object')}"
        return f"{'saved' if m.get('saved') else 'kept'} best (val loss {_num(m.get('best_val_loss'))})"
    if stage == "early_stop":
        verdict = "STOP" if m.get("stop") else "continue"
        return f"{m.get('without_improvement')}/{m.get('patience')} validations without improvement: {verdict}"
    return ""


def event_row(event: StageEvent) -> str:
    rank = "" if event.rank is None else f"{event.rank:>4} "
    return (
        f"{rank}{event.iteration:>6} {event.epoch:>5}  {event.stage:<11} {event.duration_ms:>7.2f}  {describe(event)}"
    )


class TraceWriter:
    """Streams events to a text file as they happen, so an interrupted trace is complete so far.
    With `ranks`, the table's rows start with the rank that made them."""

    def __init__(self, out: TextIO, fmt: str, ranks: bool = False) -> None:
        self.out = out
        self.fmt = fmt
        self.count = 0
        if fmt == "table":
            out.write(("rank " if ranks else "") + TABLE_HEADER + "\n")

    def write(self, event: StageEvent) -> None:
        self.out.write((event_json(event) if self.fmt == "jsonl" else event_row(event)) + "\n")
        self.count += 1
        if event.stage in ("validate", "step") or event.error is not None:
            self.out.flush()
