"""The asyncio client: the same methods as :class:`~diffstack_client.DiffstackClient`, awaitable."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Any, Unpack

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from diffstack_client._common import (
    CHANNEL_OPTIONS,
    DEFAULT_TARGET,
    REQUEST_ID_HEADER,
    Event,
    Generation,
    ImageFormatName,
    ServiceError,
    SpecParams,
    build_spec,
    event_from_message,
    job_request,
    metadata_value,
    output_options,
    preview_options,
)
from diffstack_client.diagnostics import Plugin, StackReport
from diffstack_client.v1 import diagnostics_pb2, diagnostics_pb2_grpc, generation_pb2, generation_pb2_grpc

Metadata = tuple[tuple[str, str], ...]


class AsyncDiffstackClient:
    """An asyncio client for one diffstack server.

    >>> async with AsyncDiffstackClient("127.0.0.1:50051") as client:
    ...     result = await client.generate("a small red circle at the top left", seed=7)
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        admin_token: str | None = None,
        api_key: str | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        timeout: float | None = None,
        channel: grpc.aio.Channel | None = None,
    ) -> None:
        if channel is None:
            options = list(CHANNEL_OPTIONS)
            channel = (
                grpc.aio.secure_channel(target, credentials, options)
                if credentials is not None
                else grpc.aio.insecure_channel(target, options)
            )
        self.channel = channel
        self.timeout = timeout
        self._admin: Metadata = (("authorization", f"Bearer {admin_token}"),) if admin_token else ()
        self._key: Metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        self._generation = generation_pb2_grpc.GenerationServiceStub(channel)
        self._diagnostics = diagnostics_pb2_grpc.DiagnosticsServiceStub(channel)
        self._health = health_pb2_grpc.HealthStub(channel)

    async def generate(
        self,
        prompt: str,
        *,
        image_format: ImageFormatName = "png",
        quality: int | None = None,
        effort: int | None = None,
        lossless: bool = False,
        timeout: float | None = None,
        request_id: str | None = None,
        **params: Unpack[SpecParams],
    ) -> Generation:
        """Generate images for ``prompt`` and return them with their seeds."""
        request = generation_pb2.GenerateRequest(
            spec=build_spec(prompt, params), output=output_options(image_format, quality, effort, lossless)
        )
        call = self._generation.Generate(
            request, timeout=self._timeout(timeout), metadata=self._key + _request_metadata(request_id)
        )
        try:
            response = await call
            request_id = metadata_value(await call.initial_metadata(), REQUEST_ID_HEADER)
        except grpc.aio.AioRpcError as error:
            raise ServiceError.from_rpc_error(error) from error
        return Generation.from_message(response.result, request_id)

    def stream(
        self,
        prompt: str,
        *,
        previews: bool = False,
        preview_max_side: int = 0,
        preview_format: ImageFormatName = "jpeg",
        image_format: ImageFormatName = "png",
        quality: int | None = None,
        effort: int | None = None,
        lossless: bool = False,
        timeout: float | None = None,
        request_id: str | None = None,
        **params: Unpack[SpecParams],
    ) -> AsyncIterator[Event]:
        """Generate with a stream of events: ``Queued``, ``Progress``, ``Preview``, then ``Finished``.

        Leaving the loop early cancels the request on the server.
        """
        request = generation_pb2.GenerateStreamRequest(
            spec=build_spec(prompt, params),
            output=output_options(image_format, quality, effort, lossless),
            previews=preview_options(previews, preview_max_side, preview_format),
        )
        call = self._generation.GenerateStream(
            request, timeout=self._timeout(timeout), metadata=self._key + _request_metadata(request_id)
        )
        return _events(call)

    # -- jobs ------------------------------------------------------------------------------------------

    async def submit_job(
        self,
        prompt: str,
        *,
        idempotency_key: str = "",
        previews: bool = False,
        image_format: ImageFormatName = "png",
        **params: Unpack[SpecParams],
    ) -> str:
        """Queue a job that runs whether or not anyone watches; returns its id. Submitting again with
        the same ``idempotency_key`` returns the same job (it never runs twice)."""
        request = job_request(prompt, params, idempotency_key, previews, image_format)
        return str((await self._call(self._generation.SubmitJob, request)).job_id)

    def watch_job(self, job_id: str, *, from_now: bool = False) -> AsyncIterator[Event]:
        """The job's events from its start (or from now) until it ends, ``Finished`` last; a failed
        job raises its error. Leaving the loop early leaves the job running."""
        call = self._generation.WatchJob(
            generation_pb2.WatchJobRequest(job_id=job_id, from_now=from_now),
            timeout=self.timeout,
            metadata=self._key,
        )
        return _events(call)

    async def cancel_job(self, job_id: str) -> str:
        """Cancel the job; returns its state name after the call (e.g. ``JOB_STATE_CANCELLED``)."""
        request = generation_pb2.CancelJobRequest(job_id=job_id)
        return generation_pb2.JobState.Name((await self._call(self._generation.CancelJob, request)).state)

    async def list_jobs(self) -> list[generation_pb2.JobInfo]:
        """This caller's jobs the server still keeps, oldest first, with queue positions."""
        response = await self._call(self._generation.ListJobs, generation_pb2.ListJobsRequest())
        return list(response.jobs)

    async def _call(self, method: Any, request: Any) -> Any:
        try:
            return await method(request, timeout=self.timeout, metadata=self._key)
        except grpc.aio.AioRpcError as error:
            raise ServiceError.from_rpc_error(error) from error

    # -- diagnostics ---------------------------------------------------------------------------------

    async def plugins(self) -> list[Plugin]:
        response = await self._admin_call(self._diagnostics.ListPlugins, diagnostics_pb2.ListPluginsRequest())
        return [Plugin.from_message(plugin) for plugin in response.plugins]

    async def stack(self, model: str = "") -> StackReport:
        response = await self._admin_call(
            self._diagnostics.GetStack, diagnostics_pb2.GetStackRequest(model=model)
        )
        return StackReport.from_message(response.stack)

    async def models(self) -> list[diagnostics_pb2.Model]:
        response = await self._admin_call(self._diagnostics.ListModels, diagnostics_pb2.ListModelsRequest())
        return list(response.models)

    async def loras(self) -> list[diagnostics_pb2.Lora]:
        response = await self._admin_call(self._diagnostics.ListLoras, diagnostics_pb2.ListLorasRequest())
        return list(response.loras)

    async def stats(self) -> diagnostics_pb2.GetStatsResponse:
        return await self._admin_call(self._diagnostics.GetStats, diagnostics_pb2.GetStatsRequest())

    async def load_model(self, model: str) -> diagnostics_pb2.LoadModelResponse:
        request = diagnostics_pb2.LoadModelRequest(model=model)
        return await self._admin_call(self._diagnostics.LoadModel, request)

    async def unload_model(self, model: str) -> bool:
        request = diagnostics_pb2.UnloadModelRequest(model=model)
        return bool((await self._admin_call(self._diagnostics.UnloadModel, request)).unloaded)

    async def free_memory(self) -> diagnostics_pb2.FreeMemoryResponse:
        return await self._admin_call(self._diagnostics.FreeMemory, diagnostics_pb2.FreeMemoryRequest())

    async def health(self, service: str = "", timeout: float | None = None) -> str:
        try:
            response = await self._health.Check(
                health_pb2.HealthCheckRequest(service=service), timeout=self._timeout(timeout)
            )
        except grpc.aio.AioRpcError as error:
            raise ServiceError.from_rpc_error(error) from error
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    async def wait_until_serving(self, timeout: float = 60.0, service: str = "") -> None:
        """Wait until the server reports SERVING (it waits for the port to open, too)."""
        give_up_at = time.monotonic() + timeout
        request = health_pb2.HealthCheckRequest(service=service)
        while (remaining := give_up_at - time.monotonic()) > 0:
            try:
                async for update in self._health.Watch(request, timeout=remaining, wait_for_ready=True):
                    if update.status == health_pb2.HealthCheckResponse.SERVING:
                        return
            except grpc.aio.AioRpcError as error:
                if error.code() is grpc.StatusCode.DEADLINE_EXCEEDED:
                    break
                if error.code() is not grpc.StatusCode.UNAVAILABLE:
                    raise ServiceError.from_rpc_error(error) from error
                await asyncio.sleep(0)  # the server closed the stream (restarting): watch again
        raise TimeoutError(f"the server was not SERVING within {timeout} s")

    def _timeout(self, timeout: float | None) -> float | None:
        return timeout if timeout is not None else self.timeout

    async def _admin_call(self, method: Any, request: Any) -> Any:
        try:
            return await method(request, timeout=self.timeout, metadata=self._admin)
        except grpc.aio.AioRpcError as error:
            raise ServiceError.from_rpc_error(error) from error

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> AsyncDiffstackClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


def _request_metadata(request_id: str | None) -> Metadata:
    return ((REQUEST_ID_HEADER, request_id),) if request_id else ()


async def _events(call: Any) -> AsyncIterator[Event]:
    """A stream's events; leaving early cancels the call (a generation stops, a job runs on)."""
    request_id = ""
    try:
        async for message in call:
            if not request_id:
                request_id = metadata_value(await call.initial_metadata(), REQUEST_ID_HEADER)
            if isinstance(message, generation_pb2.WatchJobResponse):
                message = message.event
            yield event_from_message(message, request_id)
    except grpc.aio.AioRpcError as error:
        raise ServiceError.from_rpc_error(error) from error
    finally:
        call.cancel()
