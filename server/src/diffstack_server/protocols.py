"""What the server needs from an engine: exactly the part of :class:`diffstack.engine.Engine` it calls.

The server is written against this protocol so that unit tests can drive the queue with a small fake,
and so that a replica host (Ray Serve) can hand the same servicers any object with these methods.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from diffstack.engine import GenerationJob, GenerationRequest, GenerationResult, ModelListing
    from diffstack.errors import DiffstackError
    from diffstack.types import PluginRecord, StackReport


class ServingEngine(Protocol):
    """The engine as the server uses it; :class:`diffstack.engine.Engine` satisfies it."""

    @property
    def plugins(self) -> tuple[PluginRecord, ...]: ...

    def is_loaded(self, name: str = "") -> bool: ...

    def models(self) -> list[ModelListing]: ...

    def report(self, model: str = "") -> StackReport: ...

    def prepare(self, request: GenerationRequest) -> GenerationRequest: ...

    def batch_key(self, request: GenerationRequest) -> Hashable: ...

    def run(self, jobs: Sequence[GenerationJob]) -> list[GenerationResult | DiffstackError]: ...

    def stats(self) -> dict[str, float]: ...
