"""One rank's process: joins the process group, builds the experiment as DDP trains it, and steps
it when the launcher says so, answering with the events it made, each tagged with its rank."""

from __future__ import annotations

import dataclasses
import datetime
import os
import sys
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

from loopscope.shared.errors import UserError
from loopscope.shared.lifeline import exit_when_orphaned
from loopscope.shared.nodes import node_key

COLLECTIVE_TIMEOUT_SECONDS = 120  # a backstop: the launcher stops ranks left waiting long before
COORDINATOR_WAIT_SECONDS = 300  # another node's rank waits this long for node 0's app to listen


@dataclass(frozen=True)
class RankSpec:
    """What every rank is started with."""

    target: str
    device: str
    seed: int
    bugs: tuple[str, ...]
    probe: bool
    world_size: int  # every rank of every node
    master_port: int
    master_addr: str = "127.0.0.1"
    first_rank: int = 0  # this node's first global rank: node_rank * ranks per node
    # Experiment fields set after it is built (the quality matrix's long clean runs: no early stop).
    overrides: tuple[tuple[str, Any], ...] = ()
    script: bool = False  # target is a user's DDP script, run as torchrun runs it
    script_args: tuple[str, ...] = ()
    # Where node 0's app takes the commands of other nodes' ranks (`run --nnodes`): a rank started
    # without a pipe connects there instead.
    coordinator: tuple[str, int] | None = None


def connect_to_coordinator(spec: RankSpec, rank: int) -> Any:
    """A rank of another node: its connection to node 0's app (retried while node 0 starts)."""
    import time
    from multiprocessing.connection import Client

    assert spec.coordinator is not None
    deadline = time.monotonic() + COORDINATOR_WAIT_SECONDS
    while True:
        try:
            conn = Client(spec.coordinator, authkey=node_key())
            break
        except OSError:  # refused, or not reachable yet
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    conn.send(("hello", rank))
    return conn


@dataclass(frozen=True)
class RankState:
    """Where one rank's loop is after a command: what the coordinator's driver reports as its own."""

    iteration: int
    epoch: int
    completed_iterations: int
    next_stage: Any  # Stage | None
    finished: bool
    stop_reason: str | None
    halted: Any  # StageError | None
    at_boundary: bool
    active_bugs: tuple[str, ...]
    iteration_stages: tuple[Any, ...]
    last_iteration_next: bool


def rank_state(stepper: Any) -> RankState:
    return RankState(
        iteration=stepper.iteration,
        epoch=stepper.epoch,
        completed_iterations=stepper.completed_iterations,
        next_stage=stepper.next_stage(),
        finished=stepper.finished,
        stop_reason=stepper.stop_reason,
        halted=stepper.halted,
        at_boundary=stepper.at_boundary,
        active_bugs=stepper.active_bugs,
        iteration_stages=tuple(stepper.iteration_stages()),
        last_iteration_next=stepper.last_iteration_next(),
    )


def rank_main(local_rank: int, spec: RankSpec, conn: Any, parent_pid: int) -> None:
    """Entry point of a rank's process (spawned: torch is imported here, in the child)."""
    rank = spec.first_rank + local_rank
    exit_when_orphaned(parent_pid)  # a launcher killed outright must not leave ranks behind
    if conn is None:  # a rank of another node: node 0's app moves it
        conn = connect_to_coordinator(spec, rank)
    # What the user's code prints goes where the launcher's messages go, never into its output
    # (trace's records on stdout; the app's engine sends both to its log).
    sys.stdout.flush()
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    # As torchrun: one thread per rank unless asked otherwise, so N ranks do not fight for the cores.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch
    import torch.distributed as dist

    if os.environ["OMP_NUM_THREADS"].isdigit():
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    if spec.script:
        _script_rank_main(rank, local_rank, spec, conn)
        return
    from loopscope.engine.devices import resolve_device
    from loopscope.engine.distributed.wrap import (
        EpochSampledLoader,
        LocalGradNorms,
        add_batchnorm_checksum,
        batch_fingerprint,
        distribute,
        parameter_checksum,
    )
    from loopscope.engine.experiment import load_experiment
    from loopscope.engine.stepper import Stepper
    from loopscope.shared.vocab import Stage

    try:
        device = resolve_device(spec.device)
        if device.type == "cuda":
            gpus = torch.cuda.device_count()
            if local_rank >= gpus:  # NCCL refuses two ranks on one device, at their first collective
                raise UserError(
                    f"no GPU of its own (NCCL runs one rank per device, and this machine has {gpus}): "
                    f"use --nproc {gpus} or fewer on CUDA, or --device cpu (gloo)"
                )
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo",
            init_method=f"tcp://{spec.master_addr}:{spec.master_port}",
            rank=rank,
            world_size=spec.world_size,
            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_SECONDS),
        )
        experiment = load_experiment(spec.target, spec.seed)
        for name, value in spec.overrides:
            setattr(experiment, name, value)
        experiment = distribute(experiment, rank, spec.world_size, spec.seed, device)
        local_norms = LocalGradNorms()
        local_norms.install(experiment.model)
        loader = experiment.train_loader  # before a bug that replaces it (no_shuffle_sorted_data) is on
        assert isinstance(loader, EpochSampledLoader)
        stepper = Stepper(experiment, device, probe=spec.probe, sync_cuda=False, bugs=spec.bugs)
        loader.bug_on = stepper.injector.__contains__
    except BaseException as exc:  # told to the launcher in one line; nothing to step
        conn.send(("failed", f"rank {rank}: {type(exc).__name__}: {exc}"))
        return
    conn.send(("ready", stepper.info(), rank_state(stepper)))

    def add_rank_metrics(event: Any) -> None:
        """As each event is made (the record's metrics are its own): what only this rank knows."""
        if event.error is not None:
            return
        if event.stage == Stage.LOAD_BATCH:
            event.metrics["batch_fingerprint"] = batch_fingerprint(stepper.body.values.clean_inputs)
            # The loader now read: a bug may have replaced it with one that does not shuffle.
            sampler = getattr(experiment.train_loader, "sampler", None)
            event.metrics["sampler_shuffles"] = bool(getattr(sampler, "shuffle", False))
        elif event.stage == Stage.FORWARD:
            add_batchnorm_checksum(event, experiment.model)
        elif event.stage == Stage.BACKWARD:
            local, all_reduces, seconds = local_norms.take()
            if local is not None:
                event.metrics["local_grad_norm"] = local
            event.metrics["all_reduces"] = all_reduces
            event.metrics["comm_ms"] = seconds * 1000.0
        elif event.stage == Stage.STEP:
            if "rank_modifies_parameters" in stepper.injector and rank == spec.world_size - 1:
                with torch.no_grad():  # the bug: an edit on one rank, outside DDP
                    next(experiment.model.parameters()).mul_(1.001)
            event.metrics["param_checksum"] = parameter_checksum(experiment.model)

    stepper.on_event = add_rank_metrics
    local_norms.measuring = spec.probe

    def set_probe(on: bool) -> None:
        stepper.probe = local_norms.measuring = on

    try:
        _serve(stepper, conn, rank, set_probe)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _serve(driver: Any, conn: Any, rank: int, set_probe: Any) -> None:
    """Run the launcher's commands on this rank's driver until told to stop (or the launcher is gone)."""

    def tagged(events: list[Any]) -> list[Any]:
        return [dataclasses.replace(event, rank=rank) for event in events]

    try:
        while True:
            command = conn.recv()
            kind, *arguments = (command,) if isinstance(command, str) else command
            if kind == "stop":
                break
            events: list[Any] = []
            if kind in ("stage", "iteration", "epoch") and arguments:  # probed or not, as the coordinator says
                set_probe(bool(arguments[0]))
            if kind == "stage":
                event = driver.step_stage()
                events = [] if event is None else [event]
            elif kind == "iteration":
                events = driver.run_iteration()
            elif kind == "epoch":
                events = driver.run_epoch()
            elif kind == "bug":
                with suppress(UserError, KeyError, ValueError):  # the coordinator checked it applies
                    driver.set_bug(arguments[0], bool(arguments[1]))
            conn.send(("events", tagged(events), rank_state(driver)))
    except (EOFError, OSError):
        pass  # the launcher is gone


def _script_rank_main(rank: int, local_rank: int, spec: RankSpec, conn: Any) -> None:
    """A user's DDP script as one of torchrun's workers: the environment torchrun sets (the script
    calls `init_process_group` itself, and wraps its own model in DDP), stepped by the launcher."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from loopscope.engine.batches import split_batch
    from loopscope.engine.distributed.wrap import (
        LocalGradNorms,
        add_batchnorm_checksum,
        batch_fingerprint,
        parameter_checksum,
    )
    from loopscope.engine.script.driver import ScriptDriver
    from loopscope.engine.script.main_thread import lend_main_thread
    from loopscope.shared.vocab import Stage

    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(local_rank),
        WORLD_SIZE=str(spec.world_size),
        MASTER_ADDR=spec.master_addr,
        MASTER_PORT=str(spec.master_port),
    )
    try:
        driver = ScriptDriver(spec.target, list(spec.script_args), probe=spec.probe, bugs=spec.bugs)
    except BaseException as exc:
        conn.send(("failed", f"rank {rank}: {type(exc).__name__}: {exc}"))
        return
    conn.send(("ready", driver.info(), rank_state(driver)))

    local_norms = LocalGradNorms()
    hooked: list[bool] = []  # one entry once the hook was tried

    def add_rank_metrics(event: Any) -> None:
        """What only this rank knows, from the objects the script made."""
        if event.error is not None:
            return
        if event.stage == Stage.LOAD_BATCH and driver.last_batch is not None:
            with suppress(TypeError):
                event.metrics["batch_fingerprint"] = batch_fingerprint(split_batch(driver.last_batch)[0])
        elif event.stage == Stage.FORWARD:
            if driver.models:
                add_batchnorm_checksum(event, driver.models[0])
            if not hooked:
                # The script's DDP model exists from its first forward; its first backward is still to come.
                model = next((m for m in driver.models if isinstance(m, DistributedDataParallel)), None)
                hooked.append(model is not None)
                if model is not None:
                    try:
                        local_norms.install(model)
                    except RuntimeError:  # the script registered a communication hook of its own: it keeps it
                        hooked[0] = False
        elif event.stage == Stage.BACKWARD and hooked and hooked[0]:
            local, all_reduces, seconds = local_norms.take()
            if local is not None:
                event.metrics["local_grad_norm"] = local
            event.metrics["all_reduces"] = all_reduces
            event.metrics["comm_ms"] = seconds * 1000.0
        elif event.stage == Stage.STEP and driver.models:
            event.metrics["param_checksum"] = parameter_checksum(driver.models[0])

    driver.on_event = add_rank_metrics

    def set_probe(on: bool) -> None:
        driver.probe = local_norms.measuring = on

    def serve() -> None:
        try:
            _serve(driver, conn, rank, set_probe)
        finally:
            driver.close()  # a script waiting at a stage is ended, giving the main thread back

    try:
        lend_main_thread(serve)  # the script runs on the main thread, as under torchrun
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
