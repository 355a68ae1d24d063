"""Eager execution hands the denoiser back untouched."""

from __future__ import annotations

import torch

import diffstack_eager
from diffstack.types import CompileTarget, DenoiserKind, Family, ModelInfo


def test_eager_returns_the_same_module() -> None:
    model = ModelInfo("m", Family.SD1, DenoiserKind.UNET, "cpu", torch.float32)
    offer, _ = diffstack_eager.compile_model(model=model)
    module = torch.nn.Linear(2, 2)
    assert offer.target is CompileTarget.DENOISER
    assert offer.build(module, model) is module


def test_the_eager_decode_is_the_vaes_own() -> None:
    from diffstack.testing import build_tiny_pipeline

    pipe = build_tiny_pipeline(Family.SD1, 0)
    model = ModelInfo("m", Family.SD1, DenoiserKind.UNET, "cpu", torch.float32)
    _, offer = diffstack_eager.compile_model(model=model)
    assert offer.target is CompileTarget.VAE_DECODE
    latents = torch.randn(1, pipe.vae.config.latent_channels, 8, 8)
    with torch.no_grad():
        expected = pipe.vae.decode(latents, return_dict=False)[0]
        assert torch.equal(offer.build(pipe.vae, model)(latents), expected)


def test_the_host_accepts_the_offer_on_a_tiny_model() -> None:
    """Through the host's own checks, as plugin authors test theirs (diffstack.testing)."""
    from diffstack.testing import assert_offer_passes

    assert assert_offer_passes(diffstack_eager, offer="eager")
