"""Checks a request can get before any model is loaded: limits and names against what is installed.

Loading a model and composing its stack takes seconds, so the CLI checks here first what needs no
model: sizes, steps, image counts and guidance against ``[limits]``, and schedule and wrapper names
against what the installed plugins offer for any family (sampler names too, where a plugin
adds samplers). The engine's validation still runs after
loading, with the model's own facts (its size multiple, its family's samplers, what its stack kept).
"""

from __future__ import annotations

from diffstack.config import Settings
from diffstack.engine import validation
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


def violations_before_loading(
    request: GenerationRequest, settings: Settings, host: PluginHost
) -> list[FieldViolation]:
    """Every problem ``request`` has that no model is needed to see: validation's own field checks
    (one wording for the CLI and the server) on the fields the request sets (zero takes a default)."""
    limits = settings.limits
    multiple = min(adapter.size_multiple for adapter in ADAPTERS)  # the model's own is checked later
    violations: list[FieldViolation] = []
    for field, side in (("width", request.width), ("height", request.height)):
        if side:
            violations += validation.side_violations(field, side, multiple)
    if request.width and request.height:
        violations += validation.pixels_violations(request.width, request.height, limits)
    if request.steps:
        violations += validation.steps_violations(request.steps, limits)
    if request.num_images:
        violations += validation.images_violations(request.num_images, request.seeds, limits)
    if request.guidance is not None:
        violations += validation.guidance_violations(request.guidance)
    if request.sampler and request.sampler not in SAMPLERS:  # plugin samplers: the installed ones
        known = [*SAMPLERS, *installed_offer_names(host, "select_sampler")]
        violations += validation.sampler_violations(request.sampler, known)
    return violations + _name_violations(request, host)


def _name_violations(request: GenerationRequest, host: PluginHost) -> list[FieldViolation]:
    """Schedule and wrapper names no installed plugin offers (which a model keeps is known later)."""
    violations: list[FieldViolation] = []
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
