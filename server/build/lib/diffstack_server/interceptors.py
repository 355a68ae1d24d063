"""The two server interceptors: errors → status codes (the only place statuses are built), admin token.

:class:`StatusInterceptor` wraps every diffstack.v1 RPC. It gives the call a request id (the client's
``x-request-id`` metadata or a fresh one, echoed back as initial metadata and bound to every log line),
maps :mod:`diffstack.errors` to gRPC status codes with ``google.rpc`` details, and records the outcome
in the access log and the metrics. Handlers raise ``InvalidRequest``, ``Overloaded`` and friends and
never build a status themselves. Request bytes that do not parse as the RPC's message are
INVALID_ARGUMENT (gRPC alone answers UNKNOWN). Everything a status echoes of the client's input is
bounded, so the trailers stay far below the 8 KiB metadata limit of gRPC clients: a status that
outgrew it would reach the client as RESOURCE_EXHAUSTED instead of the error it carries.

:class:`AdminTokenInterceptor` requires ``authorization: Bearer <token>`` on DiagnosticsService calls.
"""

from __future__ import annotations

import asyncio
import hmac
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextvars import ContextVar
from datetime import timedelta
from typing import Any

import grpc
import structlog
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from diffstack.errors import (
    Cancelled,
    DeadlineExceeded,
    DiffstackError,
    FieldViolation,
    InvalidRequest,
    ModelError,
    NotFound,
    NotReady,
    OutOfMemory,
    Overloaded,
    PermissionDenied,
    Unauthenticated,
)
from diffstack_server.metrics import Metrics
from diffstack_server.tickets import DEADLINE_SLACK_S

log = structlog.get_logger("diffstack.server.rpc")

REQUEST_ID_HEADER = "x-request-id"
ERROR_DOMAIN = "diffstack"
SERVICE_PREFIX = "/diffstack.v1."
DIAGNOSTICS_PREFIX = "/diffstack.v1.DiagnosticsService/"

MAX_MESSAGE_BYTES = 512
MAX_FIELD_BYTES = 64
MAX_DESCRIPTION_BYTES = 256
MAX_DETAILS_BYTES = 2048
"""Bounds on a status (UTF-8 bytes): the message travels percent-encoded (up to 3x), the details
base64-encoded (4/3x); both together stay under 4 KiB of trailers."""
ELLIPSIS = "…"

_request_id: ContextVar[str] = ContextVar("diffstack_request_id", default="")

# Most specific class first: OutOfMemory is an Overloaded.
_CODES: tuple[tuple[type[DiffstackError], grpc.StatusCode, str], ...] = (
    (InvalidRequest, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST"),
    (OutOfMemory, grpc.StatusCode.RESOURCE_EXHAUSTED, "OUT_OF_MEMORY"),
    (Overloaded, grpc.StatusCode.RESOURCE_EXHAUSTED, "OVERLOADED"),
    (NotReady, grpc.StatusCode.UNAVAILABLE, "NOT_READY"),
    (Cancelled, grpc.StatusCode.CANCELLED, "CANCELLED"),
    (DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED, "DEADLINE_EXCEEDED"),
    (PermissionDenied, grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED"),
    (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED"),
    (NotFound, grpc.StatusCode.NOT_FOUND, "NOT_FOUND"),
    (ModelError, grpc.StatusCode.FAILED_PRECONDITION, "MODEL_ERROR"),
)


def current_request_id() -> str:
    """The request id of the RPC being handled in this task (a fresh one outside an RPC)."""
    return _request_id.get() or uuid.uuid4().hex


def status_for(error: BaseException, request_id: str) -> tuple[grpc.StatusCode, status_pb2.Status]:
    """The gRPC code and ``google.rpc.Status`` (with details) that ``error`` maps to."""
    code, reason = grpc.StatusCode.INTERNAL, "INTERNAL"
    message = f"internal error (request id {request_id})"
    for error_type, error_code, error_reason in _CODES:
        if isinstance(error, error_type):
            code, reason, message = error_code, error_reason, str(error) or error_reason.lower()
            break
    violations = list(error.violations) if isinstance(error, InvalidRequest) else []
    retry_after_s = error.retry_after_s if isinstance(error, Overloaded) else None
    while True:  # drop trailing violations until the details fit (the message still counts them)
        status = _status(code, clip(message, MAX_MESSAGE_BYTES), violations, reason, request_id)
        if retry_after_s is not None:
            _pack(status, error_details_pb2.RetryInfo(retry_delay=_duration(retry_after_s)))
        if status.ByteSize() <= MAX_DETAILS_BYTES or not violations:
            return code, status
        violations.pop()


def _status(
    code: grpc.StatusCode, message: str, violations: list[FieldViolation], reason: str, request_id: str
) -> status_pb2.Status:
    details: list[Any] = []
    if violations:
        details.append(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(
                        field=clip(v.field, MAX_FIELD_BYTES),
                        description=clip(v.description, MAX_DESCRIPTION_BYTES),
                    )
                    for v in violations
                ]
            )
        )
    details.append(error_details_pb2.ErrorInfo(reason=reason, domain=ERROR_DOMAIN))
    details.append(error_details_pb2.RequestInfo(request_id=request_id))
    status = status_pb2.Status(code=getattr(code_pb2, code.name), message=message)
    for detail in details:
        _pack(status, detail)
    return status


def _pack(status: status_pb2.Status, detail: Any) -> None:
    packed = any_pb2.Any()
    packed.Pack(detail)
    status.details.append(packed)


def _duration(seconds: float) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromTimedelta(timedelta(seconds=max(0.0, seconds)))
    return duration


def clip(text: str, max_bytes: int) -> str:
    """``text`` cut to at most ``max_bytes`` of UTF-8 (ending in an ellipsis when cut)."""
    encoded = text.encode("utf-8", errors="replace")
    if len(encoded) <= max_bytes:
        return text
    cut = encoded[: max_bytes - len(ELLIPSIS.encode())].decode("utf-8", errors="ignore")
    return cut + ELLIPSIS


class _Undecodable:
    """What a request that did not parse is handed on as, so the handler can refuse it with a status."""

    def __init__(self, message_name: str, error: BaseException) -> None:
        self.error = InvalidRequest(
            FieldViolation("request", f"the bytes are not a valid {message_name} message ({error})")
        )


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """``deserializer``, answering :class:`_Undecodable` instead of raising (gRPC would say UNKNOWN)."""
    if deserializer is None:
        return None
    message_name = getattr(getattr(deserializer, "__self__", None), "DESCRIPTOR", None)
    name = message_name.full_name if message_name is not None else "request"

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:
            return _Undecodable(name, exc)

    return deserialize


def _decoded(request: Any) -> Any:
    if isinstance(request, _Undecodable):
        raise request.error
    return request


Unary = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]
Streaming = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], AsyncIterator[Any]]


def rewrap(
    handler: grpc.RpcMethodHandler[Any, Any],
    unary: Callable[[Unary], Unary],
    streaming: Callable[[Streaming], Streaming],
    tolerant: bool = False,
) -> grpc.RpcMethodHandler[Any, Any]:
    """``handler`` with its unary-unary or unary-stream behaviour wrapped (others unchanged);
    ``tolerant``: undecodable requests reach the behaviour as :class:`_Undecodable`."""
    deserializer = _tolerant(handler.request_deserializer) if tolerant else handler.request_deserializer
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(
            unary(handler.unary_unary),
            request_deserializer=deserializer,
            response_serializer=handler.response_serializer,
        )
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(
            streaming(handler.unary_stream),
            request_deserializer=deserializer,
            response_serializer=handler.response_serializer,
        )
    return handler


class StatusInterceptor(grpc.aio.ServerInterceptor):
    """Request ids, exceptions → status codes with details, and one access-log line + metric per RPC."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or not method.startswith(SERVICE_PREFIX):
            return handler
        return rewrap(
            handler, lambda b: self._unary(method, b), lambda b: self._streaming(method, b), tolerant=True
        )

    def _unary(self, method: str, behaviour: Unary) -> Unary:
        async def handle(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            started = await self._begin(method, context)
            outcome = ["OK"]
            try:
                return await behaviour(_decoded(request), context)
            except BaseException as exc:
                await self._fail(exc, context, outcome, lambda code: self._end(method, code, started))
                raise
            finally:
                if outcome[0]:
                    self._end(method, outcome[0], started)

        return handle

    def _streaming(self, method: str, behaviour: Streaming) -> Streaming:
        async def handle(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            started = await self._begin(method, context)
            outcome = ["OK"]
            try:
                async for message in behaviour(_decoded(request), context):
                    yield message
            except BaseException as exc:
                await self._fail(exc, context, outcome, lambda code: self._end(method, code, started))
                raise
            finally:
                if outcome[0]:
                    self._end(method, outcome[0], started)

        return handle

    async def _begin(self, method: str, context: grpc.aio.ServicerContext[Any, Any]) -> float:
        given = dict(context.invocation_metadata() or ()).get(REQUEST_ID_HEADER)
        request_id = str(given)[:128] if given else uuid.uuid4().hex
        _request_id.set(request_id)  # each RPC runs in its own task, so its own context
        structlog.contextvars.bind_contextvars(request_id=request_id, method=method)
        await context.send_initial_metadata(((REQUEST_ID_HEADER, request_id),))
        return time.perf_counter()

    async def _fail(
        self,
        exc: BaseException,
        context: grpc.aio.ServicerContext[Any, Any],
        outcome: list[str],
        end: Callable[[str], None],
    ) -> None:
        """Name what ended the call in ``outcome[0]`` and, for an error, abort with its status (raises).
        An error is recorded (``end``) before the status leaves: the client may read the metrics next."""
        if isinstance(exc, grpc.aio.AbortError):
            code = context.code()
            outcome[0] = code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"
            return
        if isinstance(exc, asyncio.CancelledError | GeneratorExit):
            # The client's own timer ends the call a little before the server's copy of the deadline
            # runs out: a cancel that close to the deadline is the deadline.
            remaining = context.time_remaining()
            due = remaining is not None and remaining <= DEADLINE_SLACK_S
            outcome[0] = "DEADLINE_EXCEEDED" if due else "CANCELLED"
            return
        code, status = status_for(exc, _request_id.get())
        if code is grpc.StatusCode.INTERNAL:
            log.exception("internal_error")
        end(code.name)
        outcome[0] = ""  # recorded already
        grpc_status = rpc_status.to_status(status)
        await context.abort(grpc_status.code, grpc_status.details, grpc_status.trailing_metadata)

    def _end(self, method: str, code: str, started: float) -> None:
        seconds = time.perf_counter() - started
        self.metrics.observe_rpc(method, code, seconds)
        log.info("rpc", code=code, duration_ms=round(seconds * 1000, 2))
        structlog.contextvars.unbind_contextvars("request_id", "method")


class AdminTokenInterceptor(grpc.aio.ServerInterceptor):
    """Requires ``authorization: Bearer <token>`` metadata on every DiagnosticsService RPC."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        if handler is None or not handler_call_details.method.startswith(DIAGNOSTICS_PREFIX):
            return handler
        return rewrap(handler, self._checked, self._checked_stream)

    def _check(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        given = dict(context.invocation_metadata() or ()).get("authorization", "")
        given_bytes = given.encode() if isinstance(given, str) else bytes(given)
        if not hmac.compare_digest(given_bytes, self._expected):
            raise PermissionDenied("this RPC needs the admin token: send 'authorization: Bearer <token>'")

    def _checked(self, behaviour: Unary) -> Unary:
        async def handle(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            self._check(context)
            return await behaviour(request, context)

        return handle

    def _checked_stream(self, behaviour: Streaming) -> Streaming:
        async def handle(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            self._check(context)
            async for message in behaviour(request, context):
                yield message

        return handle
