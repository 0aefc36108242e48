"""What only the ranks side by side show: findings from the numbers each rank reports (its batch's
fingerprint, its parameters' checksum), never from the bugs switched on."""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from typing import Any

from loopscope.shared.bugs import BUGS_BY_ID
from loopscope.shared.events import Finding, StageEvent
from loopscope.shared.vocab import Severity, Stage

SAME_BATCHES_STREAK = 3  # iterations in a row with one batch on every rank: not a coincidence
EPOCH_START = 3  # batches compared at the start of consecutive epochs


def _finding(finding_id: str, severity: Severity, message: str, bug: str) -> Finding:
    """A finding that suspects one bug, with that bug's fix."""
    return Finding(finding_id, severity, message, (bug,), BUGS_BY_ID[bug].fix)


class RankComparison:
    """Fed every turn's events (all ranks'); returns the findings each turn raises, once per id."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self.raised: dict[str, tuple[int, Finding]] = {}  # id -> (iteration, finding)
        self._same_streak = 0
        self._starts: dict[int, dict[int, list[str]]] = defaultdict(dict)  # rank -> epoch -> fingerprints
        self._communicating: dict[tuple[int | None, int], int] = {}  # (rank, iteration) -> backwards that all-reduced
        self._batch_sizes: dict[int, int] = {}  # rank -> examples in its latest batch
        self.batchnorm_compared = False  # some forward's BatchNorm statistics were compared across ranks

    def annotate(self, events: list[StageEvent]) -> list[StageEvent]:
        """The events, each with the findings comparing the ranks raised at it added."""
        raised = self.observe(events)
        out = []
        for event in events:
            mine = tuple(finding for at, finding in raised if at is event)
            out.append(dataclasses.replace(event, diagnostics=event.diagnostics + mine) if mine else event)
        return out

    def observe(self, events: list[StageEvent]) -> list[tuple[StageEvent, Finding]]:
        found: list[tuple[StageEvent, Finding]] = []
        # One group per stage run on every rank: with accumulation, per micro-batch.
        by_stage: dict[tuple[int, Any, Stage], list[StageEvent]] = defaultdict(list)
        for event in events:
            if event.error is None:
                by_stage[(event.iteration, event.metrics.get("micro_batch"), event.stage)].append(event)
        for (iteration, _, stage), group in by_stage.items():
            if stage == Stage.LOAD_BATCH:
                found += self._batches(iteration, group)
            elif stage == Stage.FORWARD:
                found += self._batchnorm(iteration, group)
            elif stage == Stage.STEP:
                found += self._checksums(iteration, group)
            elif stage == Stage.BACKWARD:
                found += self._all_reduces(iteration, group)
            elif stage == Stage.VALIDATE:
                found += self._validations(iteration, group)
            elif stage == Stage.CHECKPOINT:
                found += self._checkpoints(iteration, group)
        return [(event, finding) for event, finding in found if self._first(event.iteration, finding)]

    def _first(self, iteration: int, finding: Finding) -> bool:
        if finding.id in self.raised:
            return False
        self.raised[finding.id] = (iteration, finding)
        return True

    def _batches(self, iteration: int, group: list[StageEvent]) -> list[tuple[StageEvent, Finding]]:
        prints = [e.metrics.get("batch_fingerprint") for e in group]
        found = []
        if len(group) == self.world_size > 1 and None not in prints and len(set(prints)) == 1:
            self._same_streak += 1
            if self._same_streak == SAME_BATCHES_STREAK:
                found.append(
                    (
                        group[0],
                        _finding(
                            "ranks_same_batches",
                            "error",
                            f"every rank loaded the same examples in {SAME_BATCHES_STREAK} batches running, up to "
                            f"iteration {iteration} (batch fingerprint {prints[0]} on all {self.world_size} ranks): the data "
                            "is not split between the ranks, so they do one rank's work N times",
                            "no_distributed_sampler",
                        ),
                    )
                )
        else:
            self._same_streak = 0
        for event in group:
            found += self._epoch_order(event)
            if event.rank is not None and "batch_size" in event.metrics:
                self._batch_sizes[event.rank] = event.metrics["batch_size"]
        return found

    def _epoch_order(self, event: StageEvent) -> list[tuple[StageEvent, Finding]]:
        fingerprint = event.metrics.get("batch_fingerprint")
        if fingerprint is None or event.rank is None:
            return []
        starts = self._starts[event.rank]
        start = starts.setdefault(event.epoch, [])
        if len(start) >= EPOCH_START:
            return []
        start.append(fingerprint)
        before = starts.get(event.epoch - 1)
        starts.pop(event.epoch - 2, None)
        compared = min(EPOCH_START, len(before)) if before else 0
        if before is None or not compared or len(start) != compared or not event.metrics.get("sampler_shuffles"):
            return []
        if start != before[:compared]:
            return []
        finding = _finding(
            "same_order_each_epoch",
            "warning",
            f"epoch {event.epoch} began with the same {compared} batches as epoch {event.epoch - 1} on rank "
            f"{event.rank}, though its sampler shuffles: the shuffle is not renewed from one epoch to the next",
            "set_epoch_forgotten",
        )
        return [(event, finding)]

    def _all_reduces(self, iteration: int, group: list[StageEvent]) -> list[tuple[StageEvent, Finding]]:
        """Accumulating micro-batches: only the backward before the step needs to all-reduce, so a
        second backward that communicates in one iteration is the no_sync() left out."""
        found = []
        for event in group:
            if not event.metrics.get("all_reduces") or "micro_batch" not in event.metrics:
                continue
            key = (event.rank, iteration)
            self._communicating[key] = self._communicating.get(key, 0) + 1
            if self._communicating[key] != 2:
                continue
            finding = _finding(
                "all_reduce_every_micro_batch",
                "warning",
                f"rank {event.rank} all-reduced its gradients at micro-batch {event.metrics['micro_batch']} as well "
                f"as at an earlier one of the same step ({event.metrics.get('comm_ms', 0):.2f} ms this time): correct, "
                "but each step pays the communication once per micro-batch instead of once",
                "accumulation_without_no_sync",
            )
            found.append((event, finding))
        self._communicating = {k: v for k, v in self._communicating.items() if k[1] >= iteration}
        return found

    def _batchnorm(self, iteration: int, group: list[StageEvent]) -> list[tuple[StageEvent, Finding]]:
        """DDP hands every rank rank 0's running statistics before a forward; after it they still
        agree only if every rank normalized with the same (the whole batch's) statistics."""
        sums = [e.metrics.get("batchnorm_checksum") for e in group]
        if len(group) < 2 or None in sums:
            return []
        self.batchnorm_compared = True
        if len(set(sums)) == 1:
            return []
        per_rank = ", ".join(f"rank {e.rank}: {checksum}" for e, checksum in zip(group, sums))
        sizes = {self._batch_sizes.get(e.rank) for e in group if e.rank is not None}
        size = sizes.pop() if len(sizes) == 1 else None
        examples = (
            f"its own {size} examples instead of the {size * len(group)} of every rank's batch together"
            if size
            else "its own share of the batch instead of the whole batch"
        )
        finding = _finding(
            "batchnorm_statistics_per_rank",
            "warning",
            f"after forward at iteration {iteration} the ranks' BatchNorm running statistics differ "
            f"({per_rank}): each rank normalized with the mean and variance of {examples}",
            "batchnorm_not_synced",
        )
        return [(group[0], finding)]

    def _checksums(self, iteration: int, group: list[StageEvent]) -> list[tuple[StageEvent, Finding]]:
        sums = [e.metrics.get("param_checksum") for e in group]
        if len(group) < 2 or None in sums or len(set(sums)) == 1:
            return []
        per_rank = ", ".join(f"rank {e.rank}: {e.metrics.get('param_checksum')}" for e in group)
        finding = _finding(
            "ranks_diverged",
            "error",
            f"after step at iteration {iteration} the ranks' parameters differ ({per_rank}): they no longer "
            "train one model, and DDP will not bring them back together",
            "rank_modifies_parameters",
        )
        return [(group[-1], finding)]

    def _checkpoints(self, iteration: int, group: list[StageEvent]) -> list[tuple[StageEvent, Finding]]:
        """One model on every rank: one rank should write it."""
        writers = [e.rank for e in group if e.metrics.get("saved")]
        if len(writers) < 2:
            return []
        finding = _finding(
            "checkpoint_saved_by_every_rank",
            "warning",
            f"ranks {', '.join(map(str, writers))} each saved the checkpoint after iteration {iteration}: the same "
            f"model {len(writers)} times, {len(writers)} processes writing one file at once",
            "checkpoint_every_rank",
        )
        return [(group[0], finding)]

    def _validations(self, iteration: int, group: list[StageEvent]) -> list[tuple[StageEvent, Finding]]:
        """One validation set, one model: every rank must report the same numbers."""
        losses = [e.metrics.get("val_loss") for e in group]
        if len(group) < 2 or None in losses or len(set(losses)) == 1:
            return []
        per_rank = "; ".join(f"rank {e.rank}: {_val_summary(e)}" for e in group)
        finding = _finding(
            "ranks_disagree_on_validation",
            "warning",
            f"the validation after iteration {iteration} gave each rank other numbers ({per_rank}): each "
            "measured only its share of the validation set, so what rank 0 reports is not the whole set's",
            "val_metrics_rank0_only",
        )
        return [(group[0], finding)]


def _val_summary(event: StageEvent) -> str:
    metrics = event.metrics
    accuracy = metrics.get("val_accuracy")
    shown = f"val loss {metrics.get('val_loss'):.4g}"
    if accuracy is not None:
        shown += f", accuracy {100 * accuracy:.1f}%"
    return shown + f" on {metrics.get('val_examples')} examples"
