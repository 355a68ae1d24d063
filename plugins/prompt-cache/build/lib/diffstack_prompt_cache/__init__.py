"""Prompt cache: repeated prompts skip the text encoders. Offered as the ``prompt_cache`` encoder.

The hook only describes the offer; the cache lives in :mod:`diffstack_prompt_cache.cache`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from diffstack import (
    Availability,
    EncoderOffer,
    Ge,
    ModelInfo,
    OptionsError,
    PromptEncoder,
    hookimpl,
    parse_options,
)

PRIORITY = 1000
"""Outermost in the encoder chain: a hit must skip every other wrapper as well as the encoders."""

DEFAULT_MAX_BYTES = 256 * 2**20
"""Default bound on the cached tensors of one model (option ``max_bytes``)."""


@dataclass(frozen=True)
class PromptCacheOptions:
    """``[plugins.options.prompt_cache]``."""

    max_bytes: Annotated[int, Ge(0)] = DEFAULT_MAX_BYTES
    """Bound on the bytes of the tensors cached for one model."""


def _probe(model: ModelInfo) -> Availability:
    try:
        parse_options(PromptCacheOptions, model.plugin_options("prompt_cache"))
    except OptionsError as exc:
        return Availability.no(f"bad [plugins.options.prompt_cache]: {exc}")
    if not model.text_encoder_digest:
        return Availability.no(
            "the engine gave no text-encoder digest for this model, so cached embeddings could outlive "
            "a change of text encoder"
        )
    return Availability.yes()


def _wrap(inner: PromptEncoder, model: ModelInfo) -> PromptEncoder:
    from diffstack_prompt_cache.cache import CachingPromptEncoder

    max_bytes = parse_options(PromptCacheOptions, model.plugin_options("prompt_cache")).max_bytes
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
