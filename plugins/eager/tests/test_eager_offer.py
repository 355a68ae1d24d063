"""Eager execution hands the denoiser back untouched."""

from __future__ import annotations

import torch

import diffstack_eager
from diffstack.types import DenoiserKind, Family, ModelInfo


def test_eager_returns_the_same_module() -> None:
    model = ModelInfo("m", Family.SD1, DenoiserKind.UNET, "cpu", torch.float32)
    (offer,) = diffstack_eager.compile_model(model=model)
    module = torch.nn.Linear(2, 2)
    assert offer.build(module, model) is module


def test_the_host_accepts_the_offer_on_a_tiny_model() -> None:
    """Through the host's own checks, as plugin authors test theirs (diffstack.testing)."""
    from diffstack.testing import assert_offer_passes

    assert assert_offer_passes(diffstack_eager, offer="eager")
