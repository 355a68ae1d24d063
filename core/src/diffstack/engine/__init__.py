"""The diffusers engine: load models, compose their stacks, validate and run generation."""

from diffstack.engine.engine import Engine
from diffstack.engine.requests import (
    GeneratedImage,
    GenerationJob,
    GenerationRequest,
    GenerationResult,
    ModelListing,
    StepEvent,
)

__all__ = [
    "Engine",
    "GeneratedImage",
    "GenerationJob",
    "GenerationRequest",
    "GenerationResult",
    "ModelListing",
    "StepEvent",
]
