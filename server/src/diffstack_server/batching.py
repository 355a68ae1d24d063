"""The bounded queue and the dynamic batcher between the RPC handlers and the engine.

Handlers :meth:`~BatchQueue.submit` prepared requests and await their
:class:`~diffstack_server.tickets.Ticket`. One asyncio task takes the oldest waiting request, gathers
waiting requests with the same batch key up to ``max_batch`` images (waiting up to ``batch_wait_ms``
for more to arrive when the batch is not full, like Triton's ``max_queue_delay``), and launches them
as one ``engine.launch`` call on the engine's device thread (:class:`~diffstack.engine.EngineWorker`):
one pipeline at a time owns the device. A batch that runs out of memory is split in two once and each
half retried; a half that still does not fit fails with ``OutOfMemory``.

Batches overlap: ``engine.launch`` returns once the batch is denoised and decoded and its pixels'
copy to the host is queued (:class:`~diffstack.engine.run.PendingBatch`); a delivery task then
waits for the copy on a collector thread, checks the images, and finishes the tickets (whose handlers
encode on the encoder pool), while the batcher forms the next batch and launches it at once. On a GPU
the device work stays in one stream, in order (decode N, then denoise N+1: both are compute-bound at
the batch sizes served, so a second stream would only share the same SMs, and the CUDA graphs of
the compiled stack are recorded and replayed on the device thread's stream); what overlaps is
everything the host does between two batches: waiting for the copy, the finiteness check, making
pictures, encoding and sending them, and the next batch's forming, prompt encoding and kernel launches.
At most :data:`MAX_COLLECTING` batch is being collected while the next is formed; batches are
delivered in launch order. A cancelled request still stops at its next step while its batch
denoises; once denoised it is delivered (to nobody, if its caller left).

Cancellation and deadlines reach the engine through each job's ``should_stop``, which the engine
checks after every step: a cancelled request stops at the next step, and a request cancelled while
still queued never runs. The queue is bounded: a full queue answers :class:`Overloaded` at once
(RESOURCE_EXHAUSTED) instead of letting latency grow without limit. The bound applies before any work:
a handler reserves its place first (:meth:`~BatchQueue.reserve`), then validates, tokenizes and (if the policy
allows) waits for its model to load, then fills the place with its ticket.

The bound counts images, not requests (a request of eight images takes eight places): the work
waiting is what a client's wait depends on. When a request is filled in, the queue also estimates
when it would finish from the measured time per unit of work (:class:`BatchTiming`, seeded by the
batch-size measurement and updated by every batch) and refuses it at once with
:class:`Overloaded` and a retry hint when its deadline cannot be met, instead of letting it time out
in the queue. The estimate is optimistic (work ahead plus its own, at the batched rate), so a
request is refused only when even the best case misses its deadline.

Work outside the queue can hold the device thread: the server's warm-ups after SERVING (a batch
size's CUDA graphs, seconds; a wrapper's compile, up to a minute). Such work runs inside
:meth:`BatchQueue.hold`, with the time it is expected to take; while it runs, the estimate adds what
is left of that time (:class:`Hold`), so a request that cannot finish after it is refused at once,
its retry hint and message including the warm-up, instead of being admitted to time out behind it;
and the first batch to run after it is timed from the hold's end, so the warm-up does not inflate
the measured rate. The queue also records its last activity (:meth:`BatchQueue.quiet_s`), so the
server can wait for a real lull before a long warm-up.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import structlog

from diffstack.errors import Cancelled, DiffstackError, NotReady, OutOfMemory, Overloaded

if TYPE_CHECKING:
    from diffstack.engine import EngineWorker, GenerationResult, LaunchedBatch, ServingEngine
    from diffstack_server.metrics import Metrics
    from diffstack_server.tickets import Ticket

log = structlog.get_logger("diffstack.server.batching")

MAX_COLLECTING = 1
"""Launched batches still being collected when the next one is formed: one, so batch N's images
travel to the host, are checked and delivered while batch N+1 denoises, and no more pile up."""

# -------------------------------------------------------------------------------------------------
# The queue
# -------------------------------------------------------------------------------------------------


def work_units(ticket: Ticket) -> float:
    """What a request costs the device: steps × pixels × images (the unit of :class:`BatchTiming`)."""
    request = ticket.request
    return float(max(1, request.steps) * max(1, request.width * request.height) * ticket.images)


@dataclass
class BatchTiming:
    """Seconds per unit of work (:func:`work_units`) as batches measure it: a moving average."""

    seconds_per_unit: float | None = None
    weight: float = 0.3
    """How much the newest batch counts."""

    def observe(self, units: float, seconds: float) -> None:
        if units <= 0 or seconds <= 0:
            return
        sample = seconds / units
        previous = self.seconds_per_unit
        self.seconds_per_unit = sample if previous is None else previous + self.weight * (sample - previous)

    def seconds(self, units: float) -> float | None:
        """How long ``units`` of work take at the measured rate (None before any measurement)."""
        return None if self.seconds_per_unit is None else units * self.seconds_per_unit


@dataclass
class Hold:
    """Work outside the queue holding the device thread (a warm-up), expected to take ``expected_s``."""

    what: str
    """What holds the device, for a refusal's message ("DeepCache's compiled variant")."""
    expected_s: float
    began: float = field(default_factory=time.monotonic)

    def remaining_s(self, now: float) -> float:
        """What is left of the expected time. A hold that outlasts it is expected to take twice as
        long, again and again: the estimate stays positive and grows with the overrun (a warm-up
        that runs long is slower than thought, not nearly done)."""
        elapsed = now - self.began
        expected = max(self.expected_s, 1e-3)
        while expected <= elapsed:
            expected *= 2
        return expected - elapsed


class Reservation:
    """Places in the queue (one per image), taken before the request's preparation and filled by its
    ticket."""

    def __init__(self, queue: BatchQueue, images: int) -> None:
        self._queue: BatchQueue | None = queue
        self.images = images

    def fill(self, ticket: Ticket) -> Ticket:
        """Queue ``ticket`` in this place (NotReady if the queue closed meanwhile)."""
        queue = self._take()
        if queue is None:
            raise RuntimeError("a reservation is filled once")
        return queue._enter(ticket)

    def release(self) -> None:
        """Give the place back unused (no-op once filled or released)."""
        self._take()

    def _take(self) -> BatchQueue | None:
        queue, self._queue = self._queue, None
        if queue is not None:
            queue._reserved -= self.images
        return queue


class BatchQueue:
    """A FIFO of tickets bounded in images, and the task that runs them in batches on the engine's
    device thread. ``max_batch`` is the batch size it forms (in images); the server sets it from
    measurement at start (:mod:`diffstack_server.sizing`)."""

    def __init__(
        self,
        worker: EngineWorker,
        metrics: Metrics,
        *,
        queue_size: int,
        max_batch: int,
        batch_wait_ms: float = 0.0,
    ) -> None:
        self.worker = worker
        self.metrics = metrics
        self.queue_size = queue_size
        self.max_batch = max(1, max_batch)
        self.batch_wait_s = max(0.0, batch_wait_ms / 1000.0)
        self._waiting: list[Ticket] = []
        self._running: list[Ticket] = []
        self._reserved = 0
        self.timing = BatchTiming()
        self._closed = False
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task[None] | None = None
        self._deliveries: set[asyncio.Task[None]] = set()
        self._device_free_at = 0.0
        """When the device was last free for the next batch (perf_counter): the previous batch's
        collection, or the end of a hold."""
        self._hold: Hold | None = None
        self._last_activity = time.monotonic()
        """When a request last reserved a place, entered, or the queue last turned idle."""
        self._collector = ThreadPoolExecutor(1, thread_name_prefix="diffstack-collect")
        """Waits for launched batches' images, in launch order, off the loop and the device thread."""

    # -- life cycle --------------------------------------------------------------------------------

    @property
    def started(self) -> bool:
        return self._task is not None

    @property
    def closed(self) -> bool:
        return self._closed

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="diffstack-batcher")

    def close(self) -> None:
        """Refuse new requests; the ones already queued or running still finish."""
        self._closed = True
        self._wakeup.set()

    async def drain(self, timeout: float | None) -> bool:
        """Close, then wait until every queued and running request finished; False on timeout."""
        self.close()
        return await self.wait_idle(timeout)

    @property
    def idle(self) -> bool:
        """Nothing queued or running."""
        return self._idle.is_set()

    def quiet_s(self) -> float:
        """Seconds since the queue last had a request queued, being prepared or running (0 while it
        has one)."""
        if not self.idle or self._reserved:
            return 0.0
        return time.monotonic() - self._last_activity

    @contextmanager
    def hold(self, what: str, expected_s: float) -> Iterator[Hold]:
        """Mark the device thread held by work outside the queue (``what``, expected to take about
        ``expected_s``) for the ``with`` block: admission counts what is left of it (see
        :class:`Hold`). One at a time; enter it with no ``await`` between finding a pause and
        submitting the work, so no request is admitted unaware of it."""
        if self._hold is not None:
            raise RuntimeError(f"the device is already held by {self._hold.what}")
        self._hold = held = Hold(what, expected_s)
        try:
            yield held
        finally:
            self._hold = None
            self._device_free_at = max(self._device_free_at, time.perf_counter())

    async def wait_idle(self, timeout: float | None) -> bool:
        """Wait up to ``timeout`` seconds (None: no limit) for nothing to be queued or running;
        whether it was."""
        if self._idle.is_set():
            return True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def abort(self, error: DiffstackError) -> None:
        """Fail every queued request with ``error`` and stop the running ones at their next step
        (with the same error)."""
        self.close()
        for ticket in self._waiting:
            ticket.finish(error)
        self._waiting.clear()
        for ticket in self._running:
            ticket.cancel(error)
        self._update_idle()

    async def stop(self, timeout: float | None = None) -> None:
        """Wait for the batcher task to end (call after :meth:`drain` or :meth:`abort`)."""
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout)
            except TimeoutError:
                log.warning("batcher_stop_timeout", running=len(self._running))
        self._collector.shutdown(wait=False)

    # -- submitting --------------------------------------------------------------------------------

    def reserve(self, images: int = 1) -> Reservation:
        """Take ``images`` places for a request about to be prepared; raises :class:`Overloaded` when
        the queue (images waiting plus reserved) would overflow, NotReady when closed. Cheap: call it
        before any work."""
        if self._closed:
            raise NotReady("the server is shutting down; retry on another replica")
        images = max(1, images)
        taken = self.waiting_images + self._reserved
        if taken + images > self.queue_size:
            raise Overloaded(
                f"the queue is full ({taken} of {self.queue_size} images waiting){self._held_note()}; "
                "retry later",
                retry_after_s=self._wait_ahead_s(),
            )
        self._reserved += images
        self._last_activity = time.monotonic()
        return Reservation(self, images)

    def submit(self, ticket: Ticket) -> Ticket:
        """Queue ``ticket`` (reserve and fill in one step)."""
        return self.reserve(ticket.images).fill(ticket)

    def _enter(self, ticket: Ticket) -> Ticket:
        if self._closed:
            raise NotReady("the server is shutting down; retry on another replica")
        self._refuse_if_late(ticket)
        self._last_activity = time.monotonic()
        self._waiting.append(ticket)
        ticket.move_to(len(self._waiting) - 1)
        self._idle.clear()
        self._wakeup.set()
        self._update_gauges()
        return ticket

    def _refuse_if_late(self, ticket: Ticket) -> None:
        """Overloaded (with a retry hint) when even the optimistic finish time misses the deadline."""
        if ticket.deadline is None:
            return
        ahead = self._wait_ahead_s()
        if ahead is None:
            return  # nothing measured and nothing holding the device: admit
        own = self.timing.seconds(work_units(ticket)) or 0.0
        remaining = ticket.deadline - time.monotonic()
        if ahead + own > remaining:
            raise Overloaded(
                f"the deadline cannot be met: about {ahead + own:.2f} s of work is ahead of and in this "
                f"request{self._held_note()}, {max(0.0, remaining):.2f} s remain; retry later",
                retry_after_s=ahead,
            )

    def _wait_ahead_s(self) -> float | None:
        """Seconds until the device is free for a new request: what is left of a hold plus the work
        queued and running at the measured rate; None when neither is known."""
        work = self.timing.seconds(sum(work_units(t) for t in self._waiting + self._running))
        if self._hold is None:
            return work
        return self._hold.remaining_s(time.monotonic()) + (work or 0.0)

    def _held_note(self) -> str:
        """A refusal's reason when a hold counts in it."""
        if self._hold is None:
            return ""
        left = self._hold.remaining_s(time.monotonic())
        return f" (the server is warming up {self._hold.what} for about {left:.1f} s more)"

    def withdraw(self, ticket: Ticket, error: DiffstackError | None = None) -> None:
        """The request's caller went away: drop it from the queue, or stop it at the next step."""
        ticket.cancel(error)
        if ticket in self._waiting:
            self._waiting.remove(ticket)
            ticket.finish(ticket.should_stop() or Cancelled("cancelled"))
            self._announce_positions()
            self._update_idle()

    @property
    def depth(self) -> int:
        return len(self._waiting)

    @property
    def waiting_images(self) -> int:
        return sum(t.images for t in self._waiting)

    @property
    def in_flight(self) -> int:
        return len(self._running)

    # -- the batcher task --------------------------------------------------------------------------

    async def _loop(self) -> None:
        try:
            while True:
                await self._settle(MAX_COLLECTING)
                batch = await self._next_batch()
                if batch is None:
                    break
                await self._launch(batch)
            await self._settle(0)
        except asyncio.CancelledError:  # the server is stopping hard: batches being collected fail too
            for task in list(self._deliveries):
                task.cancel()
            raise

    async def _settle(self, at_most: int) -> None:
        """Wait until at most ``at_most`` launched batches are still being collected."""
        while len(self._deliveries) > at_most:
            await asyncio.wait(list(self._deliveries), return_when=asyncio.FIRST_COMPLETED)

    async def _next_batch(self) -> list[Ticket] | None:
        while True:
            self._drop_stopped()
            if not self._waiting:
                self._update_idle()
                if self._closed:
                    return None
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            head = self._waiting[0]
            batch = self._compatible(head)
            give_up_at = time.monotonic() + self.batch_wait_s
            while sum(t.images for t in batch) < self.max_batch and not self._closed:
                remaining = give_up_at - time.monotonic()
                if remaining <= 0:
                    break
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
                except TimeoutError:
                    break
                if head not in self._waiting:
                    break  # the head was withdrawn while we waited: start over
                batch = self._compatible(head)
            if head not in self._waiting:
                continue
            for ticket in batch:
                self._waiting.remove(ticket)
            self._announce_positions()
            return batch

    def _compatible(self, head: Ticket) -> list[Ticket]:
        """The head and the oldest waiting tickets with its batch key, up to ``max_batch`` images."""
        batch, images = [head], head.images
        for ticket in self._waiting[1:]:
            if ticket.key == head.key and images + ticket.images <= self.max_batch:
                batch.append(ticket)
                images += ticket.images
        return batch

    def _drop_stopped(self) -> None:
        """Finish queued tickets that were cancelled or whose deadline passed, without running them."""
        keep = []
        for ticket in self._waiting:
            reason = ticket.should_stop()
            if reason is None:
                keep.append(ticket)
            else:
                ticket.finish(reason)
        if len(keep) != len(self._waiting):
            self._waiting = keep
            self._announce_positions()

    def _announce_positions(self) -> None:
        for position, ticket in enumerate(self._waiting):
            ticket.move_to(position)
        self._update_gauges()

    async def _launch(self, batch: list[Ticket]) -> None:
        """Launch ``batch`` on the device thread, then hand it to a task that collects and delivers
        it, so the loop can form and launch the next batch meanwhile."""
        now = time.monotonic()
        for ticket in batch:
            ticket.started_at = now
            self.metrics.queue_seconds.observe(ticket.queue_seconds)
        self._running.extend(batch)
        self._update_gauges()
        log.info(
            "batch_start",
            requests=[t.request_id for t in batch],
            images=sum(t.images for t in batch),
            queued=len(self._waiting),
        )
        began = time.perf_counter()
        launched: LaunchedBatch | list[GenerationResult | BaseException]
        try:
            launched = await asyncio.wrap_future(self.worker.submit(self._launch_in_worker, batch))
        except asyncio.CancelledError:  # the server is stopping hard: stop the work, fail the batch
            self._fail(batch, NotReady("the server stopped"))
            raise
        except Exception as exc:  # the worker could not take the batch (stopped)
            launched = [exc] * len(batch)
        task = asyncio.get_running_loop().create_task(self._deliver(batch, launched, began))
        self._deliveries.add(task)
        task.add_done_callback(self._deliveries.discard)

    async def _deliver(
        self,
        batch: list[Ticket],
        launched: LaunchedBatch | list[GenerationResult | BaseException],
        began: float,
    ) -> None:
        """Collect a launched batch's images off the device thread (rerunning on the device thread
        what needs the reference stack), then finish its tickets, in launch order."""
        outcomes: list[GenerationResult | BaseException]
        try:
            if isinstance(launched, list):
                outcomes = launched
            else:
                collected = await asyncio.get_running_loop().run_in_executor(
                    self._collector, launched.collect
                )
                if any(outcome is None for outcome in collected):
                    retried = self.worker.submit(self._retry_in_worker, batch, launched, collected)
                    final: list[GenerationResult | DiffstackError] = await asyncio.wrap_future(retried)
                    outcomes = list(final)
                else:
                    outcomes = [outcome for outcome in collected if outcome is not None]
            if len(outcomes) != len(batch):
                raise RuntimeError(f"the engine returned {len(outcomes)} outcomes for {len(batch)} jobs")
        except asyncio.CancelledError:
            self._fail(batch, NotReady("the server stopped"))
            raise
        except Exception as exc:
            outcomes = [exc] * len(batch)
        self._observe(batch, outcomes, began)
        for ticket in batch:
            self._running.remove(ticket)
        self._update_gauges()
        for ticket, outcome in zip(batch, outcomes, strict=True):
            ticket.finish(outcome)
        self._update_idle()

    def _fail(self, batch: list[Ticket], error: DiffstackError) -> None:
        for ticket in batch:
            ticket.cancel(error)
            ticket.finish(error)
            if ticket in self._running:
                self._running.remove(ticket)
        self._update_gauges()

    def _observe(
        self, batch: list[Ticket], outcomes: list[GenerationResult | BaseException], began: float
    ) -> None:
        """Record the batch's device time: from its launch, or from when the device was last free
        for it if that was later (the previous batch's collection, which overlaps it, or a hold's
        end, which it queued behind), to its own collection."""
        done = time.perf_counter()
        seconds = max(1e-9, done - max(began, self._device_free_at))
        self._device_free_at = done
        self.metrics.observe_batch(len(batch), sum(t.images for t in batch), seconds)
        if not any(isinstance(outcome, BaseException) for outcome in outcomes):
            self.timing.observe(sum(work_units(t) for t in batch), seconds)

    # -- the worker thread ---------------------------------------------------------------------------

    def _launch_in_worker(
        self, batch: list[Ticket]
    ) -> LaunchedBatch | list[GenerationResult | BaseException]:
        """Launch the batch on the device thread; on OutOfMemory split it in two once and run each
        half to the end (outcomes known at once: the rare path need not overlap)."""
        with structlog.contextvars.bound_contextvars(request_ids=[t.request_id for t in batch]):
            engine = self._engine()
            try:
                return engine.launch([ticket.job() for ticket in batch])
            except OutOfMemory as first:
                if len(batch) == 1:
                    return [first]
                half = len(batch) // 2
                log.warning("batch_out_of_memory_splitting", requests=len(batch), first_half=half)
                outcomes: list[GenerationResult | BaseException] = []
                for part in (batch[:half], batch[half:]):
                    try:
                        launched = engine.launch([ticket.job() for ticket in part])
                        outcomes.extend(launched.retry(launched.collect()))
                    except Exception as exc:
                        outcomes.extend([exc] * len(part))
                return outcomes
            except Exception as exc:
                return [exc] * len(batch)

    def _retry_in_worker(
        self,
        batch: list[Ticket],
        launched: LaunchedBatch,
        collected: list[GenerationResult | DiffstackError | None],
    ) -> list[GenerationResult | DiffstackError]:
        with structlog.contextvars.bound_contextvars(request_ids=[t.request_id for t in batch]):
            return launched.retry(collected)

    def _engine(self) -> ServingEngine:
        engine = self.worker.engine
        if engine is None:
            raise NotReady("the engine is not started")
        return engine

    # -- bookkeeping ---------------------------------------------------------------------------------

    def _update_idle(self) -> None:
        if not self._waiting and not self._running:
            if not self._idle.is_set():
                self._last_activity = time.monotonic()
            self._idle.set()
        else:
            self._idle.clear()

    def _update_gauges(self) -> None:
        self.metrics.queue_depth.set(len(self._waiting))
        self.metrics.in_flight.set(len(self._running))
