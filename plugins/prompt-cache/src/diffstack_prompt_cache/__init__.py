"""Prompt cache: repeated prompts skip the text encoders. Offered as the ``prompt_cache`` encoder.

The hook only describes the offer; the cache lives in :mod:`diffstack_prompt_cache.cache`.
"""

from __future__ import annotations

from diffstack import Availability, EncoderOffer, ModelInfo, PromptEncoder, hookimpl

PRIORITY = 1000
"""Outermost in the encoder chain: a hit must skip every other wrapper as well as the encoders."""

DEFAULT_MAX_BYTES = 256 * 2**20
"""Default bound on the cached tensors of one model (option ``max_bytes``)."""


def _probe(model: ModelInfo) -> Availability:
    if not model.text_encoder_digest:
        return Availability.no(
            "the engine gave no text-encoder digest for this model, so cached embeddings could outlive "
            "a change of text encoder"
        )
    return Availability.yes()


def _wrap(inner: PromptEncoder, model: ModelInfo) -> PromptEncoder:
    from diffstack_prompt_cache.cache import CachingPromptEncoder

    max_bytes = int(model.plugin_options("prompt_cache").get("max_bytes", DEFAULT_MAX_BYTES))
    return CachingPromptEncoder(inner, model_key=(model.text_encoder_digest, model.name), max_bytes=max_bytes)


@hookimpl
def encode_prompt(model: ModelInfo) -> list[EncoderOffer]:
    return [
        EncoderOffer(
            name="prompt_cache",
            priority=PRIORITY,
            description="LRU cache of prompt embeddings, bounded in bytes",
            probe=_probe,
            wrap=_wrap,
        )
    ]
