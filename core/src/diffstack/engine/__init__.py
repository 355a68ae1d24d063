"""The diffusers engine: load models, compose their stacks, validate and run generation.

:class:`Engine` (torch, diffusers) is imported on first use, so that the request types and the
:class:`EngineWorker` import cheaply: a server opens its port before torch loads.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from diffstack.engine.requests import (
    GeneratedImage,
    GenerationJob,
    GenerationRequest,
    GenerationResult,
    LoraListing,
    LoraSpec,
    ModelListing,
    StepEvent,
)
from diffstack.engine.worker import EngineWorker, LaunchedBatch, ServingEngine

if TYPE_CHECKING:
    from diffstack.engine.engine import Engine

__all__ = [
    "Engine",
    "EngineWorker",
    "GeneratedImage",
    "GenerationJob",
    "GenerationRequest",
    "GenerationResult",
    "LaunchedBatch",
    "LoraListing",
    "LoraSpec",
    "ModelListing",
    "ServingEngine",
    "StepEvent",
]


def __getattr__(name: str) -> Any:
    if name == "Engine":
        from diffstack.engine.engine import Engine

        return Engine
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
