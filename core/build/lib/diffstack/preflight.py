"""Checks a request can get before any model is loaded: limits and names against what is installed.

Loading a model and composing its stack takes seconds, so the CLI checks here first what needs no
model: sizes, steps, image counts and guidance against ``[limits]``, and schedule and wrapper names
against what the installed plugins offer for any family. The engine's validation still runs after
loading, with the model's own facts (its size multiple, its family's samplers, what its stack kept).
"""

from __future__ import annotations

import math

from diffstack.config import Settings
from diffstack.engine.families import ADAPTERS
from diffstack.engine.requests import AUTO, GenerationRequest
from diffstack.engine.samplers import SAMPLERS
from diffstack.errors import FieldViolation, InvalidRequest
from diffstack.plugins import PluginHost, load_plugins
from diffstack.types import DenoiserKind, Family, ModelInfo


def installed_offer_names(host: PluginHost, hook: str) -> set[str]:
    """Names of the offers ``hook``'s implementations make for a model of any family."""
    import torch

    names: set[str] = set()
    for family in Family:
        kind = DenoiserKind.TRANSFORMER if family is Family.FLUX else DenoiserKind.UNET
        info = ModelInfo(name="", family=family, denoiser_kind=kind, device="cpu", dtype=torch.float32)
        offers, _ = host.collect(hook, model=info)
        names.update(source.offer.name for source in offers)
    return names


# Over the complexity bar: one check per field, to be shared with validation when issue 9 splits it.
def violations_before_loading(  # noqa: C901
    request: GenerationRequest, settings: Settings, host: PluginHost
) -> list[FieldViolation]:
    """Every problem ``request`` has that no model is needed to see."""
    limits = settings.limits
    multiple = min(adapter.size_multiple for adapter in ADAPTERS)  # the model's own is checked later
    violations: list[FieldViolation] = []
    for field, value in (("width", request.width), ("height", request.height)):
        if value and value % multiple:
            violations.append(FieldViolation(field, f"must be a multiple of {multiple}, got {value}"))
    if request.width and request.height and request.width * request.height > limits.max_pixels:
        violations.append(
            FieldViolation(
                "width", f"{request.width}x{request.height} exceeds the limit of {limits.max_pixels} pixels"
            )
        )
    if request.steps > limits.max_steps:
        violations.append(FieldViolation("steps", f"must be at most {limits.max_steps}, got {request.steps}"))
    if request.num_images > limits.max_images:
        violations.append(
            FieldViolation("num_images", f"must be at most {limits.max_images}, got {request.num_images}")
        )
    if request.guidance is not None and not (math.isfinite(request.guidance) and request.guidance <= 50):
        violations.append(FieldViolation("guidance", f"must be between 0 and 50, got {request.guidance}"))
    if request.sampler and request.sampler not in SAMPLERS:
        violations.append(
            FieldViolation("sampler", f"unknown sampler {request.sampler!r}; choose one of {list(SAMPLERS)}")
        )
    if request.schedule and request.schedule != AUTO:
        schedules = installed_offer_names(host, "build_sigmas")
        if request.schedule not in schedules:
            violations.append(
                FieldViolation(
                    "schedule",
                    f"no installed plugin offers a schedule named {request.schedule!r}; "
                    f"installed: {[AUTO, *sorted(schedules)]}",
                )
            )
    if request.wrappers:
        wrappers = installed_offer_names(host, "wrap_denoiser")
        for name in request.wrappers:
            if name not in wrappers:
                violations.append(
                    FieldViolation(
                        "wrappers",
                        f"no installed plugin offers a wrapper named {name!r}; installed: {sorted(wrappers)}",
                    )
                )
    return violations


def check_before_loading(request: GenerationRequest, settings: Settings) -> None:
    """Raise InvalidRequest listing every problem :func:`violations_before_loading` finds."""
    violations = violations_before_loading(request, settings, load_plugins(settings.plugins))
    if violations:
        raise InvalidRequest(violations)
