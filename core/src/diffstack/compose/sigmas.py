"""build_sigmas: named schedules; ``auto`` is the highest-ranked one whose sigmas check out."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

import torch

from diffstack.compose.slots import ModelUnderTest, SlotRecorder, build_guard, valid_offers
from diffstack.config import ComposeSettings
from diffstack.plugins import Failure, PluginHost
from diffstack.types import CandidateStatus, SigmasOffer, SlotReport

SIGMAS_CHECK_STEPS = 10


@dataclass(frozen=True)
class SigmasDecision:
    """The schedules requests may name, and the one ``auto`` takes."""

    schedules: Mapping[str, SigmasOffer]
    custom: frozenset[str]
    """Schedules that pass their own sigmas (so they need a sampler that takes ``sigmas=``)."""
    auto: str
    report: SlotReport


def compose_sigmas(host: PluginHost, model: ModelUnderTest, settings: ComposeSettings) -> SigmasDecision:
    slot = SlotRecorder("build_sigmas")
    schedules: dict[str, SigmasOffer] = {}
    custom: set[str] = set()
    for trial in valid_offers(host, "build_sigmas", SigmasOffer, model, settings, slot):
        offer = trial.offer
        if model.info.family not in offer.families:
            slot.record(trial, CandidateStatus.REJECTED, f"not made for {model.info.family.value} models")
            continue
        sigmas = build_guard(settings, "build", offer.build, SIGMAS_CHECK_STEPS, model.scheduler)
        if isinstance(sigmas, Failure):
            slot.fail(trial, sigmas)
            continue
        problem = sigmas_problem(sigmas)
        if problem:
            slot.record(trial, CandidateStatus.REJECTED, problem)
            continue
        if sigmas is not None:
            custom.add(offer.name)
        if not schedules:
            slot.record(trial, CandidateStatus.CHOSEN, "the schedule `auto` takes (highest priority)")
        else:
            slot.record(trial, CandidateStatus.AVAILABLE, "named by requests")
        schedules[offer.name] = offer
    auto = next(iter(schedules), "")
    return SigmasDecision(
        MappingProxyType(schedules), frozenset(custom), auto, slot.report([auto] if auto else [])
    )


def sigmas_problem(sigmas: object, steps: int = SIGMAS_CHECK_STEPS) -> str:
    """What is wrong with a schedule's sigmas for ``steps`` steps, or "" (None means the scheduler's
    own: fine). Composition checks each offer once; request validation checks it at the request's steps."""
    if sigmas is None:
        return ""
    if not isinstance(sigmas, list | tuple) or not all(isinstance(s, int | float) for s in sigmas):
        return f"build returned {type(sigmas).__name__}, expected a list of floats or None"
    values = torch.tensor(sigmas, dtype=torch.float64)
    if len(values) != steps + 1:
        return f"gave {len(values)} sigmas for {steps} steps, expected {steps + 1}"
    if values[-1] != 0 or not bool((values[:-1] > values[1:]).all()):
        return "sigmas must descend strictly and end in 0"
    return ""
