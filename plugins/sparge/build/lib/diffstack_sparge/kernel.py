"""SpargeAttn behind the host's kernel contract: SDPA layout, no mask, scale 1/sqrt(head_dim)."""

from __future__ import annotations

import torch

from diffstack import AttentionFn
from diffstack_sparge.config import SpargeConfig


def sparge_attention(config: SpargeConfig) -> AttentionFn:
    """The installed ``spas_sage_attn`` kernel for ``config``'s method, as an SDPA-layout kernel."""
    import spas_sage_attn

    if config.method == "topk":
        kernel = spas_sage_attn.spas_sage2_attn_meansim_topk_cuda
    else:
        kernel = spas_sage_attn.spas_sage2_attn_meansim_cuda
    arguments = config.kernel_arguments()

    def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        out = kernel(
            query,
            key,
            value,
            is_causal=False,
            scale=query.shape[-1] ** -0.5,
            # upstream reads K's mean unconditionally; smooth_k=False leaves it unassigned (NameError).
            smooth_k=True,
            tensor_layout="HND",
            **arguments,
        )
        # The kernels compute fp32 inputs in fp16 and return that; callers get their own dtype back.
        return out.to(query.dtype)

    return attention
