"""What the engine is asked for and what it answers: plain data, shared by the CLI and the server."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from PIL import Image

    from diffstack.errors import DiffstackError


AUTO = "auto"
"""The schedule name that asks for the best schedule this model and sampler can follow."""


@dataclass(frozen=True)
class LoraSpec:
    """One LoRA of a request: its name in the ``loras/`` folder and the scale its update gets."""

    name: str
    scale: float = 1.0


@dataclass(frozen=True)
class GenerationRequest:
    """One client's request. Zero and empty values mean "the model's default".

    The defaults here are the only ones: the CLI's flags and the wire conversion read them from this
    class (``GenerationRequest.strength``), and validation fills in the model's for the zero values.
    """

    prompt: str
    negative_prompt: str = ""
    model: str = ""
    width: int = 0
    height: int = 0
    steps: int = 0
    guidance: float | None = None
    sampler: str = ""
    schedule: str = AUTO
    seeds: tuple[int, ...] = ()
    num_images: int = 1
    init_image: Image.Image | None = None
    strength: float = 0.75
    mask: Image.Image | None = None
    """Inpainting: white repaints, black keeps ``init_image``; the same size as it (grey levels blend)."""
    wrappers: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    """Denoiser wrappers to enable, by name, with per-request options (within the server's policy)."""
    loras: tuple[LoraSpec, ...] = ()
    """LoRAs applied for this request (sorted by name once prepared, so equal sets batch together)."""


@dataclass(frozen=True)
class StepEvent:
    """Progress of one job; ``preview(max_side)`` decodes its current latents (costly: rate-limit it)."""

    step: int
    total: int
    preview: Callable[[int], list[Image.Image]]


def _never_stop() -> DiffstackError | None:
    return None


@dataclass
class GenerationJob:
    """A prepared request and the caller's hooks into its run."""

    request: GenerationRequest
    on_step: Callable[[StepEvent], None] | None = None
    should_stop: Callable[[], DiffstackError | None] = _never_stop
    """Returns the error to end this job with (cancelled, deadline passed), or None to go on."""


@dataclass(frozen=True)
class GeneratedImage:
    image: Image.Image
    seed: int


@dataclass(frozen=True)
class GenerationResult:
    """A finished job: its images with their seeds, the stack that served them, where time went."""

    images: tuple[GeneratedImage, ...]
    model: str
    stack: Mapping[str, tuple[str, ...]]
    timings: Mapping[str, float]


@dataclass(frozen=True)
class ModelMemory:
    """Bytes a loaded model's parameters and buffers hold on the device and in host memory."""

    device_bytes: int
    host_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.device_bytes + self.host_bytes


@dataclass(frozen=True)
class ModelListing:
    """A model the engine can serve."""

    name: str
    family: str
    loaded: bool
    default: bool
    weights: str
    description: str
    memory: ModelMemory | None = None
    """What the model holds while loaded; None when it is not."""


@dataclass(frozen=True)
class LoraListing:
    """A LoRA the engine can apply, and which loaded models take it."""

    name: str
    size_bytes: int
    rank: int
    target_modules: tuple[str, ...]
    base: str
    """The denoiser component it was made for (``unet``, ``transformer``); empty when unreadable."""
    compatible_models: tuple[str, ...]
    """Loaded models whose LoRA slot takes it."""
    problems: tuple[str, ...]
    """Why it cannot serve: the file itself, or each loaded model that refuses it."""
