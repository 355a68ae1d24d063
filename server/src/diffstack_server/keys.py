"""API keys for the generation service: who may generate, how many calls at once, how often.

Off unless ``server.api_keys`` or ``server.api_keys_file`` names callers. Then every GenerationService
call needs a caller: ``authorization: Bearer <key>`` metadata, or, when the server verifies client
certificates (``server.tls_client_ca``), a certificate whose identity (subject CN or a subject
alternative name) is a caller's ``tls_identity``. A key sent wins over the certificate (one machine
certificate may carry calls of several key holders); either way the caller has the same limits and
metrics label:

- no caller, or a key or certificate identity the server does not know: UNAUTHENTICATED;
- a key whose ``models`` list does not name the requested model: PERMISSION_DENIED;
- a key over its ``rate_per_minute`` (a token bucket holding ``burst`` calls) or its
  ``max_concurrent`` open calls: RESOURCE_EXHAUSTED, with a ``RetryInfo`` hint for the rate.

The given key is compared with every known key in constant time (no early exit, so the time says
nothing about which key came close). Keys are never logged: log lines and the metrics
(``diffstack_key_calls_total{key, outcome}``, ``diffstack_key_in_flight{key}``) carry the key's
label. Diagnostics keep their own admin token; health and reflection stay open.
"""

from __future__ import annotations

import hmac
import threading
import time
import tomllib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import grpc
import structlog
from prometheus_client import Counter, Gauge

from diffstack.config import ApiKey, Settings
from diffstack.errors import Overloaded, PermissionDenied, Unauthenticated
from diffstack_server.interceptors import Streaming, Unary, rewrap

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

GENERATION_PREFIX = "/diffstack.v1.GenerationService/"

current_caller: ContextVar[str] = ContextVar("diffstack_caller", default="")
"""The label of the key the current call came with ("" when keys are off): jobs are scoped by it."""


def load_keys(settings: Settings) -> tuple[ApiKey, ...]:
    """``server.api_keys`` and the ``[[keys]]`` of ``server.api_keys_file``; labels and certificate
    identities must be unique, and an identity needs the server to verify client certificates."""
    keys = list(settings.server.api_keys)
    path = settings.server.api_keys_file
    if path is not None:
        with path.open("rb") as file:
            keys += [ApiKey.model_validate(entry) for entry in tomllib.load(file).get("keys", [])]
    labels = [key.label for key in keys]
    if len(set(labels)) != len(labels):
        raise ValueError("server.api_keys: every key needs a label of its own")
    identities = [key.tls_identity for key in keys if key.tls_identity is not None]
    if len(set(identities)) != len(identities):
        raise ValueError("server.api_keys: every tls_identity may name one caller only")
    if identities and settings.server.tls_client_ca is None:
        raise ValueError(
            "server.api_keys: a tls_identity needs server.tls_client_ca (the server verifies client "
            "certificates only then)"
        )
    return tuple(keys)


@dataclass
class _KeyState:
    """One key's open calls and rate bucket."""

    key: ApiKey
    secret: bytes | None
    in_flight: int = 0
    tokens: float = 0.0
    refilled_at: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.tokens = float(self.key.burst)


class KeyRing:
    """The known keys and their live limits; :meth:`admit` and :meth:`release` bracket each call."""

    def __init__(self, keys: tuple[ApiKey, ...], registry: CollectorRegistry) -> None:
        self._states = [
            _KeyState(key, key.key.get_secret_value().encode() if key.key is not None else None)
            for key in keys
        ]
        self._by_identity = {key.tls_identity: state for key, state in zip(keys, self._states, strict=True)}
        self._by_identity.pop(None, None)
        self._lock = threading.Lock()
        self.calls = Counter(
            "diffstack_key_calls",
            "Generation calls by API key label and outcome (admitted or why refused).",
            ["key", "outcome"],
            registry=registry,
        )
        self.in_flight = Gauge(
            "diffstack_key_in_flight", "Open generation calls by API key label.", ["key"], registry=registry
        )

    def identify(self, given: bytes, identities: tuple[str, ...] = ()) -> _KeyState:
        """The caller whose key ``given`` matches (compared against every key in constant time); with
        no key given, the caller named by one of the verified client certificate's ``identities``."""
        found = None
        for state in self._states:
            if state.secret is not None and hmac.compare_digest(given, state.secret):
                found = state
        if not given:
            found = next((self._by_identity[i] for i in identities if i in self._by_identity), None)
        if found is None:
            self.calls.labels("", "unauthenticated").inc()
            raise Unauthenticated(_who_is_missing(given, identities))
        return found

    def admit(self, state: _KeyState, model: str | None) -> None:
        """Take a concurrency slot and a rate token for one call, or refuse it with why."""
        key = state.key
        if key.models is not None and model is not None and model not in key.models:
            self.calls.labels(key.label, "permission_denied").inc()
            raise PermissionDenied(f"API key {key.label!r} may not use model {model[:64]!r}")
        with self._lock:
            if key.max_concurrent is not None and state.in_flight >= key.max_concurrent:
                self.calls.labels(key.label, "concurrency").inc()
                raise Overloaded(
                    f"API key {key.label!r} has {state.in_flight} calls open, its max_concurrent; "
                    "retry when one ends"
                )
            if key.rate_per_minute is not None:
                now = time.monotonic()
                per_s = key.rate_per_minute / 60.0
                state.tokens = min(float(key.burst), state.tokens + (now - state.refilled_at) * per_s)
                state.refilled_at = now
                if state.tokens < 1.0:
                    self.calls.labels(key.label, "rate_limited").inc()
                    raise Overloaded(
                        f"API key {key.label!r} is over its rate of {key.rate_per_minute:g} calls a minute",
                        retry_after_s=(1.0 - state.tokens) / per_s,
                    )
                state.tokens -= 1.0
            state.in_flight += 1
        self.calls.labels(key.label, "admitted").inc()
        self.in_flight.labels(key.label).inc()

    def release(self, state: _KeyState) -> None:
        with self._lock:
            state.in_flight -= 1
        self.in_flight.labels(state.key.label).dec()


def _who_is_missing(given: bytes, identities: tuple[str, ...]) -> str:
    if given:
        return "the API key is not one this server knows"
    if identities:
        shown = ", ".join(repr(identity[:64]) for identity in identities[:4])
        return (
            f"no caller of this server has the client certificate identity {shown}, and no API key was sent"
        )
    return "this server needs an API key for generation: send 'authorization: Bearer <key>'"


def certificate_identities(context: grpc.aio.ServicerContext[Any, Any]) -> tuple[str, ...]:
    """The verified client certificate's subject CN and subject alternative names (none without mTLS:
    gRPC puts x509 peer properties in the auth context only for a certificate it verified)."""
    auth = context.auth_context() or {}
    names: list[str] = []
    for prop in ("x509_common_name", "x509_subject_alternative_name"):
        for value in auth.get(prop, ()):
            names.append(value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value))
    return tuple(dict.fromkeys(names))


def _bearer(context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
    given = dict(context.invocation_metadata() or ()).get("authorization", "")
    raw = given.encode() if isinstance(given, str) else bytes(given)
    return raw.removeprefix(b"Bearer ") if raw.startswith(b"Bearer ") else b""


def _model_of(request: Any) -> str | None:
    """The model a generation call asks for (SubmitJob wraps its request); None for calls on jobs."""
    spec = getattr(getattr(request, "request", request), "spec", None)
    return None if spec is None else str(spec.model)


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Checks each GenerationService call's key and limits (see the module docstring)."""

    def __init__(self, ring: KeyRing) -> None:
        self.ring = ring

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        if handler is None or not handler_call_details.method.startswith(GENERATION_PREFIX):
            return handler
        return rewrap(handler, self._unary, self._streaming)

    def _admitted(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> _KeyState:
        state = self.ring.identify(_bearer(context), certificate_identities(context))
        self.ring.admit(state, _model_of(request))
        structlog.contextvars.bind_contextvars(key=state.key.label)
        current_caller.set(state.key.label)
        return state

    def _unary(self, behaviour: Unary) -> Unary:
        async def handle(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            state = self._admitted(request, context)
            try:
                return await behaviour(request, context)
            finally:
                self.ring.release(state)

        return handle

    def _streaming(self, behaviour: Streaming) -> Streaming:
        async def handle(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            state = self._admitted(request, context)
            try:
                async for message in behaviour(request, context):
                    yield message
            finally:
                self.ring.release(state)

        return handle
