"""``diffstack serve --context-parallel N``: one process per GPU, splitting every denoiser step.

The launcher (this process) spawns N ranks and waits. Every rank starts the same
:class:`~diffstack.engine.Engine` on its own GPU (``cuda:RANK``) through its own
:class:`~diffstack.engine.EngineWorker`, so the stacks compose in lockstep: the
``diffstack-context-parallel`` plugin's offers are collectives, and composition agrees every decision
across the ranks. Rank 0 then serves gRPC exactly as the single-process server does; its engine is a
:class:`LockstepEngine`, which publishes every piece of device work (load, run, unload) on the
group's control channel before doing it, and the other ranks (followers) do the same work in the same
order on their device threads. The images come out of rank 0; the followers' copies are dropped.

Failure, never a hang: a rank that dies or stops its heartbeat, a follower that fails or overruns an
op, or a collective past ``server.collective_timeout_s`` turns rank 0's health NOT_SERVING and its
requests UNAVAILABLE (a load balancer moves on; restarting the group recovers). A follower whose rank 0
is gone exits. The launcher ends when rank 0 ends, and stops the followers then.

Cancellation differs from one process: every rank must run the same steps, so a cancelled request
(or one past its deadline) stops when its batch ends, not at the next step.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import structlog

from diffstack.config import Settings
from diffstack.engine import EngineWorker, ServingEngine
from diffstack.engine.requests import GenerationJob
from diffstack.engine.worker import LaunchedBatch
from diffstack.errors import NotReady
from diffstack_server.group import GROUP_ENVIRONMENT, Group, GroupAddress, GroupFailed, Op

if TYPE_CHECKING:
    from diffstack.engine.model import LoadedModel
    from diffstack.engine.requests import GenerationResult
    from diffstack.errors import DiffstackError
    from diffstack_server.app import DiffstackServer

log = structlog.get_logger("diffstack.server.parallel")

FOLLOWED_OPS = ("load", "run", "unload", "free_memory")
"""The engine methods that touch the device, and so run on every rank."""


# -------------------------------------------------------------------------------------------------
# The launcher
# -------------------------------------------------------------------------------------------------


def serve_parallel(settings: Settings, log_level: int = logging.INFO) -> int:
    """Spawn ``server.context_parallel`` ranks on this host and wait for rank 0; its exit status."""
    world = settings.server.context_parallel
    address = GroupAddress("127.0.0.1", _free_port(), world)
    os.environ.update(GROUP_ENVIRONMENT)  # inherited by every rank
    context = multiprocessing.get_context("spawn")
    ranks = [
        context.Process(
            target=run_rank, args=(settings, address, rank, log_level), name=f"diffstack-rank-{rank}"
        )
        for rank in range(world)
    ]
    for process in ranks:
        process.start()
    leader = ranks[0]

    def forward(signum: int, _frame: Any) -> None:
        if leader.pid is not None and leader.is_alive():
            os.kill(leader.pid, signum)  # rank 0 drains; the followers end when it has

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        leader.join()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for process in ranks[1:]:
            process.terminate()
        for process in ranks[1:]:
            process.join(10)
            if process.is_alive():
                process.kill()
    return leader.exitcode if leader.exitcode is not None else 1


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_rank(settings: Settings, address: GroupAddress, rank: int, log_level: int) -> None:
    """One rank's process: join the group on this rank's device, then lead (rank 0) or follow."""
    from diffstack.logs import configure_logging

    configure_logging(settings.server.log_format, log_level)
    structlog.contextvars.bind_contextvars(rank=rank)
    _follow_the_launcher(rank)
    settings, backend = rank_settings(settings, rank)
    server = settings.server
    group = Group(
        address, rank, timeout_s=server.collective_timeout_s, silent_s=server.rank_heartbeat_timeout_s
    )
    group.init_process_group(backend)
    log.info(
        "rank_joined", world=address.world, backend=backend, device=settings.engine.device, pid=os.getpid()
    )
    status = lead(settings, group, log_level) if rank == 0 else follow(settings, group)
    group.stop()
    raise SystemExit(status)


def _follow_the_launcher(rank: int) -> None:
    """Signals reach this rank through the launcher only, and the rank ends when the launcher does.

    A rank leaves the terminal's process group, so Ctrl-C reaches rank 0 once (forwarded), not twice
    (which would stop its work at once instead of draining), and no follower dies before rank 0 is
    done. A launcher that is killed outright cannot forward anything: each rank then sees its parent
    change and stops itself (rank 0 drains as on SIGTERM).
    """
    launcher = os.getppid()
    os.setpgrp()

    def watch() -> None:
        while os.getppid() == launcher:
            time.sleep(1.0)
        log.warning("launcher_gone", launcher=launcher, rank=rank)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="diffstack-launcher-watch", daemon=True).start()


def rank_settings(settings: Settings, rank: int) -> tuple[Settings, str]:
    """This rank's settings (its own GPU, its own decisions folder) and the collectives' backend."""
    import torch

    device = settings.engine.device
    on_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if on_cuda:
        torch.cuda.set_device(rank)
        device = f"cuda:{rank}"
    decisions = settings.compose.decisions_dir
    updated = settings.model_copy(
        update={
            "engine": settings.engine.model_copy(update={"device": device}),
            "compose": settings.compose.model_copy(
                update={"decisions_dir": decisions / f"rank{rank}" if decisions is not None else None}
            ),
        }
    )
    return updated, "nccl" if on_cuda else "gloo"


# -------------------------------------------------------------------------------------------------
# Rank 0
# -------------------------------------------------------------------------------------------------


def lead(settings: Settings, group: Group, log_level: int) -> int:
    """Serve gRPC with a :class:`LeaderWorker`; the group's failure turns health NOT_SERVING."""
    from diffstack_server.app import serve_async

    worker = LeaderWorker(settings, group)

    def watch(server: DiffstackServer) -> None:
        loop = asyncio.get_running_loop()

        def on_failure(reason: str) -> None:
            asyncio.run_coroutine_threadsafe(server.fail(reason), loop)

        worker.on_failure(on_failure)

    group.start_heartbeats(worker.fail)
    return asyncio.run(serve_async(settings, worker=worker, on_created=watch))


class LeaderWorker(EngineWorker):
    """Rank 0's engine worker: its engine is a :class:`LockstepEngine` over the group."""

    def __init__(self, settings: Settings, group: Group) -> None:
        super().__init__(settings)
        self.group = group
        self.failure: str | None = None
        self._listeners: list[Callable[[str], None]] = []
        self._lock = threading.Lock()

    def _start_engine(self) -> ServingEngine:
        engine = LockstepEngine(super()._start_engine(), self)
        self._engine = engine  # what ``engine`` answers: the queue and the servicers go through it
        return engine

    def on_failure(self, listener: Callable[[str], None]) -> None:
        with self._lock:
            self._listeners.append(listener)
            failure = self.failure
        if failure is not None:
            listener(failure)

    def fail(self, reason: str) -> None:
        """Mark the group failed (once) and tell the listeners (health)."""
        with self._lock:
            if self.failure is not None:
                return
            self.failure = reason
            listeners = list(self._listeners)
        log.error("group_failed", reason=reason)
        for listener in listeners:
            listener(reason)


class LockstepEngine:
    """The engine on rank 0: device work is published to the followers first, then done here."""

    def __init__(self, engine: ServingEngine, worker: LeaderWorker) -> None:
        self._engine = engine
        self._worker = worker

    def __getattr__(self, name: str) -> Any:
        """Everything that does not touch the device (resolve, pin, models, stats, ...) is rank 0's
        alone. Device work must go through the methods below: FOLLOWED_OPS names them."""
        return getattr(self._engine, name)

    def _together(self, op: Op, local: Callable[[], Any]) -> Any:
        if self._worker.failure is not None:
            raise NotReady(f"the context-parallel group failed: {self._worker.failure}")
        number = self._worker.group.publish(op)
        try:
            result = local()
        finally:
            try:
                self._worker.group.wait_done(number)
            except GroupFailed as exc:
                self._worker.fail(str(exc))
        return result

    def load(self, key: str) -> LoadedModel:
        return self._together(Op("load", (key,)), lambda: self._engine.load(key))

    def unload(self, key: str) -> bool:
        return bool(self._together(Op("unload", (key,)), lambda: self._engine.unload(key)))

    def free_memory(self) -> list[str]:
        return list(self._together(Op("free_memory"), self._engine.free_memory))

    def run(self, jobs: Sequence[GenerationJob]) -> list[GenerationResult | DiffstackError]:
        return self._together(_run_op(jobs), lambda: self._engine.run(_in_lockstep(jobs)))

    def launch(self, jobs: Sequence[GenerationJob]) -> LaunchedBatch:
        """As :meth:`run` for the batcher: returns once this rank's pixels are on their way to the
        host and every follower has run the same batch."""
        return self._together(_run_op(jobs), lambda: self._engine.launch(_in_lockstep(jobs)))


def _run_op(jobs: Sequence[GenerationJob]) -> Op:
    return Op("run", (tuple(job.request for job in jobs),))


def _in_lockstep(jobs: Sequence[GenerationJob]) -> list[GenerationJob]:
    """The jobs without their own stop: every rank runs every step (see the module docstring)."""
    return [GenerationJob(job.request, on_step=job.on_step) for job in jobs]


# -------------------------------------------------------------------------------------------------
# The other ranks
# -------------------------------------------------------------------------------------------------


def follow(settings: Settings, group: Group) -> int:
    """Start the engine (composing in lockstep with rank 0), then do the ops rank 0 publishes, in
    order, on this rank's device thread, until rank 0 is gone or the group fails."""
    silence: list[str] = []
    group.start_heartbeats(silence.append)
    worker = EngineWorker(settings, name=f"diffstack-engine-rank{group.rank}")
    try:
        engine = worker.start().result()
        worker.submit(_follow_ops, engine, group, lambda: not silence).result()
    except GroupFailed as exc:
        log.warning("follower_stopping", reason=str(exc), silence=silence or None)
        return 1 if not silence else 0
    finally:
        worker.stop()
    return 0


def _follow_ops(engine: ServingEngine, group: Group, alive: Callable[[], bool]) -> None:
    while True:
        op = group.next_op(alive)
        if op.kind not in FOLLOWED_OPS:
            group.done(f"unknown op {op.kind!r}")
            raise GroupFailed(f"rank 0 published an unknown op {op.kind!r}")
        try:
            if op.kind == "run":
                (requests,) = op.args
                engine.run([GenerationJob(request) for request in requests])
            elif op.kind == "load":
                engine.unpin(engine.load(*op.args))  # rank 0 holds the pin that matters
            else:
                getattr(engine, op.kind)(*op.args)
        except Exception as exc:
            group.done(f"{type(exc).__name__}: {exc}")
            raise GroupFailed(f"op {op.kind} failed here: {exc}") from exc
        group.done()
