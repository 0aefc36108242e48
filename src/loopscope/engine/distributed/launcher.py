"""Starts N rank processes on this machine and moves them together: every command goes to every
rank, and the answer is theirs all, or the reason some could not answer. Whatever happens, `close`
leaves no rank process behind."""

from __future__ import annotations

import multiprocessing
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

from loopscope.engine.distributed.rank import RankSpec, RankState, rank_main
from loopscope.shared.errors import UserError
from loopscope.shared.events import StageEvent
from loopscope.shared.nodes import node_key

START_SECONDS = 180  # importing torch and building the experiment, in every rank at once
# Once one rank has failed, the others get this long to answer before they are stopped: they may
# be waiting in a collective (the all-reduce in backward) for the rank that will never come.
GRACE_SECONDS = 3.0


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


@dataclass
class Turn:
    """What one command made every rank do."""

    events: list[StageEvent] = field(default_factory=list)  # in rank order
    states: list[RankState | None] = field(default_factory=list)  # each rank's, None where it did not answer
    finished: bool = False
    failure: str | None = None  # a rank that died, or could not answer: the run is over
    completed_iterations: int = 0  # rank 0's


class RankGroup:
    """The rank processes of one run."""

    def __init__(
        self, spec: RankSpec, local_ranks: int, remote_ranks: int = 0, listen: tuple[str, int] | None = None
    ) -> None:
        self.spec = spec
        # The ranks this group moves: this machine's (first_rank, first_rank + 1, ...), then, with
        # `remote_ranks`, those of other nodes, which connect to `listen` (node 0's app).
        self.world_size = local_ranks + remote_ranks
        self.local_ranks, self.remote_ranks, self.listen = local_ranks, remote_ranks, listen
        self._listener: Any = None
        self._processes: list[Any] = []  # None for another node's rank
        self._conns: list[Any] = []
        self.failure: str | None = None
        self.died: str | None = None  # the first rank that died, when one did: the cause of any failure
        self.info: Any = None  # rank 0's SessionInfo, once started
        self.states: list[RankState | None] = []  # each rank's after the last command

    def start(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        if self.remote_ranks:  # listening before any rank starts: the other nodes' ranks may come first
            from multiprocessing.connection import Listener

            self._listener = Listener(self.listen, authkey=node_key())
        for rank in range(self.local_ranks):
            ours, theirs = ctx.Pipe()
            process = ctx.Process(
                target=rank_main,
                args=(rank, self.spec, theirs, os.getpid()),
                name=f"loopscope-rank-{self.spec.first_rank + rank}",
            )
            process.start()
            theirs.close()
            self._processes.append(process)
            self._conns.append(ours)
        if self.remote_ranks:
            self._accept_remote_ranks()
        answers = self._gather(START_SECONDS)
        failed = [a[1] for a in answers if a is not None and a[0] == "failed"]
        if failed or self.failure:
            self.close()
            raise UserError(failed[0] if failed else str(self.failure))
        self.info = answers[0][1]
        self.states = [answer[2] for answer in answers]

    def _accept_remote_ranks(self) -> None:
        """The other nodes' ranks, connected in any order, placed by their global rank."""
        import threading

        remote: dict[int, Any] = {}

        def accept() -> None:
            with suppress(OSError, EOFError):
                while len(remote) < self.remote_ranks:
                    conn = self._listener.accept()  # authenticated by the shared key
                    kind, rank = conn.recv()
                    if kind == "hello" and self.local_ranks <= rank < self.world_size and rank not in remote:
                        remote[rank] = conn
                    else:
                        conn.close()

        waiter = threading.Thread(target=accept, daemon=True)
        waiter.start()
        waiter.join(START_SECONDS)
        if len(remote) < self.remote_ranks:
            self._listener.close()  # ends the wait for a node that never came
            missing = sorted(set(range(self.local_ranks, self.world_size)) - set(remote))
            host, port = self.listen or ("?", 0)
            self.close()
            raise UserError(
                f"ranks {missing} (the other nodes) did not connect to {host}:{port} within "
                f"{START_SECONDS} s: start the same command on each node, with its --node-rank"
            )
        for rank in sorted(remote):
            self._conns.append(remote[rank])
            self._processes.append(None)

    def turn(self, command: str | tuple[Any, ...]) -> Turn:
        """Every rank runs `command`: "stage", "iteration", "epoch" (or a tuple with
        whether to probe it), ("bug", id, on)."""
        if self.failure:
            return Turn(failure=self.failure)
        for conn in self._conns:
            with suppress(OSError, BrokenPipeError):  # a dead rank is reported by _gather
                conn.send(command)
        answers = self._gather(None)
        turn = Turn(failure=self.failure)
        for rank, answer in enumerate(answers):
            state = answer[2] if answer is not None and answer[0] == "events" else None
            turn.states.append(state)
            if state is None:
                continue
            turn.events += answer[1]
            turn.finished = turn.finished or state.finished
            if rank == 0:
                turn.completed_iterations = state.completed_iterations
        self.states = turn.states
        return turn

    def _gather(self, timeout: float | None) -> list[Any]:
        """One answer per rank (None where none came). A rank that dies, or that is still silent
        GRACE_SECONDS after another rank failed or halted, ends the run: `failure` says why."""
        answers: list[Any] = [None] * self.world_size
        waiting = set(range(self.world_size))
        deadline = None if timeout is None else time.monotonic() + timeout
        grace_until: float | None = None
        while waiting:
            for rank in sorted(waiting):
                conn, process = self._conns[rank], self._processes[rank]
                try:
                    ready = conn.poll(0.05 / len(waiting))
                    if ready:
                        answers[rank] = conn.recv()
                except (EOFError, OSError):
                    ready = False
                    if process is None:  # another node's rank: its connection is all there is to see
                        waiting.discard(rank)
                        died = f"rank {rank} (another node) disconnected"
                        self.died = self.died or died
                        self.failure = self.failure or died
                        continue
                    process.join(0.5)
                if ready:
                    waiting.discard(rank)
                    kind = answers[rank][0]
                    if (
                        kind == "failed" or (kind == "events" and answers[rank][2].halted is not None)
                    ) and grace_until is None:
                        grace_until = time.monotonic() + GRACE_SECONDS
                elif process is not None and not process.is_alive():
                    waiting.discard(rank)
                    died = f"rank {rank} died ({_exit_description(process.exitcode)})"
                    self.died = self.died or died
                    self.failure = self.failure or died
            now = time.monotonic()
            if waiting and grace_until is not None and now > grace_until:
                silent = ", ".join(str(r) for r in sorted(waiting))
                self.failure = self.failure or (
                    f"rank{'s' if len(waiting) > 1 else ''} {silent} stopped: waiting in a collective for a rank that failed"
                )
                break
            if waiting and self.failure and grace_until is None:
                grace_until = now + GRACE_SECONDS
            if deadline is not None and now > deadline and waiting:
                self.failure = f"ranks {sorted(waiting)} did not start within {timeout:.0f} s"
                break
        return answers

    def close(self) -> None:
        """Stop every rank: asked first, then terminated, then killed."""
        for conn in self._conns:
            with suppress(OSError, EOFError, BrokenPipeError):
                conn.send("stop")
        # Ranks left waiting in a collective for a failed one never read "stop": no point waiting.
        deadline = time.monotonic() + (0.5 if self.failure else 5.0)
        local = [process for process in self._processes if process is not None]
        for process in local:
            process.join(max(0.0, deadline - time.monotonic()))
        for process in local:
            _stop(process)
        for conn in self._conns:
            conn.close()
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        self._processes, self._conns = [], []


def _stop(process: Any) -> None:
    """A rank process gone: terminated if still alive, killed if that was not enough."""
    if process.is_alive():
        process.terminate()
        process.join(2.0)
    if process.is_alive():
        process.kill()
        process.join(2.0)


def _exit_description(code: int | None) -> str:
    if code is None:
        return "no exit code"
    if code < 0:
        import signal

        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def follow(spec: RankSpec, local_ranks: int) -> int:
    """Another node of `run --nnodes`: start this machine's ranks, which node 0's app moves, and
    wait for them to end. Returns 0, or 1 when a rank ended badly."""
    ctx = multiprocessing.get_context("spawn")
    processes = [
        ctx.Process(
            target=rank_main, args=(rank, spec, None, os.getpid()), name=f"loopscope-rank-{spec.first_rank + rank}"
        )
        for rank in range(local_ranks)
    ]
    for process in processes:
        process.start()
    try:
        for process in processes:
            process.join()
    finally:
        for process in processes:
            _stop(process)
    return 0 if all(process.exitcode == 0 for process in processes) else 1


@contextmanager
def rank_group(spec: RankSpec, local_ranks: int | None = None) -> Iterator[RankGroup]:
    """The ranks of this machine (all of them, unless `local_ranks` says how many), started and stopped."""
    group = RankGroup(spec, spec.world_size if local_ranks is None else local_ranks)
    try:
        group.start()
        yield group
    finally:
        group.close()
