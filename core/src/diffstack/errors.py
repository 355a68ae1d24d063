"""The project's exceptions. The server maps each to one gRPC status in one interceptor; handlers and
the engine raise these and never build statuses by hand."""

from __future__ import annotations

from dataclasses import dataclass


class DiffstackError(Exception):
    """Base of every error the project raises on purpose."""


@dataclass(frozen=True)
class FieldViolation:
    """One bad field of a request, named as the client spelled it (``width``, ``sampler``)."""

    field: str
    description: str


class InvalidRequest(DiffstackError):
    """The request cannot be served as asked (gRPC INVALID_ARGUMENT with field violations)."""

    def __init__(self, violations: list[FieldViolation] | FieldViolation) -> None:
        self.violations = [violations] if isinstance(violations, FieldViolation) else list(violations)
        super().__init__("; ".join(f"{v.field}: {v.description}" for v in self.violations))


class ModelError(DiffstackError):
    """A model file or folder that cannot be loaded (wrong format, unknown family, pickle)."""


class Overloaded(DiffstackError):
    """No room for more work now: the queue is full or the GPU ran out of memory."""


class OutOfMemory(Overloaded):
    """The batch did not fit in GPU memory (the server splits it once and retries)."""


class NotReady(DiffstackError):
    """The service is starting up or draining."""


class Cancelled(DiffstackError):
    """The client cancelled; the work stopped at the next step."""


class DeadlineExceeded(DiffstackError):
    """The client's deadline passed; the work stopped at the next step."""


class PermissionDenied(DiffstackError):
    """An admin RPC was called without the admin token."""
