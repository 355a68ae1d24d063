"""Jobs that survive a dropped connection: SubmitJob, WatchJob, CancelJob, ListJobs.

A job is a GenerateStream request that runs on the server whether or not anyone watches: SubmitJob
validates and queues it exactly as GenerateStream does (bad input is refused there, and no job is
made), a task on the event loop records every event the request produces (queue positions, progress,
previews, the encoded result), and WatchJob replays them from the start, or from now, then follows
the job live until it ends; a watcher that leaves changes nothing. A failed job's watchers get its
error as the call's status. CancelJob withdraws the job like a client's cancel (out of the queue, or
stopped at the next step).

Finished jobs stay ``server.jobs_keep_s`` seconds, and the finished jobs' events together stay
within ``server.jobs_keep_bytes`` (the oldest finished go first); after that the job is NOT_FOUND.
An idempotency key is scoped by the caller (the API key's label when keys are on): the same key
returns the same job while the server keeps it, even while the first submission is still being
validated, so a retried submission never runs twice. Jobs are visible to their caller only.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import structlog

from diffstack.errors import Cancelled, DiffstackError, FieldViolation, InvalidRequest, NotFound
from diffstack_client.v1 import generation_pb2
from diffstack_server.keys import current_caller
from diffstack_server.tickets import Progress, Queued, Ticket

if TYPE_CHECKING:
    from diffstack_server.servicers import GenerationServicer

log = structlog.get_logger("diffstack.server.jobs")

MAX_IDEMPOTENCY_KEY_BYTES = 128
JOB_OVERHEAD_BYTES = 1024
"""What a finished job counts against ``server.jobs_keep_bytes`` beyond its events."""

_ENDED = frozenset(
    {generation_pb2.JOB_STATE_SUCCEEDED, generation_pb2.JOB_STATE_FAILED, generation_pb2.JOB_STATE_CANCELLED}
)


@dataclass(eq=False)
class Job:
    """One submitted request, its recorded events and how it ended."""

    job_id: str
    caller: str
    idempotency_key: str
    model: str
    ticket: Ticket
    submitted_at: float = field(default_factory=time.time)
    state: int = generation_pb2.JOB_STATE_QUEUED
    position: int = 0
    events: list[generation_pb2.GenerateStreamResponse] = field(default_factory=list)
    size: int = JOB_OVERHEAD_BYTES
    error: BaseException | None = None
    ended_at: float | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def ended(self) -> bool:
        return self.state in _ENDED

    def record(self, event: generation_pb2.GenerateStreamResponse) -> None:
        self.events.append(event)
        self.size += event.ByteSize()
        self.wake()

    def wake(self) -> None:
        """Wake every watcher (each waits on the event it saw; a fresh one is made for the next)."""
        self.changed.set()
        self.changed = asyncio.Event()

    def info(self) -> generation_pb2.JobInfo:
        return generation_pb2.JobInfo(
            job_id=self.job_id,
            state=self.state,  # type: ignore[arg-type]
            position=self.position if self.state == generation_pb2.JOB_STATE_QUEUED else 0,
            idempotency_key=self.idempotency_key,
            submitted_at=self.submitted_at,
            model=self.model,
            error=str(self.error or "")[:512],
        )


class JobStore:
    """The server's jobs, by id, and the callers' idempotency keys."""

    def __init__(self, servicer: GenerationServicer) -> None:
        self.servicer = servicer
        self._jobs: dict[str, Job] = {}
        self._by_key: dict[tuple[str, str], asyncio.Future[str]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def submit(self, request: generation_pb2.SubmitJobRequest) -> generation_pb2.SubmitJobResponse:
        caller, key = current_caller.get(), request.idempotency_key
        if len(key.encode()) > MAX_IDEMPOTENCY_KEY_BYTES:
            raise InvalidRequest(
                FieldViolation("idempotency_key", f"at most {MAX_IDEMPOTENCY_KEY_BYTES} bytes")
            )
        self._evict()
        if key and (caller, key) in self._by_key:
            job_id = await asyncio.shield(self._by_key[(caller, key)])
            return generation_pb2.SubmitJobResponse(job_id=job_id, created=False)
        claim: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        if key:
            self._by_key[(caller, key)] = claim
        try:
            job = await self._start(caller, key, request.request)
        except BaseException as exc:
            self._by_key.pop((caller, key), None)
            claim.set_exception(
                exc if isinstance(exc, Exception) else Cancelled("the submission was cancelled")
            )
            claim.exception()  # retrieved: a refused submission with nobody waiting is no warning
            raise
        claim.set_result(job.job_id)
        return generation_pb2.SubmitJobResponse(job_id=job.job_id, created=True)

    async def _start(self, caller: str, key: str, request: generation_pb2.GenerateStreamRequest) -> Job:
        ticket = await self.servicer.enqueue(request.spec, request.output, None, previews=request.previews)
        job = Job(uuid.uuid4().hex, caller, key, request.spec.model, ticket)
        self._jobs[job.job_id] = job
        task = asyncio.get_running_loop().create_task(self._run(job, request), name=f"job-{job.job_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        log.info("job_submitted", job_id=job.job_id)
        return job

    async def _run(self, job: Job, request: generation_pb2.GenerateStreamRequest) -> None:
        """Record the job's events and its end, whether or not anyone watches."""
        try:
            async for event in job.ticket.events():
                if isinstance(event, Queued):
                    job.position = event.position
                elif isinstance(event, Progress):
                    job.state = generation_pb2.JOB_STATE_RUNNING
                job.record(await self.servicer.event_message(event, request.previews))
            result = await job.ticket.future
            encoded = await self.servicer.encode(job.ticket, result, request.output)
            job.record(generation_pb2.GenerateStreamResponse(result=encoded))
            job.state = generation_pb2.JOB_STATE_SUCCEEDED
        except Cancelled as exc:
            job.error, job.state = exc, generation_pb2.JOB_STATE_CANCELLED
        except Exception as exc:  # the job's failure is its watchers' status, never the loop's
            job.error, job.state = exc, generation_pb2.JOB_STATE_FAILED
            if not isinstance(exc, DiffstackError):
                log.exception("job_failed", job_id=job.job_id)
        finally:
            job.ended_at = time.monotonic()
            job.wake()
            log.info("job_ended", job_id=job.job_id, state=generation_pb2.JobState.Name(job.state))  # type: ignore[arg-type]
            self._evict()

    def _find(self, job_id: str) -> Job:
        job = self._jobs.get(job_id)
        if job is None or job.caller != current_caller.get():
            raise NotFound(f"no job {job_id[:64]!r}: unknown, another caller's, or no longer kept")
        return job

    async def watch(
        self, request: generation_pb2.WatchJobRequest
    ) -> AsyncIterator[generation_pb2.WatchJobResponse]:
        job = self._find(request.job_id)
        sent = len(job.events) if request.from_now else 0
        while True:
            waiter = job.changed
            while sent < len(job.events):
                yield generation_pb2.WatchJobResponse(event=job.events[sent])
                sent += 1
            if job.ended:
                break
            await waiter.wait()
        if job.error is not None:
            raise job.error

    def cancel(self, request: generation_pb2.CancelJobRequest) -> generation_pb2.CancelJobResponse:
        job = self._find(request.job_id)
        if not job.ended:
            self.servicer.runtime.queue.withdraw(job.ticket, Cancelled("cancelled by CancelJob"))
            return generation_pb2.CancelJobResponse(state=generation_pb2.JOB_STATE_CANCELLED)
        return generation_pb2.CancelJobResponse(state=job.state)  # type: ignore[arg-type]

    def list(self) -> generation_pb2.ListJobsResponse:
        self._evict()
        caller = current_caller.get()
        return generation_pb2.ListJobsResponse(
            jobs=[job.info() for job in self._jobs.values() if job.caller == caller]
        )

    def _evict(self) -> None:
        """Drop finished jobs past ``server.jobs_keep_s``, then the oldest finished ones while the
        finished jobs hold more than ``server.jobs_keep_bytes``."""
        server = self.servicer.runtime.settings.server
        now = time.monotonic()
        ended = sorted(
            (j for j in self._jobs.values() if j.ended_at is not None), key=lambda j: j.ended_at or 0
        )
        held = sum(job.size for job in ended)
        for job in ended:
            expired = (job.ended_at or now) + server.jobs_keep_s < now
            if not expired and held <= server.jobs_keep_bytes:
                continue
            held -= job.size
            del self._jobs[job.job_id]
            if job.idempotency_key:
                self._by_key.pop((job.caller, job.idempotency_key), None)
