"""The tiny FLUX transformer both first-block-cache test modules run: two double and two single
blocks (so a cache hit has blocks to skip), 2 heads of 16, no guidance embedding."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from diffusers import FluxTransformer2DModel


def _build() -> FluxTransformer2DModel:
    torch.manual_seed(0)
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=(4, 6, 6),
    ).eval()


@pytest.fixture(scope="session")
def tiny_transformer() -> Callable[[], FluxTransformer2DModel]:
    """Builds a fresh one (seeded: every build has the same weights)."""
    return _build
