"""The plain encoder leaves the pipeline's own encoder unwrapped."""

from __future__ import annotations

import torch

import diffstack_plain_encoder
from diffstack.types import DenoiserKind, Family, ModelInfo, PromptSpec


def test_plain_encoder_is_the_inner_encoder() -> None:
    model = ModelInfo("m", Family.SD1, DenoiserKind.UNET, "cpu", torch.float32)
    (offer,) = diffstack_plain_encoder.encode_prompt(model=model)

    def inner(spec: PromptSpec) -> dict[str, torch.Tensor]:
        return {"prompt_embeds": torch.zeros(1)}

    assert offer.wrap(inner, model) is inner


def test_the_host_accepts_the_offer_on_a_tiny_model() -> None:
    """Through the host's own checks, as plugin authors test theirs (diffstack.testing)."""
    from diffstack.testing import assert_offer_passes

    assert assert_offer_passes(diffstack_plain_encoder, offer="plain")
