"""The RPC handlers: plain async methods from a request message to a response (or a stream of them).

They are named like the RPCs and free of server plumbing (status codes, request ids, metrics live in
the interceptors, serving in :mod:`diffstack_server.app`), so grpc.aio hosts them here and a replica
host such as Ray Serve's gRPC ingress can host the same objects. ``context`` is optional and only
read for the client's deadline. They never choose threads for the engine: everything that touches the
device goes through the :class:`~diffstack.engine.EngineWorker` in the :class:`Runtime`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import structlog

from diffstack.errors import DeadlineExceeded, DiffstackError, InvalidRequest, NotReady
from diffstack.profiles import all_profiles
from diffstack_client.v1 import (
    diagnostics_pb2,
    diagnostics_pb2_grpc,
    generation_pb2,
    generation_pb2_grpc,
    types_pb2,
)
from diffstack_server import convert
from diffstack_server.batching import BatchQueue
from diffstack_server.encoding import ImageEncoder
from diffstack_server.interceptors import current_request_id
from diffstack_server.jobs import JobStore
from diffstack_server.lifecycle import ModelLifecycle
from diffstack_server.tickets import Preview, PreviewPolicy, Progress, Queued, Ticket

if TYPE_CHECKING:
    from diffstack.config import Settings
    from diffstack.engine import EngineWorker, ServingEngine
    from diffstack.engine.model import LoadedModel
    from diffstack.types import DenoiserWrapperOffer
    from diffstack_server.metrics import Metrics

log = structlog.get_logger("diffstack.server.generation")

PREVIEW_QUALITY = 80


@dataclass
class Runtime:
    """What the servicers share: the settings, the engine's worker, the queue and the metrics."""

    settings: Settings
    worker: EngineWorker
    queue: BatchQueue
    metrics: Metrics
    encoder: ImageEncoder
    startup: dict[str, float] = field(default_factory=dict)
    """Where start-up time went, in seconds by phase (the ``startup`` log line; GetStats ``startup_*``)."""

    @property
    def draining(self) -> bool:
        return self.queue.closed

    def serving(self) -> tuple[ServingEngine, BatchQueue]:
        """The engine and queue, or :class:`NotReady` while starting or draining."""
        if self.draining:
            raise NotReady("the server is shutting down; retry on another replica")
        engine = self.worker.engine
        if engine is None or not self.queue.started:
            raise NotReady("the server is starting: the model is loading and its stack warming up")
        return engine, self.queue

    def started_engine(self) -> ServingEngine:
        engine = self.worker.engine
        if engine is None:
            raise NotReady("the server is starting: the model is loading and its stack warming up")
        return engine

    async def checkout(self, name: str) -> LoadedModel:
        """Model ``name``, pinned (release with ``unpin``): loaded ones at once, others loaded on the
        device thread if ``engine.load_on_request`` allows, else INVALID_ARGUMENT."""
        future = self.worker.checkout(name, may_load=self.settings.engine.load_on_request)
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            # The caller left while its model loaded: the load finishes on the device thread and
            # its hold is given back then, so the model stays free to be unloaded later.
            future.add_done_callback(self._unpin_loaded)
            raise

    def _unpin_loaded(self, future: concurrent.futures.Future[LoadedModel]) -> None:
        engine = self.worker.engine
        if engine is not None and not future.cancelled() and future.exception() is None:
            engine.unpin(future.result())


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
        self.jobs = JobStore(self)

    async def Generate(
        self, request: generation_pb2.GenerateRequest, context: Any = None
    ) -> generation_pb2.GenerateResponse:
        ticket = await self.enqueue(request.spec, request.output, context)
        try:
            result = await asyncio.shield(ticket.future)
        except asyncio.CancelledError:
            self.runtime.queue.withdraw(ticket, _why_ended(context))
            raise
        return generation_pb2.GenerateResponse(result=await self.encode(ticket, result, request.output))

    async def GenerateStream(
        self, request: generation_pb2.GenerateStreamRequest, context: Any = None
    ) -> AsyncIterator[generation_pb2.GenerateStreamResponse]:
        ticket = await self.enqueue(request.spec, request.output, context, previews=request.previews)
        finished = False
        try:
            async for event in ticket.events():
                yield await self.event_message(event, request.previews)
            result = await ticket.future
            finished = True
            yield generation_pb2.GenerateStreamResponse(
                result=await self.encode(ticket, result, request.output)
            )
        finally:
            if not finished:
                self.runtime.queue.withdraw(ticket, _why_ended(context))

    async def SubmitJob(
        self, request: generation_pb2.SubmitJobRequest, context: Any = None
    ) -> generation_pb2.SubmitJobResponse:
        return await self.jobs.submit(request)

    async def WatchJob(
        self, request: generation_pb2.WatchJobRequest, context: Any = None
    ) -> AsyncIterator[generation_pb2.WatchJobResponse]:
        async for event in self.jobs.watch(request):
            yield event

    async def CancelJob(
        self, request: generation_pb2.CancelJobRequest, context: Any = None
    ) -> generation_pb2.CancelJobResponse:
        return self.jobs.cancel(request)

    async def ListJobs(
        self, request: generation_pb2.ListJobsRequest, context: Any = None
    ) -> generation_pb2.ListJobsResponse:
        return self.jobs.list()

    # -- helpers (shared with diffstack_server.jobs) --------------------------------------------------

    async def enqueue(
        self,
        spec: types_pb2.GenerationSpec,
        output: types_pb2.OutputOptions,
        context: Any,
        previews: generation_pb2.PreviewOptions | None = None,
    ) -> Ticket:
        """Admit first (a full queue refuses before any work), then check, resolve and pin the model,
        prepare the request off the event loop, and fill the reserved place with its ticket."""
        engine, queue = self.runtime.serving()
        # Places are images; an out-of-limit count is refused by validation, not as a full queue.
        place = queue.reserve(min(max(1, spec.num_images), self.runtime.settings.limits.max_images))
        model = None
        try:
            convert.check_output(output)
            if previews is not None:
                convert.check_previews(previews)
            try:
                model = await self.runtime.checkout(spec.model)
            except InvalidRequest as error:
                raise convert.in_spec(error) from None
            # Decoding an init image and tokenizing the prompt are CPU work: off the event loop.
            prepared, key = await asyncio.to_thread(self._prepare, engine, model, spec)
            ticket = Ticket(
                request=prepared,
                key=key,
                request_id=current_request_id(),
                loop=asyncio.get_running_loop(),
                deadline=_deadline(context),
                streaming=previews is not None,
                previews=self._preview_policy(previews),
            )
            place.fill(ticket)
        except BaseException:
            place.release()
            if model is not None:
                engine.unpin(model)
            raise
        pinned = model
        ticket.future.add_done_callback(lambda _: engine.unpin(pinned))
        log.info(
            "queued",
            model=prepared.model,
            size=f"{prepared.width}x{prepared.height}",
            steps=prepared.steps,
            images=prepared.num_images,
            position=queue.depth - 1,
        )
        return ticket

    def _preview_policy(self, previews: generation_pb2.PreviewOptions | None) -> PreviewPolicy | None:
        if previews is None or not previews.enabled:
            return None
        server = self.runtime.settings.server
        cap = server.preview_max_side
        return PreviewPolicy(
            interval_s=server.preview_interval_s,
            max_side=min(previews.max_side, cap) if previews.max_side else cap,
        )

    def _prepare(
        self, engine: ServingEngine, model: LoadedModel, spec: types_pb2.GenerationSpec
    ) -> tuple[Any, Any]:
        """The prepared request and its batch key, computed once here."""
        settings = self.runtime.settings
        if not spec.profile and settings.engine.profile:  # the server's default profile
            with_default = types_pb2.GenerationSpec()
            with_default.CopyFrom(spec)
            with_default.profile = settings.engine.profile
            spec = with_default
        request = convert.request_from_spec(spec, settings.limits, all_profiles(settings.profiles))
        try:
            prepared = engine.prepare(request, model)
        except InvalidRequest as error:
            raise convert.in_spec(convert.profile_refusal(error, spec)) from None
        return prepared, engine.batch_key(prepared)

    async def encode(
        self, ticket: Ticket, result: Any, output: types_pb2.OutputOptions
    ) -> types_pb2.GenerationResult:
        started = time.perf_counter()
        queue_s = ticket.queue_seconds
        message = await self.runtime.encoder.result_message(result, output, {"queue_s": queue_s})
        message.timings["output_s"] = time.perf_counter() - started
        self.runtime.metrics.observe_images(len(message.images))
        return message

    async def event_message(
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
        images = await asyncio.to_thread(_encode_previews, event, previews.format)
        return generation_pb2.GenerateStreamResponse(
            preview=generation_pb2.PreviewEvent(step=event.step, images=images)
        )


def _encode_previews(event: Preview, image_format: int) -> list[types_pb2.Image]:
    options = convert.EncodeOptions(image_format or types_pb2.IMAGE_FORMAT_JPEG, PREVIEW_QUALITY)
    return [convert.encode_image(image, options) for image in event.images]


class DiagnosticsServicer(diagnostics_pb2_grpc.DiagnosticsServiceServicer):
    """ListPlugins, GetStack, ListModels, GetStats: the same data the CLI renders; and the admin's
    LoadModel, UnloadModel, FreeMemory (:mod:`diffstack_server.lifecycle`)."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.lifecycle = ModelLifecycle(runtime)

    async def ListPlugins(
        self, request: diagnostics_pb2.ListPluginsRequest, context: Any = None
    ) -> diagnostics_pb2.ListPluginsResponse:
        """Answers as soon as the plugins loaded, while the models still compose."""
        plugins = self.runtime.worker.plugins
        if plugins is None:
            raise NotReady("the server is starting: the plugins are loading")
        wrappers = self._wrappers_by_plugin()
        return diagnostics_pb2.ListPluginsResponse(
            plugins=[convert.plugin_message(p, wrappers.get(p.name)) for p in plugins]
        )

    def _wrappers_by_plugin(self) -> dict[str, dict[str, DenoiserWrapperOffer]]:
        """The wrapper offers of every loaded model's stack, by the plugin that made them."""
        engine = self.runtime.worker.engine
        found: dict[str, dict[str, DenoiserWrapperOffer]] = {}
        for listing in engine.models() if engine is not None else []:
            model = engine.pin(listing.name) if engine is not None and listing.loaded else None
            if model is None or engine is None:
                continue
            try:
                for slot in model.report.slots:
                    for candidate in slot.candidates:
                        offer = model.stack.wrappers.get(candidate.offer)
                        if slot.slot == "wrap_denoiser" and offer is not None:
                            found.setdefault(candidate.plugin, {})[offer.name] = offer
            finally:
                engine.unpin(model)
        return found

    async def GetStack(
        self, request: diagnostics_pb2.GetStackRequest, context: Any = None
    ) -> diagnostics_pb2.GetStackResponse:
        engine = self.runtime.started_engine()
        model = await self.runtime.checkout(request.model)
        try:
            return diagnostics_pb2.GetStackResponse(stack=convert.stack_message(model.report))
        finally:
            engine.unpin(model)

    async def ListModels(
        self, request: diagnostics_pb2.ListModelsRequest, context: Any = None
    ) -> diagnostics_pb2.ListModelsResponse:
        engine = self.runtime.started_engine()
        return diagnostics_pb2.ListModelsResponse(models=[convert.model_message(m) for m in engine.models()])

    async def ListLoras(
        self, request: diagnostics_pb2.ListLorasRequest, context: Any = None
    ) -> diagnostics_pb2.ListLorasResponse:
        engine = self.runtime.started_engine()
        listings = await asyncio.to_thread(engine.loras)  # reads LoRA files the first time
        return diagnostics_pb2.ListLorasResponse(loras=[convert.lora_message(m) for m in listings])

    async def GetStats(
        self, request: diagnostics_pb2.GetStatsRequest, context: Any = None
    ) -> diagnostics_pb2.GetStatsResponse:
        metrics, queue, engine = self.runtime.metrics, self.runtime.queue, self.runtime.worker.engine
        engine_stats = engine.stats() if engine is not None else {}
        latency = metrics.latency()
        allocated = engine_stats.get("gpu_memory_allocated_bytes")
        reserved = engine_stats.get("gpu_memory_reserved_bytes")
        return diagnostics_pb2.GetStatsResponse(
            queue_depth=queue.depth,
            in_flight=queue.in_flight,
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
            engine={
                **{k: float(v) for k, v in engine_stats.items()},
                **{f"startup_{k}": v for k, v in self.runtime.startup.items()},
                "batch_size": float(queue.max_batch),
            },
            loaded_models=[]
            if engine is None
            else [convert.model_message(m) for m in engine.models() if m.loaded],
        )

    async def LoadModel(
        self, request: diagnostics_pb2.LoadModelRequest, context: Any = None
    ) -> diagnostics_pb2.LoadModelResponse:
        return await self.lifecycle.load(request)

    async def UnloadModel(
        self, request: diagnostics_pb2.UnloadModelRequest, context: Any = None
    ) -> diagnostics_pb2.UnloadModelResponse:
        return await self.lifecycle.unload(request)

    async def FreeMemory(
        self, request: diagnostics_pb2.FreeMemoryRequest, context: Any = None
    ) -> diagnostics_pb2.FreeMemoryResponse:
        return await self.lifecycle.free_memory(request)
