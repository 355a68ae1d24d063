"""Request validation: defaults first, then one small check per field; every problem is reported at
once, each naming the field the client sent. Client input repeated in a message is bounded."""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import replace

from PIL import Image as PILImage

from diffstack.compose.sigmas import sigmas_problem
from diffstack.config import Limits
from diffstack.engine.loras import MAX_SCALE
from diffstack.engine.model import LoadedModel
from diffstack.engine.requests import AUTO, GenerationRequest
from diffstack.engine.samplers import PLUGIN_SAMPLER_BASE, SAMPLERS, Sampler
from diffstack.errors import FieldViolation, InvalidRequest, shown
from diffstack.options import OptionProblem, OptionsError, parse_options
from diffstack.types import DenoiserWrapperOffer

MAX_GUIDANCE = 50.0

Check = Callable[[GenerationRequest, LoadedModel, Limits], Iterator[FieldViolation]]


def prepare_request(request: GenerationRequest, model: LoadedModel, limits: Limits) -> GenerationRequest:
    """``request`` with the model's defaults filled in, or InvalidRequest listing every violation."""
    resolved = with_defaults(request, model, limits)
    violations = [violation for check in CHECKS for violation in check(resolved, model, limits)]
    if violations:
        raise InvalidRequest(violations)
    size = (resolved.width, resolved.height)
    init_image, mask = resolved.init_image, resolved.mask
    if init_image is not None:
        init_image = init_image.convert("RGB").resize(size)
    if mask is not None:
        mask = mask.convert("L").resize(size)
    loras = tuple(sorted(resolved.loras, key=lambda spec: spec.name))
    return replace(resolved, init_image=init_image, mask=mask, seeds=_seeds(resolved), loras=loras)


def with_defaults(request: GenerationRequest, model: LoadedModel, limits: Limits) -> GenerationRequest:
    """Zero and empty fields replaced by the model's defaults, ``auto`` by a concrete schedule."""
    width, height = model.default_size
    if request.init_image is not None and not (request.width or request.height):
        multiple = model.adapter.size_multiple
        width, height = (side - side % multiple for side in request.init_image.size)
    sampler = request.sampler or model.adapter.default_sampler
    steps = request.steps or model.default_steps
    return replace(
        request,
        model=model.name,
        width=request.width or width,
        height=request.height or height,
        steps=steps,
        guidance=_default_guidance(model, sampler) if request.guidance is None else request.guidance,
        sampler=sampler,
        schedule=_auto_schedule(model, sampler, steps, limits)
        if request.schedule in ("", AUTO)
        else request.schedule,
    )


# -------------------------------------------------------------------------------------------------
# Field checks that need no model (the CLI's preflight runs these before loading one)
# -------------------------------------------------------------------------------------------------


def side_violations(field: str, value: int, multiple: int) -> Iterator[FieldViolation]:
    if value <= 0 or value % multiple:
        yield FieldViolation(field, f"must be a positive multiple of {multiple}, got {value}")


def pixels_violations(width: int, height: int, limits: Limits) -> Iterator[FieldViolation]:
    if width * height > limits.max_pixels:
        yield FieldViolation("width", f"{width}x{height} exceeds the limit of {limits.max_pixels} pixels")


def steps_violations(steps: int, limits: Limits) -> Iterator[FieldViolation]:
    if not 1 <= steps <= limits.max_steps:
        yield FieldViolation("steps", f"must be between 1 and {limits.max_steps}, got {steps}")


def guidance_violations(
    guidance: float | None, low: float = 0.0, high: float = MAX_GUIDANCE, whose: str = ""
) -> Iterator[FieldViolation]:
    """``whose`` names a sampler with a range of its own (" for sampler 'euler_cfgpp' ...")."""
    if guidance is None or not (math.isfinite(guidance) and low <= guidance <= high):
        yield FieldViolation("guidance", f"must be between {low:g} and {high:g}{whose}, got {guidance}")


def sampler_violations(sampler: str, known: Collection[str], scope: str = "") -> Iterator[FieldViolation]:
    """``scope`` says whose samplers ``known`` are (" for sd1"), after the sampler's name."""
    if sampler not in known:
        yield FieldViolation(
            "sampler", f"unknown sampler {shown(sampler)}{scope}; choose one of {sorted(known)}"
        )


def images_violations(num_images: int, seeds: Sequence[int], limits: Limits) -> Iterator[FieldViolation]:
    if not 1 <= num_images <= limits.max_images:
        yield FieldViolation("num_images", f"must be between 1 and {limits.max_images}, got {num_images}")
    if len(seeds) > num_images:
        yield FieldViolation("seeds", f"{len(seeds)} seeds for {num_images} images")
    if any(not 0 <= seed < 2**63 for seed in seeds):
        yield FieldViolation("seeds", "seeds must be between 0 and 2^63 - 1")


# -------------------------------------------------------------------------------------------------
# One check per field
# -------------------------------------------------------------------------------------------------


def _check_prompts(
    request: GenerationRequest, model: LoadedModel, limits: Limits
) -> Iterator[FieldViolation]:
    yield from _check_prompt("prompt", request.prompt, model, limits)
    if request.negative_prompt:
        if not model.adapter.uses_negative_prompt:
            yield FieldViolation(
                "negative_prompt", f"{model.info.family.value} models take no negative prompt"
            )
        yield from _check_prompt("negative_prompt", request.negative_prompt, model, limits)


def _check_prompt(field: str, text: str, model: LoadedModel, limits: Limits) -> Iterator[FieldViolation]:
    """Characters, then bytes, then tokens: the costly count only for a text of bounded size."""
    if len(text) > limits.max_prompt_chars:
        yield FieldViolation(
            field, f"{len(text)} characters, more than the limit of {limits.max_prompt_chars}"
        )
        return
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:
        yield FieldViolation(field, "is not valid Unicode text (it holds a lone surrogate)")
        return
    if size > limits.max_prompt_bytes:
        yield FieldViolation(
            field, f"{size} bytes of UTF-8, more than the limit of {limits.max_prompt_bytes}"
        )
        return
    tokens = model.count_tokens(text)
    if tokens > limits.max_prompt_tokens:
        yield FieldViolation(field, f"{tokens} tokens, more than the limit of {limits.max_prompt_tokens}")


def _check_size(request: GenerationRequest, model: LoadedModel, limits: Limits) -> Iterator[FieldViolation]:
    multiple = model.adapter.size_multiple
    yield from side_violations("width", request.width, multiple)
    yield from side_violations("height", request.height, multiple)
    yield from pixels_violations(request.width, request.height, limits)


def _check_steps(request: GenerationRequest, model: LoadedModel, limits: Limits) -> Iterator[FieldViolation]:
    yield from steps_violations(request.steps, limits)


def _check_guidance(
    request: GenerationRequest, model: LoadedModel, limits: Limits
) -> Iterator[FieldViolation]:
    """Within [0, 50], or within the range of a plugin sampler's guidance rule ([0, 1] for CFG++)."""
    offer = model.stack.samplers.get(request.sampler)
    if offer is None:
        yield from guidance_violations(request.guidance)
    else:
        low, high = offer.guidance.guidance_range
        whose = f" for sampler {offer.name!r} ({offer.guidance} guidance)"
        yield from guidance_violations(request.guidance, low, high, whose)


def _check_sampler(
    request: GenerationRequest, model: LoadedModel, limits: Limits
) -> Iterator[FieldViolation]:
    known = [*model.adapter.samplers, *model.stack.samplers]
    yield from sampler_violations(request.sampler, known, f" for {model.info.family.value}")


def _check_images(request: GenerationRequest, model: LoadedModel, limits: Limits) -> Iterator[FieldViolation]:
    yield from images_violations(request.num_images, request.seeds, limits)


def _check_strength(
    request: GenerationRequest, model: LoadedModel, limits: Limits
) -> Iterator[FieldViolation]:
    if request.init_image is None:
        return
    if not 0 < request.strength <= 1:  # NaN fails this too
        yield FieldViolation("strength", f"must be in (0, 1], got {request.strength}")
    elif _steps_run(request) < 1:
        yield FieldViolation(
            "strength", f"strength {request.strength} of {request.steps} steps runs no step at all"
        )


def _check_mask(request: GenerationRequest, model: LoadedModel, limits: Limits) -> Iterator[FieldViolation]:
    """A mask says what of ``init_image`` to repaint, so it needs one of the same size."""
    if request.mask is None:
        return
    if request.init_image is None:
        yield FieldViolation("mask", "a mask needs an init_image to repaint (pad it to outpaint)")
    elif request.mask.size != request.init_image.size:
        (mw, mh), (iw, ih) = request.mask.size, request.init_image.size
        yield FieldViolation("mask", f"is {mw}x{mh} but init_image is {iw}x{ih}; they must match")


def _check_cost(request: GenerationRequest, model: LoadedModel, limits: Limits) -> Iterator[FieldViolation]:
    """Steps × pixels × images, once each factor is within its own limit (else that one is named)."""
    pixels = request.width * request.height
    if not (
        0 < request.steps <= limits.max_steps
        and 0 < pixels <= limits.max_pixels
        and 0 < request.num_images <= limits.max_images
    ):
        return
    steps = _steps_run(request) if request.init_image is not None else request.steps
    cost, limit = steps * pixels * request.num_images, limits.cost_limit(model.info.device)
    if cost > limit:
        yield FieldViolation(
            "steps",
            f"{steps} steps x {request.width}x{request.height} x {request.num_images} images = {cost} "
            f"pixel-steps, more than this server allows on {model.info.device} ({limit}): "
            "ask for fewer steps, fewer images or a smaller size",
        )


def _check_wrappers(
    request: GenerationRequest, model: LoadedModel, limits: Limits
) -> Iterator[FieldViolation]:
    """Known names, and options that fit what the offer declares (checked before any plugin runs)."""
    for name, options in request.wrappers.items():
        offer = model.stack.wrappers.get(name)
        if offer is None:
            yield FieldViolation(
                "wrappers",
                f"unknown or unavailable wrapper {shown(name)}; available: {sorted(model.stack.wrappers)}",
            )
            continue
        if offer.options is None:
            continue
        oversized = [key for key, value in options.items() if _too_many_pixels(value, limits)]
        for key in oversized:
            width, height = options[key].size
            yield FieldViolation(
                f"wrappers.{name}.{key}",
                f"{width}x{height} is more than the limit of {limits.max_pixels} pixels",
            )
        if oversized:
            continue
        try:
            parsed: object = parse_options(offer.options, {**model.info.plugin_options(name), **options})
        except OptionsError as exc:
            problems = exc.problems
        else:
            problems = _latent_problems(offer, parsed, request, model)
        for problem in problems:
            field = f"wrappers.{name}.{problem.option}" if problem.option else f"wrappers.{name}"
            yield FieldViolation(field, problem.message)


def _too_many_pixels(value: object, limits: Limits) -> bool:
    """An image option over the pixel limit (the server refuses one while decoding it; a caller of
    the engine in Python hands over decoded pictures, checked here)."""
    return isinstance(value, PILImage.Image) and value.width * value.height > limits.max_pixels


def _check_loras(request: GenerationRequest, model: LoadedModel, limits: Limits) -> Iterator[FieldViolation]:
    """Names and scales first (no file is read for a bad name), then the files against the slot."""
    if not request.loras:
        return
    if len(request.loras) > limits.max_loras:
        yield FieldViolation(
            "loras", f"{len(request.loras)} LoRAs asked; at most {limits.max_loras} (limits.max_loras)"
        )
        return
    names = [spec.name for spec in request.loras]
    for index, spec in enumerate(request.loras):
        if not math.isfinite(spec.scale) or abs(spec.scale) > MAX_SCALE:
            yield FieldViolation(
                f"loras[{index}].scale", f"scale {spec.scale} must be finite, within ±{MAX_SCALE}"
            )
        if names.index(spec.name) != index:
            yield FieldViolation(f"loras[{index}].name", f"LoRA {shown(spec.name)} is named twice")
    if model.loras is None:
        yield FieldViolation(
            "loras",
            f"model {model.name!r} takes no LoRAs: none fitted it when it loaded, or engine.lora_rank "
            "is 0 (unload and load it again after installing LoRAs)",
        )
        return
    yield from model.loras.violations(request.loras)


def _latent_problems(
    offer: DenoiserWrapperOffer, options: object, request: GenerationRequest, model: LoadedModel
) -> tuple[OptionProblem, ...]:
    """The wrapper's own word on the request's latent size (a multi-scale latent too small, say)."""
    if offer.check_latent is None:
        return ()
    scale = int(getattr(model.pipeline, "vae_scale_factor", 8))
    problem = offer.check_latent(options, request.height // scale, request.width // scale)
    return () if problem is None else (problem,)


def _check_schedule(
    request: GenerationRequest, model: LoadedModel, limits: Limits
) -> Iterator[FieldViolation]:
    name, sampler = request.schedule, request.sampler
    if not name:
        return  # ``auto`` with no schedule offered at all: the scheduler's own
    if name not in model.stack.schedules:
        yield FieldViolation(
            "schedule", f"unknown schedule {shown(name)}; available: {[AUTO, *model.stack.schedules]}"
        )
    elif name in model.stack.custom_schedules:
        if not _takes_sigmas(model, sampler):
            yield FieldViolation(
                "schedule",
                f"schedule {name!r} needs a sampler that takes custom sigmas "
                "(euler, flow_euler or a plugin's sampler), "
                f"not {shown(sampler)}",
            )
        elif 1 <= request.steps <= limits.max_steps:
            problem = _sigmas_problem(model, name, sampler, request.steps)
            if problem:
                yield FieldViolation(
                    "schedule", f"schedule {name!r} cannot serve {request.steps} steps: {problem}"
                )


CHECKS: tuple[Check, ...] = (
    _check_prompts,
    _check_size,
    _check_steps,
    _check_guidance,
    _check_sampler,
    _check_images,
    _check_strength,
    _check_mask,
    _check_cost,
    _check_wrappers,
    _check_loras,
    _check_schedule,
)


# -------------------------------------------------------------------------------------------------
# Helpers
# -------------------------------------------------------------------------------------------------


def _default_guidance(model: LoadedModel, sampler: str) -> float:
    """A plugin sampler's own default (CFG++ reads the scale differently), else the model's."""
    offer = model.stack.samplers.get(sampler)
    if offer is None or offer.default_guidance is None:
        return model.default_guidance
    return offer.default_guidance


def _base_sampler(model: LoadedModel, sampler: str) -> Sampler | None:
    """The built-in whose scheduler runs ``sampler``: itself, or Euler for a plugin's sampler."""
    if sampler in model.stack.samplers:
        return PLUGIN_SAMPLER_BASE
    return SAMPLERS.get(sampler)


def _takes_sigmas(model: LoadedModel, sampler: str) -> bool:
    base = _base_sampler(model, sampler)
    return base is not None and base.custom_sigmas


def _steps_run(request: GenerationRequest) -> int:
    """The steps img2img runs: diffusers skips the first ``1 - strength`` of them (a strength out of
    range, NaN say, counts as all steps: the strength check names it)."""
    if not 0 < request.strength <= 1:
        return request.steps
    return int(request.steps * request.strength)


def _auto_schedule(model: LoadedModel, sampler: str, steps: int, limits: Limits) -> str:
    """The best schedule this sampler can follow that serves ``steps`` (composition ordered them)."""
    for name in model.stack.schedules:
        if name not in model.stack.custom_schedules:
            return name
        if _takes_sigmas(model, sampler) and (
            not 1 <= steps <= limits.max_steps or not _sigmas_problem(model, name, sampler, steps)
        ):
            return name
    return ""


def _sigmas_problem(model: LoadedModel, schedule: str, sampler: str, steps: int) -> str:
    """What is wrong with a schedule's sigmas at this step count ("" when nothing): composition
    checked them at 10 steps only, and a schedule may fail at others."""
    try:
        base = _base_sampler(model, sampler)
        assert base is not None  # only asked for samplers that take sigmas
        scheduler = base.build(model.scheduler_config)
        sigmas = model.stack.schedules[schedule].build(steps, scheduler)
    except Exception as exc:  # a plugin's fault, reported as the reason this schedule cannot serve
        return f"it raised {type(exc).__name__}: {shown(str(exc), 200)}"
    return sigmas_problem(sigmas, steps)


def _seeds(request: GenerationRequest) -> tuple[int, ...]:
    """One seed per image: the given ones, continued by +1 from the last, or fresh random ones."""
    seeds = list(request.seeds)
    if not seeds:
        seeds.append(secrets.randbelow(2**63))
    while len(seeds) < request.num_images:
        seeds.append((seeds[-1] + 1) % 2**63)
    return tuple(seeds)
