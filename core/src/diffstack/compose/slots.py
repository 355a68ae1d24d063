"""What every slot's decision shares: the model under test, the stack being built, the
candidate bookkeeping, fault isolation and the fastest-within-tolerance rule."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import structlog
import torch

from diffstack.plugins import OfferFrom, PluginHost
from diffstack.types import (
    AttentionFn,
    AttentionShape,
    CandidateReport,
    CandidateStatus,
    DenoiserWrapperOffer,
    ModelInfo,
    Offer,
    PromptEncoder,
    SigmasOffer,
    SlotReport,
)

log = structlog.get_logger(__name__)
OfferT = TypeVar("OfferT", bound=Offer)
ResultT = TypeVar("ResultT")


@dataclass
class ModelUnderTest:
    """What composition needs of the loaded model: its facts and a way to call its denoiser."""

    info: ModelInfo
    denoiser: torch.nn.Module
    denoiser_inputs: dict[str, Any]
    reference_output: torch.Tensor
    module_shapes: dict[str, AttentionShape]
    base_encoder: PromptEncoder
    scheduler: Any
    measure: bool


@dataclass
class ComposedStack:
    """The decisions, ready for the engine to apply, and the report that explains them."""

    slots: list[SlotReport] = field(default_factory=list)
    attention_plan: dict[str, tuple[str, AttentionFn]] = field(default_factory=dict)
    attention_backend: str | None = None
    compiled: torch.nn.Module | None = None
    schedules: dict[str, SigmasOffer] = field(default_factory=dict)
    custom_schedules: set[str] = field(default_factory=set)
    """Schedules that pass their own sigmas (so they need a sampler that takes ``sigmas=``)."""
    auto_schedule: str = ""
    encoder: PromptEncoder | None = None
    encoder_chain: list[Any] = field(default_factory=list)
    wrappers: dict[str, DenoiserWrapperOffer] = field(default_factory=dict)


class SlotRecorder:
    """Collects one slot's candidate reports while it is decided."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.candidates: list[CandidateReport] = []
        self.chosen: list[str] = []

    def add(
        self, source: OfferFrom | None, status: CandidateStatus, reason: str = "", **numbers: Any
    ) -> None:
        offer = source.offer if source else None
        self.candidates.append(
            CandidateReport(
                plugin=source.plugin if source else "",
                offer=offer.name if offer else "",
                priority=offer.priority if offer else 0,
                status=status,
                reason=reason,
                **numbers,
            )
        )

    def report(self) -> SlotReport:
        return SlotReport(self.name, tuple(self.chosen), tuple(self.candidates))


def valid_offers(
    host: PluginHost, hook: str, offer_type: type[OfferT], model: ModelUnderTest, slot: SlotRecorder
) -> list[tuple[OfferFrom, OfferT]]:
    """Offers of the right type whose probe says yes; everything else is recorded in ``slot``."""
    sources, failures = host.collect(hook, model=model.info)
    for failure in failures:
        slot.candidates.append(
            CandidateReport(failure.plugin, "", 0, CandidateStatus.FAILED, f"hook raised: {failure.error}")
        )
    valid: list[tuple[OfferFrom, OfferT]] = []
    for source in sources:
        if not isinstance(source.offer, offer_type):
            slot.add(
                source,
                CandidateStatus.FAILED,
                f"returned {type(source.offer).__name__}, expected {offer_type.__name__}",
            )
            continue
        availability = guard("probe", source.offer.probe, model.info)
        if isinstance(availability, str):
            slot.add(source, CandidateStatus.FAILED, availability)
        elif not availability.ok:
            slot.add(source, CandidateStatus.REJECTED, availability.reason)
        else:
            valid.append((source, source.offer))
    return sorted(valid, key=lambda pair: -pair[1].priority)


def guard(stage: str, fn: Callable[..., ResultT], *args: Any) -> ResultT | str:
    """Run a plugin's code; an exception becomes a reason string instead of escaping."""
    try:
        return fn(*args)
    except Exception as exc:
        return f"{stage} raised {type(exc).__name__}: {exc}"


def pick_fastest(
    timed: list[tuple[OfferFrom, float | None]], tie_fraction: float
) -> tuple[OfferFrom, dict[int, str]]:
    """The fastest offer, priority breaking ties within ``tie_fraction``; reasons for the rest."""
    measured = [t for _, t in timed if t is not None]
    if not measured:
        return timed[0][0], {i: "lower priority (timing skipped)" for i in range(1, len(timed))}
    fastest = min(measured)
    tied = [i for i, (_, t) in enumerate(timed) if t is not None and t <= fastest * (1 + tie_fraction)]
    winner = tied[0]  # ``timed`` is in priority order
    reasons = {
        i: f"{t / fastest:.2f}x the fastest" if t is not None and i not in tied else "tied, lower priority"
        for i, (_, t) in enumerate(timed)
        if i != winner
    }
    return timed[winner][0], reasons
