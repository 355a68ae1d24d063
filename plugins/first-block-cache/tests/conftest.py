"""The tiny FLUX transformer both first-block-cache test modules run: two double and two single
blocks (so a cache hit has blocks to skip), 2 heads of 16, no guidance embedding."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from diffusers import FluxTransformer2DModel

from diffstack.testing import tiny_flux_transformer


def _build() -> FluxTransformer2DModel:
    torch.manual_seed(0)
    transformer: FluxTransformer2DModel = tiny_flux_transformer(2, 2, guidance=False)
    return transformer.eval()


@pytest.fixture(scope="session")
def tiny_transformer() -> Callable[[], FluxTransformer2DModel]:
    """Builds a fresh one (seeded: every build has the same weights)."""
    return _build
