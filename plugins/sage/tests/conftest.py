"""Fake ``sageattention`` modules with the real 1.0.6 and 2.2.0 signatures and input rules.

Each fake function computes exact attention on whatever it is handed and records the call, so a
wrapper's padding, slicing, scale and choice of function are right exactly when its output equals
SDPA on the unpadded inputs and the recorded call names the expected function. Signatures are copied
from thu-ml/SageAttention's ``sageattention/core.py`` (2.2.0) and the 1.0.6 wheel.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Callable, Iterable
from typing import Any

import pytest
import torch
import torch.nn.functional as F

Calls = list[dict[str, Any]]


def _exact(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention in float64: what every fake returns (cast back to the input dtype)."""
    return F.scaled_dot_product_attention(q.double(), k.double(), v.double(), scale=scale)


@pytest.fixture
def exact() -> Callable[..., torch.Tensor]:
    """The fakes' arithmetic, for the tests' references."""
    return _exact


def _v1(calls: Calls) -> types.ModuleType:
    def sageattn(q, k, v, tensor_layout="HND", is_causal=False, sm_scale=None, smooth_k=True, **kwargs):
        head_dim = q.size(-1)
        assert head_dim in [64, 96, 128], "headdim should be in [64, 96, 128]."
        assert q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1
        assert tensor_layout == "HND" and not is_causal
        calls.append(
            {"function": "sageattn", "head_dim": head_dim, "sm_scale": sm_scale, "smooth_k": smooth_k}
        )
        if smooth_k:
            k -= k.mean(dim=2, keepdim=True)  # what 1.0.6 really does: in place
        scale = sm_scale if sm_scale is not None else head_dim**-0.5
        return _exact(q, k, v, scale).to(q.dtype)

    module = types.ModuleType("sageattention")
    module.sageattn = sageattn  # type: ignore[attr-defined]
    return module


def _v2_kernel(name: str, calls: Calls) -> Callable[..., torch.Tensor]:
    """One 2.x entry point's shared rules: fp16/bf16 only, head dims up to 128 (padded to 64/128
    upstream), last dim contiguous; the output keeps the input dtype and head dim."""

    def kernel(q, k, v, tensor_layout="HND", is_causal=False, sm_scale=None, **kwargs):
        assert q.dtype in (torch.float16, torch.bfloat16), "Input tensors must be in dtype of fp16 or bf16"
        assert q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1
        head_dim = q.size(-1)
        if head_dim > 128:
            raise ValueError(f"Unsupported head_dim: {head_dim}")
        assert tensor_layout == "HND" and not is_causal
        calls.append({"function": name, "head_dim": head_dim, "sm_scale": sm_scale, **kwargs})
        scale = sm_scale if sm_scale is not None else head_dim**-0.5
        return _exact(q, k, v, scale).to(q.dtype)

    return kernel


def _v2(calls: Calls, built: Iterable[str]) -> tuple[types.ModuleType, types.ModuleType]:
    sageattn = _v2_kernel("sageattn", calls)
    fp16_triton = _v2_kernel("sageattn_qk_int8_pv_fp16_triton", calls)
    fp16_cuda = _v2_kernel("sageattn_qk_int8_pv_fp16_cuda", calls)
    fp8_cuda = _v2_kernel("sageattn_qk_int8_pv_fp8_cuda", calls)
    fp8_sm90 = _v2_kernel("sageattn_qk_int8_pv_fp8_cuda_sm90", calls)

    # The real signatures (sageattention 2.2.0, core.py); the bodies above enforce the shared rules.
    def sageattn_(q, k, v, tensor_layout="HND", is_causal=False, sm_scale=None, return_lse=False, **kwargs):
        return sageattn(q, k, v, tensor_layout, is_causal, sm_scale, **kwargs)

    def sageattn_qk_int8_pv_fp16_triton(
        q, k, v, tensor_layout="HND", quantization_backend="triton", is_causal=False, attn_mask=None,
        sm_scale=None, smooth_k=True, return_lse=False, **kwargs,
    ):  # fmt: skip
        return fp16_triton(q, k, v, tensor_layout, is_causal, sm_scale, smooth_k=smooth_k, **kwargs)

    def sageattn_qk_int8_pv_fp16_cuda(
        q, k, v, tensor_layout="HND", is_causal=False, qk_quant_gran="per_thread", sm_scale=None,
        pv_accum_dtype="fp32", smooth_k=True, smooth_v=False, return_lse=False, **kwargs,
    ):  # fmt: skip
        return fp16_cuda(q, k, v, tensor_layout, is_causal, sm_scale, smooth_k=smooth_k, **kwargs)

    def sageattn_qk_int8_pv_fp8_cuda(
        q, k, v, tensor_layout="HND", is_causal=False, qk_quant_gran="per_thread", sm_scale=None,
        pv_accum_dtype="fp32+fp16", smooth_k=True, smooth_v=False, return_lse=False, **kwargs,
    ):  # fmt: skip
        return fp8_cuda(q, k, v, tensor_layout, is_causal, sm_scale, smooth_k=smooth_k, **kwargs)

    def sageattn_qk_int8_pv_fp8_cuda_sm90(
        q, k, v, tensor_layout="HND", is_causal=False, qk_quant_gran="per_thread", sm_scale=None,
        pv_accum_dtype="fp32+fp32", smooth_k=True, return_lse=False, **kwargs,
    ):  # fmt: skip
        return fp8_sm90(q, k, v, tensor_layout, is_causal, sm_scale, smooth_k=smooth_k, **kwargs)

    core = types.ModuleType("sageattention.core")
    for flag in ("SM80_ENABLED", "SM89_ENABLED", "SM90_ENABLED"):
        setattr(core, flag, flag in built)
    module = types.ModuleType("sageattention")
    module.core = core  # type: ignore[attr-defined]
    module.sageattn = sageattn_  # type: ignore[attr-defined]
    module.sageattn_qk_int8_pv_fp16_triton = sageattn_qk_int8_pv_fp16_triton  # type: ignore[attr-defined]
    module.sageattn_qk_int8_pv_fp16_cuda = sageattn_qk_int8_pv_fp16_cuda  # type: ignore[attr-defined]
    module.sageattn_qk_int8_pv_fp8_cuda = sageattn_qk_int8_pv_fp8_cuda  # type: ignore[attr-defined]
    module.sageattn_qk_int8_pv_fp8_cuda_sm90 = sageattn_qk_int8_pv_fp8_cuda_sm90  # type: ignore[attr-defined]
    return module, core


ALL_BUILT = ("SM80_ENABLED", "SM89_ENABLED", "SM90_ENABLED")


@pytest.fixture
def fake_sage(monkeypatch: pytest.MonkeyPatch) -> Callable[..., Calls]:
    """``fake_sage("1.0.6")`` or ``fake_sage("2.2.0", built=("SM90_ENABLED",))`` puts that release's
    fake modules in ``sys.modules`` and returns the list its calls are recorded in."""

    def install(version: str, built: Iterable[str] = ALL_BUILT) -> Calls:
        calls: Calls = []
        if version.startswith("1."):
            monkeypatch.setitem(sys.modules, "sageattention", _v1(calls))
        else:
            module, core = _v2(calls, tuple(built))
            monkeypatch.setitem(sys.modules, "sageattention", module)
            monkeypatch.setitem(sys.modules, "sageattention.core", core)
        return calls

    return install
