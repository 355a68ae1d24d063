"""wrap_denoiser: stackable wrappers that must run and must leave the denoiser as it was."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

import torch

from diffstack.compose.slots import ModelUnderTest, SlotRecorder, build_guard, valid_offers
from diffstack.config import ComposeSettings
from diffstack.plugins import Failure, PluginHost
from diffstack.types import Availability, CandidateStatus, DenoiserWrapperOffer, SlotReport


@dataclass(frozen=True)
class WrapperDecision:
    """The wrappers a request may enable, by name."""

    wrappers: Mapping[str, DenoiserWrapperOffer]
    report: SlotReport


def compose_wrappers(
    host: PluginHost, model: ModelUnderTest, settings: ComposeSettings, reference: torch.Tensor
) -> WrapperDecision:
    """``reference`` is the denoiser's output with the chosen attention, before any wrapper."""
    slot = SlotRecorder("wrap_denoiser")
    wrappers: dict[str, DenoiserWrapperOffer] = {}
    for trial in valid_offers(host, "wrap_denoiser", DenoiserWrapperOffer, model, settings, slot):
        offer = trial.offer
        if model.info.denoiser_kind not in offer.denoiser_kinds:
            reason = (
                f"needs a {' or '.join(sorted(offer.denoiser_kinds))} denoiser, "
                f"this model has a {model.info.denoiser_kind}"
            )
            slot.record(trial, CandidateStatus.REJECTED, reason)
            continue
        verdict = build_guard(settings, "apply", _check_wrapper, offer, model, reference)
        if isinstance(verdict, Failure):
            slot.fail(trial, verdict)
            continue
        if not verdict.ok:
            slot.record(trial, CandidateStatus.REJECTED, verdict.reason)
            continue
        wrappers[offer.name] = offer
        slot.record(trial, CandidateStatus.AVAILABLE, "enabled per request")
    return WrapperDecision(MappingProxyType(wrappers), slot.report([]))


def _check_wrapper(
    offer: DenoiserWrapperOffer, model: ModelUnderTest, reference: torch.Tensor
) -> Availability:
    """The wrapper must run, and removing it must leave the denoiser exactly as it was."""
    handle = offer.apply(model.denoiser, model.info.plugin_options(offer.name))
    try:
        handle.reset_state()
        if not torch.isfinite(model.denoise()).all():
            return Availability.no("produced non-finite output")
    finally:
        handle.remove()
    if not torch.equal(model.denoise(), reference):
        return Availability.no("removing it did not restore the denoiser")
    return Availability.yes()
