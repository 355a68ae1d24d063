"""A queued request as the batcher and its handler share it: the ticket, and the events of a stream.

The engine's worker thread calls :meth:`Ticket.should_stop` and :meth:`Ticket.on_step`; everything
else runs on the event loop. Events cross from the worker to the loop with ``call_soon_threadsafe``,
so they arrive in order and before the outcome.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Hashable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import structlog

from diffstack.errors import Cancelled, DeadlineExceeded, DiffstackError

if TYPE_CHECKING:
    from PIL import Image as PILImage

    from diffstack.engine import GenerationJob, GenerationRequest, GenerationResult, StepEvent

log = structlog.get_logger("diffstack.server.tickets")


# -------------------------------------------------------------------------------------------------
# Events a streaming request receives
# -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Queued:
    """The request waits with ``position`` requests ahead of it."""

    position: int


@dataclass(frozen=True)
class Progress:
    """Step ``step`` of ``total`` finished."""

    step: int
    total: int


@dataclass(frozen=True)
class Preview:
    """Decoded pictures of the work in progress at ``step``, one per image of the request."""

    step: int
    images: list[PILImage.Image]


Event = Queued | Progress | Preview


@dataclass(frozen=True)
class PreviewPolicy:
    """How often and how large previews of one request may be (already capped by the server)."""

    interval_s: float
    max_side: int


_DONE = object()
DEADLINE_SLACK_S = 0.05
"""gRPC may end a call a little before our copy of its deadline: within this, a cancel is the deadline."""


# -------------------------------------------------------------------------------------------------
# Tickets
# -------------------------------------------------------------------------------------------------


@dataclass(eq=False)
class Ticket:
    """One queued request: its prepared request, its future, and the stream of its events."""

    request: GenerationRequest
    key: Hashable
    request_id: str
    loop: asyncio.AbstractEventLoop
    deadline: float | None = None  # time.monotonic() value
    streaming: bool = False
    previews: PreviewPolicy | None = None
    enqueued_at: float = field(default_factory=time.monotonic)
    started_at: float | None = None
    future: asyncio.Future[GenerationResult] = field(init=False)
    _events: asyncio.Queue[Any] = field(init=False)
    _stop: DiffstackError | None = field(default=None, init=False)
    _last_preview: float = field(default=0.0, init=False)
    _position: int = field(default=-1, init=False)

    def __post_init__(self) -> None:
        self.future = self.loop.create_future()
        self._events = asyncio.Queue()

    @property
    def images(self) -> int:
        return max(1, self.request.num_images)

    @property
    def queue_seconds(self) -> float:
        return (self.started_at or time.monotonic()) - self.enqueued_at

    # -- called by the engine's worker thread ------------------------------------------------------

    def should_stop(self) -> DiffstackError | None:
        """Why this job must stop now (cancelled, deadline passed), or None to go on."""
        if self._stop is not None:
            return self._stop
        if self.deadline is not None and time.monotonic() >= self.deadline:
            return DeadlineExceeded("the deadline passed")
        return None

    def on_step(self, event: StepEvent) -> None:
        """Forward step progress (and, at the capped rate, a preview) to the request's stream."""
        self._post(Progress(event.step, event.total))
        policy = self.previews
        if policy is None or event.step >= event.total:
            return
        now = time.monotonic()
        if now - max(self._last_preview, self.started_at or now) < policy.interval_s:
            return
        self._last_preview = now
        try:
            pictures = event.preview(policy.max_side)
        except Exception:  # a preview is a courtesy: never fail the generation for it
            log.warning("preview_failed", request_id=self.request_id, exc_info=True)
            return
        self._post(Preview(event.step, list(pictures)))

    def _post(self, event: Any) -> None:
        self.loop.call_soon_threadsafe(self._events.put_nowait, event)

    def job(self) -> GenerationJob:
        from diffstack.engine import GenerationJob

        return GenerationJob(
            request=self.request,
            on_step=self.on_step if self.streaming else None,
            should_stop=self.should_stop,
        )

    # -- called on the event loop ------------------------------------------------------------------

    def cancel(self, error: DiffstackError | None = None) -> None:
        """Stop this request at the next step (or before it starts), failing it with ``error``
        (by default DeadlineExceeded when its deadline is due, else Cancelled)."""
        if self._stop is None:
            if error is None:
                due = self.deadline is not None and time.monotonic() >= self.deadline - DEADLINE_SLACK_S
                error = DeadlineExceeded("the deadline passed") if due else Cancelled("the client cancelled")
            self._stop = error

    def move_to(self, position: int) -> None:
        if position != self._position:
            self._position = position
            if self.streaming:
                self._events.put_nowait(Queued(position))

    def finish(self, outcome: GenerationResult | BaseException) -> None:
        """Deliver the outcome (after every event the worker posted, which are already queued)."""
        if not self.future.done():
            if isinstance(outcome, BaseException):
                self.future.set_exception(outcome)
                self.future.exception()  # retrieved here: an abandoned ticket must not warn later
            else:
                self.future.set_result(outcome)
        self._events.put_nowait(_DONE)

    async def events(self) -> AsyncIterator[Event]:
        """The request's events until it finishes; then await :attr:`future` for the outcome."""
        while True:
            event = await self._events.get()
            if event is _DONE:
                return
            yield event
