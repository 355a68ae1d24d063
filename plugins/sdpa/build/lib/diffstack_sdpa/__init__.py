"""PyTorch's scaled dot-product attention: the reference every other kernel is checked against."""

from __future__ import annotations

from diffstack import AttentionFn, AttentionOffer, ModelInfo, hookimpl


def _build(model: ModelInfo) -> AttentionFn:
    import torch.nn.functional as F

    return F.scaled_dot_product_attention


@hookimpl
def select_attention(model: ModelInfo) -> list[AttentionOffer]:
    return [
        AttentionOffer(
            name="sdpa",
            description="PyTorch SDPA (cuDNN, flash, efficient or math, as PyTorch picks)",
            build=_build,
            diffusers_backend="native",
        )
    ]
