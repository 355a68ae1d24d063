"""SpargeAttn offered to the host for the attention shapes its block-sparse kernels serve."""

from __future__ import annotations

from diffstack import AttentionOffer, ModelInfo, hookimpl
from diffstack_sparge.support import build, probe, supports


@hookimpl
def select_attention(model: ModelInfo) -> list[AttentionOffer]:
    return [
        AttentionOffer(
            name="sparge",
            # Sparse and quantized, so the lossiest offer: any measured tie goes to an exact kernel.
            priority=-20,
            description="SpargeAttn: block-sparse SageAttention2 (topk or cdf blocks); head dims 64 and 128",
            probe=probe,
            build=build,
            supports=supports,
        )
    ]
