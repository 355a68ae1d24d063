"""build_sigmas: named schedules; ``auto`` is the highest-priority one whose sigmas check out."""

from __future__ import annotations

import torch

from diffstack.compose.slots import (
    ComposedStack,
    ModelUnderTest,
    SlotRecorder,
    guard,
    valid_offers,
)
from diffstack.plugins import PluginHost
from diffstack.types import (
    CandidateStatus,
    SigmasOffer,
)


def compose_sigmas(host: PluginHost, model: ModelUnderTest, stack: ComposedStack) -> None:
    slot = SlotRecorder("build_sigmas")
    for source, offer in valid_offers(host, "build_sigmas", SigmasOffer, model, slot):
        if model.info.family not in offer.families:
            slot.add(source, CandidateStatus.REJECTED, f"not made for {model.info.family.value} models")
            continue
        if offer.name in stack.schedules:
            slot.add(
                source,
                CandidateStatus.REJECTED,
                f"another plugin already offers a schedule named {offer.name!r}",
            )
            continue
        sigmas = guard("build", offer.build, SIGMAS_CHECK_STEPS, model.scheduler)
        if isinstance(sigmas, str):
            slot.add(source, CandidateStatus.FAILED, sigmas)
            continue
        problem = _check_sigmas(sigmas)
        if problem:
            slot.add(source, CandidateStatus.REJECTED, problem)
            continue
        stack.schedules[offer.name] = offer
        if sigmas is not None:
            stack.custom_schedules.add(offer.name)
        if not stack.auto_schedule:
            stack.auto_schedule = offer.name
            slot.chosen.append(offer.name)
            slot.add(source, CandidateStatus.CHOSEN, "the schedule `auto` takes (highest priority)")
        else:
            slot.add(source, CandidateStatus.AVAILABLE, "named by requests")
    stack.slots.append(slot.report())


SIGMAS_CHECK_STEPS = 10


def _check_sigmas(sigmas: list[float] | None, steps: int = SIGMAS_CHECK_STEPS) -> str:
    """What is wrong with a schedule's sigmas, or "" (None means the scheduler's own: fine)."""
    if sigmas is None:
        return ""
    values = torch.tensor(sigmas, dtype=torch.float64)
    if len(values) != steps + 1:
        return f"gave {len(values)} sigmas for {steps} steps, expected {steps + 1}"
    if values[-1] != 0 or not bool((values[:-1] > values[1:]).all()):
        return "sigmas must descend strictly and end in 0"
    return ""
