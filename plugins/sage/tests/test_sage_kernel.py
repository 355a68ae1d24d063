"""The kernel wrapper against fake ``sageattention`` modules with the real signatures (CPU).

Each fake computes exact attention on whatever it is handed, so the wrapper's padding, slicing and
scale are right exactly when its output equals SDPA on the unpadded inputs.
"""

from __future__ import annotations

import sys
import types
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from packaging.version import Version

from diffstack_sage import support
from diffstack_sage.kernel import sage_attention

HEAD_DIMS = (40, 64, 80, 96, 128)


def exact(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    return F.scaled_dot_product_attention(q.double(), k.double(), v.double(), scale=scale)


def fake_v1(calls: list[dict[str, Any]]) -> types.ModuleType:
    """sageattention 1.0.6's ``sageattn`` signature and input rules, exact arithmetic."""

    def sageattn(q, k, v, tensor_layout="HND", is_causal=False, sm_scale=None, smooth_k=True, **kwargs):
        head_dim = q.size(-1)
        assert head_dim in [64, 96, 128], "headdim should be in [64, 96, 128]."
        assert q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1
        assert tensor_layout == "HND" and not is_causal
        calls.append({"head_dim": head_dim, "sm_scale": sm_scale, "smooth_k": smooth_k})
        if smooth_k:
            k -= k.mean(dim=2, keepdim=True)  # what 1.0.6 really does: in place
        scale = sm_scale if sm_scale is not None else head_dim**-0.5
        return exact(q, k, v, scale).to(q.dtype)

    module = types.ModuleType("sageattention")
    module.sageattn = sageattn  # type: ignore[attr-defined]
    return module


def fake_v2(calls: list[dict[str, Any]]) -> types.ModuleType:
    """sageattention 2.x's auto-dispatch ``sageattn`` signature and input rules, exact arithmetic."""

    def sageattn(q, k, v, tensor_layout="HND", is_causal=False, sm_scale=None, return_lse=False, **kwargs):
        assert q.dtype in (torch.float16, torch.bfloat16), "Input tensors must be in dtype of fp16 or bf16"
        head_dim = q.size(-1)
        if head_dim > 128:
            raise ValueError(f"Unsupported head_dim: {head_dim}")
        calls.append({"head_dim": head_dim, "sm_scale": sm_scale, **kwargs})
        scale = sm_scale if sm_scale is not None else head_dim**-0.5
        return exact(q, k, v, scale).to(q.dtype)

    module = types.ModuleType("sageattention")
    module.sageattn = sageattn  # type: ignore[attr-defined]
    return module


def qkv(head_dim: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(head_dim)
    return tuple(torch.randn(2, 3, 70, head_dim, generator=generator).to(dtype) for _ in range(3))  # type: ignore[return-value]


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_v1_pads_to_64_96_128_keeps_the_scale_and_leaves_inputs_alone(
    head_dim: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[dict[str, Any]] = []
    monkeypatch.setitem(sys.modules, "sageattention", fake_v1(calls))
    attention = sage_attention(Version("1.0.6"))
    q, k, v = qkv(head_dim, torch.float16)
    key_before = k.clone()

    out = attention(q, k, v)

    assert out.shape == q.shape and out.dtype == q.dtype
    torch.testing.assert_close(out, exact(q, k, v, head_dim**-0.5).half(), atol=2e-3, rtol=2e-3)
    assert torch.equal(k, key_before)  # 1.0.6 subtracts K's mean in place; the wrapper must not let it
    [call] = calls
    assert call["head_dim"] == {40: 64, 80: 96}.get(head_dim, head_dim)
    assert call["sm_scale"] == pytest.approx(head_dim**-0.5)
    assert call["smooth_k"] is False


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_v2_pads_to_64_128_and_runs_float32_callers_in_half(
    head_dim: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[dict[str, Any]] = []
    monkeypatch.setitem(sys.modules, "sageattention", fake_v2(calls))
    attention = sage_attention(Version("2.2.0"))
    q, k, v = qkv(head_dim, torch.float32)

    out = attention(q, k, v)

    assert out.shape == q.shape and out.dtype == torch.float32
    reference = exact(q.half(), k.half(), v.half(), head_dim**-0.5)
    torch.testing.assert_close(out.double(), reference, atol=2e-3, rtol=2e-3)
    [call] = calls
    assert call["head_dim"] == (64 if head_dim <= 64 else 128)
    assert call["sm_scale"] == pytest.approx(head_dim**-0.5)


def test_build_through_the_offer_uses_the_installed_generation(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict[str, Any]] = []
    monkeypatch.setitem(sys.modules, "sageattention", fake_v1(calls))
    monkeypatch.setattr(support, "installed_version", lambda: Version("1.0.6"))
    attention = support.build(None)  # type: ignore[arg-type]  (build does not read the model)
    attention(*qkv(80, torch.float16))
    assert calls[0]["head_dim"] == 96


def test_a_head_dim_over_128_is_refused_loudly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "sageattention", fake_v1([]))
    attention = sage_attention(Version("1.0.6"))
    with pytest.raises(ValueError, match="up to 128, got 160"):
        attention(*qkv(160, torch.float16))
