"""encode_prompt: chain the wrappers; each must return exactly the pipeline's own embeddings."""

from __future__ import annotations

from dataclasses import dataclass, replace

from diffstack.compose.slots import ModelUnderTest, SlotRecorder, build_guard, valid_offers
from diffstack.config import ComposeSettings
from diffstack.plugins import Failure, PluginHost
from diffstack.timing import relative_error
from diffstack.types import (
    CandidateStatus,
    EncoderOffer,
    PromptEmbeddings,
    PromptEncoder,
    PromptSpec,
    SlotReport,
)

CHECK_PROMPT = PromptSpec("a red circle at the top left", "blurry")


@dataclass(frozen=True)
class EncoderDecision:
    """The outermost encoder requests use, and the wrappers it chains (innermost first)."""

    encoder: PromptEncoder
    chain: tuple[PromptEncoder, ...]
    report: SlotReport


def _encode_twice(encoder: PromptEncoder) -> list[PromptEmbeddings]:
    """Twice, so a cache is checked on its hit as well as its miss."""
    return [encoder(CHECK_PROMPT) for _ in range(2)]


def compose_encoder(host: PluginHost, model: ModelUnderTest, settings: ComposeSettings) -> EncoderDecision:
    slot = SlotRecorder("encode_prompt")
    reference = model.base_encoder(CHECK_PROMPT)
    encoder = model.base_encoder
    chain: list[PromptEncoder] = []
    chosen: list[str] = []
    for trial in reversed(valid_offers(host, "encode_prompt", EncoderOffer, model, settings, slot)):
        wrapped = build_guard(settings, "wrap", trial.offer.wrap, encoder, model.info)
        if isinstance(wrapped, Failure):
            slot.fail(trial, wrapped)
            continue
        outputs = build_guard(settings, "encode", _encode_twice, wrapped)
        if isinstance(outputs, Failure):
            slot.fail(trial, outputs)
            continue
        error = max(relative_error(out[k], reference[k]) for out in outputs for k in reference)
        checked = replace(trial, numeric_error=error)
        if error > 0:
            reason = f"embeddings differ from the pipeline's own (relative error {error:.2e})"
            slot.record(checked, CandidateStatus.REJECTED, reason)
            continue
        encoder = wrapped
        chain.append(wrapped)
        chosen.insert(0, trial.offer.name)
        slot.record(checked, CandidateStatus.CHOSEN, "wraps the pipeline's encoder")
    return EncoderDecision(encoder, tuple(chain), slot.report(chosen))
