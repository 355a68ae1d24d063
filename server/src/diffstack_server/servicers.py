"""The RPC handlers: plain async methods from a request message to a response (or a stream of them).

They are named like the RPCs and free of server plumbing (status codes, request ids, metrics live in
the interceptors, serving in :mod:`diffstack_server.app`), so grpc.aio hosts them here and a replica
host such as Ray Serve's gRPC ingress can host the same objects. ``context`` is optional and only
read for the client's deadline.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import structlog

from diffstack.errors import DeadlineExceeded, DiffstackError, InvalidRequest, NotReady
from diffstack_client.v1 import (
    diagnostics_pb2,
    diagnostics_pb2_grpc,
    generation_pb2,
    generation_pb2_grpc,
    types_pb2,
)
from diffstack_server import convert
from diffstack_server.batching import BatchQueue
from diffstack_server.interceptors import current_request_id
from diffstack_server.tickets import Preview, PreviewPolicy, Progress, Queued, Ticket

if TYPE_CHECKING:
    from diffstack.config import Settings
    from diffstack_server.metrics import Metrics
    from diffstack_server.protocols import ServingEngine

log = structlog.get_logger("diffstack.server.generation")

PREVIEW_QUALITY = 80


@dataclass
class Runtime:
    """What the servicers share: the settings, the metrics, and (once started) the engine and queue."""

    settings: Settings
    metrics: Metrics
    engine: ServingEngine | None = None
    queue: BatchQueue | None = None
    draining: bool = False
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    engine_thread: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(max_workers=1, thread_name_prefix="diffstack-engine")
    )
    """The one thread that starts the engine and runs every batch (CUDA graphs are per thread)."""

    def serving(self) -> tuple[ServingEngine, BatchQueue]:
        """The engine and queue, or :class:`NotReady` while starting or draining."""
        if self.draining:
            raise NotReady("the server is shutting down; retry on another replica")
        if self.engine is None or self.queue is None:
            raise NotReady("the server is starting: the model is loading and its stack warming up")
        return self.engine, self.queue

    def executor_for(self, engine: ServingEngine, model: str) -> ThreadPoolExecutor | None:
        """Where to call into ``model``: loading composes (and may compile) it, so that happens on
        the engine thread; a loaded model's cheap calls take the default pool."""
        return None if engine.is_loaded(model) else self.engine_thread

    def started_engine(self) -> ServingEngine:
        if self.engine is None:
            raise NotReady("the server is starting: the model is loading and its stack warming up")
        return self.engine


def _deadline(context: Any) -> float | None:
    time_remaining = getattr(context, "time_remaining", None)
    remaining = time_remaining() if callable(time_remaining) else None
    return None if remaining is None else time.monotonic() + remaining


def _why_ended(context: Any) -> DiffstackError | None:
    """DeadlineExceeded when the call ended because its deadline passed; None lets the ticket decide."""
    time_remaining = getattr(context, "time_remaining", None)
    remaining = time_remaining() if callable(time_remaining) else None
    return DeadlineExceeded("the deadline passed") if remaining is not None and remaining <= 0 else None


class GenerationServicer(generation_pb2_grpc.GenerationServiceServicer):
    """Generate and GenerateStream: validate, queue, await the batch, encode."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    async def Generate(
        self, request: generation_pb2.GenerateRequest, context: Any = None
    ) -> generation_pb2.GenerateResponse:
        ticket = await self._enqueue(request.spec, request.output, context)
        queue = self.runtime.queue
        try:
            result = await asyncio.shield(ticket.future)
        except asyncio.CancelledError:
            if queue is not None:
                queue.withdraw(ticket, _why_ended(context))
            raise
        return generation_pb2.GenerateResponse(result=await self._encode(ticket, result, request.output))

    async def GenerateStream(
        self, request: generation_pb2.GenerateStreamRequest, context: Any = None
    ) -> AsyncIterator[generation_pb2.GenerateStreamResponse]:
        ticket = await self._enqueue(request.spec, request.output, context, previews=request.previews)
        queue = self.runtime.queue
        finished = False
        try:
            async for event in ticket.events():
                yield await self._event_message(event, request.previews)
            result = await ticket.future
            finished = True
            yield generation_pb2.GenerateStreamResponse(
                result=await self._encode(ticket, result, request.output)
            )
        finally:
            if not finished and queue is not None:
                queue.withdraw(ticket, _why_ended(context))

    # -- helpers -----------------------------------------------------------------------------------

    async def _enqueue(
        self,
        spec: types_pb2.GenerationSpec,
        output: types_pb2.OutputOptions,
        context: Any,
        previews: generation_pb2.PreviewOptions | None = None,
    ) -> Ticket:
        engine, queue = self.runtime.serving()
        settings = self.runtime.settings
        convert.check_output(output)
        if previews is not None:
            convert.check_previews(previews)
        loop = asyncio.get_running_loop()
        # Decoding an init image and tokenizing the prompt are CPU work: off the event loop.
        executor = self.runtime.executor_for(engine, spec.model)
        prepared, key = await loop.run_in_executor(executor, self._prepare, engine, spec)
        policy = None
        if previews is not None and previews.enabled:
            cap = settings.server.preview_max_side
            policy = PreviewPolicy(
                interval_s=settings.server.preview_interval_s,
                max_side=min(previews.max_side, cap) if previews.max_side else cap,
            )
        ticket = Ticket(
            request=prepared,
            key=key,
            request_id=current_request_id(),
            loop=loop,
            deadline=_deadline(context),
            streaming=previews is not None,
            previews=policy,
        )
        queue.submit(ticket)
        log.info(
            "queued",
            model=prepared.model,
            size=f"{prepared.width}x{prepared.height}",
            steps=prepared.steps,
            images=prepared.num_images,
            position=queue.depth - 1,
        )
        return ticket

    def _prepare(self, engine: ServingEngine, spec: types_pb2.GenerationSpec) -> tuple[Any, Any]:
        request = convert.request_from_spec(spec, self.runtime.settings.limits)
        try:
            prepared = engine.prepare(request)
        except InvalidRequest as error:
            raise convert.in_spec(error) from None
        return prepared, engine.batch_key(prepared)

    async def _encode(
        self, ticket: Ticket, result: Any, output: types_pb2.OutputOptions
    ) -> types_pb2.GenerationResult:
        started = time.perf_counter()
        queue_s = ticket.queue_seconds
        message = await asyncio.get_running_loop().run_in_executor(
            None, convert.result_message, result, output, {"queue_s": queue_s}
        )
        message.timings["output_s"] = time.perf_counter() - started
        self.runtime.metrics.observe_images(len(message.images))
        return message

    async def _event_message(
        self, event: Queued | Progress | Preview, previews: generation_pb2.PreviewOptions
    ) -> generation_pb2.GenerateStreamResponse:
        if isinstance(event, Queued):
            return generation_pb2.GenerateStreamResponse(
                queued=generation_pb2.QueuedEvent(position=event.position)
            )
        if isinstance(event, Progress):
            return generation_pb2.GenerateStreamResponse(
                progress=generation_pb2.ProgressEvent(step=event.step, total=event.total)
            )
        images = await asyncio.get_running_loop().run_in_executor(
            None, _encode_previews, event, previews.format
        )
        return generation_pb2.GenerateStreamResponse(
            preview=generation_pb2.PreviewEvent(step=event.step, images=images)
        )


def _encode_previews(event: Preview, image_format: int) -> list[types_pb2.Image]:
    return [
        convert.encode_image(image, image_format, PREVIEW_QUALITY, default=types_pb2.IMAGE_FORMAT_JPEG)
        for image in event.images
    ]


class DiagnosticsServicer(diagnostics_pb2_grpc.DiagnosticsServiceServicer):
    """ListPlugins, GetStack, ListModels, GetStats: the same data the CLI renders."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    async def ListPlugins(
        self, request: diagnostics_pb2.ListPluginsRequest, context: Any = None
    ) -> diagnostics_pb2.ListPluginsResponse:
        engine = self.runtime.started_engine()
        return diagnostics_pb2.ListPluginsResponse(
            plugins=[convert.plugin_message(p) for p in engine.plugins]
        )

    async def GetStack(
        self, request: diagnostics_pb2.GetStackRequest, context: Any = None
    ) -> diagnostics_pb2.GetStackResponse:
        engine = self.runtime.started_engine()
        executor = self.runtime.executor_for(engine, request.model)
        report = await asyncio.get_running_loop().run_in_executor(executor, engine.report, request.model)
        return diagnostics_pb2.GetStackResponse(stack=convert.stack_message(report))

    async def ListModels(
        self, request: diagnostics_pb2.ListModelsRequest, context: Any = None
    ) -> diagnostics_pb2.ListModelsResponse:
        engine = self.runtime.started_engine()
        return diagnostics_pb2.ListModelsResponse(models=[convert.model_message(m) for m in engine.models()])

    async def GetStats(
        self, request: diagnostics_pb2.GetStatsRequest, context: Any = None
    ) -> diagnostics_pb2.GetStatsResponse:
        metrics, queue, engine = self.runtime.metrics, self.runtime.queue, self.runtime.engine
        engine_stats = engine.stats() if engine is not None else {}
        latency = metrics.latency()
        allocated = engine_stats.get("gpu_memory_allocated_bytes")
        reserved = engine_stats.get("gpu_memory_reserved_bytes")
        return diagnostics_pb2.GetStatsResponse(
            queue_depth=queue.depth if queue else 0,
            in_flight=queue.in_flight if queue else 0,
            requests_served=metrics.served,
            requests_failed=metrics.failed,
            images_served=metrics.images,
            batches_run=metrics.batches,
            latency=diagnostics_pb2.LatencyPercentiles(
                p50=latency.p50, p90=latency.p90, p99=latency.p99, count=latency.count
            ),
            uptime_s=metrics.uptime_s,
            gpu_memory_allocated_bytes=None if allocated is None else int(allocated),
            gpu_memory_reserved_bytes=None if reserved is None else int(reserved),
            engine={k: float(v) for k, v in engine_stats.items()},
        )
