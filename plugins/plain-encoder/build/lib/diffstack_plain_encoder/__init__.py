"""The pipeline's own prompt encoder, unwrapped: the reference the encode_prompt chain starts from."""

from __future__ import annotations

from diffstack import EncoderOffer, ModelInfo, PromptEncoder, hookimpl


def _unwrapped(inner: PromptEncoder, model: ModelInfo) -> PromptEncoder:
    return inner


@hookimpl
def encode_prompt(model: ModelInfo) -> list[EncoderOffer]:
    return [EncoderOffer(name="plain", description="the pipeline's own encode_prompt", wrap=_unwrapped)]
