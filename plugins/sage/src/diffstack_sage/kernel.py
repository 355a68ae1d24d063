"""SageAttention behind the host's kernel contract: SDPA layout, no mask, scale 1/sqrt(head_dim).

Both generations are called through their public ``sageattn``. Head dims the kernels lack are padded
with zeros (zeros add nothing to q·k nor to the output columns kept) and the output is sliced back;
the softmax scale is passed explicitly so it stays 1/sqrt of the *original* head dim.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from packaging.version import Version

from diffstack import AttentionFn
from diffstack_sage.config import KERNELS

HEAD_DIMS_V1 = (64, 96, 128)
"""sageattention 1.x (Triton) asserts one of these."""
HEAD_DIMS_V2 = (64, 128)
"""sageattention 2.x pads to these itself; padding here first keeps one code path for both."""
HALF = (torch.float16, torch.bfloat16)


def sage_attention(version: Version, kernel: str = "auto") -> AttentionFn:
    """The installed SageAttention as an SDPA-layout kernel: ``sageattn`` (``auto``) or the 2.x kernel
    that ``kernel`` names (see :data:`diffstack_sage.config.KERNELS`)."""
    import sageattention

    if version.major >= 2:
        function = getattr(sageattention, KERNELS[kernel].function)
        # 2.x smooths K out of place (it hands K's mean to its quantizer), so its default stays on.
        return padded_attention(function, HEAD_DIMS_V2, smooth_key_here=False)
    if kernel != "auto":
        raise ValueError(f"sageattention {version} has only sageattn; kernel {kernel!r} needs 2.x")
    return padded_attention(sageattention.sageattn, HEAD_DIMS_V1, smooth_key_here=True)


def padded_attention(
    kernel: Callable[..., torch.Tensor], widths: Sequence[int], smooth_key_here: bool
) -> AttentionFn:
    """Wrap ``kernel`` (``sageattn``'s signature) so any head dim up to ``max(widths)`` works.

    ``smooth_key_here``: sageattention 1.x smooths K by subtracting its mean *in place* on the
    caller's tensor (``k -= km``); doing the same subtraction out of place here and passing
    ``smooth_k=False`` keeps the accuracy benefit without mutating the caller's key.
    """

    def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        head_dim = query.shape[-1]
        width = _width(head_dim, widths)
        dtype = query.dtype
        if dtype not in HALF:  # 2.x accepts only fp16/bf16; fp16 keeps 1.x on its fast path too
            query, key, value = query.half(), key.half(), value.half()
        extra: dict[str, Any] = {}
        if smooth_key_here:
            key = key - key.mean(dim=-2, keepdim=True)
            extra["smooth_k"] = False
        out = kernel(
            _pad(query, width),
            _pad(key, width),
            _pad(value, width),
            tensor_layout="HND",
            is_causal=False,
            sm_scale=head_dim**-0.5,
            **extra,
        )
        return out[..., :head_dim].to(dtype)

    return attention


def _width(head_dim: int, widths: Sequence[int]) -> int:
    fitting = [w for w in widths if w >= head_dim]
    if not fitting:
        raise ValueError(f"SageAttention supports head dims up to {max(widths)}, got {head_dim}")
    return min(fitting)


def _pad(tensor: torch.Tensor, width: int) -> torch.Tensor:
    """Zero-pad the head dim to ``width``; the kernels also need the last dim contiguous."""
    if tensor.shape[-1] == width:
        return tensor if tensor.stride(-1) == 1 else tensor.contiguous()
    return F.pad(tensor, (0, width - tensor.shape[-1]))
