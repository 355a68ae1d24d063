"""The project's exceptions. The server maps each to one gRPC status in one interceptor; handlers and
the engine raise these and never build statuses by hand."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

MAX_SHOWN_CHARS = 80
"""How much of a client's value an error message repeats: enough to recognise it, never so much that
an error grows past gRPC's trailer limit (a 4,000-character schedule name did)."""
MAX_FIELD_CHARS = 120
MAX_DESCRIPTION_CHARS = 300
MAX_VIOLATIONS = 10
"""Violations beyond this are counted, not listed: ten thousand unknown option keys make one line."""
MAX_MESSAGE_CHARS = 500
"""The error's message (gRPC's status message) repeats at most this much of the violations.

Together these keep a refusal under gRPC's default limits on a response's metadata (8 KiB soft,
16 KiB hard), or the client
would see RESOURCE_EXHAUSTED instead: 10 violations of at most 420 characters travel base64-encoded
in the status details (≈5.6 KB) beside a message of at most 500."""


def shown(value: Any, limit: int = MAX_SHOWN_CHARS) -> str:
    """``repr(value)`` cut to ``limit`` characters, for repeating client input in messages."""
    if isinstance(value, str) and len(value) > 4 * limit:
        value = value[: 4 * limit]  # repr of a huge string is built only from its head
    return _cut(repr(value), limit)


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else f"{text[: limit - 1]}…"


class DiffstackError(Exception):
    """Base of every error the project raises on purpose."""


@dataclass(frozen=True)
class FieldViolation:
    """One bad field of a request, named as the client spelled it (``width``, ``sampler``)."""

    field: str
    description: str

    def __post_init__(self) -> None:
        # Both may carry client input (a wrapper's name, an unknown sampler): bounded here, once.
        object.__setattr__(self, "field", _cut(self.field, MAX_FIELD_CHARS))
        object.__setattr__(self, "description", _cut(self.description, MAX_DESCRIPTION_CHARS))


class InvalidRequest(DiffstackError):
    """The request cannot be served as asked (gRPC INVALID_ARGUMENT with field violations).

    At most :data:`MAX_VIOLATIONS` are kept; a last one says how many more there were.
    """

    def __init__(self, violations: list[FieldViolation] | FieldViolation) -> None:
        violations = [violations] if isinstance(violations, FieldViolation) else list(violations)
        if len(violations) > MAX_VIOLATIONS:
            more = len(violations) - MAX_VIOLATIONS + 1
            violations = [*violations[: MAX_VIOLATIONS - 1], FieldViolation("", f"and {more} more problems")]
        self.violations = violations
        super().__init__(
            _cut("; ".join(f"{v.field}: {v.description}" for v in violations), MAX_MESSAGE_CHARS)
        )


class ModelError(DiffstackError):
    """A model file or folder that cannot be loaded (wrong format, unknown family, pickle)."""


class Overloaded(DiffstackError):
    """No room for more work now: the queue is full, a deadline cannot be met, or the GPU ran out of
    memory. ``retry_after_s``, when known, is how long the server expects to need before it could
    take the request (sent as a ``google.rpc.RetryInfo`` detail)."""

    def __init__(self, message: str = "", retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class OutOfMemory(Overloaded):
    """The batch did not fit in GPU memory (the server splits it once and retries)."""


class NotReady(DiffstackError):
    """The service is starting up or draining."""


class Cancelled(DiffstackError):
    """The client cancelled; the work stopped at the next step."""


class DeadlineExceeded(DiffstackError):
    """The client's deadline passed; the work stopped at the next step."""


class PermissionDenied(DiffstackError):
    """An admin RPC was called without the admin token, or a caller's key does not cover the call."""


class NotFound(DiffstackError):
    """The thing the call names (a job, say) does not exist, or no longer does."""


class Unauthenticated(DiffstackError):
    """The generation service needs a key and the call brought none that the server knows."""
