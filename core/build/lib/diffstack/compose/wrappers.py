"""wrap_denoiser: stackable wrappers that must run and must leave the denoiser as it was."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

import torch

from diffstack.compose.slots import ModelUnderTest, SlotRecorder, build_guard, valid_offers
from diffstack.config import ComposeSettings
from diffstack.plugins import Failure, PluginHost
from diffstack.timing import relative_error
from diffstack.types import Availability, CandidateStatus, DenoiserWrapperOffer, SlotReport


@dataclass(frozen=True)
class WrapperDecision:
    """The wrappers a request may enable, by name."""

    wrappers: Mapping[str, DenoiserWrapperOffer]
    report: SlotReport


RESTORE_TOLERANCE = 1e-4
"""How far the denoiser's output may move across applying and removing a wrapper. Run-to-run noise
(another thread count, another kernel pick) moves it by about 1e-6; a hook or a cache left behind
moves it by orders of magnitude more, so exact equality would refuse correct wrappers at random."""


def compose_wrappers(host: PluginHost, model: ModelUnderTest, settings: ComposeSettings) -> WrapperDecision:
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
        verdict = build_guard(settings, "apply", _check_wrapper, offer, model)
        if isinstance(verdict, Failure):
            slot.fail(trial, verdict)
            continue
        if not verdict.ok:
            slot.record(trial, CandidateStatus.REJECTED, verdict.reason)
            continue
        wrappers[offer.name] = offer
        slot.record(trial, CandidateStatus.AVAILABLE, "enabled per request")
    return WrapperDecision(MappingProxyType(wrappers), slot.report([]))


def _check_wrapper(offer: DenoiserWrapperOffer, model: ModelUnderTest) -> Availability:
    """The wrapper must run, and removing it must leave the denoiser as it was: compared with an
    output taken just before applying it, so earlier work in the process cannot tip the check."""
    before = model.denoise()
    handle = offer.apply(model.denoiser, model.info.plugin_options(offer.name))
    try:
        handle.reset_state()
        if not torch.isfinite(model.denoise()).all():
            return Availability.no("produced non-finite output")
    finally:
        handle.remove()
    drift = relative_error(model.denoise(), before)
    if drift > RESTORE_TOLERANCE:
        return Availability.no(f"removing it did not restore the denoiser (output moved by {drift:.1e})")
    return Availability.yes()
