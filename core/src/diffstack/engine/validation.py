"""Request validation: every problem is reported at once, each naming the field the client sent."""

from __future__ import annotations

import math
import secrets
from dataclasses import replace

from diffstack.config import Limits
from diffstack.engine.model import LoadedModel
from diffstack.engine.requests import GenerationRequest
from diffstack.engine.samplers import SAMPLERS
from diffstack.errors import FieldViolation, InvalidRequest
from diffstack.types import Family

AUTO = "auto"


def prepare_request(request: GenerationRequest, model: LoadedModel, limits: Limits) -> GenerationRequest:
    """``request`` with the model's defaults filled in, or InvalidRequest listing every violation."""
    violations: list[FieldViolation] = []
    width, height = _size(request, model, limits, violations)
    steps = request.steps or model.default_steps
    guidance = model.default_guidance if request.guidance is None else request.guidance
    sampler = request.sampler or model.adapter.default_sampler

    _check_prompt("prompt", request.prompt, model, limits, violations)
    if request.negative_prompt:
        if not model.adapter.uses_negative_prompt:
            violations.append(
                FieldViolation("negative_prompt", f"{model.info.family.value} models take no negative prompt")
            )
        _check_prompt("negative_prompt", request.negative_prompt, model, limits, violations)
    if not 1 <= steps <= limits.max_steps:
        violations.append(FieldViolation("steps", f"must be between 1 and {limits.max_steps}, got {steps}"))
    if not (math.isfinite(guidance) and 0 <= guidance <= 50):
        violations.append(FieldViolation("guidance", f"must be between 0 and 50, got {guidance}"))
    if sampler not in model.adapter.samplers:
        violations.append(
            FieldViolation(
                "sampler",
                f"unknown sampler {sampler!r} for {model.info.family.value}; "
                f"choose one of {sorted(model.adapter.samplers)}",
            )
        )
    if not 1 <= request.num_images <= limits.max_images:
        violations.append(
            FieldViolation(
                "num_images", f"must be between 1 and {limits.max_images}, got {request.num_images}"
            )
        )
    if len(request.seeds) > request.num_images:
        violations.append(
            FieldViolation("seeds", f"{len(request.seeds)} seeds for {request.num_images} images")
        )
    if any(not 0 <= seed < 2**63 for seed in request.seeds):
        violations.append(FieldViolation("seeds", "seeds must be between 0 and 2^63 - 1"))
    if request.init_image is not None and not 0 < request.strength <= 1:
        violations.append(FieldViolation("strength", f"must be in (0, 1], got {request.strength}"))
    elif request.init_image is not None and int(steps * request.strength) < 1:
        violations.append(
            FieldViolation("strength", f"strength {request.strength} of {steps} steps runs no step at all")
        )
    for name in request.wrappers:
        if name not in model.stack.wrappers:
            violations.append(
                FieldViolation(
                    "wrappers",
                    f"unknown or unavailable wrapper {name!r}; available: {sorted(model.stack.wrappers)}",
                )
            )
    schedule = _schedule(request.schedule or AUTO, sampler, model, violations)
    if violations:
        raise InvalidRequest(violations)

    init_image = request.init_image
    if init_image is not None:
        init_image = init_image.convert("RGB").resize((width, height))
    return replace(
        request,
        model=model.name,
        width=width,
        height=height,
        steps=steps,
        guidance=guidance,
        sampler=sampler,
        schedule=schedule,
        seeds=_seeds(request),
        init_image=init_image,
    )


def _size(
    request: GenerationRequest, model: LoadedModel, limits: Limits, violations: list[FieldViolation]
) -> tuple[int, int]:
    default_width, default_height = model.default_size
    if request.init_image is not None and not (request.width or request.height):
        default_width, default_height = request.init_image.size
        default_width -= default_width % limits.size_multiple
        default_height -= default_height % limits.size_multiple
    width, height = request.width or default_width, request.height or default_height
    multiple = limits.size_multiple * (2 if model.info.family is Family.FLUX else 1)
    for field, value in (("width", width), ("height", height)):
        if value <= 0 or value % multiple:
            violations.append(
                FieldViolation(field, f"must be a positive multiple of {multiple}, got {value}")
            )
    if width * height > limits.max_pixels:
        violations.append(
            FieldViolation("width", f"{width}x{height} exceeds the limit of {limits.max_pixels} pixels")
        )
    return width, height


def _check_prompt(
    field: str, text: str, model: LoadedModel, limits: Limits, violations: list[FieldViolation]
) -> None:
    tokens = len(model.pipeline.tokenizer(text, truncation=False).input_ids)
    if tokens > limits.max_prompt_tokens:
        violations.append(
            FieldViolation(field, f"{tokens} tokens, more than the limit of {limits.max_prompt_tokens}")
        )


def _schedule(name: str, sampler: str, model: LoadedModel, violations: list[FieldViolation]) -> str:
    """The schedule's concrete name; ``auto`` takes the best one this sampler can follow."""
    schedules = model.stack.schedules
    takes_sigmas = sampler in SAMPLERS and SAMPLERS[sampler].custom_sigmas
    if name == AUTO:
        usable = [n for n in schedules if takes_sigmas or n not in model.stack.custom_schedules]
        return usable[0] if usable else ""
    if name not in schedules:
        violations.append(
            FieldViolation("schedule", f"unknown schedule {name!r}; available: {[AUTO, *schedules]}")
        )
    elif not takes_sigmas and name in model.stack.custom_schedules:
        violations.append(
            FieldViolation(
                "schedule",
                f"schedule {name!r} needs a sampler that takes custom sigmas (euler, flow_euler), "
                f"not {sampler!r}",
            )
        )
    return name


def _seeds(request: GenerationRequest) -> tuple[int, ...]:
    """One seed per image: the given ones, continued by +1 from the last, or fresh random ones."""
    seeds = list(request.seeds)
    if not seeds:
        seeds.append(secrets.randbelow(2**63))
    while len(seeds) < request.num_images:
        seeds.append((seeds[-1] + 1) % 2**63)
    return tuple(seeds)
