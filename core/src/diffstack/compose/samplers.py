"""select_sampler: named samplers that combine the two halves of guidance themselves.

Every offer that probes yes is checked on known tensors, two steps of one trajectory: the first must
be the Euler step of the guided probability-flow ODE at the scale the offer's guidance rule implies
(CFG++ at ``λ`` is ordinary CFG at ``λσ/(σ − σ_next)`` for that step), and the step to σ = 0 must
land on the guided data estimate ``x − σ·(ε_u + g(ε_c − ε_u))``. Both hold for every sampler whose
first step is first-order (Euler, DPM++ 2M, UniPC's start), whatever it does in between, so they
catch a sampler that ignores a half, swaps them or reads its guidance the other way round.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from types import MappingProxyType

import torch

from diffstack.compose.slots import ModelUnderTest, SlotRecorder, build_guard, valid_offers
from diffstack.config import ComposeSettings
from diffstack.plugins import Failure, PluginHost
from diffstack.timing import relative_error
from diffstack.types import CandidateStatus, GuidanceRule, SamplerOffer, SlotReport

SAMPLER_TOLERANCE = 1e-5
"""Relative error allowed against the written-out steps: float32 rounding of a few operations."""
CHECK_SIGMAS = (14.6146, 6.4746, 0.0)
"""The two steps checked: from SD's largest sigma to AYS's second, then to 0."""
CHECK_GUIDANCE = {GuidanceRule.CFG: 5.0, GuidanceRule.CFG_PP: 0.6}
"""The scale checked when the offer names no default of its own."""


@dataclass(frozen=True)
class SamplerDecision:
    """The plugin samplers requests may name."""

    samplers: Mapping[str, SamplerOffer]
    report: SlotReport


def compose_samplers(host: PluginHost, model: ModelUnderTest, settings: ComposeSettings) -> SamplerDecision:
    slot = SlotRecorder("select_sampler")
    samplers: dict[str, SamplerOffer] = {}
    for trial in valid_offers(host, "select_sampler", SamplerOffer, model, settings, slot):
        offer = trial.offer
        problem = _offer_problem(offer, model)
        if problem:
            slot.record(trial, CandidateStatus.REJECTED, problem)
            continue
        error = build_guard(settings, "check", sampler_error, offer, model.denoiser_inputs.get("sample"))
        if isinstance(error, Failure):
            slot.fail(trial, error)
            continue
        trial = replace(trial, numeric_error=error)
        if not error <= SAMPLER_TOLERANCE:  # NaN fails too
            reason = f"its steps differ from the written-out {offer.guidance} steps by {error:.1e}"
            slot.record(trial, CandidateStatus.REJECTED, f"{reason} (> {SAMPLER_TOLERANCE:g})")
            continue
        samplers[offer.name] = offer
        slot.record(trial, CandidateStatus.AVAILABLE, f"named by requests ({offer.guidance} guidance)")
    return SamplerDecision(MappingProxyType(samplers), slot.report([]))


def _offer_problem(offer: SamplerOffer, model: ModelUnderTest) -> str:
    """Why the offer cannot serve this model, before any of its code runs ("" when nothing)."""
    if model.info.family not in offer.families:
        return f"not made for {model.info.family.value} models"
    if offer.name in model.builtin_samplers:
        return f"the name {offer.name!r} is a built-in sampler's; offers need distinct names"
    if not isinstance(offer.guidance, GuidanceRule):
        return f"guidance must be a GuidanceRule, got {offer.guidance!r}"
    low, high = offer.guidance.guidance_range
    default = offer.default_guidance
    if default is None and offer.guidance is not GuidanceRule.CFG:
        return f"a {offer.guidance} sampler needs a default_guidance in [{low:g}, {high:g}]"
    if default is not None and not low <= default <= high:
        return f"default_guidance {default} is outside [{low:g}, {high:g}] for {offer.guidance} guidance"
    return ""


def sampler_error(offer: SamplerOffer, like: torch.Tensor | None) -> float:
    """The larger relative error of the offer's two checked steps against the written-out ones."""
    generator = torch.Generator().manual_seed(0)
    shape = tuple(like.shape) if like is not None else (2, 4, 8, 8)
    device = like.device if like is not None else torch.device("cpu")

    def noise() -> torch.Tensor:
        return torch.randn(shape, generator=generator).to(device)

    guidance = (
        offer.default_guidance if offer.default_guidance is not None else CHECK_GUIDANCE[offer.guidance]
    )
    (sigma, middle, last), x = CHECK_SIGMAS, noise() * CHECK_SIGMAS[0]
    step = offer.start()
    with torch.inference_mode():
        uncond, cond = noise(), noise()
        first = step(x, sigma, middle, uncond, cond, guidance)
        scale = guidance * sigma / (sigma - middle) if offer.guidance is GuidanceRule.CFG_PP else guidance
        euler = x + (middle - sigma) * (uncond + scale * (cond - uncond))
        uncond, cond = noise(), noise()
        final = step(first, middle, last, uncond, cond, guidance)
        data = first - middle * (uncond + guidance * (cond - uncond))
        return max(relative_error(first, euler), relative_error(final, data))
