"""The kernel wrapper against a fake ``spas_sage_attn`` with upstream's signatures (CPU).

The real kernels were not run here (no GPU, and the package is not on PyPI); the fake follows the
upstream code's argument list, input checks and dtype behaviour, and computes dense exact attention.
"""

from __future__ import annotations

import sys
import types
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from diffstack.types import DenoiserKind, Family, ModelInfo
from diffstack_sparge import support


def _dense(q, k, v, scale):
    dtype = torch.float16 if q.dtype in (torch.float32, torch.float16) else torch.bfloat16
    out = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), scale=scale)
    return out.to(dtype)  # upstream: o = torch.empty_like(q) after casting q to fp16/bf16


def fake_module(calls: list[dict[str, Any]]) -> types.ModuleType:
    def spas_sage2_attn_meansim_topk_cuda(
        q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, smooth_k=True,
        simthreshd1=-0.1, cdfthreshd=None, topk=0.5, pvthreshd=50, attention_sink=False,
        tensor_layout="HND", output_dtype=torch.float16, return_sparsity=False,
    ):  # fmt: skip
        assert tensor_layout == "HND" and q.size(-2) >= 128 and q.size(-1) in (64, 128)
        calls.append(dict(fn="topk", topk=topk, simthreshd1=simthreshd1, pvthreshd=pvthreshd, scale=scale))
        assert smooth_k and not is_causal
        return _dense(q, k, v, scale)

    def spas_sage2_attn_meansim_cuda(
        q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, smooth_k=True,
        simthreshd1=0.6, cdfthreshd=0.98, pvthreshd=50, attention_sink=False,
        tensor_layout="HND", output_dtype=torch.float16, return_sparsity=False,
    ):  # fmt: skip
        assert tensor_layout == "HND" and q.size(-2) >= 128 and q.size(-1) in (64, 128)
        calls.append(dict(fn="cdf", cdfthreshd=cdfthreshd, simthreshd1=simthreshd1, pvthreshd=pvthreshd))
        assert smooth_k and not is_causal
        return _dense(q, k, v, scale)

    module = types.ModuleType("spas_sage_attn")
    module.spas_sage2_attn_meansim_topk_cuda = spas_sage2_attn_meansim_topk_cuda  # type: ignore[attr-defined]
    module.spas_sage2_attn_meansim_cuda = spas_sage2_attn_meansim_cuda  # type: ignore[attr-defined]
    return module


def model_with(options: dict[str, Any]) -> ModelInfo:
    return ModelInfo(
        "m", Family.FLUX, DenoiserKind.TRANSFORMER, "cuda", torch.bfloat16, options={"sparge": options}
    )


def qkv(head_dim: int, dtype: torch.dtype):
    generator = torch.Generator().manual_seed(head_dim)
    return tuple(torch.randn(1, 2, 192, head_dim, generator=generator).to(dtype) for _ in range(3))


@pytest.mark.parametrize("head_dim", [64, 128])
def test_topk_by_default_with_the_configured_sparsity(head_dim: int, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict[str, Any]] = []
    monkeypatch.setitem(sys.modules, "spas_sage_attn", fake_module(calls))
    attention = support.build(model_with({"topk": 0.3}))
    q, k, v = qkv(head_dim, torch.bfloat16)

    out = attention(q, k, v)

    assert out.dtype == torch.bfloat16 and out.shape == q.shape
    reference = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    torch.testing.assert_close(out.double(), reference, atol=1e-2, rtol=1e-2)
    scale = pytest.approx(head_dim**-0.5)
    assert calls == [{"fn": "topk", "topk": 0.3, "simthreshd1": -0.1, "pvthreshd": 50, "scale": scale}]


def test_cdf_method_and_float32_callers_get_float32_back(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict[str, Any]] = []
    monkeypatch.setitem(sys.modules, "spas_sage_attn", fake_module(calls))
    attention = support.build(
        model_with({"method": "cdf", "cdfthreshd": 0.9, "simthreshd1": 0.5, "pvthreshd": 20})
    )

    out = attention(*qkv(64, torch.float32))

    assert out.dtype == torch.float32
    [call] = calls
    assert (call["fn"], call["cdfthreshd"], call["simthreshd1"], call["pvthreshd"]) == ("cdf", 0.9, 0.5, 20)
