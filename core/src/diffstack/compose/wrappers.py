"""wrap_denoiser: stackable wrappers that must run and must leave the denoiser as it was."""

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
    Availability,
    CandidateStatus,
    DenoiserWrapperOffer,
)


def compose_wrappers(host: PluginHost, model: ModelUnderTest, stack: ComposedStack) -> None:
    slot = SlotRecorder("wrap_denoiser")
    for source, offer in valid_offers(host, "wrap_denoiser", DenoiserWrapperOffer, model, slot):
        if model.info.denoiser_kind not in offer.denoiser_kinds:
            slot.add(
                source,
                CandidateStatus.REJECTED,
                f"needs a {' or '.join(sorted(offer.denoiser_kinds))} denoiser, "
                f"this model has a {model.info.denoiser_kind}",
            )
            continue
        verdict = guard("apply", _check_wrapper, offer, model)
        if isinstance(verdict, str):
            slot.add(source, CandidateStatus.FAILED, verdict)
            continue
        if not verdict.ok:
            slot.add(source, CandidateStatus.REJECTED, verdict.reason)
            continue
        stack.wrappers[offer.name] = offer
        slot.add(source, CandidateStatus.AVAILABLE, "enabled per request")
    stack.slots.append(slot.report())


def _check_wrapper(offer: DenoiserWrapperOffer, model: ModelUnderTest) -> Availability:
    """The wrapper must run, and removing it must leave the denoiser exactly as it was."""
    handle = offer.apply(model.denoiser, model.info.plugin_options(offer.name))
    try:
        handle.reset_state()
        with torch.inference_mode():
            output = model.denoiser(**model.denoiser_inputs, return_dict=False)[0]
        if not torch.isfinite(output).all():
            return Availability.no("produced non-finite output")
    finally:
        handle.remove()
    with torch.inference_mode():
        after = model.denoiser(**model.denoiser_inputs, return_dict=False)[0]
    if not torch.equal(after, model.reference_output):
        return Availability.no("removing it did not restore the denoiser")
    return Availability.yes()
