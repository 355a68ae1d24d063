"""One Ray Serve replica: the server's GenerationServicer and DiagnosticsServicer over its own engine.

Ray's gRPC proxy routes each RPC to a method of the same name here. Each method runs the very same
servicer method the grpc.aio server runs, and maps what it raises exactly as the server's
StatusInterceptor does (:func:`diffstack_server.interceptors.status_for`: code, message and
``google.rpc`` details in the trailers), so no exception ever reaches Ray, which would answer INTERNAL
with its traceback. Every answer carries the ``x-diffstack-replica`` trailer naming the replica.
``Check`` answers ``grpc.health.v1`` (Ray Serve has none of its own); GetStats adds up the stats that
the replicas post to one :class:`StatsBoard` actor.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

import grpc
import structlog
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2
from grpc_status import rpc_status
from ray import serve

from diffstack.config import Settings
from diffstack.errors import NotReady
from diffstack_client.v1 import diagnostics_pb2, generation_pb2
from diffstack_ray import wire  # noqa: F401  (our messages pickle between proxy and replica)
from diffstack_ray.stats import STATS_BOARD, STATS_NAMESPACE, StatsBoard, combined_stats
from diffstack_server.app import HEALTH_SERVICES, build_runtime, size_batches
from diffstack_server.interceptors import REQUEST_ID_HEADER, status_for
from diffstack_server.servicers import DiagnosticsServicer, GenerationServicer

log = structlog.get_logger("diffstack.ray")

M = TypeVar("M", bound=Message)

REPLICA_HEADER = "x-diffstack-replica"
GENERATE = "/diffstack.v1.GenerationService/Generate"
GENERATE_STREAM = "/diffstack.v1.GenerationService/GenerateStream"
STATS_FRESH_S = 30.0
"""Stats posted longer ago than this are a replica that is gone: left out of the sum."""


class Replica:
    """The deployment's class: one engine, its queue, and the two servicers (see the module doc)."""

    async def __init__(self, settings: dict[str, Any]) -> None:  # type: ignore[misc]  # Ray awaits it
        self.settings = Settings.model_validate(settings)
        self.name = serve.get_replica_context().replica_tag
        self.runtime = build_runtime(self.settings)
        self.generation = GenerationServicer(self.runtime)
        self.diagnostics = DiagnosticsServicer(self.runtime)
        self.board = StatsBoard.options(  # type: ignore[attr-defined]
            name=STATS_BOARD, namespace=STATS_NAMESPACE, get_if_exists=True, lifetime="detached"
        ).remote()
        started = time.perf_counter()
        await asyncio.wrap_future(self.runtime.worker.start())
        await size_batches(self.runtime)
        self.runtime.queue.start()
        await self._post_stats()
        log.info("replica_ready", replica=self.name, seconds=round(time.perf_counter() - started, 2))

    async def check_health(self) -> None:
        """Ray's periodic probe: a replica whose device thread is gone is replaced; posts its stats."""
        if not self.runtime.worker.join(timeout=0) and self.runtime.worker.engine is not None:
            await self._post_stats()
            return
        raise RuntimeError("the engine's device thread has stopped")

    async def _post_stats(self) -> None:
        stats = await self.diagnostics.GetStats(diagnostics_pb2.GetStatsRequest())
        await self.board.post.remote(self.name, stats.SerializeToString())

    # -- generation --------------------------------------------------------------------------------

    async def Generate(
        self, request: generation_pb2.GenerateRequest, grpc_context: Any
    ) -> generation_pb2.GenerateResponse:
        return await self._answer(
            self.generation.Generate(request, grpc_context),
            grpc_context,
            generation_pb2.GenerateResponse,
            GENERATE,
        )

    async def GenerateStream(
        self, request: generation_pb2.GenerateStreamRequest, grpc_context: Any
    ) -> AsyncIterator[generation_pb2.GenerateStreamResponse]:
        started = time.perf_counter()
        try:
            async for message in self.generation.GenerateStream(request, grpc_context):
                yield message
        except Exception as exc:
            self._observe(GENERATE_STREAM, self._fail(exc, grpc_context), started)
        else:
            self._mark(grpc_context)
            self._observe(GENERATE_STREAM, "OK", started)

    # -- diagnostics -------------------------------------------------------------------------------

    async def ListPlugins(self, request: Any, grpc_context: Any) -> Any:
        return await self._answer(
            self.diagnostics.ListPlugins(request, grpc_context),
            grpc_context,
            diagnostics_pb2.ListPluginsResponse,
        )

    async def GetStack(self, request: Any, grpc_context: Any) -> Any:
        return await self._answer(
            self.diagnostics.GetStack(request, grpc_context), grpc_context, diagnostics_pb2.GetStackResponse
        )

    async def ListModels(self, request: Any, grpc_context: Any) -> Any:
        return await self._answer(
            self.diagnostics.ListModels(request, grpc_context),
            grpc_context,
            diagnostics_pb2.ListModelsResponse,
        )

    async def ListLoras(self, request: Any, grpc_context: Any) -> Any:
        return await self._answer(
            self.diagnostics.ListLoras(request, grpc_context),
            grpc_context,
            diagnostics_pb2.ListLorasResponse,
        )

    async def GetStats(self, request: Any, grpc_context: Any) -> Any:
        """This replica's stats added to the others' latest posts (``engine["replicas"]`` counts them)."""
        return await self._answer(self._all_stats(), grpc_context, diagnostics_pb2.GetStatsResponse)

    async def _all_stats(self) -> diagnostics_pb2.GetStatsResponse:
        own = await self.diagnostics.GetStats(diagnostics_pb2.GetStatsRequest())
        posted: dict[str, tuple[float, bytes]] = await self.board.read.remote()
        others = []
        for replica, (at, data) in posted.items():
            if replica != self.name and time.time() - at <= STATS_FRESH_S:
                others.append((replica, diagnostics_pb2.GetStatsResponse.FromString(data)))
        return combined_stats([(self.name, own), *others])

    # -- health ------------------------------------------------------------------------------------

    async def Check(
        self, request: health_pb2.HealthCheckRequest, grpc_context: Any
    ) -> health_pb2.HealthCheckResponse:
        """``grpc.health.v1.Health/Check`` for "" and each diffstack service, as the plain server does."""
        if request.service not in HEALTH_SERVICES:
            grpc_context.set_code(grpc.StatusCode.NOT_FOUND)
            grpc_context.set_details(f"unknown service {request.service[:64]!r}")
            return health_pb2.HealthCheckResponse()
        try:
            self.runtime.serving()
            status = health_pb2.HealthCheckResponse.SERVING
        except NotReady:
            status = health_pb2.HealthCheckResponse.NOT_SERVING
        self._mark(grpc_context)
        return health_pb2.HealthCheckResponse(status=status)

    # -- statuses ----------------------------------------------------------------------------------

    async def _answer(
        self, call: Awaitable[M], grpc_context: Any, response_type: type[M], method: str = ""
    ) -> M:
        """``call``'s answer; on an error, its status set on the call and an empty ``response_type``
        (Ray must have a message to send, though the client gets only the status)."""
        started = time.perf_counter()
        try:
            response = await call
        except Exception as exc:
            self._observe(method, self._fail(exc, grpc_context), started)
            return response_type()
        self._mark(grpc_context)
        self._observe(method, "OK", started)
        return response

    def _observe(self, method: str, code: str, started: float) -> None:
        """Generation outcomes feed the served/failed counts and latency, as the interceptor does."""
        if method:
            self.runtime.metrics.observe_rpc(method, code, time.perf_counter() - started)

    def _mark(self, grpc_context: Any, extra: list[tuple[str, Any]] | None = None) -> None:
        grpc_context.set_trailing_metadata([(REPLICA_HEADER, self.name), *(extra or [])])

    def _fail(self, exc: BaseException, grpc_context: Any) -> str:
        """Set the status the server's StatusInterceptor would send; Ray answers it, not a traceback."""
        given = dict(grpc_context.invocation_metadata() or ()).get(REQUEST_ID_HEADER)
        request_id = str(given)[:128] if given else uuid.uuid4().hex
        code, status = status_for(exc, request_id)
        if code is grpc.StatusCode.INTERNAL:
            log.error("internal_error", replica=self.name, request_id=request_id, exc_info=exc)
        grpc_status = rpc_status.to_status(status)
        grpc_context.set_code(grpc_status.code)
        grpc_context.set_details(grpc_status.details)
        self._mark(grpc_context, list(grpc_status.trailing_metadata))
        return code.name
