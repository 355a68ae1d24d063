"""The reference attention offer: SDPA for UNets, diffusers' native backend for transformers."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import diffstack_sdpa
from diffstack.types import DenoiserKind, Family, ModelInfo


def test_sdpa_offer_is_pytorch_sdpa_and_the_native_backend() -> None:
    model = ModelInfo("m", Family.FLUX, DenoiserKind.TRANSFORMER, "cpu", torch.float32)
    (offer,) = diffstack_sdpa.select_attention(model=model)
    q, k, v = (torch.randn(1, 2, 8, 16) for _ in range(3))
    assert torch.equal(offer.build(model)(q, k, v), F.scaled_dot_product_attention(q, k, v))
    assert offer.diffusers_backend == "native"
    assert offer.probe(model).ok


def test_the_host_accepts_the_offer_on_a_tiny_model() -> None:
    """Through the host's own checks, as plugin authors test theirs (diffstack.testing)."""
    from diffstack.testing import assert_offer_passes

    assert assert_offer_passes(diffstack_sdpa, offer="sdpa")
