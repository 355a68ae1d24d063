"""encode_prompt: chain the wrappers; each must return exactly the pipeline's own embeddings."""

from __future__ import annotations

from diffstack.compose.slots import (
    ComposedStack,
    ModelUnderTest,
    SlotRecorder,
    guard,
    valid_offers,
)
from diffstack.plugins import PluginHost
from diffstack.timing import relative_error
from diffstack.types import (
    CandidateStatus,
    EncoderOffer,
    PromptEmbeddings,
    PromptEncoder,
    PromptSpec,
)

CHECK_PROMPT = PromptSpec("a red circle at the top left", "blurry")


def _encode_twice(encoder: PromptEncoder) -> list[PromptEmbeddings]:
    """Twice, so a cache is checked on its hit as well as its miss."""
    return [encoder(CHECK_PROMPT) for _ in range(2)]


def compose_encoder(host: PluginHost, model: ModelUnderTest, stack: ComposedStack) -> None:
    slot = SlotRecorder("encode_prompt")
    reference = model.base_encoder(CHECK_PROMPT)
    encoder = model.base_encoder
    for source, offer in reversed(valid_offers(host, "encode_prompt", EncoderOffer, model, slot)):
        wrapped = guard("wrap", offer.wrap, encoder, model.info)
        if isinstance(wrapped, str):
            slot.add(source, CandidateStatus.FAILED, wrapped)
            continue
        outputs = guard("encode", _encode_twice, wrapped)
        if isinstance(outputs, str):
            slot.add(source, CandidateStatus.FAILED, outputs)
            continue
        error = max(relative_error(out[k], reference[k]) for out in outputs for k in reference)
        if error > 0:
            slot.add(
                source,
                CandidateStatus.REJECTED,
                f"embeddings differ from the pipeline's own (relative error {error:.2e})",
                numeric_error=error,
            )
            continue
        encoder = wrapped
        stack.encoder_chain.append(wrapped)
        slot.chosen.insert(0, offer.name)
        slot.add(source, CandidateStatus.CHOSEN, "wraps the pipeline's encoder", numeric_error=error)
    stack.encoder = encoder
    stack.slots.append(slot.report())
